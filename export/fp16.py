"""The fp16 graph: fp16 weights and activations, fp32 kept only where the numerics need it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence
from unittest import mock

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data
from onnxruntime.transformers import float16 as ort_float16
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16, convert_np_to_float16

logger = logging.getLogger(__name__)

SHAPE_OPS = ("Shape", "Size")


def nodes_fed_only_by(model: onnx.ModelProto, inputs: Sequence[str]) -> list[str]:
    """Names of the nodes whose values depend on no graph input other than `inputs`.

    Constants and shape queries (Shape, Size) count as depending on nothing: a shape carries no
    precision, and the UNet expands the timestep to the sample's batch through one.
    """
    graph_inputs = {i.name for i in model.graph.input}
    allowed = set(inputs)
    deps: dict[str, frozenset[str]] = {n: frozenset([n]) for n in graph_inputs}
    for init in model.graph.initializer:
        deps[init.name] = frozenset()
    blocked = []
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        if node.op_type in SHAPE_OPS:
            dep = frozenset()
        else:
            dep = frozenset().union(*(deps.get(i, frozenset()) for i in node.input if i))
        for out in node.output:
            deps[out] = dep
        if dep <= allowed:
            blocked.append(node.name)
    return blocked


def to_fp16(model: onnx.ModelProto, fp32_inputs: Sequence[str] = ()) -> tuple[onnx.ModelProto, list[str]]:
    """Convert to fp16 keeping graph I/O types; subgraphs fed only by fp32_inputs stay fp32.

    Returns the fp16 model and the names of the nodes kept in fp32.
    """
    for node in model.graph.node:  # the converter's block list works on node names
        if not node.name:
            raise ValueError(f"unnamed {node.op_type} node: cannot keep it in fp32 by name")
    keep = nodes_fed_only_by(model, fp32_inputs) if fp32_inputs else []
    fp16 = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST), node_block_list=keep,
        disable_shape_infer=True,
    )
    logger.debug("fp16: %d nodes kept in fp32", len(keep))
    return fp16, keep


def convert_file(src: Path, dst: Path, fp32_inputs: Sequence[str], load: Callable[[Path], onnx.ModelProto],
                 save: Callable[[onnx.ModelProto, Path], None], umask: int) -> list[str]:
    """to_fp16 of the graph at `src`, written to `dst`; returns the names of the nodes kept in fp32.

    `load` gives the graph without its external weights (with inferred types). Graphs whose weights are
    inline convert in memory and are saved with `save`. Graphs with external weights (the UNet, the
    SDXL text encoder) never hold them: the converter runs on the graph alone, then each weight is read
    from `src`'s data file, converted exactly as the converter converts inline weights
    (convert_np_to_float16) where it made that initializer fp16, and appended to `dst`'s data file,
    one tensor at a time.
    """
    model = load(src)
    external = {i.name: ExternalDataInfo(i) for i in model.graph.initializer if uses_external_data(i)}
    if not external:
        half, kept = to_fp16(model, fp32_inputs)
        save(half, dst)
        return kept
    sources = {i.name: i.data_type for i in model.graph.initializer}
    # The converter reads each converted initializer back only for its shape; external ones have none
    # loaded, and their dims are that shape.
    with mock.patch.object(ort_float16, "make_value_info_from_tensor", _value_info_from_dims):
        half, kept = to_fp16(model, fp32_inputs)
    data = dst.with_name(f"{dst.name}.data")
    tmp_data, tmp = dst.with_name(f".{data.name}.tmp"), dst.with_name(f".{dst.name}.tmp")
    with open(tmp_data, "wb") as out:
        for init in half.graph.initializer:
            if init.name not in external:
                continue
            info = external[init.name]
            array = _read_external(src.parent / info.location, info.offset or 0, info.length,
                                   onnx.helper.tensor_dtype_to_np_dtype(sources[init.name]))
            if sources[init.name] == onnx.TensorProto.FLOAT and init.data_type == onnx.TensorProto.FLOAT16:
                array = convert_np_to_float16(array)
            blob = np.ascontiguousarray(array).tobytes()
            offset = out.tell()
            out.write(blob)
            _point_at(init, data.name, offset, len(blob))
    os.chmod(tmp_data, 0o666 & ~umask)
    onnx.save_model(half, tmp)
    tmp_data.replace(data)
    tmp.replace(dst)
    return kept


def _point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make `tensor`'s external data entries say where its bytes now are."""
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _value_info_from_dims(tensor: onnx.TensorProto) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))


def _read_external(path: Path, offset: int, length: int | None, dtype: np.dtype) -> np.ndarray:
    """One tensor's values from an external data file (read, not mapped: the file may be rewritten)."""
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read() if length is None else f.read(length)
    return np.frombuffer(raw, dtype=dtype)
