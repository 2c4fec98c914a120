"""The engine directory's manifest.json: write atomically, read with clear errors. Stdlib only."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

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
        """Build from parsed JSON; fields this version does not know (added by later exports) are ignored."""
        d = _known(cls, d)
        d["dims"] = ModelDims(**_known(ModelDims, d["dims"]))
        d["build"] = BuildRanges(**_known(BuildRanges, d["build"]))
        d["components"] = {k: ComponentEntry(**_known(ComponentEntry, v)) for k, v in d["components"].items()}
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


def check_output_dir(target: str | os.PathLike, overwrite: bool, source: str | os.PathLike | None = None,
                     replaceable: Callable[[Path], bool] = is_engine_directory, what: str = "an engine directory") -> None:
    """Raise (before any work) unless target may be written: absent, or with overwrite an empty folder or
    `replaceable` (by default an engine directory this tool wrote); never the source, inside it or around it."""
    out = Path(target).expanduser().resolve()
    if source is not None and Path(source).expanduser().exists():
        src = Path(source).expanduser().resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ValueError(f"--out {target} is the source {source}, inside it or contains it; choose another folder")
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise FileExistsError(f"{target} already exists; choose another --out or pass --overwrite")
    if out.is_dir() and not out.is_symlink() and (not any(out.iterdir()) or replaceable(out)):
        return
    raise FileExistsError(
        f"{target} exists and is not {what} written by this tool (nor an empty folder); "
        "--overwrite replaces only those: choose another --out"
    )


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(
    target: str | os.PathLike, overwrite: bool = False, source: str | os.PathLike | None = None,
    replaceable: Callable[[Path], bool] = is_engine_directory, what: str = "an engine directory",
) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to target, on failure delete it.

    With overwrite, only an empty folder or one `replaceable` accepts (check_output_dir) is replaced.
    The folder gets the permissions the umask gives (mkdtemp alone makes it 0700).
    """
    check_output_dir(target, overwrite, source, replaceable, what)
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        if target.exists():
            aside_tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, aside_tmp / target.name)
            os.replace(tmp, target)
            shutil.rmtree(aside_tmp, ignore_errors=True)  # only what we just moved aside: the replaced folder
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str | None = None,
                 writer: Callable[[Path], None] | None = None) -> None:
    """Write a file under a temporary name (data, or writer(tmp_path)), then rename it into place.

    The file gets the permissions the umask gives (mkstemp alone makes it 0600).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if writer is None:
                fh.write(data.encode() if isinstance(data, str) else data)
        if writer is not None:
            writer(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
