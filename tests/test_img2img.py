"""Image-to-image: Pipeline.generate(image=..., strength=...) vs diffusers' StableDiffusionImg2ImgPipeline
with the same weights, scheduler config and noise (every sampler, strength 0.3 and 0.75); resize modes;
bad image requests fail before any model runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from diffusion_engine.runtime.pipeline import Pipeline
from diffusion_engine.runtime.request import RESIZE_MODES, fit_image
from diffusion_engine.runtime.samplers import SAMPLERS, img2img_plan
from tests.test_pipeline import DIFFUSERS, PROMPT, psnr

STEPS = 6
SIZE = (256, 320)  # (height, width): non-square


def picture(height: int, width: int) -> np.ndarray:
    """A deterministic test picture: colour gradients with a disc, uint8 HxWx3."""
    y, x = np.mgrid[0:height, 0:width]
    disc = (y - height / 2) ** 2 + (x - width / 3) ** 2 < (height / 4) ** 2
    rgb = np.stack([x / width * 255, y / height * 255, np.where(disc, 230, 40)], axis=-1)
    return rgb.astype(np.uint8)


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    with Pipeline.load(tiny_engine) as p:
        yield p


@pytest.fixture(scope="module")
def img2img_reference(tiny_pipeline):
    from diffusers import StableDiffusionImg2ImgPipeline

    ref = StableDiffusionImg2ImgPipeline(**tiny_pipeline.components)
    ref.set_progress_bar_config(disable=True)
    return ref


def img2img_images(ref, image: np.ndarray, strength: float, draws, monkeypatch, **kw) -> np.ndarray:
    """A diffusers img2img pipeline's uint8 images; every randn_tensor call (posterior sample, initial
    noise, ancestral noise) takes the next of `draws`, the arrays our generator drew in the same order."""
    import diffusers.models.autoencoders.vae as vae
    import diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_img2img as lcm
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as sd
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as sdxl
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea
    import diffusers.schedulers.scheduling_lcm as lcm_scheduler

    draws = iter(draws)
    for module in (vae, sd, sdxl, lcm, ea, lcm_scheduler):
        monkeypatch.setattr(module, "randn_tensor", lambda shape, *a, **k: torch.from_numpy(next(draws)).reshape(shape))
    ref.set_progress_bar_config(disable=True)
    out = ref(image=Image.fromarray(image), strength=strength, output_type="np", **kw).images
    return (out * 255).round().astype(np.uint8)


def diffusers_img2img(ref, scheduler: str, image: np.ndarray, strength: float, draws, monkeypatch, **kw) -> np.ndarray:
    """img2img_images with sampler `scheduler` on the checkpoint's scheduler config."""
    cls, forced = DIFFUSERS[scheduler]
    base = ref.scheduler.config
    ref.scheduler = cls.from_config(base, **forced)
    try:
        return img2img_images(ref, image, strength, draws, monkeypatch, **kw)
    finally:
        ref.scheduler = DDIMScheduler.from_config(base)


