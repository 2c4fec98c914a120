"""Train the tiny shapes text-to-image model from scratch on the CPU and save it in diffusers format.

`python -m diffusion_engine.train.train --out DIR`: the autoencoder first (on fresh images), then
the UNet and text encoder together on cached latents, the caption dropped 10% of the time for
classifier-free guidance. Seeded, deterministic algorithms, a fixed thread count.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusion_engine.engine.atomic import atomic_directory, check_output_dir
from diffusion_engine.train import data
from diffusion_engine.train.model import Recipe, build_components

logger = logging.getLogger(__name__)

LOG = "train_log.csv"
RECIPE = "recipe.json"


class Log:
    """Mean loss per `every` steps, with elapsed seconds, per phase."""

    def __init__(self, every: int):
        self.every, self.rows, self.start, self._acc = every, [], time.perf_counter(), []

    def add(self, phase: str, step: int, loss: float) -> None:
        self._acc.append(loss)
        if (step + 1) % self.every == 0:
            row = {"phase": phase, "step": step + 1, "loss": float(np.mean(self._acc)),
                   "seconds": round(time.perf_counter() - self.start, 1)}
            self.rows.append(row)
            self._acc = []
            logger.info("%s step %d loss %.5f (%.0f s)", phase, row["step"], row["loss"], row["seconds"])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def lr_lambda(warmup: int, total: int):
    """Linear warm-up, then cosine decay to 10%."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return f


def random_crops(images: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """One crop per image, at offsets that are multiples of 4 (the latent grid stays aligned)."""
    offsets = 4 * rng.integers((images.shape[1] - crop) // 4 + 1, size=(len(images), 2))
    return np.stack([im[y:y + crop, x:x + crop] for im, (y, x) in zip(images, offsets)])


def train_vae(vae, recipe: Recipe, rng: np.random.Generator, log: Log) -> None:
    """L1 reconstruction + a weak KL term (as in Stable Diffusion's KL-f8), on fresh images every step.

    The autoencoder has no attention, so it trains on crops: a quarter of the pixels per image.
    """
    with torch.no_grad():  # start with posterior std e^-3: noise of std 1 would drown the first latents
        vae.quant_conv.weight[recipe.latent_channels:] = 0.0
        vae.quant_conv.bias[recipe.latent_channels:] = recipe.vae_init_logvar
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe.warmup, recipe.vae_steps))
    vae.train()
    for step in range(recipe.vae_steps):
        x = to_tensor(random_crops(data.batch(rng, recipe.vae_batch, recipe.size)[0], recipe.vae_crop, rng))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, x) + recipe.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log.add("vae", step, loss.item())
    vae.eval()


