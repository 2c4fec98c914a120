"""Check ONNX graphs op by op against the TensorRT ONNX parser's supported-operator table.

The table (data/trt_onnx_ops.json) is onnx-tensorrt's docs/operators.md as data: supported ops,
the tensor types each accepts, and its restrictions in checkable form ("rules"). Only structure
matters, so graphs are loaded without their external weights. onnx is imported lazily: the
runtime imports engine.manifest/specs and must stay lean.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from diffusion_engine.engine.manifest import Manifest
from diffusion_engine.engine.specs import CPU_GRAPH

logger = logging.getLogger(__name__)

TABLE = "trt_onnx_ops.json"
ONNX_DOMAINS = ("", "ai.onnx")
# onnx.TensorProto.DataType codes -> the type names the table uses.
TYPE_NAMES = {
    1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING",
    9: "BOOL", 10: "FP16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128",
    16: "BF16", 17: "FP8", 18: "FLOAT8E4M3FNUZ", 19: "FLOAT8E5M2", 20: "FLOAT8E5M2FNUZ", 21: "UINT4",
    22: "INT4", 23: "FP4",
}


@dataclass(frozen=True)
class Finding:
    """One problem or warning at one node (or the opset) of one graph."""

    file: str
    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.op_type} node {self.node!r}: {self.reason}"


@dataclass(frozen=True)
class GraphCheck:
    """The op types one graph uses and what of it the TensorRT ONNX parser does not support."""

    file: str
    opset: int
    ops: Mapping[str, int]
    problems: tuple[Finding, ...] = ()
    warnings: tuple[Finding, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Graph:
    """What the per-node checks need to know about a model: types, constants, I/O, local functions."""

    types: dict[str, str] = field(default_factory=dict)
    constants: set[str] = field(default_factory=set)
    io: set[str] = field(default_factory=set)
    functions: set[tuple[str, str]] = field(default_factory=set)


@lru_cache(maxsize=1)
def load_table() -> dict[str, Any]:
    """The packaged supported-operator table."""
    return json.loads(resources.files("diffusion_engine.engine").joinpath("data", TABLE).read_text())


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:2])


def opset_max(table: Mapping[str, Any], target: str) -> int:
    """The newest default-domain opset the parser of TensorRT `target` reads."""
    known = [v for v in table["opset"]["max"] if _version(v) <= _version(target)]
    if not known:
        raise ValueError(f"TensorRT {target} is older than the table covers ({sorted(table['opset']['max'])})")
    return table["opset"]["max"][max(known, key=_version)]


def check_graph(path: str | Path, table: Mapping[str, Any] | None = None, target: str | None = None) -> GraphCheck:
    """Check one ONNX graph (structure only: no external data is read) against the table."""
    import onnx

    table = table or load_table()
    target = target or table["default_target"]
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, OSError: whatever it is, the graph cannot be checked
        raise ValueError(f"{path}: not a readable ONNX graph ({type(exc).__name__}: {exc})") from exc
    try:
        model = onnx.shape_inference.infer_shapes(model)  # tensor types for the type checks
    except Exception as exc:  # a graph shape inference cannot follow: its types stay unchecked
        logger.warning("%s: shape inference failed (%s); tensor types are checked where declared", path.name, exc)
    graph = _describe(model)
    problems, warnings = _opset_findings(path.name, model, table, target), []
    ops: Counter[str] = Counter()
    for node in _nodes(model):
        ops[_op_name(node)] += 1
        bad, warn = _node_findings(path.name, node, graph, table, target)
        problems += bad
        warnings += warn
    opset = next((o.version for o in model.opset_import if o.domain in ONNX_DOMAINS), 0)
    return GraphCheck(path.name, opset, dict(sorted(ops.items())), tuple(problems), tuple(warnings))


def check_engine(engine_dir: str | Path, manifest: Manifest, target: str | None = None) -> list[GraphCheck]:
    """Check every ONNX graph TensorRT may build from (fp32 and fp16 files alike; not the ONNX Runtime CPU graph)."""
    table = load_table()
    files = dict.fromkeys(f for c in manifest.components.values() for k, f in c.files.items() if k != CPU_GRAPH)
    return [check_graph(Path(engine_dir) / f, table, target) for f in files]


def _op_name(node: Any) -> str:
    return node.op_type if node.domain in ONNX_DOMAINS else f"{node.domain}::{node.op_type}"


def _nodes(model: Any) -> Iterator[Any]:
    """Every node: the main graph, its subgraphs (If/Loop/Scan bodies) and model-local function bodies."""
    for graph in _graphs(model.graph):
        yield from graph.node
    for function in model.functions:
        for node in function.node:
            yield node
            for sub in _subgraphs(node):
                for graph in _graphs(sub):
                    yield from graph.node


def _subgraphs(node: Any) -> Iterator[Any]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _graphs(graph: Any) -> Iterator[Any]:
    """A graph and, recursively, every graph held in its nodes' attributes."""
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _graphs(sub)


