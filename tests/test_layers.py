"""Import boundaries (DESIGN.md "Layers"): every module's imports, read with ast, point down; one test per rule.

Imports are read statically from the source, at module level and inside functions (where lazy
imports hide), and so are importlib.import_module("...") calls with a literal name. A module of
this project is named by its path under the repository root (`engine.plans`, `runtime.samplers.plan`).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "diffusion_engine"  # installed, the folders below are diffusion_engine.<folder>
FOLDERS = ("engine", "runtime", "export", "benchmarks", "train", "tests")
TOOLS = ("benchmarks", "train", "tests")

# engine/ holds two layers: the lean contract and the offline builders. Every engine module is one of them.
CONTRACT = ("engine", "engine.atomic", "engine.digest", "engine.extras", "engine.manifest", "engine.plans",
            "engine.specs", "engine.toolchain")
BUILD = ("engine.cli", "engine.onnx_shapes", "engine.start_graph", "engine.step_graph", "engine.trt_build", "engine.trt_ops")
# The runtime's GPU backends: the only runtime modules that may import tensorrt or cuda-python.
RUNTIME_GPU = ("runtime.cuda", "runtime.trt", "runtime.trt_loader")
GPU_BINDINGS = ("tensorrt", "cuda")

STDLIB = frozenset(sys.stdlib_module_names)
CONTRACT_EXTERNAL = STDLIB | {"numpy"}
# Base dependencies (pyproject): numpy, onnxruntime, tokenizers, pillow, tqdm (engine-run's progress bar).
RUNTIME_EXTERNAL = CONTRACT_EXTERNAL | {"onnxruntime", "tokenizers", "PIL", "tqdm"}
# The HTTP app and its server (the [serve] extra): only these runtime modules; the queue, the A1111
# translation and the image codec stay on the base dependencies (a Triton backend or Ray replica reuses them).
# The Triton model file imports Triton's python-backend module, which exists only inside tritonserver.
SERVE_EXTERNAL = frozenset({"fastapi", "starlette", "uvicorn", "prometheus_client"})
RUNTIME_EXTRAS = {"runtime.serve.app": SERVE_EXTERNAL, "runtime.serve.cli": SERVE_EXTERNAL,
                  "runtime.serve.triton_model": frozenset({"triton_python_backend_utils"})}
NEVER_IN_RUNTIME = ("torch", "diffusers", "transformers", "onnx", "onnxscript", "onnx_graphsurgeon", "polygraphy",
                    "safetensors", "accelerate")
# The builders: onnx, polygraphy and the [trt] extra (tensorrt, and cuda-python for engine-build's own
# device query, engine/toolchain.py's docstring says why it is not the runtime's).
BUILD_EXTERNAL = CONTRACT_EXTERNAL | {"onnx", "polygraphy", "onnx_graphsurgeon", *GPU_BINDINGS}


@dataclass(frozen=True)
class Import:
    """One import in one module: the project module it names (internal) or the top-level package (external)."""

    module: str
    line: int
    target: str
    internal: bool

    def __str__(self) -> str:
        path = self.module.replace(".", "/") + ".py"
        return f"{path}:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    """Every Python module of the six top-level folders, by name."""
    return {module_name(p): p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))}


def imported_names(tree: ast.AST, package: str) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every import statement and literal importlib.import_module call."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .plan import x, from . import x
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([NAMESPACE, *anchor] + ([base] if base else []))
            yield from ((node.lineno, f"{base}.{a.name}") for a in node.names)
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))


def resolve(name: str) -> tuple[str, bool]:
    """(project module, True) for this project's names, longest known module first; else (top-level package, False)."""
    parts = name.split(".")
    if parts[0] == NAMESPACE:
        parts = parts[1:]
    elif parts[0] != "tests":
        return parts[0], False
    for n in range(len(parts), 0, -1):  # `from pkg.mod import f` names pkg.mod.f: the module is pkg.mod
        if ".".join(parts[:n]) in modules():
            return ".".join(parts[:n]), True
    return ".".join(parts), True


