"""What our GPU code calls in cuda-python's runtime API and in TensorRT, collected from our source with `ast`,
and checks of it against the real packages: cuda.bindings.runtime imported (it imports without a driver), the
TensorRT bindings read from the wheel's compiled module without importing it (its libnvinfer is not on PyPI).

Used by tests/test_gpu_api.py; the collectors take source text, so a test can plant a wrong name in a copy.
"""

from __future__ import annotations

import ast
import inspect
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = ("runtime/cuda.py", "engine/toolchain.py", "engine/trt_build.py")
TRT_SOURCES = ("runtime/trt.py", "runtime/trt_loader.py", "engine/trt_build.py", "engine/toolchain.py")


def sources(names: tuple[str, ...]) -> dict[str, str]:
    return {n: (ROOT / n).read_text() for n in names}


# --- cuda-python's runtime API ----------------------------------------------------------------------------

@dataclass
class CudaUses:
    """cudart calls (name, positional count, keyword names, where), attribute chains, tuple unpacks of a
    call's result (name, length) and attributes read from an unpacked value (call, index, attribute)."""

    calls: list[tuple[str, int, tuple[str, ...], str]] = field(default_factory=list)
    chains: list[tuple[tuple[str, ...], str]] = field(default_factory=list)
    unpacks: list[tuple[str, int, str]] = field(default_factory=list)
    fields: list[tuple[str, int, str, str]] = field(default_factory=list)


def _is_loader_call(node: ast.AST) -> bool:
    """A call of a function whose name says it returns the cudart module: cudart(), _cudart(), load_cudart()."""
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and "cudart" in node.func.id


def _chain(node: ast.AST, is_root: Any) -> tuple[str, ...] | None:
    """('a', 'b') for root.a.b where is_root(root); else None."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return tuple(reversed(names)) if names and is_root(node) else None


def collect_cuda(texts: dict[str, str]) -> CudaUses:
    """Every use of the cudart module in these sources, per function (module aliases: names bound to a loader call)."""
    uses = CudaUses()
    for path, text in texts.items():
        for fn in (n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            body = list(ast.walk(fn))
            aliases = {t.id for n in body if isinstance(n, ast.Assign) and _is_loader_call(n.value)
                       for t in n.targets if isinstance(t, ast.Name)}
            is_root = lambda n: _is_loader_call(n) or (isinstance(n, ast.Name) and n.id in aliases)  # noqa: E731
            call_funcs = {id(n.func) for n in body if isinstance(n, ast.Call)}
            for n in body:
                where = f"{path}:{getattr(n, 'lineno', '?')}"
                if isinstance(n, ast.Call) and (c := _chain(n.func, is_root)) and len(c) == 1:
                    npos = sum(not isinstance(a, ast.Starred) for a in n.args)
                    uses.calls.append((c[0], npos, tuple(k.arg for k in n.keywords if k.arg), where))
                elif isinstance(n, ast.Attribute) and id(n) not in call_funcs and (c := _chain(n, is_root)):
                    uses.chains.append((c, where))
            for n in body:  # err, x = rt.fn(...) [if ... else ...]
                if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Tuple):
                    value = n.value.body if isinstance(n.value, ast.IfExp) else n.value
                    if isinstance(value, ast.Call) and (c := _chain(value.func, is_root)) and len(c) == 1:
                        names = n.targets[0].elts
                        uses.unpacks.append((c[0], len(names), f"{path}:{n.lineno}"))
                        for i, t in enumerate(names):
                            for a in body:
                                if isinstance(a, ast.Attribute) and isinstance(a.value, ast.Name) and isinstance(t, ast.Name) \
                                        and a.value.id == t.id and i > 0:
                                    uses.fields.append((c[0], i, a.attr, f"{path}:{a.lineno}"))
    # An Attribute inside a longer chain is part of that chain: keep the longest ones only.
    longest = {c for c, _ in uses.chains}
    uses.chains = [(c, w) for c, w in uses.chains if not any(o != c and o[: len(c)] == c for o in longest)]
    return uses


def documented_returns(fn: Any) -> list[str]:
    """The types in a cuda-python function's numpydoc 'Returns' section (cudaError_t first)."""
    doc = fn.__doc__ or ""
    m = re.search(r"\nReturns\n-+\n(.*?)(?:\n\n[A-Z][A-Za-z ]+\n-+\n|\Z)", doc, re.S)
    entries = [line for line in (m.group(1).splitlines() if m else []) if line and not line[0].isspace()]
    return [e.split(" : ")[-1].strip() for e in entries]


