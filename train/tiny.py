"""Tiny checkpoints of every supported family (SD1.x, SD2.x, SDXL, Turbo, LCM, the SDXL refiner) built in
code from a seed, and inpainting variants (a 9-channel UNet in the family's inpaint pipeline) of SD1.x,
SD2.x and SDXL."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from diffusion_engine.engine.atomic import atomic_directory, check_output_dir, run_cli
from diffusion_engine.engine.extras import require

logger = logging.getLogger(__name__)

# Words the tiny tokenizer knows as whole tokens; anything else falls back to characters.
_WORDS = (
    "a an the on of in with and photo picture painting background "
    "red green blue yellow white black circle square triangle cat dog astronaut horse riding"
).split()

TINY_INFO = "tiny_checkpoint.json"  # what build_tiny wrote: builder, family, seed
# The "builder" ids TINY_INFO records: unchanged since this module was export/tiny.py, so folders
# written before the move are still recognised and reused.
SD1_BUILDER, BUILDER = "diffusion_engine.export.tiny.build_tiny_sd1", "diffusion_engine.export.tiny.build_tiny"
TINY_VAE_BUILDER = "diffusion_engine.train.tiny.build_tiny_vae"
TINY_TEXT_HIDDEN = 32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-unicode table (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def tiny_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small CLIP-format BPE vocabulary (byte alphabet, word-end forms, merges for _WORDS)."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        # Merge left to right: "r e", "re d</w>" ... so each word ends as one token.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            rule = (pieces[0], pieces[1])
            if rule not in merges:
                merges.append(rule)
                if merged not in tokens:
                    tokens.append(merged)
            pieces = [merged] + pieces[2:]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _tiny_components(seed: int, in_channels: int = 4):
    """The five diffusers/transformers components of a tiny SD1.x pipeline, seeded (in_channels 9: inpainting)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = tiny_clip_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = 77
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=TINY_TEXT_HIDDEN, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"], hidden_act="quick_gelu", projection_dim=32,
        )
    )
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_HIDDEN, attention_head_dim=8,
    )
    torch.manual_seed(seed + 2)
    # Four blocks: the VAE scale factor is 8, as in every real SD checkpoint.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=256, scaling_factor=0.18215,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000,
    )
    return text_encoder, tokenizer, unet, vae, scheduler


def build_tiny_sd1(out_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False, inpainting: bool = False) -> Path:
    """Write a tiny, randomly initialised SD1.x checkpoint in diffusers format; return its path.

    The same seed gives the same weights. The folder appears atomically (temp name, rename).
    `inpainting`: a 9-channel UNet in a StableDiffusionInpaintPipeline.
    """
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    out = Path(out_dir)
    info = {"builder": SD1_BUILDER, "seed": seed, **({"inpainting": True} if inpainting else {})}
    if _existing(out, overwrite, info):
        return out
    text_encoder, tokenizer, unet, vae, scheduler = _tiny_components(seed, 9 if inpainting else 4)
    pipe = (StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline)(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    _save_atomically(pipe, out, info)
    logger.info("wrote tiny SD1 checkpoint (seed %d) to %s", seed, out)
    return out


def _is_tiny_checkpoint(path: Path) -> bool:
    """True if path is a checkpoint (or tiny VAE: a model folder) this module wrote (it has tiny_checkpoint.json)."""
    model = (path / "model_index.json").is_file() or (path / "config.json").is_file()
    return model and (path / TINY_INFO).is_file()


def _existing(out: Path, overwrite: bool, info: dict) -> bool:
    """True if out already holds the tiny checkpoint `info` describes (reuse it); raise if it holds another
    one (without overwrite) or anything this module did not write."""
    if os.path.lexists(out) and not overwrite:
        try:
            found = json.loads((out / TINY_INFO).read_text())
        except (OSError, ValueError):
            found = None
        if found is None:
            raise FileExistsError(f"{out} exists and is not a tiny checkpoint written by engine-tiny; choose another folder")
        if found != info:
            raise FileExistsError(
                f"{out} holds another tiny checkpoint ({_describe(found)}), not {_describe(info)}; "
                "pass --overwrite to replace it or choose another folder"
            )
        return True
    check_output_dir(out, overwrite, replaceable=_is_tiny_checkpoint, what="a tiny checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    return False


def _describe(info: dict) -> str:
    if info.get("builder") == TINY_VAE_BUILDER:
        return f"tiny VAE, {info.get('latent_channels')} latent channels, seed {info.get('seed')}"
    variant = ", inpainting" if info.get("inpainting") else ""
    return f"family {info.get('family', 'sd1')}{variant}, seed {info.get('seed')}"


def _save_atomically(pipe, out: Path, info: dict) -> None:
    """save_pretrained under a temporary name beside out, then rename it into place (replacing only
    a tiny checkpoint or an empty folder: atomic_directory's rules)."""
    with atomic_directory(out, overwrite=True, replaceable=_is_tiny_checkpoint, what="a tiny checkpoint") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / TINY_INFO).write_text(json.dumps(info, indent=2) + "\n")


# What real checkpoints' scheduler configs carry, whatever their class (diffusers keeps foreign keys).
_SD_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "clip_sample": False, "set_alpha_to_one": False,
}
# The tiny checkpoints of the other families: each is its family's architecture at toy width, with
# the scheduler set-up the family's detection rule (export/families.py) and its model card expect.
_TINY_SCHEDULERS = {
    # SD 2.1-style zero-terminal-SNR v-prediction fine-tune (Lin et al. 2023): trailing timesteps.
    "sd2": ("DDIMScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing",
                              "rescale_betas_zero_snr": True, "steps_offset": 1}),
    "sdxl": ("EulerDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
    "sd-turbo": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing", "steps_offset": 1}),
    "sdxl-turbo": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing", "steps_offset": 1}),
    "lcm": ("LCMScheduler", {"original_inference_steps": 50, "set_alpha_to_one": True, "steps_offset": 1}),
    # The SDXL refiner ships SDXL's Euler set-up. Its VAE and text encoder are the tiny SDXL's (same seed:
    # the same weights, as the real refiner shares SDXL's VAE and OpenCLIP encoder), so the two hand latents over.
    "sdxl-refiner": ("EulerDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
}
TINY_FAMILIES = ("sd1",) + tuple(_TINY_SCHEDULERS)
INPAINTING_FAMILIES = ("sd1", "sd2", "sdxl")  # the families diffusers has an inpaint pipeline (and checkpoints) for


def _tiny_tokenizer(pad_token: str | None = None):
    from transformers import CLIPTokenizer

    vocab, merges = tiny_clip_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, **({"pad_token": pad_token} if pad_token else {}))
    tokenizer.model_max_length = 77
    return tokenizer