@torch.no_grad()
def encode_dataset(vae, recipe: Recipe, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Posterior mean and std of `latent_images` fresh images, and their captions."""
    means, stds, captions = [], [], []
    for start in range(0, recipe.latent_images, 256):
        images, scenes = data.batch(rng, min(256, recipe.latent_images - start), recipe.size)
        posterior = vae.encode(to_tensor(images)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions += [s.caption for s in scenes]
    return torch.cat(means), torch.cat(stds), captions


def scaling_factor(means: torch.Tensor, stds: torch.Tensor) -> float:
    """1 / std of sampled latents, so the diffusion model sees unit-variance latents (SD's convention)."""
    return float(1.0 / torch.sqrt(means.var() + stds.pow(2).mean()))


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids exactly as StableDiffusionPipeline makes them (padded to the maximum length)."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights for epsilon prediction: min(SNR, gamma) / SNR."""
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return torch.clamp(snr, max=gamma) / snr


@torch.no_grad()
def ema_update(average: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * model, parameter by parameter."""
    torch._foreach_lerp_(list(average.parameters()), list(model.parameters()), 1.0 - decay)


def train_unet(unet, text_encoder, tokenizer, scheduler, latents, recipe: Recipe, rng: np.random.Generator, log: Log):
    """Epsilon-prediction loss on noised (scaled) cached latents; returns EMA copies of UNet and text encoder."""
    means, stds, captions = latents
    prompts = sorted(set(captions))
    ids = tokenize(tokenizer, prompts + [""])
    index = torch.tensor([prompts.index(c) for c in captions])
    model = torch.nn.ModuleList([unet, text_encoder])
    average = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.unet_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe.warmup, recipe.unet_steps))
    alphas_cumprod = scheduler.alphas_cumprod
    model.train()
    for step in range(recipe.unet_steps):
        rows = torch.from_numpy(rng.integers(len(captions), size=recipe.unet_batch))
        z0 = means[rows] + stds[rows] * torch.randn_like(means[rows])
        drop = torch.from_numpy(rng.random(recipe.unet_batch) < recipe.cfg_dropout)
        cond = text_encoder(ids[torch.where(drop, len(prompts), index[rows])])[0]
        t = torch.from_numpy(rng.integers(scheduler.config.num_train_timesteps, size=recipe.unet_batch))
        noise = torch.randn_like(z0)
        pred = unet(scheduler.add_noise(z0, noise, t), t, cond).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(alphas_cumprod, t, recipe.min_snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        # EMA with a warm-up (as diffusers' EMAModel): early weights fade out fast.
        ema_update(average, model, min(recipe.ema_decay, (1 + step) / (10 + step)))
        log.add("unet", step, per_sample.mean().item())
    return average[0], average[1]


def save(out: Path, components, recipe: Recipe, log: Log, overwrite: bool) -> Path:
    """Write the diffusers checkpoint, recipe.json and the training log, atomically (temp name, rename)."""
    from diffusers import StableDiffusionPipeline

    text_encoder, tokenizer, unet, vae, scheduler = components
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    with atomic_directory(out, overwrite, replaceable=_is_trained_checkpoint, what="a trained checkpoint") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / RECIPE).write_text(json.dumps(recipe.to_json(), indent=2) + "\n")
        with open(tmp / LOG, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["phase", "step", "loss", "seconds"])
            writer.writeheader()
            writer.writerows(log.rows)
    return out


def _is_trained_checkpoint(path: Path) -> bool:
    """True if path is a checkpoint save wrote (it has recipe.json): the one kind --overwrite replaces."""
    return (path / RECIPE).is_file()


def train(recipe: Recipe, out: Path, overwrite: bool = False, vae_from: Path | None = None) -> Path:
    """Run the whole recipe (or the UNet part, reusing `vae_from`'s autoencoder) and write `out`."""
    check_output_dir(out, overwrite, replaceable=_is_trained_checkpoint, what="a trained checkpoint")  # before training
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(recipe.seed)
    log = Log(recipe.log_every)
    text_encoder, tokenizer, unet, vae, scheduler = build_components(recipe)
    if vae_from is None:
        train_vae(vae, recipe, rng, log)
    else:  # reuse a trained autoencoder; the dataset is still encoded afresh, with this seed
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(Path(vae_from) / "vae").eval()
    means, stds, captions = encode_dataset(vae, recipe, rng)
    scale = scaling_factor(means, stds)
    vae.register_to_config(scaling_factor=scale)
    logger.info("latent scaling factor %.4f (%.0f s)", scale, time.perf_counter() - log.start)
    latents = (means * scale, stds * scale, captions)
    unet, text_encoder = train_unet(unet, text_encoder, tokenizer, scheduler, latents, recipe, rng, log)
    path = save(out, (text_encoder, tokenizer, unet, vae, scheduler), recipe, log, overwrite)
    logger.info("wrote %s in %.0f s", path, time.perf_counter() - log.start)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m diffusion_engine.train.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--vae-from", type=Path, help="reuse this checkpoint's autoencoder (skip its training)")
    for f in dataclasses.fields(Recipe):
        if f.type in ("int", "float"):
            p.add_argument("--" + f.name.replace("_", "-"), type=int if f.type == "int" else float, default=f.default,
                           help=f"(default {f.default})")
        elif f.type in ("tuple[int, ...]", "tuple[str, ...]"):  # e.g. --unet-channels 48 64 64
            p.add_argument("--" + f.name.replace("_", "-"), type=int if "int" in f.type else str, nargs="+",
                           default=f.default, help=f"(default {' '.join(map(str, f.default))})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe) if hasattr(args, f.name)}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    train(Recipe(**overrides), args.out, overwrite=args.overwrite, vae_from=args.vae_from)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