def check_cuda(uses: CudaUses, rt: Any) -> list[str]:
    """Problems: calls that do not exist or do not bind to the real signature, missing names, wrong unpacks."""
    problems = []
    for name, npos, keywords, where in uses.calls:
        fn = getattr(rt, name, None)
        if fn is None:
            problems.append(f"{where}: cudart has no {name}")
            continue
        try:
            inspect.signature(fn).bind(*[None] * npos, **{k: None for k in keywords})
        except TypeError as exc:
            problems.append(f"{where}: {name}{inspect.signature(fn)} called with {npos} positional {keywords}: {exc}")
    for chain, where in uses.chains:
        obj = rt
        for part in chain:
            if not hasattr(obj, part):
                problems.append(f"{where}: cudart has no {'.'.join(chain)}")
                break
            obj = getattr(obj, part)
    for name, n, where in uses.unpacks:
        returns = documented_returns(getattr(rt, name, None))
        if len(returns) != n:
            problems.append(f"{where}: {name} returns {len(returns)} values ({', '.join(returns)}), unpacked into {n}")
    for name, i, attr, where in uses.fields:
        returns = documented_returns(getattr(rt, name, None))
        type_name = re.sub(r"[:`~.]|py:obj", "", returns[i]) if i < len(returns) else None
        cls = getattr(rt, type_name, None) if type_name else None
        if cls is None or not hasattr(cls(), attr):
            problems.append(f"{where}: {name}'s value {i} ({type_name}) has no attribute {attr}")
    return problems


# --- TensorRT ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrtUse:
    """One TensorRT name our code reads: a module attribute, member, method, keyword or overridden method."""

    name: str
    owner: str  # 'tensorrt' for module attributes, the class or enum for members when known, else 'object'
    where: str
    guard: str  # '' (always needed), 'hasattr' (optional: feature-tested), 'strongly_typed' / 'weakly_typed'


def collect_trt(texts: dict[str, str]) -> list[TrtUse]:
    """Every TensorRT name these sources read. The module is `trt` or `.trt`; TensorRT objects are values made by
    its calls and every name such a value is assigned to anywhere in these sources (to a fixpoint)."""
    trees = {path: ast.parse(text) for path, text in texts.items()}
    objects: set[str] = set()

    def is_module(n: ast.AST) -> bool:
        return (isinstance(n, ast.Name) and n.id == "trt") or (isinstance(n, ast.Attribute) and n.attr == "trt")

    def is_object(n: ast.AST) -> bool:
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
            return is_module(n.func.value) or is_object(n.func.value)
        return (isinstance(n, ast.Name) and n.id in objects) or (isinstance(n, ast.Attribute) and n.attr in objects
                                                                   and not is_module(n))

    while True:  # names bound to TensorRT objects, across files (builder, network, cfg, engine, context, ...)
        before = len(objects)
        for tree in trees.values():
            for n in ast.walk(tree):
                if isinstance(n, ast.Assign) and is_object(n.value):
                    objects.update(t.id if isinstance(t, ast.Name) else t.attr for t in n.targets
                                   if isinstance(t, (ast.Name, ast.Attribute)))
        if len(objects) == before:
            break
    uses = []
    for path, tree in trees.items():
        guards = _guards(tree)
        for n in ast.walk(tree):
            where, guard = f"{path}:{getattr(n, 'lineno', '?')}", guards.get(id(n), "")
            if isinstance(n, ast.Attribute) and is_module(n.value):
                uses.append(TrtUse(n.attr, "tensorrt", where, guard))
            elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute) and is_module(n.value.value):
                uses.append(TrtUse(n.attr, n.value.attr, where, guard))
            elif isinstance(n, ast.Attribute) and is_object(n.value):
                uses.append(TrtUse(n.attr, "object", where, guard))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and (is_object(n.func.value) or is_module(n.func.value)):
                uses.extend(TrtUse(k.arg, "keyword", where, guard) for k in n.keywords if k.arg)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("hasattr", "getattr") \
                    and len(n.args) >= 2 and isinstance(n.args[1], ast.Constant):
                owner = n.args[0]
                if isinstance(owner, ast.Attribute) and (is_module(owner.value) or is_module(owner)):
                    optional = n.func.id == "hasattr" or len(n.args) == 3
                    uses.append(TrtUse(n.args[1].value, owner.attr, where, "hasattr" if optional else guard))
            if isinstance(n, ast.ClassDef) and any(isinstance(b, ast.Attribute) and is_module(b.value) for b in n.bases):
                base = next(b.attr for b in n.bases if isinstance(b, ast.Attribute) and is_module(b.value))
                uses.extend(TrtUse(f.name, base, f"{path}:{f.lineno}", guard) for f in n.body
                            if isinstance(f, ast.FunctionDef) and not f.name.startswith("__"))
    return uses


