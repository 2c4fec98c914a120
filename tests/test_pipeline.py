"""The runtime end to end: Pipeline.generate vs diffusers' StableDiffusionPipeline, CLI, bad input."""

from __future__ import annotations

import json
import logging
import shutil
import threading

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image

from diffusion_engine.engine.manifest import ManifestError, read_manifest
from diffusion_engine.runtime.pipeline import Pipeline
from diffusion_engine.runtime.samplers import SAMPLERS, STOCHASTIC, make_plan

PROMPT = "a red circle on a blue background"
DIFFUSERS = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
}
SIZES = [(256, 256), (256, 320)]  # (height, width): square and non-square
STEPS = 6


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    with Pipeline.load(tiny_engine) as p:
        yield p


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def diffusers_images(ref_pipe, scheduler: str, latents: np.ndarray, **kw) -> np.ndarray:
    """diffusers' uint8 images with the same weights, scheduler config, latents and settings."""
    cls, forced = DIFFUSERS[scheduler]
    base = ref_pipe.scheduler.config
    ref_pipe.scheduler = cls.from_config(base, **forced)
    ref_pipe.set_progress_bar_config(disable=True)
    try:
        out = ref_pipe(latents=torch.from_numpy(latents), output_type="np", **kw).images
    finally:
        ref_pipe.scheduler = DDIMScheduler.from_config(base)
    return (out * 255).round().astype(np.uint8)


