"""The SDXL refiner: its own engine (one OpenCLIP text encoder, aesthetic-score time ids), the base +
refiner flow (generate(refiner=..., refiner_start=...)) and a plain refiner img2img pass, at parity with
diffusers' StableDiffusionXLPipeline(denoising_end) -> StableDiffusionXLImg2ImgPipeline(denoising_start)
with the same weights, scheduler configs and noise; bad refiner requests fail before any model runs.
Every test that needs the refiner's own export is in the slow suite (make test-slow, run by CI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers import scheduling_euler_ancestral_discrete
from PIL import Image

from diffusion_engine.engine.manifest import read_manifest
from diffusion_engine.engine.specs import PROMPT_EMBEDS, TEXT_EMBEDS, TEXT_ENCODER, TIME_IDS
from diffusion_engine.export.families import detect_family
from diffusion_engine.runtime.samplers import STOCHASTIC, denoising_end_plan, denoising_start, make_plan
from tests.test_img2img import img2img_images, our_draws, picture
from tests.test_pipeline import DIFFUSERS, psnr

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

PROMPT = "a red circle on a blue background"
SIZE = (256, 320)


@pytest.fixture(scope="module")
def engines(family, pipelines):
    """(base checkpoint, refiner checkpoint, base Pipeline, refiner Pipeline)."""
    base_ckpt, base_engine = family("sdxl")
    refiner_ckpt, refiner_engine = family("sdxl-refiner")
    return base_ckpt, refiner_ckpt, pipelines(base_engine), pipelines(refiner_engine)


def diffusers_pipe(ckpt, sampler: str):
    pipe = DiffusionPipeline.from_pretrained(ckpt)
    cls, forced = DIFFUSERS[sampler]
    pipe.scheduler = cls.from_config(dict(pipe.scheduler.config), **forced)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_refined(base_ckpt, refiner_ckpt, sampler, steps, fraction, latents, noise, monkeypatch, **kw):
    """diffusers' ensemble of experts: the base to denoising_end as latents, the refiner from denoising_start."""
    if noise is not None:
        draws = iter(noise)
        monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor",
                            lambda shape, *a, **k: torch.from_numpy(next(draws)).reshape(shape))
    base, refiner = diffusers_pipe(base_ckpt, sampler), diffusers_pipe(refiner_ckpt, sampler)
    scores = {k: kw.pop(k) for k in ("aesthetic_score", "negative_aesthetic_score") if k in kw}
    mid = base(PROMPT, num_inference_steps=steps, denoising_end=fraction, output_type="latent",
               latents=torch.from_numpy(latents), height=SIZE[0], width=SIZE[1], **kw).images
    out = refiner(PROMPT, num_inference_steps=steps, denoising_start=fraction, image=mid, output_type="np",
                  **scores, **kw).images
    return (out * 255).round().astype(np.uint8)


def our_noise(result, sampler: str, seed: int, shape: tuple[int, ...]) -> list[np.ndarray] | None:
    """With latents given, the seeded generator draws the base's per-evaluation noise, then the refiner's."""
    if sampler not in STOCHASTIC:
        return None
    rng = np.random.default_rng(seed)
    counts = result.parameters["base_evaluations"], result.parameters["refiner_evaluations"]
    return [row for count in counts for row in rng.standard_normal((count,) + shape, dtype=np.float32)]


