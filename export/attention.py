"""Attention for ONNX Runtime on the CPU: the exporter's decomposed attention fused into
com.microsoft.MultiHeadAttention, and the score buffers a graph still holds.

torch's exporter writes scaled-dot-product attention as MatMul -> Softmax -> MatMul over a
[batch, heads, Sq, Skv] score tensor: at 1024x1024 SD1.5's first-level self-attention has
Sq = Skv = 16384, 2 x 8 x 16384^2 fp32 = 17 GB per UNet call, which no 24 GiB machine holds.
ONNX Runtime's MultiHeadAttention CPU kernel computes the same softmax(q k^T * scale) v in tiles
(flash attention) without materialising the scores. Its transformers optimizer does not match
this exporter's pattern (it fuses no attention in these graphs), so the rewrite is here:

    q4 = Transpose[0,2,1,3](Reshape(q3))                 q3: [B, Sq, H*D]   (q4: [B, H, Sq, D])
    kT = views of Transpose[0,2,1,3](Reshape(k3))        k3: [B, Skv, H*D]  (kT: [B, H, D, Skv])
    v4 = Transpose[0,2,1,3](Reshape(v3))                 v3: [B, Skv, H*Dv]
    out3 = Reshape(Transpose[0,2,1,3](MatMul(Softmax(MatMul(q4 * a, kT * b)), v4)))
      -> MultiHeadAttention(q3, k3, v3, num_heads=H, scale=a*b) -> out3

Every candidate is checked against shapes inferred at concrete sizes before it is rewritten; the
fused graph is then checked against PyTorch like every exported graph. TensorRT and OpenVINO
keep reading the plain graph (they fuse attention themselves; com.microsoft ops are ONNX
Runtime's own).
"""

from __future__ import annotations

import logging
import math
from typing import Mapping

import onnx
from onnx import helper, numpy_helper

from diffusion_engine.engine.onnx_shapes import Shape, known, resolved_shapes
from diffusion_engine.engine.specs import BATCH, HEIGHT, LATENT_HEIGHT, LATENT_WIDTH, WIDTH, AxisRange, ComponentSpec

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
SPLIT_HEADS = [0, 2, 1, 3]  # [B, S, H, D] <-> [B, H, S, D]
SPATIAL_AXES = ((LATENT_HEIGHT, LATENT_WIDTH), (HEIGHT, WIDTH))


class _Graph:
    """Producer / consumer / initializer lookups over one graph."""

    def __init__(self, graph: onnx.GraphProto, shapes: Mapping[str, Shape]):
        self.shapes = shapes
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {i.name: i for i in graph.initializer}

    def made_by(self, name: str, op: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op else None

    def only_consumer(self, name: str, op: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def scalar(self, name: str) -> float | None:
        init = self.inits.get(name)
        if init is None and (node := self.made_by(name, "Constant")) is not None:
            init = node.attribute[0].t if node.attribute and node.attribute[0].name == "value" else None
        if init is None or math.prod(init.dims) != 1 or init.data_location == onnx.TensorProto.EXTERNAL:
            return None
        return float(numpy_helper.to_array(init).reshape(()))

    def unscaled(self, name: str) -> tuple[str, float]:
        """(x, c) for name = x * c with c a scalar constant, else (name, 1)."""
        node = self.made_by(name, "Mul")
        if node is not None:
            for x, c in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
                value = self.scalar(c)
                if value is not None:
                    return x, value
        return name, 1.0

    def perm(self, node: onnx.NodeProto) -> list[int]:
        return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])

    def split_heads(self, name: str) -> tuple[str, Shape] | None:
        """(x3, shape of name) if name = Transpose[0,2,1,3](Reshape(x3)) with x3 [B, S, H*D] -> [B, H, S, D]."""
        t = self.made_by(name, "Transpose")
        r = t is not None and self.perm(t) == SPLIT_HEADS and self.made_by(t.input[0], "Reshape")
        if not r:
            return None
        x3, s3, s4 = r.input[0], self.shapes.get(r.input[0]), self.shapes.get(name)
        if not (known(s3) and known(s4) and len(s3) == 3 and len(s4) == 4):
            return None
        if s3[0] != s4[0] or s3[1] != s4[2] or s3[2] != s4[1] * s4[3]:
            return None
        return x3, s4

    def keys_source(self, name: str) -> tuple[str, Shape] | None:
        """(k3, k4 shape) for kT [B, H, D, Skv] reached from a head split k4 [B, H, Skv, D] through views."""
        kt = self.shapes.get(name)
        node = self.producer.get(name)
        for _ in range(8):
            if node is None or node.op_type not in ("Reshape", "Transpose"):
                return None
            split = self.split_heads(node.input[0])
            if split is not None:
                k4 = split[1]
                if known(kt) and len(kt) == 4 and (kt[0], kt[1], kt[2], kt[3]) == (k4[0], k4[1], k4[3], k4[2]):
                    return split
                return None
            node = self.producer.get(node.input[0])
        return None