def latents_for(pipe, n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    f = pipe.manifest.dims.vae_scale_factor
    return np.random.default_rng(seed).standard_normal((n, 4, height // f, width // f), dtype=np.float32)


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("scheduler", [s for s in SAMPLERS if s not in STOCHASTIC])
def test_generate_matches_diffusers(pipe, tiny_pipeline, scheduler, height, width):
    latents = latents_for(pipe, 1, height, width)
    ours = pipe.generate(PROMPT, steps=STEPS, scheduler=scheduler, latents=latents, height=height, width=width)
    ref = diffusers_images(tiny_pipeline, scheduler, latents, prompt=PROMPT, num_inference_steps=STEPS,
                           guidance_scale=7.5, height=height, width=width)
    assert ours.array.shape == ref.shape == (1, height, width, 3)
    score = psnr(ours.array, ref)
    print(f"PSNR sd1 tiny {scheduler} {height}x{width}: {score:.1f} dB")
    assert score >= 40.0


def test_euler_ancestral_matches_diffusers_given_our_noise(pipe, tiny_pipeline, monkeypatch):
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea

    latents = latents_for(pipe, 1, 256, 320)
    ours = pipe.generate(PROMPT, steps=STEPS, scheduler="euler_a", latents=latents, seed=11, height=256, width=320)
    # With latents given, the seeded generator's first draws are the per-evaluation noise.
    plan = make_plan("euler_a", pipe.manifest.scheduler_config, STEPS)
    noise = iter(np.random.default_rng(11).standard_normal((plan.num_evaluations,) + latents.shape, dtype=np.float32))
    monkeypatch.setattr(ea, "randn_tensor", lambda *a, **k: torch.from_numpy(next(noise)))
    ref = diffusers_images(tiny_pipeline, "euler_a", latents, prompt=PROMPT, num_inference_steps=STEPS,
                           guidance_scale=7.5, height=256, width=320)
    assert psnr(ours.array, ref) >= 40.0


def test_unguided_and_negative_prompt_match_diffusers(pipe, tiny_pipeline):
    latents = latents_for(pipe, 1, 256, 256, seed=3)
    ours = pipe.generate(PROMPT, steps=STEPS, guidance_scale=1.0, latents=latents, height=256, width=256)
    ref = diffusers_images(tiny_pipeline, "ddim", latents, prompt=PROMPT, num_inference_steps=STEPS,
                           guidance_scale=1.0, height=256, width=256)
    assert psnr(ours.array, ref) >= 40.0
    ours = pipe.generate(PROMPT, "green square", steps=STEPS, guidance_scale=5.0, latents=latents, height=256, width=256)
    ref = diffusers_images(tiny_pipeline, "ddim", latents, prompt=PROMPT, negative_prompt="green square",
                           num_inference_steps=STEPS, guidance_scale=5.0, height=256, width=256)
    assert psnr(ours.array, ref) >= 40.0


def test_prompt_list_and_batch_match_diffusers(pipe, tiny_pipeline):
    prompts = [PROMPT, "a yellow triangle on a black background"]
    latents = latents_for(pipe, 2, 256, 256, seed=4)
    ours = pipe.generate(prompts, steps=4, latents=latents, height=256, width=256)
    ref = diffusers_images(tiny_pipeline, "ddim", latents, prompt=prompts, num_inference_steps=4, height=256, width=256)
    assert ours.array.shape == (2, 256, 256, 3) and len(ours.images) == 2 and psnr(ours.array, ref) >= 40.0
    ours = pipe.generate(PROMPT, steps=4, batch_size=2, latents=latents, height=256, width=256)
    ref = diffusers_images(tiny_pipeline, "ddim", latents, prompt=PROMPT, num_images_per_prompt=2,
                           num_inference_steps=4, height=256, width=256)
    assert psnr(ours.array, ref) >= 40.0


def test_seeded_generation_is_reproducible(pipe):
    a = pipe.generate(PROMPT, steps=3, seed=7, height=256, width=256, scheduler="euler_a")
    b = pipe.generate(PROMPT, steps=3, seed=7, height=256, width=256, scheduler="euler_a")
    c = pipe.generate(PROMPT, steps=3, seed=8, height=256, width=256, scheduler="euler_a")
    np.testing.assert_array_equal(a.array, b.array)
    assert not np.array_equal(a.array, c.array)
    d = pipe.generate(PROMPT, steps=1, height=256, width=256)
    assert isinstance(d.seed, int) and d.parameters["seed"] == d.seed
    e = pipe.generate(PROMPT, steps=1, height=256, width=256, seed=d.seed)
    np.testing.assert_array_equal(d.array, e.array)
    assert isinstance(a.images[0], Image.Image) and a.array.dtype == np.uint8
    for stage in ("tokenize", "text_encoder", "unet", "step_graph", "vae_decoder", "total"):
        assert a.timings[stage] >= 0.0


def test_concurrent_generate_equals_serial(pipe):
    jobs = [dict(prompt=PROMPT, seed=s, steps=3, height=256, width=256 + 64 * (s % 2)) for s in range(4)]
    serial = [pipe.generate(**j).array for j in jobs]
    results: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, pipe.generate(**jobs[i]).array)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, arr in enumerate(serial):
        np.testing.assert_array_equal(results[i], arr)


def test_long_prompt_is_truncated_with_a_readable_warning(pipe, caplog, tiny_checkpoint):
    """The warning names the dropped words as the checkpoint's own (transformers) tokenizer decodes them."""
    from transformers import CLIPTokenizer

    prompt = "a red circle on a blue background " * 12
    with caplog.at_level(logging.WARNING, logger="diffusion_engine"):
        pipe.generate(prompt, steps=1, height=256, width=256, seed=0)
    reference = CLIPTokenizer.from_pretrained(tiny_checkpoint / "tokenizer")
    ids = reference(prompt).input_ids
    dropped = reference.decode(ids[reference.model_max_length - 1 : -1]).strip()
    print(caplog.text.strip(), "| reference:", dropped)
    assert "longer than the 77 tokens" in caplog.text and f"dropped: {dropped!r}" in caplog.text
    assert "</w>" not in caplog.text


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(height=260), "height 260 is not a size this engine takes: a multiple of 16 from 256 to 384"),
        (dict(width=512), "width 512 is not a size this engine takes: a multiple of 16 from 256 to 384"),
        (dict(height=264), "height 264 is not a size this engine takes: a multiple of 16 from 256 to 384"),
        (dict(height=0), "height 0 is not a size this engine takes"),
        (dict(width=0), "width 0 is not a size this engine takes"),
        (dict(prompt=None), "prompt must be a string or a non-empty list of strings, got None"),
        (dict(seed=-2), r"seed must be an integer >= 0, or -1 \(or None\) for a random seed, got -2"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(steps=0), "steps must be an integer >= 1, got 0"),
        (dict(scheduler="karras"), "unknown scheduler 'karras'; valid: ddim, pndm, lms, euler, euler_a, heun"),
        (dict(guidance_scale=-1.0), "guidance_scale must be a finite number >= 0, got -1.0"),
        (dict(latents=np.zeros((1, 4, 16, 16), np.float32)), r"latents have shape \(1, 4, 16, 16\); this request needs \(1, 4, 32, 32\)"),
        (dict(batch_size=3), "3 images per call .* exceeds the engine's max batch 2"),
        (dict(prompt=[]), "prompt must be a string or a non-empty list"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt must be a string or a list of 1 strings"),
    ],
)
def test_bad_requests_fail_before_any_model_runs(pipe, monkeypatch, kwargs, message):
    def forbidden(*a, **k):
        raise AssertionError("a model ran")

    for session in pipe.sessions.values():
        monkeypatch.setattr(session, "_run", forbidden)
    args = {"prompt": PROMPT, "height": 256, "width": 256, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe.generate(**args)


def test_bad_engine_directories(tiny_engine, tmp_path):
    with pytest.raises(ManifestError, match="no such engine directory"):
        Pipeline.load(tmp_path / "missing")
    copy = tmp_path / "engine"
    shutil.copytree(tiny_engine, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(ManifestError, match="format version 2 is newer"):
        Pipeline.load(copy)
    (copy / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "components"}))
    with pytest.raises(ManifestError, match="corrupt manifest"):
        Pipeline.load(copy)
    with pytest.raises(ValueError, match="unknown backend .cuda.; valid: auto, ort-cpu, ort-cuda, trt"):
        Pipeline.load(tiny_engine, backend="cuda")