@lru_cache(maxsize=None)
def imports_of(module: str) -> tuple[Import, ...]:
    """The distinct (line, project module or package) imports of one module."""
    path = modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    return tuple(dict.fromkeys(Import(module, line, *resolve(name)) for line, name in imported_names(tree, package)))


def layer(module: str) -> str:
    """contract, build, runtime, export or tools: where a project module sits (DESIGN.md, "Layers")."""
    top = module.split(".")[0]
    if top == "engine":
        return "contract" if module in CONTRACT else "build" if module in BUILD else "unclassified"
    return "tools" if top in TOOLS else top


def check(name: str, members: Callable[[str], bool], bad: Callable[[Import], bool]) -> None:
    """Assert no import of the member modules is bad; print what was checked, and the offenders."""
    checked = [m for m in modules() if members(m)]
    found = [i for m in checked for i in imports_of(m)]
    offending = [i for i in found if bad(i)]
    print(f"{name}: {len(checked)} modules, {len(found)} imports (module level and in functions) checked, "
          f"{len(offending)} offending")
    assert checked, f"{name}: no modules found under {ROOT}"
    assert not offending, f"{name}: imports against DESIGN.md 'Layers':\n  " + "\n  ".join(map(str, offending))


def test_every_engine_module_is_contract_or_build():
    engine = [m for m in modules() if m.split(".")[0] == "engine"]
    print(f"engine/: {len(engine)} modules: {len(CONTRACT)} contract, {len(BUILD)} build")
    assert [m for m in engine if layer(m) == "unclassified"] == [], "name each new engine module in CONTRACT or BUILD"
    assert set(CONTRACT + BUILD) <= set(engine), "CONTRACT / BUILD name a module that does not exist"
    assert set(RUNTIME_GPU) <= set(modules()), "RUNTIME_GPU names a module that does not exist"
    assert set(RUNTIME_EXTRAS) <= set(modules()), "RUNTIME_EXTRAS names a module that does not exist"


def test_contract_imports_only_stdlib_numpy_and_the_contract():
    check("contract", lambda m: layer(m) == "contract",
          lambda i: layer(i.target) != "contract" if i.internal else i.target not in CONTRACT_EXTERNAL)


def test_runtime_imports_no_torch_diffusers_onnx_builders_or_export():
    assert not RUNTIME_EXTERNAL & set(NEVER_IN_RUNTIME)
    check("runtime", lambda m: layer(m) == "runtime",
          lambda i: layer(i.target) not in ("contract", "runtime") if i.internal
          else i.target not in RUNTIME_EXTERNAL | set(GPU_BINDINGS) | RUNTIME_EXTRAS.get(i.module, frozenset()))


def test_tensorrt_and_cuda_only_in_the_runtime_gpu_modules():
    check(f"GPU bindings {GPU_BINDINGS} outside {RUNTIME_GPU}", lambda m: layer(m) in ("contract", "runtime")
          and m not in RUNTIME_GPU, lambda i: not i.internal and i.target in GPU_BINDINGS)


def test_build_imports_no_runtime_and_no_export():
    check("build", lambda m: layer(m) == "build",
          lambda i: layer(i.target) not in ("contract", "build") if i.internal else i.target not in BUILD_EXTERNAL)


def test_export_imports_no_tools():
    check("export", lambda m: layer(m) == "export", lambda i: i.internal and layer(i.target) == "tools")


def test_the_reader_sees_lazy_and_relative_imports():
    """The checks above are only as good as this reader: a function-level, a relative and an importlib import."""
    source = "def f():\n    import tensorrt\n    from .plan import slot\n    importlib.import_module('cuda.bindings')\n"
    names = [n for _, n in imported_names(ast.parse(source), "runtime.samplers")]
    assert names == ["tensorrt", f"{NAMESPACE}.runtime.samplers.plan.slot", "cuda.bindings"]
    assert [resolve(n) for n in names] == [("tensorrt", False), ("runtime.samplers.plan", True), ("cuda", False)]
