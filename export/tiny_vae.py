"""A tiny autoencoder (diffusers' AutoencoderTiny: TAESD for SD1.x/2.x, TAESDXL for SDXL) as a second decoder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusion_engine.engine.digest import file_digest
from diffusion_engine.export.errors import CheckpointError

TINY_VAE_CLASS = "AutoencoderTiny"
CONFIG = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def read_tiny_vae_config(path: str | Path) -> dict[str, Any]:
    """The config of a local diffusers AutoencoderTiny folder, checked without loading weights."""
    folder = Path(path).expanduser()
    what = "--tiny-vae needs a local diffusers AutoencoderTiny folder (e.g. a download of madebyollin/taesd)"
    if not folder.is_dir():
        raise CheckpointError(f"--tiny-vae {path}: no such folder; {what}")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"--tiny-vae {path}: unreadable {CONFIG} ({type(exc).__name__}); {what}") from exc
    found = config.get("_class_name") if isinstance(config, dict) else None
    if found != TINY_VAE_CLASS:
        raise CheckpointError(f"--tiny-vae {path}: its {CONFIG} is for {found!r}, not {TINY_VAE_CLASS}; {what}")
    return config


def tiny_vae_factor(config: dict[str, Any]) -> int:
    """Pixels per latent of an AutoencoderTiny: its decoder upsamples after every stage but the last."""
    stages = len(config.get("num_decoder_blocks", (3, 3, 3, 1)))
    return int(config.get("upsampling_scaling_factor", 2)) ** (stages - 1)


def check_tiny_vae(config: dict[str, Any], path: str | Path, latent_channels: int, vae_factor: int) -> None:
    """The tiny VAE must decode the checkpoint's latents: the same channels and the same pixels per latent."""
    channels = int(config.get("latent_channels", 4))
    if channels != latent_channels:
        raise CheckpointError(
            f"--tiny-vae {path} decodes {channels}-channel latents; the checkpoint's have {latent_channels} "
            f"(TAESD fits SD1.x/2.x, TAESDXL fits SDXL)")
    factor = tiny_vae_factor(config)
    if factor != vae_factor:
        raise CheckpointError(f"--tiny-vae {path} upsamples latents {factor}x; the checkpoint's VAE factor is {vae_factor}")


def checkpoint_vae_config(source: str | Path) -> dict[str, Any] | None:
    """A diffusers folder's vae/config.json (for the checks before loading), or None where there is none."""
    path = Path(source).expanduser() / "vae" / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # single files, hub ids: checked after loading
    return config if isinstance(config, dict) else None


def check_against_folder(tiny: dict[str, Any], path: str | Path, source: str | Path) -> None:
    """check_tiny_vae against a diffusers folder's VAE config, where the source has one (cheap: no weights)."""
    vae = checkpoint_vae_config(source)
    if vae is not None and "latent_channels" in vae and "block_out_channels" in vae:
        check_tiny_vae(tiny, path, int(vae["latent_channels"]), 2 ** (len(vae["block_out_channels"]) - 1))


def load_tiny_vae(path: str | Path) -> tuple[Any, str]:
    """The AutoencoderTiny module (fp32, eval) and the sha256 digest of its folder's config and weights."""
    from diffusers import AutoencoderTiny

    folder = Path(path).expanduser()
    try:
        vae = AutoencoderTiny.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # missing or damaged weights: one line naming the folder
        raise CheckpointError(f"--tiny-vae {path}: could not load it ({type(exc).__name__}: {exc})") from exc
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == CONFIG))
    return vae.eval().float(), file_digest(files, root=folder)
