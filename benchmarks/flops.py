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

import numpy as np
import onnx
from onnx import numpy_helper

logger = logging.getLogger(__name__)

COUNTED = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "MultiHeadAttention")

# Dense fp16 tensor-core peak (TFLOP/s, no sparsity) by GPU name substring; the first match wins.
FP16_PEAK_TFLOPS = (
    ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("GH200", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0),
    ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("T4", 65.0), ("V100", 125.0),
)

Shape = tuple  # of int or None


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
    pin_inputs(model, dict(dims))
    shapes = _infer(model)
    for _ in range(100):  # each round resolves one more level (a Reshape's computed shape, a fused op)
        if not (fold_shape_arithmetic(model, shapes) + annotate_contrib_outputs(model, shapes)):
            break
        shapes = _infer(model)
    result = count_macs(model.graph, shapes)
    if result.unresolved:
        logger.warning("%s: %d counted nodes have unknown shapes and are left out (first: %s)",
                       Path(path).name, len(result.unresolved), result.unresolved[0])
    return result


def pin_inputs(model: onnx.ModelProto, dims: Mapping[str, int]) -> None:
    """Replace the graph inputs' named dims by concrete values; drop stale intermediate shapes."""
    for value in model.graph.input:
        for d in value.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                if d.dim_param not in dims:
                    raise KeyError(f"no value for axis {d.dim_param!r} of input {value.name!r}")
                d.dim_value = int(dims[d.dim_param])
    del model.graph.value_info[:]


def _shape_of(value: onnx.ValueInfoProto) -> Shape | None:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)


def _infer(model: onnx.ModelProto) -> dict[str, Shape]:
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    g = inferred.graph
    shapes = {v.name: _shape_of(v) for v in list(g.input) + list(g.value_info) + list(g.output)}
    shapes.update({i.name: tuple(i.dims) for i in g.initializer})
    return {k: v for k, v in shapes.items() if v is not None}


SMALL = 64  # elements: shape arithmetic values are tiny; anything larger is data, never evaluated
_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Max": np.maximum, "Min": np.minimum,
           "Equal": np.equal, "Mod": np.mod}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _evaluate(node: onnx.NodeProto, values: Mapping[str, np.ndarray], shapes: Mapping[str, Shape]) -> np.ndarray | None:
    """The value of a shape-arithmetic node's single output, or None if it is not one / not known."""
    op, at = node.op_type, _attrs(node)
    if op == "Constant":
        if "value" in at:
            return numpy_helper.to_array(at["value"])
        for key in ("value_int", "value_ints", "value_float", "value_floats"):
            if key in at:
                return np.array(at[key])
        return None
    if op == "Shape":
        shape = shapes.get(node.input[0])
        return np.array(shape[at.get("start", 0):at.get("end")], np.int64) if _known(shape) or shape == () else None
    ins = [values.get(n) if n else None for n in node.input]
    if not ins or ins[0] is None or any(x is None for x, n in zip(ins, node.input) if n):
        return None
    x = ins[0]
    if op in _BINARY:
        return _BINARY[op](x, ins[1])
    if op == "Div":
        y = ins[1]
        return (np.trunc(x / y).astype(x.dtype)) if np.issubdtype(x.dtype, np.integer) else x / y
    if op in ("Identity", "Neg", "Abs"):
        return {"Identity": x, "Neg": -x, "Abs": np.abs(x)}[op]
    if op == "Cast":
        return x.astype(onnx.helper.tensor_dtype_to_np_dtype(at["to"]))
    if op == "Gather":
        return np.take(x, ins[1], axis=at.get("axis", 0))
    if op == "Concat":
        return np.concatenate([np.atleast_1d(v) for v in ins], axis=at.get("axis", 0))
    if op in ("Squeeze", "Unsqueeze"):
        axes = tuple(int(a) for a in (ins[1] if len(ins) > 1 else at.get("axes", ())))
        if op == "Squeeze":
            return np.squeeze(x, axis=axes or None)
        return np.expand_dims(x, axes)
    if op == "Reshape":
        target = [x.shape[i] if d == 0 else int(d) for i, d in enumerate(ins[1])]
        return x.reshape(target)
    if op == "Slice":
        starts, ends = ins[1], ins[2]
        axes = ins[3] if len(ins) > 3 and ins[3] is not None else range(len(starts))
        steps = ins[4] if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
        index = [slice(None)] * x.ndim
        for a, b, e, st in zip(axes, starts, ends, steps):
            index[int(a)] = slice(int(b), int(e), int(st))
        return x[tuple(index)]
    if op == "Where":
        return np.where(x, ins[1], ins[2])
    if op == "Range":
        return np.arange(x, ins[1], ins[2])
    return None


