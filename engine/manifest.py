"""The engine directory's manifest.json: write atomically, read with clear errors. Stdlib only."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from diffusion_engine.engine.atomic import check_output_dir
from diffusion_engine.engine.digest import file_digest
from diffusion_engine.engine.specs import (
    CPU_GRAPH,
    AxisRange,
    BuildRanges,
    ComponentSpec,
    ModelDims,
    TensorSpec,
    Tolerance,
    component_specs,
)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A missing, corrupt or incompatible engine directory; the message names the path."""


@dataclass
class ComponentEntry:
    """One component of the engine: its graph files, I/O, built ranges and measured errors."""

    files: dict[str, str]  # "fp32", "fp16", CPU_GRAPH ("cpu": attention fused for ONNX Runtime's CPU) -> file name
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    axis_ranges: dict[str, dict[str, int]]
    tolerance: dict[str, float]
    gpu_precision: str  # the graph TensorRT builds from: "fp16", or "fp32" where fp16 is unsafe
    parameters: int
    parity: dict[str, list[dict[str, Any]]]  # precision -> [{dims, max_abs, rel_error}]
    notes: list[str] = field(default_factory=list)
    plans: list[dict[str, Any]] = field(default_factory=list)  # TensorRT plans, added by engine-build
    # graph key ("cpu" or "fp32": what ort-cpu opens) -> the score tensors its attention materialises,
    # per batch row: {"elements", "at_area", "power", "axes"} (export/attention.py); absent before them.
    score_buffers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def cpu_key(self) -> str:
        """The key of the graph ONNX Runtime on the CPU runs: CPU_GRAPH (attention fused) where the export wrote it."""
        return CPU_GRAPH if CPU_GRAPH in self.files else "fp32"

    def cpu_file(self) -> str:
        return self.files[self.cpu_key()]

    @classmethod
    def from_spec(cls, spec: ComponentSpec, ranges: dict[str, AxisRange], **kw: Any) -> "ComponentEntry":
        return cls(
            inputs=[asdict(t) for t in spec.inputs],
            outputs=[asdict(t) for t in spec.outputs],
            axis_ranges={a: asdict(r) for a, r in ranges.items()},
            tolerance=asdict(spec.tolerance),
            **kw,
        )

    def spec(self, name: str) -> ComponentSpec:
        """The component spec as recorded (names, dtypes, axes)."""
        def tensors(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["axes"])) for t in items)

        return ComponentSpec(name, tensors(self.inputs), tensors(self.outputs), Tolerance(**self.tolerance))

    def ranges(self) -> dict[str, AxisRange]:
        return {a: AxisRange(**r) for a, r in self.axis_ranges.items()}