def _describe(model: Any) -> _Graph:
    """Tensor types (declared and inferred), constant tensors, graph I/O and local function names."""
    g = _Graph(functions={(f.domain, f.name) for f in model.functions})
    g.io = {v.name for v in list(model.graph.input) + list(model.graph.output)}
    for graph in _graphs(model.graph):
        for v in list(graph.input) + list(graph.output) + list(graph.value_info):
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
                g.types[v.name] = _type_name(v.type.tensor_type.elem_type)
        for t in graph.initializer:
            g.types[t.name] = _type_name(t.data_type)
            g.constants.add(t.name)
    for node in _nodes(model):
        if node.op_type == "Constant" and node.domain in ONNX_DOMAINS:
            g.constants.update(o for o in node.output if o)
    return g


def _type_name(code: int) -> str:
    return TYPE_NAMES.get(code, f"type {code}")


def _opset_findings(file: str, model: Any, table: Mapping[str, Any], target: str) -> list[Finding]:
    """The default-domain opset must lie in the range the parser reads."""
    low, high = table["opset"]["min"], opset_max(table, target)
    found = [o.version for o in model.opset_import if o.domain in ONNX_DOMAINS]
    return [
        Finding(file, "-", "opset", f"opset {v} is outside [{low}, {high}], the range TensorRT {target}'s ONNX parser reads")
        for v in found if not low <= v <= high
    ]


def _node_findings(
    file: str, node: Any, graph: _Graph, table: Mapping[str, Any], target: str
) -> tuple[list[Finding], list[Finding]]:
    """(problems, warnings) of one node: op support, restrictions, tensor types, UINT8 outside graph I/O."""
    if node.domain not in ONNX_DOMAINS:
        if (node.domain, node.op_type) in graph.functions:
            return [], []  # a model-local function: the parser inlines it; its body is checked node by node
        return [_found(file, node, f"custom domain {node.domain!r}: TensorRT needs a plugin for it")], []
    entry = table["operators"].get(node.op_type)
    if entry is None:
        return [_found(file, node, "not in the TensorRT ONNX parser's operator table")], []
    if not entry["supported"]:
        return [_found(file, node, "listed as unsupported by the TensorRT ONNX parser")], []
    since = entry.get("min_tensorrt", "10.0")
    if _version(since) > _version(target):
        return [_found(file, node, f"supported only from TensorRT {since} (checking for {target})")], []
    reasons = _rule_reasons(node, table["rules"].get(node.op_type, {}), graph)
    type_reasons, warnings = _type_reasons(node, entry, table, graph)
    reasons += type_reasons + _io_only_reasons(node, table, graph)
    return [_found(file, node, r) for r in reasons], [_found(file, node, w) for w in warnings]


def _found(file: str, node: Any, reason: str) -> Finding:
    return Finding(file, node.name or (node.output[0] if node.output else "?"), _op_name(node), reason)


def _attributes(node: Any) -> dict[str, Any]:
    import onnx

    values = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        values[a.name] = v.decode() if isinstance(v, bytes) else v
    return values


def _rule_reasons(node: Any, rule: Mapping[str, Any], graph: _Graph) -> list[str]:
    """The table's restrictions for this op type, checked on the node's attributes and inputs."""
    if not rule:
        return []
    attrs, reasons = _attributes(node), []
    for name, allowed in rule.get("attributes", {}).items():
        if name in attrs and attrs[name] not in allowed:
            reasons.append(f"{name}={attrs[name]!r} is not supported (allowed: {', '.join(map(str, allowed))})")
    reasons += [f"attribute {name!r} is not supported" for name in rule.get("forbidden_attributes", []) if name in attrs]
    used = sum(1 for o in node.output if o)
    if used > rule.get("max_outputs", used):
        reasons.append(f"only the first {rule['max_outputs']} output(s) are supported; it uses {used}")
    kernel = attrs.get("kernel_shape")
    if "kernel_rank" in rule and kernel is not None and len(kernel) not in rule["kernel_rank"]:
        reasons.append(f"{len(kernel)}D kernel; only {' or '.join(f'{r}D' for r in rule['kernel_rank'])} are supported")
    for name in rule.get("unit_attributes", []):
        if any(v != 1 for v in attrs.get(name, [])):
            reasons.append(f"{name}={list(attrs[name])} must be empty or all ones")
    for i in rule.get("constant_inputs", []):
        if i < len(node.input) and node.input[i] and node.input[i] not in graph.constants:
            reasons.append(f"input {i} ({node.input[i]!r}) must be an initializer or a Constant")
    return reasons