def annotate_contrib_outputs(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> int:
    """Declare MultiHeadAttention output shapes (ONNX inference does not know com.microsoft ops)."""
    added = 0
    for node in model.graph.node:
        if node.op_type != "MultiHeadAttention" or node.output[0] in shapes:
            continue
        q, v = shapes.get(node.input[0]), shapes.get(node.input[2]) if len(node.input) > 2 else None
        if _known(q) and _known(v) and len(q) == 3 and len(v) == 3:
            model.graph.value_info.append(
                onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, [q[0], q[1], v[2]]))
            added += 1
    return added


def fold_shape_arithmetic(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> int:
    """Evaluate small constant/shape subgraphs and replace them by initializers; return nodes folded."""
    g = model.graph
    values = {i.name: numpy_helper.to_array(i) for i in g.initializer
              if math.prod(i.dims) <= SMALL and i.data_location != onnx.TensorProto.EXTERNAL}
    folded: set[int] = set()
    for index, node in enumerate(g.node):
        if len(node.output) != 1 or node.op_type in COUNTED:
            continue
        try:
            out = _evaluate(node, values, shapes)
        except (ValueError, TypeError, IndexError, KeyError):  # not evaluable here: leave it to inference
            out = None
        if out is not None and np.asarray(out).size <= SMALL:
            values[node.output[0]] = np.asarray(out)
            folded.add(index)
    if not folded:
        return 0
    kept = [n for i, n in enumerate(g.node) if i not in folded]
    new = [numpy_helper.from_array(values[g.node[i].output[0]], g.node[i].output[0]) for i in sorted(folded)]
    del g.node[:]
    g.node.extend(kept)
    g.initializer.extend(new)
    return len(folded)


def _known(shape: Shape | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def node_macs(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int | None:
    """Multiply-accumulates of one node, or None if a needed shape is unknown."""
    ins = [shapes.get(n) if n else None for n in node.input]
    out = shapes.get(node.output[0]) if node.output else None
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        x, w = ins[0], ins[1]
        if op == "Conv" and _known(out) and _known(w):
            return math.prod(out) * math.prod(w[1:])  # each output value: Cin/groups x kernel MACs
        if op == "ConvTranspose" and _known(x) and _known(w):
            return math.prod(x) * math.prod(w[1:])  # each input value scatters to Cout/groups x kernel
        return None
    if op == "MatMul":
        a = ins[0]
        if _known(a) and _known(out):
            return math.prod(out) * a[-1]
        return None
    if op == "Gemm":
        a = ins[0]
        trans_a = any(att.name == "transA" and att.i for att in node.attribute)
        if _known(a) and _known(out) and len(a) == 2:
            return math.prod(out) * (a[0] if trans_a else a[1])
        return None
    if op in ("Attention", "MultiHeadAttention"):
        return _attention_macs(ins, out)
    return 0


def _attention_macs(ins: Sequence[Shape | None], out: Shape | None) -> int | None:
    """Q.K^T and P.V: batch x Sq x Skv x (hidden_qk + hidden_v), for 3-D or 4-D (B, H, S, D) Q/K/V."""
    q, k = ins[0], ins[1] if len(ins) > 1 else None
    if not (_known(q) and _known(k) and _known(out)):
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
