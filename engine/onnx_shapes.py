"""Shapes of an ONNX graph at concrete input sizes: named axes pinned, ONNX shape inference, and the
small integer shape arithmetic between (Shape, Gather, Concat, ...) evaluated and folded into
constants so that Reshapes fed by computed shapes resolve. Read without weights. Build layer (onnx)."""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

Shape = tuple  # of int or None


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


def infer(model: onnx.ModelProto) -> dict[str, Shape]:
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
        return np.array(shape[at.get("start", 0):at.get("end")], np.int64) if known(shape) or shape == () else None
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
        if known(q) and known(v) and len(q) == 3 and len(v) == 3:
            model.graph.value_info.append(
                onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, [q[0], q[1], v[2]]))
            added += 1
    return added


def fold_shape_arithmetic(model: onnx.ModelProto, shapes: Mapping[str, Shape], keep: Iterable[str] = ()) -> int:
    """Evaluate small constant/shape subgraphs and replace them by initializers; return nodes folded.
    Nodes of the op types in `keep` are never folded."""
    keep, g = set(keep), model.graph
    values = {i.name: numpy_helper.to_array(i) for i in g.initializer
              if math.prod(i.dims) <= SMALL and i.data_location != onnx.TensorProto.EXTERNAL}
    folded: set[int] = set()
    for index, node in enumerate(g.node):
        if len(node.output) != 1 or node.op_type in keep:
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


def known(shape: Shape | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def resolved_shapes(model: onnx.ModelProto, dims: Mapping[str, int], keep: Iterable[str] = ()) -> dict[str, Shape]:
    """Pin model's inputs to dims (in place) and fold shape arithmetic until inference settles; name -> shape."""
    pin_inputs(model, dims)
    shapes = infer(model)
    for _ in range(100):  # each round resolves one more level (a Reshape's computed shape, a fused op)
        if not (fold_shape_arithmetic(model, shapes, keep) + annotate_contrib_outputs(model, shapes)):
            break
        shapes = infer(model)
    return shapes