def _type_reasons(node: Any, entry: Mapping[str, Any], table: Mapping[str, Any], graph: _Graph) -> tuple[list[str], list[str]]:
    """Types of the tensors the table's 'Supported Types' column describes, where they are known."""
    allowed, reasons, warnings = entry.get("types", []), [], []
    spots = table["type_tensors"].get(node.op_type, table["type_tensors"]["default"])
    for spot in spots:
        kind, index = spot.split(":")
        names: Sequence[str] = node.input if kind == "input" else node.output
        name = names[int(index)] if int(index) < len(names) else ""
        found = graph.types.get(name) if name else None
        if found is None or found in allowed:
            continue
        if found == "DOUBLE" and table["data_types"]["double_cast_down_to"] in allowed:
            warnings.append(f"{kind} {index} ({name!r}) is DOUBLE: TensorRT casts it down to FP32")
        else:
            reasons.append(f"{kind} {index} ({name!r}) is {found}; the table allows {', '.join(allowed)}")
    return reasons, warnings


def _io_only_reasons(node: Any, table: Mapping[str, Any], graph: _Graph) -> list[str]:
    """Types such as UINT8 exist only as network inputs or outputs."""
    io_only = set(table["data_types"]["io_only"])
    return [
        f"{name!r} is {graph.types[name]}, which TensorRT allows only as a network input or output"
        for name in dict.fromkeys(list(node.input) + list(node.output))
        if name and graph.types.get(name) in io_only and name not in graph.io
    ]


def format_report(checks: Sequence[GraphCheck], target: str | None = None) -> str:
    """The graphs, a table of the op types used and their status, then every problem and warning."""
    table = load_table()
    target = target or table["default_target"]
    src = table["source"]
    lines = [
        f"TensorRT ONNX parser check: target TensorRT {target}, opset {table['opset']['min']}-{opset_max(table, target)}",
        f"table         {src['repository']} {src['document']} @ {src['ref']} ({src['commit'][:12]}), read {src['read_on']}",
        "",
    ]
    rows = [("graph", "opset", "nodes", "op types", "result")]
    rows += [(c.file, str(c.opset), str(sum(c.ops.values())), str(len(c.ops)), "ok" if c.ok else f"{len(c.problems)} unsupported")
             for c in checks]
    lines += _columns(rows) + [""]
    lines += _columns(_op_rows(checks)) + [""]
    problems = [p for c in checks for p in c.problems]
    warnings = [w for c in checks for w in c.warnings]
    lines += [f"unsupported   {p}" for p in problems] + [f"warning       {w}" for w in warnings]
    verdict = f"{len(problems)} unsupported uses in {sum(not c.ok for c in checks)} graph(s)" if problems else "all graphs supported"
    return "\n".join(lines + [f"result        {verdict}"])


def _op_rows(checks: Sequence[GraphCheck]) -> list[tuple[str, ...]]:
    """One row per op type: total nodes, the components using it, and its status."""
    counts: Counter[str] = Counter()
    users: dict[str, dict[str, None]] = {}
    bad: Counter[str] = Counter(p.op_type for c in checks for p in c.problems)
    for c in checks:
        counts.update(c.ops)
        for op in c.ops:
            users.setdefault(op, {})[c.file.split(".")[0]] = None
    rows = [("op type", "nodes", "used in", "TensorRT")]
    for op in sorted(counts):
        rows.append((op, str(counts[op]), ", ".join(users[op]), f"UNSUPPORTED ({bad[op]} nodes)" if bad[op] else "ok"))
    rows += [(op, "-", "-", f"UNSUPPORTED ({n})") for op, n in bad.items() if op not in counts]  # e.g. the opset
    return rows


def _columns(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