@pytest.mark.slow  # the refiner's own export
@pytest.mark.parametrize(("sampler", "steps", "fraction"), [
    ("euler", 6, 0.8), ("euler_a", 6, 0.7), ("dpmpp_2m", 8, 0.8), ("heun", 5, 0.75), ("ddim", 6, 0.6),
])
def test_base_and_refiner_match_diffusers(engines, monkeypatch, sampler, steps, fraction):
    base_ckpt, refiner_ckpt, base, refiner = engines
    latents = np.random.default_rng(1).standard_normal((1, 4, SIZE[0] // 8, SIZE[1] // 8), dtype=np.float32)
    ours = base.generate(PROMPT, steps=steps, scheduler=sampler, latents=latents, seed=7, height=SIZE[0],
                         width=SIZE[1], guidance_scale=5.0, refiner=refiner, refiner_start=fraction)
    p = ours.parameters
    assert p["base_evaluations"] + p["refiner_evaluations"] >= make_plan(sampler, base.manifest.scheduler_config,
                                                                           steps).num_evaluations
    theirs = diffusers_refined(base_ckpt, refiner_ckpt, sampler, steps, fraction, latents,
                               our_noise(ours, sampler, 7, latents.shape), monkeypatch, guidance_scale=5.0)
    score = psnr(ours.array, theirs)
    print(f"PSNR base+refiner sdxl {sampler} steps {steps} switch {fraction} "
          f"({p['base_evaluations']} + {p['refiner_evaluations']} evaluations): {score:.1f} dB")
    assert ours.array.shape == theirs.shape == (1, *SIZE, 3) and score >= 40.0


@pytest.mark.slow  # the refiner's own export
def test_base_img2img_then_refiner_matches_diffusers(engines, monkeypatch):
    """An img2img request on the base, refined: diffusers' SDXL img2img pipeline with denoising_end, then the refiner."""
    import diffusers.models.autoencoders.vae as vae
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as sdxl_img2img
    from diffusers import StableDiffusionXLImg2ImgPipeline

    base_ckpt, refiner_ckpt, base, refiner = engines
    image = picture(256, 256)
    ours = base.generate(PROMPT, image=image, strength=0.75, steps=8, scheduler="euler", seed=5, guidance_scale=5.0,
                         refiner=refiner, refiner_start=0.8)
    draws = iter(our_draws(base, "euler", 8, 0.75, 5, 1, 256, 256))  # the posterior sample's eps, the initial noise
    for module in (vae, sdxl_img2img):
        monkeypatch.setattr(module, "randn_tensor", lambda shape, *a, **k: torch.from_numpy(next(draws)).reshape(shape))
    first = StableDiffusionXLImg2ImgPipeline(**diffusers_pipe(base_ckpt, "euler").components)
    first.set_progress_bar_config(disable=True)
    mid = first(PROMPT, image=Image.fromarray(image), strength=0.75, num_inference_steps=8, denoising_end=0.8,
                output_type="latent", guidance_scale=5.0).images
    theirs = diffusers_pipe(refiner_ckpt, "euler")(PROMPT, num_inference_steps=8, denoising_start=0.8, image=mid,
                                                   output_type="np", guidance_scale=5.0).images
    score = psnr(ours.array, (theirs * 255).round().astype(np.uint8))
    print(f"PSNR base img2img (strength 0.75) + refiner at 0.8: {score:.1f} dB "
          f"({ours.parameters['base_evaluations']} + {ours.parameters['refiner_evaluations']} evaluations)")
    assert score >= 40.0


@pytest.mark.slow  # the refiner's own export
def test_aesthetic_scores_condition_the_refiner_as_in_diffusers(engines, monkeypatch):
    base_ckpt, refiner_ckpt, base, refiner = engines
    latents = np.random.default_rng(2).standard_normal((1, 4, SIZE[0] // 8, SIZE[1] // 8), dtype=np.float32)
    kw = dict(steps=6, scheduler="euler", latents=latents, height=SIZE[0], width=SIZE[1], guidance_scale=5.0,
              refiner=refiner, refiner_start=0.5)
    default = base.generate(PROMPT, **kw)
    scored = base.generate(PROMPT, aesthetic_score=9.0, negative_aesthetic_score=1.0, **kw)
    assert default.parameters["refiner_time_ids"] == [256.0, 320.0, 0.0, 0.0, 6.0]
    assert default.parameters["refiner_negative_time_ids"] == [256.0, 320.0, 0.0, 0.0, 2.5]
    assert scored.parameters["refiner_time_ids"][-1] == 9.0 and scored.parameters["refiner_negative_time_ids"][-1] == 1.0
    changed = psnr(default.array, scored.array)
    theirs = diffusers_refined(base_ckpt, refiner_ckpt, "euler", 6, 0.5, latents, None, monkeypatch,
                               guidance_scale=5.0, aesthetic_score=9.0, negative_aesthetic_score=1.0)
    score = psnr(scored.array, theirs)
    print(f"PSNR base+refiner, aesthetic 9.0 / 1.0: {score:.1f} dB (vs the default scores' image: {changed:.1f} dB)")
    assert score >= 40.0 and not np.array_equal(default.array, scored.array)


@pytest.mark.slow  # the refiner's own export
@pytest.mark.parametrize("strength", [None, 0.6])
def test_refiner_img2img_matches_diffusers(engines, monkeypatch, strength):
    """A plain refiner pass on a finished image (StableDiffusionXLImg2ImgPipeline, default strength 0.3)."""
    _, refiner_ckpt, _, refiner = engines
    image = picture(256, 256)
    ours = refiner.generate(PROMPT, image=image, strength=strength, steps=6, seed=3, guidance_scale=5.0)
    used = ours.parameters["strength"]
    assert used == (0.3 if strength is None else strength)
    draws = our_draws(refiner, "euler", 6, used, 3, 1, 256, 256)
    theirs = img2img_images(diffusers_pipe(refiner_ckpt, "euler"), image, used, draws, monkeypatch, prompt=PROMPT,
                            num_inference_steps=6, guidance_scale=5.0)
    score = psnr(ours.array, theirs)
    print(f"PSNR refiner img2img strength {used}: {score:.1f} dB")
    assert score >= 40.0


@pytest.mark.slow  # the refiner's own export
def test_refiner_engine_has_one_text_encoder_and_aesthetic_time_ids(family):
    ckpt, engine = family("sdxl-refiner")
    m = read_manifest(engine)
    assert m.family == "sdxl-refiner" and m.tokenizer_2 is None
    assert (m.dims.text_encoders, m.dims.pooled_size, m.dims.time_ids_size, m.dims.aesthetic) == (1, 32, 5, True)
    encoder = m.components[TEXT_ENCODER].spec(TEXT_ENCODER)
    assert [t.name for t in encoder.inputs] == ["input_ids"] and [t.name for t in encoder.outputs] == [PROMPT_EMBEDS, TEXT_EMBEDS]
    assert m.components["unet"].spec("unet").tensor(TIME_IDS).axes == ("batch", 5)
    assert m.defaults["strength"] == 0.3
    index = json.loads((ckpt / "model_index.json").read_text())
    assert detect_family("x", index, {}) == "sdxl-refiner"
    # The same pipeline class with the first text encoder is an SDXL base saved for img2img.
    assert detect_family("x", {**index, "text_encoder": ["transformers", "CLIPTextModel"]}, {}) == "sdxl"


def test_switch_points_follow_diffusers_cutoff(family):
    """denoising_end keeps the timesteps >= the cutoff; denoising_start runs those below, whole Heun steps."""
    config = read_manifest(family("sdxl")[1]).scheduler_config
    for sampler, steps, fraction in [("euler", 10, 0.8), ("heun", 6, 0.75), ("pndm", 6, 0.5), ("dpmpp_2m", 25, 0.8)]:
        full = make_plan(sampler, config, steps)
        cutoff = round(1000 - fraction * 1000)
        head = denoising_end_plan(full, config, fraction)
        tail = make_plan(sampler, config, steps, denoising_start(sampler, config, steps, fraction))
        print(f"{sampler} {steps} steps at {fraction}: base {head.timesteps.tolist()} refiner {tail.timesteps.tolist()}")
        assert (head.timesteps >= cutoff).all() and (full.timesteps[head.num_evaluations:] < cutoff).all()
        assert (tail.timesteps < cutoff).sum() >= tail.num_evaluations - 1 and tail.timesteps[-1] == full.timesteps[-1]


@pytest.mark.slow  # the refiner's own export
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(refiner_start=1.0), r"refiner_start must be a number strictly between 0 and 1, got 1.0"),
        (dict(refiner_start=0), r"refiner_start must be a number strictly between 0 and 1, got 0"),
        (dict(refiner_start="0.8"), r"refiner_start must be a number strictly between 0 and 1"),
        (dict(refiner_start=0.01, steps=4), r"refiner_start 0.01: the switch at 0.01 leaves the base no step"),
        (dict(refiner_start=0.9999, steps=4), r"refiner_start 0.9999: the switch at 0.9999 leaves the refiner no step"),
        (dict(scheduler="lcm"), "refiner: the lcm sampler does not continue another model's latents"),
        (dict(mask=np.full((256, 320), 255, np.uint8), image=picture(256, 320)), "refiner= with mask= is not supported"),
        (dict(aesthetic_score=float("nan")), "aesthetic_score must be a finite number, got nan"),
        (dict(height=512), "height 512 is not a size this engine takes"),
    ],
)
def test_bad_refiner_requests_fail_before_any_model_runs(engines, monkeypatch, kwargs, message):
    _, _, base, refiner = engines
    for pipe in (base, refiner):
        for session in pipe.sessions.values():
            monkeypatch.setattr(session, "_run", lambda feeds: pytest.fail("a model ran"))
    request = {"steps": 4, "height": 256, "width": 320, "refiner": refiner, **kwargs}
    with pytest.raises(ValueError, match=message):
        base.generate(PROMPT, **request)


@pytest.mark.slow  # the refiner's own export
def test_refiner_of_another_family_and_misplaced_refiner_inputs_are_refused(engines, tiny_engine, pipelines, monkeypatch):
    _, _, base, refiner = engines
    sd1 = pipelines(tiny_engine)
    for pipe in (base, refiner, sd1):
        for session in pipe.sessions.values():
            monkeypatch.setattr(session, "_run", lambda feeds: pytest.fail("a model ran"))
    cases = [
        (base, dict(refiner=sd1), r"refiner: .* is a sd1 engine, not an sdxl-refiner one"),
        (base, dict(refiner=base), r"refiner: .* is a sdxl engine, not an sdxl-refiner one"),
        (sd1, dict(refiner=refiner), "the SDXL refiner continues an SDXL base .*; this is a sd1 engine"),
        (base, dict(refiner="refiner-dir"), "refiner must be a Pipeline"),
        (base, dict(refiner_start=0.8), "refiner_start applies with refiner=...; this request has no refiner"),
        (base, dict(aesthetic_score=6.0), "aesthetic_score: aesthetic-score conditioning is an input of the SDXL refiner"),
        (refiner, dict(), "this sdxl-refiner engine refines images: pass image="),
        (refiner, dict(image=picture(256, 256), target_size=(256, 256)), "target_size: the SDXL refiner conditions on"),
    ]
    for pipe, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe.generate(PROMPT, steps=4, **kwargs)
    # A refiner built for fewer sizes or images than the base's request (its own checks, named as the refiner's).
    from dataclasses import replace

    from diffusion_engine.engine.specs import BuildRanges
    from diffusion_engine.runtime.pipeline import Pipeline

    narrow = Pipeline(refiner.engine_dir, replace(refiner.manifest, build=BuildRanges(256, 256, 1)), refiner.components)
    with pytest.raises(ValueError, match=r"refiner .*: width 320 is not a size this engine takes: a multiple of 8 from 256 to 256"):
        base.generate(PROMPT, steps=4, height=256, width=320, refiner=narrow)
    with pytest.raises(ValueError, match=r"refiner .*: 2 images per call .* exceeds the engine's max batch 1"):
        base.generate(PROMPT, steps=4, height=256, width=256, batch_size=2, refiner=narrow)


@pytest.mark.slow  # the refiner's own export
def test_engine_run_refiner(engines, tmp_path, capsys):
    from diffusion_engine.runtime.cli import main

    _, _, base, refiner = engines
    out = tmp_path / "refined.png"
    args = ["--engine", str(base.engine_dir), "--refiner", str(refiner.engine_dir), "--refiner-start", "0.7",
            "--prompt", PROMPT, "--steps", "5", "--seed", "4", "--height", "256", "--width", "256", "--out", str(out)]
    assert main(args) == 0
    with Image.open(out) as image:
        params = json.loads(image.text["diffusion-engine"])
        assert image.size == (256, 256)
    assert params["refiner_start"] == 0.7 and params["refiner_family"] == "sdxl-refiner"
    print(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["--engine", str(base.engine_dir), "--refiner-start", "0.7", "--prompt", PROMPT,
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "--refiner-start applies with --refiner DIR" in capsys.readouterr().err