def fuse_attention(model: onnx.ModelProto, dims: Mapping[str, int]) -> int:
    """Rewrite model's decomposed attention into MultiHeadAttention in place (shapes are inferred on
    a weightless copy pinned to dims); return how many were fused."""
    g = _Graph(model.graph, resolved_shapes(_weightless(model), dims, keep=("MatMul", "Softmax")))
    fused, drop = [], set()
    for soft in (n for n in model.graph.node if n.op_type == "Softmax"):
        axis = next((a.i for a in soft.attribute if a.name == "axis"), -1)
        qk = g.made_by(soft.input[0], "MatMul")
        pv = g.only_consumer(soft.output[0], "MatMul")
        if axis not in (-1, 3) or qk is None or pv is None or pv.input[0] != soft.output[0]:
            continue
        (q4, a), (kt, b) = g.unscaled(qk.input[0]), g.unscaled(qk.input[1])
        q, k, v = g.split_heads(q4), g.keys_source(kt), g.split_heads(pv.input[1])
        merge = g.only_consumer(pv.output[0], "Transpose")
        out = merge is not None and g.perm(merge) == SPLIT_HEADS and g.only_consumer(merge.output[0], "Reshape")
        if not (q and k and v and out):
            continue
        (q3, q4s), (k3, k4s), (v3, v4s) = q, k, v
        out_shape = g.shapes.get(out.output[0])
        heads = q4s[1]
        if k4s[1] != heads or v4s[1] != heads or k4s[3] != q4s[3] or v4s[2] != k4s[2]:
            continue
        if not (known(out_shape) and tuple(out_shape) == (q4s[0], q4s[2], heads * v4s[3])):
            continue
        fused.append(helper.make_node(
            "MultiHeadAttention", [q3, k3, v3], [out.output[0]], domain=MS_DOMAIN,
            name=f"fused_{soft.name or soft.output[0]}", num_heads=int(heads), scale=float(a * b)))
        drop.add(id(out))
    if not fused:
        return 0
    kept = [n for n in model.graph.node if id(n) not in drop]
    del model.graph.node[:]
    model.graph.node.extend(kept + fused)
    _prune_dead(model.graph)
    _topological_sort(model.graph)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(fused)


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """model's structure with large initializers' data dropped (shape inference reads only dims)."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for init in light.graph.initializer:
        if math.prod(init.dims) > 64:
            dims, dtype, name = list(init.dims), init.data_type, init.name
            init.Clear()
            init.name, init.data_type = name, dtype
            init.dims.extend(dims)
            init.data_location = onnx.TensorProto.EXTERNAL  # no data here: never read as a value
            init.external_data.add(key="location", value="(not loaded)")
    return light


def _prune_dead(graph: onnx.GraphProto) -> None:
    """Drop nodes none of whose outputs are used (what the fused attention left behind)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | {i for n in graph.node for i in n.input}
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            return
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


def spatial_axes(spec: ComponentSpec) -> tuple[str, str] | None:
    """The component's image axes (latent or pixel), or None where it has none (the text encoder)."""
    axes = {a for t in spec.inputs for a in t.axes if isinstance(a, str)}
    return next((pair for pair in SPATIAL_AXES if set(pair) <= axes), None)


def score_buffers(model: onnx.ModelProto, spec: ComponentSpec, ranges: Mapping[str, AxisRange],
                  base: Mapping[str, int]) -> list[dict]:
    """The [rows, ..., Sq, Skv] tensors every Softmax of the graph materialises, per batch row, as a
    law in the image area: elements(area) = elements * (area / at_area) ** power.

    Shapes are inferred at batch 1 and two image sizes (the range's smallest, and twice its sides);
    power is 2 for self-attention over image tokens, 1 for cross-attention to text, 0 for text alone.
    """
    axes = spatial_axes(spec)
    sizes = [{**base, BATCH: 1}]
    if axes:
        sizes = [{**base, BATCH: 1, **{a: ranges[a].min * k for a in axes}} for k in (1, 2)]
    found: list[list[int]] = []
    for dims in sizes:
        shapes = resolved_shapes(_weightless(model), dims, keep=("MatMul", "Softmax"))
        found.append([math.prod(shapes[n.output[0]]) if known(shapes.get(n.output[0])) else -1
                      for n in model.graph.node if n.op_type == "Softmax"])
    area = math.prod(sizes[0][a] for a in axes) if axes else 1
    records = []
    for i, first in enumerate(found[0]):
        if first <= 0 or (axes and found[1][i] <= 0):
            raise ValueError(f"{spec.name}: the shape of softmax #{i} is not inferable at {sizes[0]}")
        power = round(math.log(found[1][i] / first, 4)) if axes else 0
        if axes and found[1][i] != first * 4 ** power:
            raise ValueError(f"{spec.name}: softmax #{i} grows {found[1][i] / first:g}x with 4x the image area")
        records.append({"elements": int(first), "at_area": int(area), "power": int(power),
                        "axes": list(axes) if axes else []})
    return records