@dataclass
class Manifest:
    """Everything the runtime needs to know about an engine directory."""

    family: str
    prediction_type: str
    dims: ModelDims
    build: BuildRanges
    scheduler_config: dict[str, Any]
    tokenizer: dict[str, Any]  # file, max_length, pad/bos/eos token ids
    components: dict[str, ComponentEntry]
    source: dict[str, str]
    tool_versions: dict[str, str]
    format_version: int = FORMAT_VERSION
    # Added within format 1 (older manifests read with these defaults):
    defaults: dict[str, Any] = field(default_factory=dict)  # size, steps, guidance_scale, scheduler
    tokenizer_2: dict[str, Any] | None = None  # SDXL's second tokenizer, as `tokenizer`
    force_zeros_for_empty_prompt: bool = False  # SDXL: an empty negative prompt is zero conditioning
    # file name -> {"bytes": size, "sha256": digest} of every file of the engine (not manifest.json itself)
    checksums: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d = {"format_version": d.pop("format_version"), **d}
        return json.dumps(d, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        """Build from parsed JSON; fields this version does not know (added by later exports) are ignored."""
        d = _known(cls, d)
        d["dims"] = ModelDims(**_known(ModelDims, d["dims"]))
        d["build"] = BuildRanges(**_known(BuildRanges, d["build"]))
        d["components"] = {k: ComponentEntry(**_known(ComponentEntry, v)) for k, v in d["components"].items()}
        return cls(**d)

    def specs(self) -> dict[str, ComponentSpec]:
        """Specs rebuilt from the model dims (the same function export used)."""
        return component_specs(self.dims)


def read_manifest(engine_dir: str | os.PathLike, check_sizes: bool = True) -> Manifest:
    """Read and check an engine directory's manifest (files present, with check_sizes of the recorded
    sizes: a stat per file); ManifestError says what is wrong."""
    root = Path(engine_dir)
    path = root / MANIFEST
    if not root.is_dir():
        raise ManifestError(f"{root}: no such engine directory")
    if not path.is_file():
        raise ManifestError(f"{root} is not an engine directory: it has no {MANIFEST}")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: corrupt manifest ({exc})") from exc
    version = d.get("format_version") if isinstance(d, dict) else None
    if not isinstance(version, int):
        raise ManifestError(f"{path}: corrupt manifest (no integer format_version)")
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format version {version} is newer than this diffusion-engine reads ({FORMAT_VERSION}); upgrade it"
        )
    try:
        manifest = Manifest.from_dict(d)
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{path}: corrupt manifest ({type(exc).__name__}: {exc})") from exc
    missing = [f for c in manifest.components.values() for f in c.files.values() if not (root / f).is_file()]
    for tokenizer in filter(None, (manifest.tokenizer, manifest.tokenizer_2)):
        if not (root / tokenizer.get("file", "")).is_file():
            missing.append(str(tokenizer.get("file")))
    if missing:
        raise ManifestError(f"{root}: files listed in the manifest are missing: {', '.join(missing)}")
    damaged = check_files(root, manifest, digests=False) if check_sizes else []
    if damaged:
        raise EngineFileError(f"{root}: {damaged[0]}; {repair_hint(root)}")
    return manifest


class EngineFileError(ManifestError):
    """A file of an engine directory is damaged (truncated, overwritten, unreadable); the message names it."""


def repair_hint(engine_dir: str | os.PathLike) -> str:
    return f"the engine is damaged: check it with `engine-info --verify {engine_dir}` and export it again"


def checksums(root: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """{name: {"bytes", "sha256"}} of the named files of root, by default every file but the manifest and hidden ones."""
    root = Path(root)
    if names is None:
        names = sorted(p.name for p in root.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))
    return {n: {"bytes": (root / n).stat().st_size, "sha256": file_digest([root / n], root)} for n in names}


def check_files(root: str | os.PathLike, manifest: Manifest, digests: bool = True) -> list[str]:
    """What is wrong with the files the manifest's checksums list: missing, another size, (with digests) other bytes."""
    root, problems = Path(root), []
    for name, want in manifest.checksums.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != want.get("bytes"):
            problems.append(f"{name} has {path.stat().st_size:,} bytes, the export wrote {want.get('bytes'):,}")
        elif digests and file_digest([path], root) != want.get("sha256"):
            problems.append(f"{name} has other contents than the export wrote (sha256 differs)")
    return problems


def damaged_file(path: str | os.PathLike, exc: BaseException) -> EngineFileError:
    """The one-line error for an engine file a library could not load."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    return EngineFileError(
        f"{path} cannot be loaded ({first}): check the engine with `engine-info --verify {Path(path).parent}`; "
        "if it is damaged, export it again"
    )


def _known(cls: type, d: Any) -> dict[str, Any]:
    """The entries of d that are fields of the dataclass cls (readers ignore unknown fields)."""
    if not isinstance(d, dict):
        raise TypeError(f"expected an object for {cls.__name__}, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def is_engine_directory(path: str | os.PathLike) -> bool:
    """True if path is a folder holding a manifest.json this tool wrote (an integer format_version, components)."""
    manifest = Path(path) / MANIFEST
    try:
        d = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(d, dict) and isinstance(d.get("format_version"), int) and isinstance(d.get("components"), dict)


def check_engine_out(target: str | os.PathLike, overwrite: bool, source: str | os.PathLike | None = None) -> None:
    """check_output_dir for an engine directory: with overwrite, only one this tool wrote (or an empty folder)."""
    check_output_dir(target, overwrite, source, is_engine_directory, "an engine directory")
