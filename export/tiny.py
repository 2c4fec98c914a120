"""Tiny SD1.x-architecture checkpoints built in code from a seed, for tests and the demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

# Words the tiny tokenizer knows as whole tokens; anything else falls back to characters.
_WORDS = (
    "a an the on of in with and photo picture painting background "
    "red green blue yellow white black circle square triangle cat dog astronaut horse riding"
).split()

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


def _tiny_components(seed: int):
    """The five diffusers/transformers components of a tiny SD1.x pipeline, seeded."""
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
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
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


def build_tiny_sd1(out_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny, randomly initialised SD1.x checkpoint in diffusers format; return its path.

    The same seed gives the same weights. The folder appears atomically (temp name, rename).
    """
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    if out.exists():
        if not overwrite:
            if (out / "model_index.json").is_file():
                return out
            raise FileExistsError(f"{out} exists and is not a checkpoint; pass overwrite=True")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text_encoder, tokenizer, unet, vae, scheduler = _tiny_components(seed)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        info = {"builder": "diffusion_engine.export.tiny.build_tiny_sd1", "seed": seed}
        (tmp / "tiny_checkpoint.json").write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote tiny SD1 checkpoint (seed %d) to %s", seed, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`engine-tiny OUT [--seed N]`: write a tiny random-weight SD1.x checkpoint (for tests and demos)."""
    p = argparse.ArgumentParser(prog="engine-tiny", description=main.__doc__.split(": ", 1)[1])
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    print(build_tiny_sd1(args.out, seed=args.seed, overwrite=args.overwrite))
    return 0
