"""The fp16 graph: fp16 weights and activations, fp32 kept only where the numerics need it."""

from __future__ import annotations

import logging
from typing import Sequence

import onnx
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

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