def _tiny_text_encoder(seed: int, hidden_act: str, projection: bool = False):
    """A 2-layer CLIP text encoder (with a text projection: SDXL's second encoder)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab, _ = tiny_clip_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=TINY_TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], hidden_act=hidden_act,
        projection_dim=TINY_TEXT_HIDDEN,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _tiny_unet(seed: int, family: str, in_channels: int = 4):
    """One cross-attention block, no mid block (quick to export), with the family's extra inputs."""
    import torch
    from diffusers import UNet2DConditionModel

    xl = family in ("sdxl", "sdxl-turbo")
    extra: dict = {}
    if family.startswith("sdxl"):  # the added embedding: pooled text (32) + 6 size ids (refiner: 5) x 8 features
        ids = 5 if family == "sdxl-refiner" else 6
        extra = {"addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                 "projection_class_embeddings_input_dim": TINY_TEXT_HIDDEN + ids * 8}
    if family == "lcm":
        extra = {"time_cond_proj_dim": TINY_TEXT_HIDDEN}
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(32,),
        norm_num_groups=16, down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        mid_block_type=None, cross_attention_dim=TINY_TEXT_HIDDEN * (2 if xl else 1), attention_head_dim=8,
        use_linear_projection=family != "lcm", **extra,
    )


def _tiny_vae(seed: int, family: str):
    """Four one-resnet blocks (VAE factor 8), no attention; SDXL's scaling factor for the SDXL families."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8, block_out_channels=(8, 8, 8, 8),
        layers_per_block=0, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        mid_block_add_attention=False, sample_size=256,
        scaling_factor=0.13025 if family.startswith("sdxl") else 0.18215,
    )


def _tiny_pipeline(family: str, seed: int, inpainting: bool = False):
    """The diffusers pipeline of a tiny checkpoint of `family` (not sd1: see _tiny_components)."""
    import diffusers

    cls_name, options = _TINY_SCHEDULERS[family]
    scheduler = getattr(diffusers, cls_name).from_config({**_SD_SCHEDULER, **options})
    unet = _tiny_unet(seed + (4 if family == "sdxl-refiner" else 1), family, 9 if inpainting else 4)
    parts = {"unet": unet, "vae": _tiny_vae(seed + 2, family), "scheduler": scheduler}
    if family == "sdxl-refiner":  # no first text encoder; aesthetic-score time ids
        return diffusers.StableDiffusionXLImg2ImgPipeline(
            text_encoder=None, tokenizer=None, text_encoder_2=_tiny_text_encoder(seed + 3, "gelu", projection=True),
            tokenizer_2=_tiny_tokenizer("!"), requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
            add_watermarker=False, **parts,
        )
    if family.startswith("sdxl"):
        cls = diffusers.StableDiffusionXLInpaintPipeline if inpainting else diffusers.StableDiffusionXLPipeline
        return cls(
            text_encoder=_tiny_text_encoder(seed, "quick_gelu"), tokenizer=_tiny_tokenizer(),
            text_encoder_2=_tiny_text_encoder(seed + 3, "gelu", projection=True), tokenizer_2=_tiny_tokenizer("!"),
            force_zeros_for_empty_prompt=True, add_watermarker=False, **parts,
        )
    text = {"text_encoder": _tiny_text_encoder(seed, "quick_gelu" if family == "lcm" else "gelu"),
            "tokenizer": _tiny_tokenizer()}
    cls = diffusers.LatentConsistencyModelPipeline if family == "lcm" else diffusers.StableDiffusionPipeline
    cls = diffusers.StableDiffusionInpaintPipeline if inpainting else cls
    return cls(**text, **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_tiny(family: str, out_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False,
               inpainting: bool = False) -> Path:
    """Write a tiny, randomly initialised checkpoint of `family` (see TINY_FAMILIES) in diffusers format;
    `inpainting`: its inpainting variant (INPAINTING_FAMILIES).

    The same family, variant and seed give the same weights; the folder appears atomically.
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny checkpoint for family {family!r}; valid: {', '.join(TINY_FAMILIES)}")
    if inpainting and family not in INPAINTING_FAMILIES:
        raise ValueError(f"no tiny inpainting checkpoint for family {family!r}; valid: {', '.join(INPAINTING_FAMILIES)}")
    if family == "sd1":
        return build_tiny_sd1(out_dir, seed=seed, overwrite=overwrite, inpainting=inpainting)
    out = Path(out_dir)
    info = {"builder": BUILDER, "family": family, "seed": seed, **({"inpainting": True} if inpainting else {})}
    if _existing(out, overwrite, info):
        return out
    _save_atomically(_tiny_pipeline(family, seed, inpainting), out, info)
    logger.info("wrote tiny %s%s checkpoint (seed %d) to %s", family, " inpainting" * inpainting, seed, out)
    return out


