"""Load a checkpoint for export: a diffusers folder, a hub id, or a single .safetensors/.ckpt file."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion_engine.engine.digest import file_digest
from diffusion_engine.engine.specs import (
    AESTHETIC_TIME_IDS,
    FAMILY_DEFAULTS,
    SIZE_TIME_IDS,
    TEXT_ENCODER,
    UNET,
    VAE_ENCODER,
    ModelDims,
)
from diffusion_engine.export.errors import CheckpointError
from diffusion_engine.export.families import SCHEDULER_REQUIREMENTS, detect_family

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
# The pipeline modules each component's export is the last to use (the VAE serves decoder and encoder).
RELEASED_AFTER = {TEXT_ENCODER: ("text_encoder", "text_encoder_2"), UNET: ("unet",), VAE_ENCODER: ("vae",)}


@dataclass
class Checkpoint:
    """A loaded checkpoint: its diffusers pipeline and what the engine records about it."""

    source: str
    kind: str  # "diffusers-folder", "hub", "single-file"
    family: str
    pipeline: Any  # a diffusers StableDiffusion(XL)Pipeline or LatentConsistencyModelPipeline
    digest: str
    config: str | None = None  # the single-file checkpoint's diffusers config it was loaded with

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The checkpoint's scheduler config, with what its family requires (turbo: trailing timesteps)."""
        cfg = dict(self.pipeline.scheduler.config)
        cfg["_class_name"] = type(self.pipeline.scheduler).__name__
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"}
        for key, value in SCHEDULER_REQUIREMENTS.get(self.family, {}).items():
            if cfg.get(key) != value:
                logger.warning("%s: scheduler %s=%r set to %r, as %s needs",
                               self.source, key, cfg.get(key), value, self.family)
                cfg[key] = value
        return cfg

    @property
    def prediction_type(self) -> str:
        return self.pipeline.scheduler.config.get("prediction_type", "epsilon")

    @property
    def dims(self) -> ModelDims:
        return model_dims(self.pipeline)

    @property
    def native_size(self) -> int:
        """The image side the UNet was trained at (what diffusers' pipelines default to)."""
        sample = self.pipeline.unet.config.sample_size
        side = sample if isinstance(sample, int) else None
        return side * self.dims.vae_scale_factor if side else FAMILY_DEFAULTS[self.family].size

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        return bool(getattr(self.pipeline.config, "force_zeros_for_empty_prompt", False))

    def fp32_bytes(self, component: str) -> int:
        """fp32 bytes of the modules release(component) frees (0 for the VAE decoder, which shares the VAE)."""
        modules = [getattr(self.pipeline, a, None) for a in RELEASED_AFTER.get(component, ())]
        return 4 * sum(p.numel() for m in modules if m is not None for p in m.parameters())

    def release(self, component: str) -> None:
        """Free the weights of the modules no component after `component` needs (export order:
        text encoder, UNet, VAE decoder, VAE encoder). The modules stay, on the meta device, with
        their configs: the checkpoint's dims and defaults still read them."""
        for attr in RELEASED_AFTER.get(component, ()):
            module = getattr(self.pipeline, attr, None)
            if module is not None:
                module.to("meta")


def model_dims(pipe: Any) -> ModelDims:
    """The numbers the component specs need, read from a diffusers pipeline's configs.

    SDXL's pooled text is the second encoder's projection; the SDXL refiner has only that encoder
    (and tokenizer) and conditions on an aesthetic score instead of the target size.
    """
    unet = pipe.unet.config
    second = getattr(pipe, "text_encoder_2", None)
    encoders = [e for e in (pipe.text_encoder, second) if e is not None]
    pooled = int(second.config.projection_dim) if second is not None else 0
    aesthetic = bool(getattr(pipe.config, "requires_aesthetics_score", False))
    text_time = unet.get("addition_embed_type") == "text_time"
    latent = int(pipe.vae.config.latent_channels)
    if unet.in_channels not in (latent, 2 * latent + 1):
        raise CheckpointError(
            f"the UNet takes {unet.in_channels} input channels; the VAE's latents have {latent} (a plain UNet) "
            f"and an inpainting UNet reads {2 * latent + 1} (latents, mask, masked-image latents)"
        )
    dims = ModelDims(
        latent_channels=latent,
        vae_scale_factor=2 ** (len(pipe.vae.config.block_out_channels) - 1),
        unet_downsample=2 ** (len(unet.down_block_types) - 1),
        text_hidden_size=sum(int(e.config.hidden_size) for e in encoders),
        max_text_length=text_tokenizers(pipe)[0].model_max_length,
        text_encoders=len(encoders),
        pooled_size=pooled,
        time_ids_size=(AESTHETIC_TIME_IDS if aesthetic else SIZE_TIME_IDS) if text_time else 0,
        timestep_cond_size=int(unet.get("time_cond_proj_dim") or 0),
        inpainting=unet.in_channels == 2 * latent + 1,
    )
    _check_dims(pipe, dims)
    return dims


