"""Load a checkpoint for export: a diffusers folder, a hub id, or a single .safetensors/.ckpt file."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion_engine.engine.specs import ModelDims
from diffusion_engine.export.errors import CheckpointError

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
SUPPORTED_PIPELINES = ("StableDiffusionPipeline",)


@dataclass
class Checkpoint:
    """A loaded checkpoint: its diffusers pipeline and what the engine records about it."""

    source: str
    kind: str  # "diffusers-folder", "hub", "single-file"
    family: str
    pipeline: Any  # diffusers.StableDiffusionPipeline
    digest: str

    @property
    def scheduler_config(self) -> dict[str, Any]:
        cfg = dict(self.pipeline.scheduler.config)
        cfg["_class_name"] = type(self.pipeline.scheduler).__name__
        return {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"}

    @property
    def prediction_type(self) -> str:
        return self.pipeline.scheduler.config.get("prediction_type", "epsilon")

    @property
    def dims(self) -> ModelDims:
        p = self.pipeline
        return ModelDims(
            latent_channels=p.unet.config.in_channels,
            vae_scale_factor=2 ** (len(p.vae.config.block_out_channels) - 1),
            unet_downsample=2 ** (len(p.unet.config.down_block_types) - 1),
            text_hidden_size=p.text_encoder.config.hidden_size,
            max_text_length=p.tokenizer.model_max_length,
        )


def load_checkpoint(source: str, config: str | None = None) -> Checkpoint:
    """Load a diffusers folder, a hub id (downloaded with diffusers) or a single-file checkpoint."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_folder(path, source, "diffusers-folder")
    if path.is_file():
        from diffusion_engine.export.single_file import load_single_file

        pipe = load_single_file(path, config=config)
        return Checkpoint(str(path), "single-file", _family(pipe, path), pipe, file_digest([path]))
    if _HUB_ID.match(source) and not source.startswith((".", "~")):
        return _from_folder(_download(source), source, "hub")
    raise CheckpointError(f"{source}: no such file or folder, and not a hub id of the form 'org/name'")


def _download(repo_id: str) -> Path:
    """Download a hub checkpoint into the Hugging Face cache (needs network access to the hub)."""
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(repo_id))
    except Exception as exc:  # network, auth, missing repo: all reported the same way
        raise CheckpointError(
            f"{repo_id}: could not download from the model hub ({type(exc).__name__}: {exc}); "
            "check the id and network access, or pass a local diffusers folder"
        ) from exc


def _from_folder(path: Path, source: str, kind: str) -> Checkpoint:
    index = path / "model_index.json"
    if not index.is_file():
        raise CheckpointError(f"{path} is not a diffusers checkpoint: it has no model_index.json")
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, safety_checker=None)
    except Exception as exc:
        raise CheckpointError(f"{path}: could not load the checkpoint ({type(exc).__name__}: {exc})") from exc
    weights = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return Checkpoint(str(path), kind, _family(pipe, path), pipe, file_digest(weights, root=path))


def _family(pipe: Any, path: Path) -> str:
    """The model family: sd1 or sd2 for a StableDiffusionPipeline; anything else is refused."""
    name = type(pipe).__name__
    if name not in SUPPORTED_PIPELINES:
        raise CheckpointError(f"{path}: {name} checkpoints are not supported; supported: {', '.join(SUPPORTED_PIPELINES)}")
    return "sd2" if pipe.unet.config.cross_attention_dim == 1024 else "sd1"


def file_digest(files: list[Path], root: Path | None = None) -> str:
    """sha256 over the files' relative names and contents, in sorted order."""
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root) if root else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()