def _guards(tree: ast.AST) -> dict[int, str]:
    """Node id -> the feature test it runs under: 'hasattr' inside `if hasattr(...)`, 'weakly_typed' inside
    `if not <x>.strongly_typed ...` (its body runs only on a TensorRT without STRONGLY_TYPED), 'strongly_typed'."""
    out: dict[int, str] = {}
    for n in ast.walk(tree):
        if not isinstance(n, ast.If):
            continue
        names = [m for m in ast.walk(n.test) if isinstance(m, ast.Attribute) and m.attr == "strongly_typed"]
        negated = any(isinstance(m, ast.UnaryOp) and isinstance(m.op, ast.Not) and m.operand in names
                      for m in ast.walk(n.test))
        if names:
            kind = "weakly_typed" if negated else "strongly_typed"
        elif any(isinstance(m, ast.Call) and isinstance(m.func, ast.Name) and m.func.id == "hasattr" for m in ast.walk(n.test)):
            kind = "hasattr"
        else:
            continue
        for stmt in n.body:
            for m in ast.walk(stmt):
                out.setdefault(id(m), kind)
    return out


def bindings_wheel(folder: Path, major: int) -> Path | None:
    """The newest tensorrt-cu12-bindings wheel of a major version in `folder` (make install downloads them)."""
    wheels = sorted(folder.glob(f"tensorrt_cu12_bindings-{major}.*.whl")) if folder.is_dir() else []
    return wheels[-1] if wheels else None


@dataclass(frozen=True)
class Bindings:
    """What a TensorRT bindings wheel binds: every identifier string its compiled module's code points at
    (pybind11 passes each class, method, attribute, argument and enum member name as such a string), and the
    Python text of its package (module attributes set there, e.g. __version__)."""

    version: str
    names: frozenset[str]
    python: str


def read_bindings(wheel: Path) -> Bindings:
    with zipfile.ZipFile(wheel) as z:
        so = z.read("tensorrt_bindings/tensorrt.so")
        python = z.read("tensorrt_bindings/__init__.py").decode()
    return Bindings(wheel.name.split("-")[1], frozenset(referenced_strings(so)), python)


def referenced_strings(elf: bytes) -> Iterator[str]:
    """Identifier strings in .rodata that x86-64 code loads by `lea reg, [rip + disp32]` (string literals
    passed as arguments). A linker may merge a string into another's tail ('serialize' in 'deserialize'):
    the pointer then lands inside the longer one, and the string read from there is still the right one."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or struct.unpack_from("<H", elf, 18)[0] != 62:
        raise ValueError("not an x86-64 ELF64 module")
    sections = _sections(elf)
    text_addr, text_off, text_size = sections[".text"]
    ro_addr, ro_off, ro_size = sections[".rodata"]
    text = elf[text_off: text_off + text_size]
    ident = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*\0")
    # REX.W (+R) 8D /r with mod=00 rm=101: lea r64, [rip + disp32]; 7 bytes long.
    for m in re.finditer(rb"[\x48\x4c]\x8d[\x05\x0d\x15\x1d\x25\x2d\x35\x3d]", text):
        target = text_addr + m.start() + 7 + struct.unpack_from("<i", text, m.end())[0]
        if ro_addr <= target < ro_addr + ro_size and (s := ident.match(elf, ro_off + target - ro_addr)):
            yield s.group()[:-1].decode()


def _sections(elf: bytes) -> dict[str, tuple[int, int, int]]:
    """ELF64 section name -> (address, file offset, size)."""
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    entsize, count, names_index = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * entsize) for i in range(count)]
    names = headers[names_index][4]
    return {elf[names + h[0]: elf.index(b"\0", names + h[0])].decode(): (h[3], h[4], h[5]) for h in headers}


def check_trt(uses: list[TrtUse], b: Bindings) -> list[str]:
    """Problems: names our code needs from this TensorRT that its bindings do not bind."""
    strongly_typed = "STRONGLY_TYPED" in b.names
    problems = []
    for u in uses:
        if u.guard == "hasattr" or (u.guard == "weakly_typed" and strongly_typed) \
                or (u.guard == "strongly_typed" and not strongly_typed):
            continue
        if u.name.startswith("__"):
            found = u.owner != "tensorrt" or re.search(rf"^{u.name}\s*=", b.python, re.M) is not None
        else:
            found = u.name in b.names
        if not found:
            problems.append(f"{u.where}: TensorRT {b.version} binds no {u.name} ({u.owner})")
    return problems
