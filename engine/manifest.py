"""The engine directory's manifest.json: write atomically, read with clear errors. Stdlib only."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from diffusion_engine.engine.specs import (
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

    files: dict[str, str]  # precision ("fp32", "fp16") -> file name in the engine dir
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    axis_ranges: dict[str, dict[str, int]]
    tolerance: dict[str, float]
    gpu_precision: str  # the graph TensorRT builds from: "fp16", or "fp32" where fp16 is unsafe
    parameters: int
    parity: dict[str, list[dict[str, Any]]]  # precision -> [{dims, max_abs, rel_error}]
    notes: list[str] = field(default_factory=list)
    plans: list[dict[str, Any]] = field(default_factory=list)  # TensorRT plans, added by engine-build

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

    def to_json(self) -> str:
        d = asdict(self)
        d = {"format_version": d.pop("format_version"), **d}
        return json.dumps(d, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        d = dict(d)
        d["dims"] = ModelDims(**d["dims"])
        d["build"] = BuildRanges(**d["build"])
        d["components"] = {k: ComponentEntry(**v) for k, v in d["components"].items()}
        return cls(**d)

    def specs(self) -> dict[str, ComponentSpec]:
        """Specs rebuilt from the model dims (the same function export used)."""
        return component_specs(self.dims)


def read_manifest(engine_dir: str | os.PathLike) -> Manifest:
    """Read and check an engine directory's manifest; ManifestError says what is wrong."""
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
    return manifest


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to target, on failure delete it."""
    target = Path(target).resolve()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; choose another --out or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a file under a temporary name, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
