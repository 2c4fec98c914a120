"""Prototype: fuse the dynamo exporter's decomposed scaled-dot-product attention into ONNX Runtime's
com.microsoft.MultiHeadAttention, whose CPU kernel tiles the softmax (flash attention) instead of
materialising [batch, heads, S, S] scores. At 512x512 SD1.5's first-level self-attention has
S = 4096: 2 x 8 x 4096^2 fp32 = 1 GiB of scores per call without fusion.

The exporter's pattern (torch 2.13, opset 20), per attention:
    q4 = Transpose[0,2,1,3](Reshape(q3))                    q3: [B, S, C]
    kT = Reshape(Transpose[0,2,1](Reshape(Transpose[0,2,1,3](Reshape(k3)))))  -> [B, H, D, Skv]
    out3 = Reshape(Transpose[0,2,1,3](MatMul(Softmax(MatMul(q4 * a, kT * b)), v4)))
becomes MultiHeadAttention(q3, k3, v3, num_heads=H, scale=a*b) -> out3. The graph is written
beside a hard link to the original weights file; nothing in the engine directory changes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from diffusion_engine.benchmarks import flops
from diffusion_engine.engine.atomic import write_atomic

logger = logging.getLogger(__name__)

_VIEW_OPS = ("Reshape", "Transpose")


class _Graph:
    def __init__(self, graph: onnx.GraphProto):
        self.g = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {i.name: i for i in graph.initializer}

    def scalar(self, name: str) -> float | None:
        init = self.inits.get(name)
        if init is None or np.prod(init.dims) != 1:
            return None
        return float(numpy_helper.to_array(init).reshape(()))

    def only_consumer(self, name: str, op: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def source_3d(self, name: str) -> str | None:
        """Walk up Reshape/Transpose views to the first tensor not produced by one (the [B, S, C] input)."""
        node = self.producer.get(name)
        if node is None or node.op_type not in _VIEW_OPS:
            return None
        while node is not None and node.op_type in _VIEW_OPS:
            name = node.input[0]
            node = self.producer.get(name)
        return name

    def scaled(self, name: str) -> tuple[str, float] | None:
        """(input, scalar) of a Mul by a scalar initializer."""
        node = self.producer.get(name)
        if node is None or node.op_type != "Mul":
            return None
        for x, c in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            if self.scalar(c) is not None:
                return x, self.scalar(c)
        return None


def _heads(shapes: dict, name: str) -> int | None:
    shape = shapes.get(name)
    return shape[1] if shape is not None and len(shape) == 4 and isinstance(shape[1], int) else None


def fuse_attention(model: onnx.ModelProto, shapes: dict) -> int:
    """Rewrite every matching attention in place; return how many were fused."""
    g = _Graph(model.graph)
    new_nodes, drop = [], set()
    for soft in [n for n in model.graph.node if n.op_type == "Softmax"]:
        qk = g.producer.get(soft.input[0])
        pv = g.only_consumer(soft.output[0], "MatMul")
        if qk is None or qk.op_type != "MatMul" or pv is None:
            continue
        q, k = g.scaled(qk.input[0]), g.scaled(qk.input[1])
        if q is None or k is None:
            continue
        t_out = g.only_consumer(pv.output[0], "Transpose")
        r_out = t_out and g.only_consumer(t_out.output[0], "Reshape")
        heads = _heads(shapes, q[0])
        q3, k3, v3 = g.source_3d(q[0]), g.source_3d(k[0]), g.source_3d(pv.input[1])
        if not (r_out and heads and q3 and k3 and v3):
            continue
        new_nodes.append(helper.make_node(
            "MultiHeadAttention", [q3, k3, v3], [r_out.output[0]], domain="com.microsoft",
            name=f"fused_{soft.name}", num_heads=heads, scale=q[1] * k[1]))
        drop.add(id(r_out))
    if not new_nodes:
        return 0
    kept = [n for n in model.graph.node if id(n) not in drop]
    del model.graph.node[:]
    model.graph.node.extend(kept + new_nodes)
    _prune_dead(model.graph)
    _topological_sort(model.graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(new_nodes)


def _prune_dead(graph: onnx.GraphProto) -> None:
    """Drop nodes none of whose outputs are used (the decomposed attention left behind)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | {i for n in graph.node for i in n.input}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        keep = [n for n in graph.node if n not in dead]
        del graph.node[:]
        graph.node.extend(keep)


def _topological_sort(graph: onnx.GraphProto) -> None:
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, order = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                order.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input near {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(order)


def fuse_file(src: Path, dst: Path, dims: dict[str, int]) -> int:
    """Fuse src's attention into dst (weights: a hard link to src's external data file; same filesystem)."""
    model = onnx.load(str(src), load_external_data=False)
    probe = onnx.load(str(src), load_external_data=False)
    flops.pin_inputs(probe, dims)
    shapes = flops._infer(probe)
    for _ in range(8):
        if not flops.fold_shape_arithmetic(probe, shapes):
            break
        shapes = flops._infer(probe)
    count = fuse_attention(model, shapes)
    dst.parent.mkdir(parents=True, exist_ok=True)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location" and not (dst.parent / entry.value).exists():
                # A hard link: ONNX Runtime refuses external data that resolves outside the model's folder.
                os.link((src.parent / entry.value).resolve(), dst.parent / entry.value)
    write_atomic(dst, writer=lambda tmp: onnx.save(model, str(tmp)))  # the graph only: its weights are the links
    logger.info("fused %d attention blocks: %s -> %s", count, src, dst)
    return count