def tiny_autoencoder(seed: int = 0, latent_channels: int = 4):
    """A tiny diffusers AutoencoderTiny (TAESD's architecture at width 8, one block per stage: factor 8 as
    the tiny checkpoints' VAEs), seeded. Its last convolution is biased to mid-grey, so that random weights
    decode to images with structure and contrast instead of pixels clamped at black."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                          num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=latent_channels)
    last = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.bias.fill_(0.5)  # DecoderTiny's output x maps to pixels x (x * 2 - 1, then the pipeline's / 2 + 0.5)
        last.weight.mul_(4.0)  # default init gives ~13 levels of spread; ~50 makes a decode error visible
    return vae


def build_tiny_vae(out_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False, latent_channels: int = 4) -> Path:
    """Write a tiny, randomly initialised AutoencoderTiny (tiny_autoencoder) in diffusers format; return its path.

    It decodes the tiny checkpoints' latents (4 channels, factor 8); the folder appears atomically.
    """
    out = Path(out_dir)
    info = {"builder": TINY_VAE_BUILDER, "seed": seed, "latent_channels": latent_channels}
    if _existing(out, overwrite, info):
        return out
    _save_atomically(tiny_autoencoder(seed, latent_channels), out, info)
    logger.info("wrote tiny AutoencoderTiny (seed %d) to %s", seed, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`engine-tiny OUT [--family sd1] [--inpainting] [--seed N]`: write a tiny random-weight checkpoint (for tests and demos)."""
    p = argparse.ArgumentParser(prog="engine-tiny", description=main.__doc__.split(": ", 1)[1])
    p.add_argument("out")
    p.add_argument("--family", choices=TINY_FAMILIES, default="sd1")
    p.add_argument("--inpainting", action="store_true",
                   help=f"a 9-channel inpainting UNet ({', '.join(INPAINTING_FAMILIES)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny-vae", metavar="DIR",
                   help="also write a tiny AutoencoderTiny for this checkpoint's latents at DIR (engine-export --tiny-vae DIR)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    return run_cli("engine-tiny", lambda: _build(args))


def _build(args: argparse.Namespace) -> int:
    try:
        require("export", "engine-tiny")
        print(build_tiny(args.family, args.out, seed=args.seed, overwrite=args.overwrite, inpainting=args.inpainting))
        if args.tiny_vae:
            print(build_tiny_vae(args.tiny_vae, seed=args.seed, overwrite=args.overwrite))
    except (OSError, ValueError, ImportError) as exc:
        print(f"engine-tiny: error: {exc}", file=sys.stderr)
        return 2
    return 0