def test_engine_run_writes_png_with_parameters(tiny_engine, tmp_path, capsys):
    from diffusion_engine.runtime.cli import main

    out = tmp_path / "img.png"
    args = ["--engine", str(tiny_engine), "--prompt", PROMPT, "--steps", "2", "--guidance", "6", "--scheduler",
            "euler", "--seed", "5", "--height", "256", "--width", "320", "--out", str(out)]
    assert main(args) == 0
    image = Image.open(out)
    params = json.loads(image.text["diffusion-engine"])
    assert image.size == (320, 256)
    assert params | {"prompt": PROMPT, "steps": 2, "guidance_scale": 6.0, "scheduler": "euler", "seed": 5,
                     "height": 256, "width": 320} == params
    # A1111's PNG Info text: what its UI and image sites read back.
    name = read_manifest(tiny_engine).source["checkpoint"].rstrip("/").rsplit("/", 1)[-1]
    text = image.text["parameters"]
    assert text.startswith(f"{PROMPT}\nSteps: 2, Sampler: Euler, CFG scale: 6.0, Seed: 5, Size: 320x256, Model hash: ")
    assert text.endswith(f", Model: {name}") and "Negative prompt" not in text
    assert "unet_per_step" in capsys.readouterr().out
    assert main(args[:-2] + ["--out", str(tmp_path / "b.png"), "--batch", "2"]) == 0
    assert (tmp_path / "b-0.png").is_file() and (tmp_path / "b-1.png").is_file()
    assert main(args[:-2] + ["--out", str(tmp_path / "c.png"), "--height", "100"]) == 2
    assert "height 100 is not a size this engine takes: a multiple of 16 from 256 to 384" in capsys.readouterr().err
    assert main(args[:-2] + ["--out", str(tmp_path / "d.png"), "--height", "0"]) == 2
    assert "height 0 is not a size this engine takes" in capsys.readouterr().err
    assert not (tmp_path / "d.png").exists()


def test_seed_minus_one_is_random(pipe):
    a = pipe.generate(PROMPT, steps=1, height=256, width=256, seed=-1)
    assert a.seed is not None and a.seed >= 0
    b = pipe.generate(PROMPT, steps=1, height=256, width=256, seed=a.seed)
    np.testing.assert_array_equal(a.array, b.array)
