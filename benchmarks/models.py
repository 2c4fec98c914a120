"""Realistic-architecture checkpoints with random weights (SD1.5, SDXL), for latency and memory only.

The weights are random (seeded), so the images are noise: these checkpoints measure speed and
memory at the real shapes and parameter counts, never image quality. The tokenizer is the tiny
BPE tokenizer of train/tiny.py with its ids remapped into a CLIP-sized vocabulary (49408, with
<|startoftext|> = 49406 and <|endoftext|> = 49407 as in CLIP), so the text encoder's embedding
table has the real size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from diffusion_engine.engine.atomic import atomic_directory, check_output_dir

logger = logging.getLogger(__name__)

BENCH_INFO = "bench_checkpoint.json"  # what build_checkpoint wrote: architecture, seed, dtype, parameters
NOTE = "random weights (seeded): for latency and memory only, never image quality"
CLIP_VOCAB = 49408
CLIP_POSITIONS = 77
SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
)

# SD1.5 (stable-diffusion-v1-5): UNet 859.5M, CLIP ViT-L/14 text encoder 123.1M, VAE 83.7M parameters.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu",
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5,
)
CLIP_L = dict(
    vocab_size=CLIP_VOCAB, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=CLIP_POSITIONS, hidden_act="quick_gelu", projection_dim=768,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)

# SDXL base 1.0: UNet 2.57B (text_time addition embeddings), CLIP ViT-L + OpenCLIP ViT-bigG/14
# (hidden 1280, 32 layers, with projection), VAE 83.7M (scaling 0.13025).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
CLIP_BIG_G = dict(
    vocab_size=CLIP_VOCAB, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=CLIP_POSITIONS, hidden_act="gelu", projection_dim=1280,
)

# Parameter counts of the real checkpoints, checked by the builders (and the tests, on the meta device).
PARAMETERS = {
    "sd15": {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863},
    "sdxl": {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863},
}


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The tiny BPE tokenizer with ids remapped into CLIP's 49408-entry vocabulary (specials at 49406/7)."""
    from transformers import CLIPTokenizer

    from diffusion_engine.train.tiny import tiny_clip_vocab

    tiny, merges = tiny_clip_vocab()
    specials = ("<|startoftext|>", "<|endoftext|>")
    words = [t for t in sorted(tiny, key=tiny.get) if t not in specials]
    # Fillers keep the ids dense up to 49405; no merge rule ever produces them.
    fillers = [f"<|unused{i}|>" for i in range(CLIP_VOCAB - len(specials) - len(words))]
    vocab = {t: i for i, t in enumerate(words + fillers + list(specials))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token)
    tokenizer.model_max_length = CLIP_POSITIONS
    return tokenizer


def _text_config(base: dict[str, Any], tokenizer) -> Any:
    from transformers import CLIPTextConfig

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return CLIPTextConfig(
        **base, bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"), eos_token_id=eos, pad_token_id=eos,
    )


def sd15_components(seed: int = 0) -> dict[str, Any]:
    """The components of an SD1.5-architecture pipeline (random weights from seed)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(CLIP_L, tokenizer))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**SD15_UNET)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**SD_VAE, sample_size=512, scaling_factor=0.18215)
    scheduler = PNDMScheduler(**SCHEDULER, skip_prk_steps=True, set_alpha_to_one=False)
    # SD1.5's scheduler_config.json carries clip_sample: false (read by DDIM and friends via from_config).
    scheduler.register_to_config(clip_sample=False)
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sdxl_components(seed: int = 0) -> dict[str, Any]:
    """The components of an SDXL-base-architecture pipeline (random weights from seed)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer()
    tokenizer_2 = clip_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!" (id 0)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(CLIP_L, tokenizer))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(CLIP_BIG_G, tokenizer_2))
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(**SDXL_UNET)
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(**SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    scheduler = EulerDiscreteScheduler(**SCHEDULER, timestep_spacing="leading", interpolation_type="linear")
    scheduler.register_to_config(clip_sample=False)  # as in SDXL's scheduler_config.json
    return dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)


TAESD_FOLDER = "taesd"  # build_checkpoint(tiny_vae=True): the random-weight tiny autoencoder, inside the checkpoint


