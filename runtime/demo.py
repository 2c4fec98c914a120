"""The built-in demo model: a tiny checkpoint trained on shapes, exported once into a cache.

`engine-run` without `--engine` uses it. The checkpoint ships in `diffusion_engine.train`
(`train/demo-checkpoint/`); the first run exports it into
`$DIFFUSION_ENGINE_CACHE/demo-<digest>` (default `~/.cache/diffusion-engine/demo-<digest>`, the
digest being a sha256 of the checkpoint and the export settings); later runs reuse that engine. The export needs torch, which
the runtime never imports, so it runs as a subprocess: `python -m diffusion_engine.export.cli`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

from diffusion_engine.engine.digest import file_digest
from diffusion_engine.engine.extras import missing_modules
from diffusion_engine.engine.manifest import MANIFEST, ManifestError, check_files, is_engine_directory, read_manifest
from diffusion_engine.engine.specs import UNET

logger = logging.getLogger(__name__)

CACHE_ENV = "DIFFUSION_ENGINE_CACHE"
DEFAULT_CACHE = "~/.cache/diffusion-engine"
CHECKPOINT_PACKAGE, CHECKPOINT = "diffusion_engine.train", "demo-checkpoint"
# Trained at 64x64 (the manifest's default size); the engine also takes up to 128, in steps of 16.
MIN_SIZE, MAX_SIZE, MAX_BATCH = 64, 128, 4
# Its default guidance: it draws the cleanest shapes at 1.5 to 2 (train/README.md, "The committed
# checkpoint"); SD1.x's usual 7.5 over-saturates them.
GUIDANCE = 2.0
EXPORT_SETTINGS = (f"--min-size {MIN_SIZE} --max-size {MAX_SIZE} --max-batch {MAX_BATCH} "
                   f"--default-guidance {GUIDANCE}")
DESCRIPTION = (
    "a tiny model trained from scratch on 64x64 images of one shape, prompted as "
    "'a COLOR SHAPE on a COLOR background' (colours red, green, blue, yellow, white, black; "
    "shapes circle, square, triangle)"
)

Say = Callable[[str], None]
UNCHECKED = "was exported before engines carried checksums"  # a flaw of a cache made by an older version
UNFUSED = "was exported before fused CPU attention"  # another: it works, with whole attention score matrices
MISSING = "is not there"


class DemoError(RuntimeError):
    """The demo model cannot be made ready (missing [export] extra, failed export, broken install)."""


@dataclass(frozen=True)
class DemoModel:
    """The packaged checkpoint, its engine directory in the cache, and whether this call exported it."""

    checkpoint: Path
    engine_dir: Path
    exported: bool


def checkpoint_dir() -> Path:
    """The packaged demo checkpoint (a diffusers folder), found through importlib.resources."""
    try:
        path = Path(str(resources.files(CHECKPOINT_PACKAGE) / CHECKPOINT))
    except ModuleNotFoundError as exc:
        raise DemoError(f"{CHECKPOINT_PACKAGE} is not installed; reinstall diffusion-engine or pass --engine") from exc
    if not (path / "model_index.json").is_file():
        raise DemoError(f"the demo checkpoint is missing from this install ({path}); reinstall diffusion-engine or pass --engine")
    return path


def checkpoint_digest(path: Path) -> str:
    """sha256 over every file of the checkpoint: relative name, then contents, in sorted order."""
    return file_digest(sorted(p for p in path.rglob("*") if p.is_file()), root=path).removeprefix("sha256:")


def cache_root() -> Path:
    """$DIFFUSION_ENGINE_CACHE, or ~/.cache/diffusion-engine."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def engine_dir_for(checkpoint: Path) -> Path:
    """<cache>/demo-<digest[:12]>, the digest of the checkpoint's and the export settings' (EXPORT_SETTINGS):
    a changed checkpoint or setting gets a new engine, never a stale one."""
    key = hashlib.sha256(f"{checkpoint_digest(checkpoint)} {EXPORT_SETTINGS}".encode()).hexdigest()
    return cache_root() / f"demo-{key[:12]}"


def export_command(checkpoint: Path, out: Path) -> list[str]:
    """The export subprocess: this interpreter, the engine-export CLI, the demo's build ranges and guidance."""
    return [sys.executable, "-m", "diffusion_engine.export.cli", str(checkpoint), "--out", str(out),
            *EXPORT_SETTINGS.split(), "--overwrite"]


def ensure_engine(say: Say = lambda message: None) -> DemoModel:
    """The demo engine, exported first if the cache has none or a damaged one; `say` hears about a coming export."""
    checkpoint = checkpoint_dir()
    out = engine_dir_for(checkpoint)
    flaw = _flaw(out)
    if flaw is None:
        return DemoModel(checkpoint, out, exported=False)
    missing = missing_modules("export")
    if missing and flaw in (UNCHECKED, UNFUSED):  # it works; it is exported again (with checksums) once [export] is here
        return DemoModel(checkpoint, out, exported=False)
    if missing:
        raise DemoError(
            f"the built-in demo model must be exported once, which needs the [export] extra "
            f"(missing: {', '.join(missing)}): pip install 'diffusion-engine[export]', or pass --engine DIR"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out.parent / f".{out.name}.lock"):
        flaw = _flaw(out)
        if flaw is None:  # another process exported it while we waited
            return DemoModel(checkpoint, out, exported=False)
        if os.path.lexists(out) and not is_engine_directory(out):
            raise DemoError(f"the demo engine cache {out} is damaged (its manifest is unreadable); delete that folder")
        again = f"again, as the cached one {flaw}, " if os.path.lexists(out) else "once "
        say(f"exporting the built-in demo model {again}into {out} (about a minute; later runs reuse it)")
        _export(checkpoint, out)
    return DemoModel(checkpoint, out, exported=True)


def _flaw(engine_dir: Path) -> str | None:
    """None if the cached engine reads and every file has the size and digest its export recorded (a few MB);
    else what is wrong with it, for the message (MISSING where nothing was exported yet)."""
    if not (engine_dir / MANIFEST).is_file():
        return MISSING
    try:
        manifest = read_manifest(engine_dir)
        problems = check_files(engine_dir, manifest)
    except ManifestError as exc:
        problems = [str(exc)]
    else:
        if not manifest.checksums:
            return UNCHECKED
        if not problems and not manifest.components[UNET].score_buffers:
            return UNFUSED
    return f"is damaged ({problems[0]})" if problems else None


def _export(checkpoint: Path, out: Path) -> None:
    """Run the export subprocess; its output is shown only if it fails."""
    command = export_command(checkpoint, out)
    logger.debug("running %s", " ".join(command))
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0 or not (out / MANIFEST).is_file():
        tail = "\n".join(result.stdout.strip().splitlines()[-15:])
        raise DemoError(f"exporting the demo model failed (exit status {result.returncode}):\n{tail}")
    logger.debug("export output:\n%s", result.stdout)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive file lock, so concurrent first runs export once (where fcntl exists)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent first runs each export; the rename keeps the folder whole
        yield
        return
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
