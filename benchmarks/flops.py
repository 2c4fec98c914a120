"""FLOPs of an ONNX graph at concrete shapes: MACs of Conv, ConvTranspose, MatMul, Gemm and attention.

The graph is read without its weights (initializer shapes are in the proto), its dynamic input
axes are pinned to the requested values, and shapes are inferred by ONNX shape inference, with
the small integer "shape arithmetic" between (Shape, Gather, Mul, Div, Concat, ...) evaluated
here and folded into constants so that Reshapes fed by computed shapes resolve. FLOPs = 2 x MACs.
Elementwise ops, normalisations and softmax are not counted (a few percent of a UNet's work).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import onnx

from diffusion_engine.engine.onnx_shapes import Shape, known, resolved_shapes

logger = logging.getLogger(__name__)

COUNTED = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "MultiHeadAttention")

# Dense fp16 tensor-core peak (TFLOP/s, no sparsity) by GPU name substring; the first match wins.
FP16_PEAK_TFLOPS = (
    ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("GH200", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0),
    ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("T4", 65.0), ("V100", 125.0),
)


@dataclass(frozen=True)
class GraphFlops:
    """MACs per counted op type at one set of input shapes; nodes whose shapes stayed unknown."""

    macs: Mapping[str, int]
    unresolved: tuple[str, ...] = field(default_factory=tuple)

    @property
    def flops(self) -> int:
        return 2 * sum(self.macs.values())

    def as_dict(self) -> dict:
        return {"flops": self.flops, "macs_by_op": dict(self.macs), "unresolved_nodes": len(self.unresolved)}


def fp16_peak_tflops(gpu_name: str) -> float | None:
    """The dense fp16 tensor peak of a GPU from its name, or None if unknown."""
    for key, peak in FP16_PEAK_TFLOPS:
        if key.lower() in gpu_name.lower():
            return peak
    return None


def graph_flops(path: str | Path, dims: Mapping[str, int]) -> GraphFlops:
    """MACs of a graph file with its named input axes set to dims (missing axes raise KeyError)."""
    return _graph_flops_cached(str(path), tuple(sorted(dims.items())))


@lru_cache(maxsize=64)
def _graph_flops_cached(path: str, dims: tuple[tuple[str, int], ...]) -> GraphFlops:
    model = onnx.load(path, load_external_data=False)
    shapes = resolved_shapes(model, dict(dims), keep=COUNTED)
    result = count_macs(model.graph, shapes)
    if result.unresolved:
        logger.warning("%s: %d counted nodes have unknown shapes and are left out (first: %s)",
                       Path(path).name, len(result.unresolved), result.unresolved[0])
    return result


def node_macs(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int | None:
    """Multiply-accumulates of one node, or None if a needed shape is unknown."""
    ins = [shapes.get(n) if n else None for n in node.input]
    out = shapes.get(node.output[0]) if node.output else None
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        x, w = ins[0], ins[1]
        if op == "Conv" and known(out) and known(w):
            return math.prod(out) * math.prod(w[1:])  # each output value: Cin/groups x kernel MACs
        if op == "ConvTranspose" and known(x) and known(w):
            return math.prod(x) * math.prod(w[1:])  # each input value scatters to Cout/groups x kernel
        return None
    if op == "MatMul":
        a = ins[0]
        if known(a) and known(out):
            return math.prod(out) * a[-1]
        return None
    if op == "Gemm":
        a = ins[0]
        trans_a = any(att.name == "transA" and att.i for att in node.attribute)
        if known(a) and known(out) and len(a) == 2:
            return math.prod(out) * (a[0] if trans_a else a[1])
        return None
    if op in ("Attention", "MultiHeadAttention"):
        return _attention_macs(ins, out)
    return 0


def _attention_macs(ins: Sequence[Shape | None], out: Shape | None) -> int | None:
    """Q.K^T and P.V: batch x Sq x Skv x (hidden_qk + hidden_v), for 3-D or 4-D (B, H, S, D) Q/K/V."""
    q, k = ins[0], ins[1] if len(ins) > 1 else None
    if not (known(q) and known(k) and known(out)):
        return None
    if len(q) == 4:  # (B, H, S, D)
        batch, sq, hidden_qk = q[0], q[2], q[1] * q[3]
        skv = k[2]
        hidden_v = out[1] * out[3] if len(out) == 4 else out[-1]
    else:
        batch, sq, hidden_qk = q[0], q[1], q[2]
        skv = k[1]
        hidden_v = out[-1]
    return batch * sq * skv * (hidden_qk + hidden_v)


def count_macs(graph: onnx.GraphProto, shapes: Mapping[str, Shape]) -> GraphFlops:
    """Sum node MACs by op type over the top-level graph."""
    macs = {op: 0 for op in COUNTED}
    unresolved: list[str] = []
    for node in graph.node:
        if node.op_type not in COUNTED:
            continue
        m = node_macs(node, shapes)
        if m is None:
            unresolved.append(f"{node.op_type}:{node.name or node.output[0]}")
        else:
            macs[node.op_type] += m
    return GraphFlops({k: v for k, v in macs.items() if v}, tuple(unresolved))