def our_draws(pipe: Pipeline, scheduler: str, steps: int, strength: float, seed: int, n: int, height: int, width: int):
    """What generate draws from default_rng(seed), in order: posterior eps, initial noise, per-step noise."""
    f = pipe.manifest.dims.vae_scale_factor
    latent = (4, height // f, width // f)
    rng = np.random.default_rng(seed)
    draws = [rng.standard_normal((1,) + latent, dtype=np.float32), rng.standard_normal((n,) + latent, dtype=np.float32)]
    plan = img2img_plan(scheduler, pipe.manifest.scheduler_config, steps, strength)
    if plan.uses_noise.any():
        draws += list(rng.standard_normal((plan.num_evaluations, n) + latent, dtype=np.float32))
    return draws


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("scheduler", [s for s in SAMPLERS if s != "lcm"])
def test_img2img_matches_diffusers(pipe, img2img_reference, scheduler, strength, monkeypatch):
    image = picture(*SIZE)
    ours = pipe.generate(PROMPT, image=image, strength=strength, steps=STEPS, scheduler=scheduler, seed=3)
    assert ours.array.shape == (1, *SIZE, 3) and ours.parameters["strength"] == strength
    draws = our_draws(pipe, scheduler, STEPS, strength, 3, 1, *SIZE)
    ref = diffusers_img2img(img2img_reference, scheduler, image, strength, draws, monkeypatch, prompt=PROMPT,
                            num_inference_steps=STEPS, guidance_scale=7.5)
    score = psnr(ours.array, ref)
    print(f"PSNR img2img sd1 tiny {scheduler} strength {strength}: {score:.1f} dB")
    assert score >= 40.0


def test_img2img_batch_and_unguided_match_diffusers(pipe, img2img_reference, monkeypatch):
    image = picture(256, 256)
    ours = pipe.generate(PROMPT, image=image, strength=0.6, steps=5, seed=4, batch_size=2, guidance_scale=1.0)
    draws = our_draws(pipe, "ddim", 5, 0.6, 4, 2, 256, 256)
    ref = diffusers_img2img(img2img_reference, "ddim", image, 0.6, draws, monkeypatch, prompt=PROMPT,
                            num_inference_steps=5, guidance_scale=1.0, num_images_per_prompt=2)
    score = psnr(ours.array, ref)
    print(f"PSNR img2img batch 2 unguided: {score:.1f} dB")
    assert ours.array.shape == (2, 256, 256, 3) and score >= 40.0


def test_the_image_size_is_the_default_size(pipe):
    out = pipe.generate(PROMPT, image=Image.fromarray(picture(*SIZE)), strength=0.5, steps=2, seed=0)
    assert (out.parameters["height"], out.parameters["width"]) == SIZE


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_resize_modes(mode):
    pixels = picture(200, 100)  # portrait, into a landscape 128x256 (height x width)
    out = fit_image(pixels, 128, 256, mode)
    print(mode, out.shape)
    assert out.shape == (128, 256, 3) and out.dtype == np.uint8
    if mode == "resize-and-fill":  # fitted 128 high x 64 wide in the middle, edges repeated outwards
        assert (out[:, :96] == out[:, 96:97]).all()
    if mode == "crop-and-resize":  # the middle rows of the picture, scaled to cover the width
        middle = np.asarray(Image.fromarray(pixels).resize((256, 512), Image.LANCZOS))[192:320]
        assert np.abs(out.astype(int) - middle).max() == 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(strength=0.0), r"strength must be a number in \(0, 1\], got 0.0"),
        (dict(strength=1.5), r"strength must be a number in \(0, 1\], got 1.5"),
        (dict(strength=0.1, steps=5), r"strength 0.1 with 5 steps reruns no step"),
        (dict(height=320, width=256), "image is 320x256 but the request is 256x320; leave width and height out"),
        (dict(resize_mode="stretch"), "unknown resize_mode 'stretch'; valid: just-resize, crop-and-resize"),
        (dict(image=np.zeros((256, 256), np.uint8)), "image must be a PIL image, a file or a uint8 HxWx3 RGB array"),
        (dict(image=Image.new("RGBA", (320, 256))), r"image has an alpha channel \(mode RGBA\)"),
        (dict(image=[np.zeros((256, 320, 3), np.uint8)] * 2), "image must be one image"),
        (dict(image=None, resize_mode="just-resize"), "resize_mode applies to an init image"),
        (dict(image="/nonexistent/picture.png"), "cannot be read as an image"),
        (dict(scheduler="lcm", strength=0.05), "steps 4 is more than lcm takes on this engine at strength 0.05: 1 to 2"),
    ],
)
def test_bad_image_requests_fail_before_any_model_runs(pipe, kwargs, message, monkeypatch):
    for session in pipe.sessions.values():
        monkeypatch.setattr(session, "_run", lambda feeds: pytest.fail("a model ran"))
    request = {"image": picture(256, 320), "steps": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe.generate(PROMPT, **request)


def test_engine_run_image_and_strength(tiny_engine, tmp_path, capsys):
    import json

    from diffusion_engine.runtime.cli import main

    Image.fromarray(picture(*SIZE)).save(tmp_path / "in.png")
    args = ["--engine", str(tiny_engine), "--prompt", PROMPT, "--image", str(tmp_path / "in.png"), "--strength", "0.5",
            "--steps", "4", "--seed", "1", "--out", str(tmp_path / "out.png")]
    assert main(args) == 0
    with Image.open(tmp_path / "out.png") as out:
        params = json.loads(out.text["diffusion-engine"])
        assert out.size == (SIZE[1], SIZE[0])
    print(capsys.readouterr().out.strip().splitlines()[-2])
    assert (params["strength"], params["height"], params["width"]) == (0.5, *SIZE)
    assert main(args[:-2] + ["--width", "256", "--resize-mode", "crop-and-resize", "--out", str(tmp_path / "c.png")]) == 0
    with Image.open(tmp_path / "c.png") as out:
        assert out.size == (256, SIZE[0]) and json.loads(out.text["diffusion-engine"])["resize_mode"] == "crop-and-resize"