def text_tokenizers(pipe: Any) -> list[Any]:
    """The tokenizers of the text encoders the engine runs, in input order (the refiner: tokenizer_2 only)."""
    return [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]


def _check_dims(pipe: Any, dims: ModelDims) -> None:
    """The text widths must be what the UNet reads (as diffusers' SDXL pipeline checks)."""
    unet = pipe.unet.config
    if isinstance(unet.cross_attention_dim, int) and unet.cross_attention_dim != dims.text_hidden_size:
        raise CheckpointError(
            f"the text encoders give {dims.text_hidden_size} features, "
            f"the UNet's cross_attention_dim is {unet.cross_attention_dim}"
        )
    if dims.time_ids_size:
        given = unet.addition_time_embed_dim * dims.time_ids_size + dims.pooled_size
        expected = pipe.unet.add_embedding.linear_1.in_features
        if given != expected:
            aesthetic = "" if dims.aesthetic else "out"
            raise CheckpointError(
                f"the UNet's added embedding takes {expected} features; {dims.time_ids_size} time ids (with{aesthetic} "
                f"requires_aesthetics_score) and pooled text give {given}"
            )
    tokenizers = text_tokenizers(pipe)
    if len(tokenizers) != dims.text_encoders:
        raise CheckpointError(f"the checkpoint has {dims.text_encoders} text encoders and {len(tokenizers)} tokenizers")
    if len({t.model_max_length for t in tokenizers}) > 1:
        raise CheckpointError(f"the tokenizers' lengths differ: {[t.model_max_length for t in tokenizers]}")


def load_checkpoint(source: str, config: str | None = None, family: str | None = None) -> Checkpoint:
    """Load a diffusers folder, a hub id (downloaded with diffusers) or a single-file checkpoint.

    `family` overrides the detected family within the checkpoint's architecture (export/families.py).
    """
    path, kind = Path(source).expanduser(), source_kind(source)
    if kind == "diffusers-folder":
        return _from_folder(path, source, kind, family)
    if kind == "single-file":
        from diffusion_engine.export.single_file import load_single_file

        pipe = load_single_file(path, config=config)
        detected = _family(pipe, path, family)
        return Checkpoint(str(path), kind, detected, pipe, file_digest([path]), config)
    return _from_folder(_download(source), source, kind, family)


def source_kind(source: str) -> str:
    """"diffusers-folder", "single-file" or "hub", decided without loading anything; else CheckpointError."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path} is not a diffusers checkpoint: it has no model_index.json")
        return "diffusers-folder"
    if path.is_file():
        return "single-file"
    if _HUB_ID.match(source) and not source.startswith((".", "~")):
        return "hub"
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


def _from_folder(path: Path, source: str, kind: str, family: str | None) -> Checkpoint:
    """Detect the family from the configs (refusing before any weights load), then load the pipeline."""
    index = path / "model_index.json"
    if not index.is_file():
        raise CheckpointError(f"{path} is not a diffusers checkpoint: it has no model_index.json")
    components = _read_json(index)
    detected = detect_family(str(path), components, _component_configs(path), source, family)
    from diffusers import DiffusionPipeline

    skipped = {"safety_checker": None} if "safety_checker" in components else {}  # never exported
    try:
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, **skipped)
    except Exception as exc:
        raise CheckpointError(f"{path}: could not load the checkpoint ({type(exc).__name__}: {exc})") from exc
    weights = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return Checkpoint(str(path), kind, detected, pipe, file_digest(weights, root=path))


def _component_configs(path: Path) -> dict[str, dict[str, Any]]:
    """The unet, text_encoder and scheduler configs of a diffusers folder ({} where absent)."""
    files = {"unet": "unet/config.json", "text_encoder": "text_encoder/config.json",
             "scheduler": "scheduler/scheduler_config.json"}
    return {name: _read_json(path / f) if (path / f).is_file() else {} for name, f in files.items()}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable config ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: a config must be a JSON object")
    return data


def _family(pipe: Any, path: Path, family: str | None) -> str:
    """The family of an already loaded pipeline (single files), by the same rule as for folders."""
    first = pipe.text_encoder
    index = {"_class_name": type(pipe).__name__,
             "text_encoder": ["transformers", type(first).__name__] if first is not None else [None, None]}
    configs = {
        "unet": dict(pipe.unet.config), "text_encoder": first.config.to_dict() if first is not None else {},
        "scheduler": {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__},
    }
    return detect_family(str(path), index, configs, path.name, family)
