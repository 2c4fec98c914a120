"""Load an original-format (LDM / A1111) single-file SD1.x checkpoint into a diffusers pipeline."""

from __future__ import annotations

import json
import logging
import pickle
import socket
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from diffusion_engine.export.errors import CheckpointError

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

logger = logging.getLogger(__name__)

ALLOWED_SUFFIXES = (".safetensors", ".ckpt")
# Key prefixes of the three SD1.x parts in the LDM layout; diffusers needs all three.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# diffusers recognises the CLIP text encoder of an SD1.x file by this exact key.
CLIP_MARKER = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
# Components an export never uses and a single file has no weights for.
_SKIPPED = {"safety_checker": None, "feature_extractor": None, "image_encoder": None}


def load_single_file(path: str | Path, config: str | Path | None = None) -> "StableDiffusionPipeline":
    """Load an SD1.x .safetensors/.ckpt via diffusers' from_single_file; config: a local diffusers folder."""
    path = Path(path)
    keys = read_checkpoint_keys(path)
    check_sd1_keys(path, keys)
    config_dir = None if config is None else check_config_dir(Path(config))
    logger.info("loading single-file checkpoint %s (architecture from %s)", path, config_dir or "the hub")
    pipe = _from_single_file(path, config_dir)
    _check_no_meta_weights(path, pipe)
    return pipe


def read_checkpoint_keys(path: Path) -> list[str]:
    """Tensor names of a .safetensors or .ckpt file, read without unpickling arbitrary objects."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix not in ALLOWED_SUFFIXES:
        raise CheckpointError(
            f"{path}: unsupported suffix {path.suffix!r}; allowed: {', '.join(ALLOWED_SUFFIXES)}"
        )
    if path.suffix == ".safetensors":
        return _safetensors_keys(path)
    return _ckpt_keys(path)


def _safetensors_keys(path: Path) -> list[str]:
    """Tensor names from a safetensors header; the header check also catches truncated files."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: corrupt or not a safetensors checkpoint ({exc})") from exc


def _ckpt_keys(path: Path) -> list[str]:
    """Tensor names from a .ckpt pickle loaded with weights_only=True (mmap'd when zip-format)."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise CheckpointError(f"{path}: corrupt or not a checkpoint ({exc})") from exc
        raise CheckpointError(
            f"{path}: the pickle holds objects other than tensors, and loading it could run arbitrary "
            "code; convert it to .safetensors in a trusted environment first"
        ) from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: corrupt or not a checkpoint ({exc})") from exc
    # Lightning checkpoints nest the weights under "state_dict" (sometimes twice), as diffusers unwraps.
    while isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        kind = type(obj).__name__
        raise CheckpointError(f"{path}: not a checkpoint (holds a {kind}, not a dict of tensors)")
    return [str(k) for k in obj]


def check_sd1_keys(path: Path, keys: Iterable[str]) -> None:
    """Raise unless the keys hold an SD1.x UNet, VAE and CLIP text encoder in the LDM layout."""
    keys = list(keys)
    missing = []
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        missing.append(f"UNet ({UNET_PREFIX}*)")
    if not any(k.startswith(VAE_PREFIX) for k in keys):
        missing.append(f"VAE ({VAE_PREFIX}*)")
    if CLIP_MARKER not in keys:
        missing.append(f"CLIP text encoder ({CLIP_MARKER})")
    if missing:
        found = sorted({k.split(".")[0] for k in keys})[:8]
        raise CheckpointError(
            f"{path} is not an SD1.x checkpoint in the original (LDM) layout: no {', '.join(missing)}; "
            f"top-level key prefixes found: {found or 'none'}"
        )


def check_config_dir(config: Path) -> Path:
    """Raise unless config is a diffusers-format folder with the components an SD1.x pipeline needs."""
    index = config / "model_index.json"
    if not index.is_file():
        raise CheckpointError(f"config {config}: not a diffusers-format folder (no model_index.json)")
    try:
        components = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"config {index}: unreadable ({exc})") from exc
    needed = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    absent = [name for name in needed if name not in components or not (config / name).is_dir()]
    if absent:
        raise CheckpointError(f"config {config}: lacks component folders/entries {absent}")
    return config


def _from_single_file(path: Path, config_dir: Path | None) -> "StableDiffusionPipeline":
    """Call diffusers' StableDiffusionPipeline.from_single_file, turning its failures into CheckpointError."""
    from diffusers import StableDiffusionPipeline

    kwargs: dict = {**_SKIPPED, "requires_safety_checker": False}
    if config_dir is not None:
        # A local folder: diffusers reads the configs (and tokenizer files) there, never the hub.
        kwargs.update(config=str(config_dir), local_files_only=True)
    try:
        return StableDiffusionPipeline.from_single_file(str(path), **kwargs)
    except Exception as exc:
        if config_dir is None and _is_hub_failure(exc):
            raise CheckpointError(
                f"{path}: could not fetch the SD1.x architecture config from the Hugging Face hub ({exc}); "
                "pass a local diffusers-format config folder with --config DIR"
            ) from exc
        if isinstance(exc, (ValueError, RuntimeError, NotImplementedError, KeyError)):
            # diffusers builds models on 'meta': a weight the file lacks fails when moved to the CPU.
            problem = "lacks weights needed by" if "meta tensor" in str(exc) else "does not match"
            raise CheckpointError(
                f"{path} {problem} the architecture in {config_dir or 'the hub config'} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        raise


def _is_hub_failure(exc: BaseException) -> bool:
    """True when exc, or an exception it was raised from, is a hub or network failure."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    network = (
        HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError,
        socket.gaierror,
    )
    visited: set[int] = set()
    seen: BaseException | None = exc
    while seen is not None and id(seen) not in visited:
        if isinstance(seen, network):
            return True
        visited.add(id(seen))
        seen = seen.__cause__ or seen.__context__
    return False


def _check_no_meta_weights(path: Path, pipe: "StableDiffusionPipeline") -> None:
    """Raise if a component kept weights the file did not provide (diffusers leaves them on 'meta')."""
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        tensors = list(module.named_parameters()) + list(module.named_buffers())
        empty = [key for key, tensor in tensors if tensor.is_meta]
        if empty:
            raise CheckpointError(f"{path}: no weights for {name} tensors {empty[:5]} ({len(empty)} in all)")