def taesd(seed: int = 0) -> Any:
    """A TAESD-architecture AutoencoderTiny (diffusers' default config is TAESD's; TAESDXL has the same
    architecture: 4 latent channels, factor 8), random weights from seed."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny()


def _pipeline(name: str, parts: dict[str, Any]) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[name](**parts)


BUILDERS: dict[str, Callable[[int], dict[str, Any]]] = {"sd15": sd15_components, "sdxl": sdxl_components}


def parameter_counts(parts: dict[str, Any]) -> dict[str, int]:
    """Parameters per torch module among a pipeline's components."""
    return {k: sum(p.numel() for p in v.parameters()) for k, v in parts.items() if hasattr(v, "parameters")}


def _is_bench_checkpoint(path: Path) -> bool:
    """True if path is a checkpoint build_checkpoint wrote (it has bench_checkpoint.json)."""
    return (path / BENCH_INFO).is_file()


def build_checkpoint(name: str, out_dir: str | os.PathLike, seed: int = 0, fp16: bool = False, overwrite: bool = False,
                     tiny_vae: bool = False) -> Path:
    """Write a random-weight checkpoint of the named architecture in diffusers format; return its path.

    The folder appears atomically. fp16 builds the modules in fp16 (half the memory and disk: SDXL
    about 7 GB instead of 14 GB); the exporter upcasts to fp32 either way. tiny_vae: also a random-weight
    TAESD-architecture AutoencoderTiny in OUT/taesd (for engine-export --tiny-vae OUT/taesd).
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown architecture {name!r}; valid: {', '.join(BUILDERS)}")
    out = Path(out_dir)
    # Before the GBs of weights are made: atomic_directory checks again before it writes.
    check_output_dir(out, overwrite, replaceable=_is_bench_checkpoint, what="a benchmark checkpoint")
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16 if fp16 else torch.float32)  # fp16: never hold fp32 copies
    try:
        parts = BUILDERS[name](seed)
        tiny = taesd(seed + 10) if tiny_vae else None
    finally:
        torch.set_default_dtype(previous)
    counts = parameter_counts(parts)
    if counts != PARAMETERS[name]:
        raise RuntimeError(f"{name}: parameter counts {counts} differ from the real architecture's {PARAMETERS[name]}")
    info = {"builder": f"diffusion_engine.benchmarks.models.build_checkpoint({name!r})", "seed": seed,
            "dtype": "float16" if fp16 else "float32", "parameters": counts, "note": NOTE}
    if tiny is not None:
        info["tiny_vae"] = {"folder": TAESD_FOLDER, "parameters": sum(p.numel() for p in tiny.parameters())}
    with atomic_directory(out, overwrite, replaceable=_is_bench_checkpoint, what="a benchmark checkpoint") as tmp:
        _pipeline(name, parts).save_pretrained(tmp, safe_serialization=True)
        if tiny is not None:
            tiny.save_pretrained(tmp / TAESD_FOLDER, safe_serialization=True)
        (tmp / BENCH_INFO).write_text(json.dumps(info, indent=2) + "\n")
    logger.info("wrote %s checkpoint (seed %d, %s) to %s", name, seed, info["dtype"], out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m diffusion_engine.benchmarks.models {sd15,sdxl} --out DIR`: random-weight checkpoints."""
    p = argparse.ArgumentParser(prog="python -m diffusion_engine.benchmarks.models", description=__doc__.split("\n")[0])
    p.add_argument("architecture", choices=sorted(BUILDERS))
    p.add_argument("--out", required=True, help="diffusers folder to create (put it under /tmp: GBs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp16", action="store_true", help="store weights in fp16 (half the disk and memory)")
    p.add_argument("--tiny-vae", action="store_true",
                   help=f"also write a random-weight TAESD-architecture AutoencoderTiny in OUT/{TAESD_FOLDER} "
                        f"(engine-export OUT --tiny-vae OUT/{TAESD_FOLDER})")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = build_checkpoint(args.architecture, args.out, seed=args.seed, fp16=args.fp16, overwrite=args.overwrite,
                            tiny_vae=args.tiny_vae)
    print(path)
    if args.tiny_vae:
        print(path / TAESD_FOLDER)
    print(f"note: {NOTE}")
    if args.architecture == "sdxl":
        print("note: engine-export does not support SDXL yet (awaits the model-families issue); no SDXL bench yet")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
