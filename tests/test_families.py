"""Model families: detection, export and generate() at parity with each family's diffusers pipeline.

Every family's tiny checkpoint (train/tiny.py) is exported once per session (sd1's is conftest's
engine) and compared image by image with diffusers (same weights, scheduler config and latents;
stochastic samplers get our noise injected): PSNR >= 40 dB on the uint8 images.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_lcm

from diffusion_engine.engine.manifest import read_manifest
from diffusion_engine.engine.specs import (
    FAMILY_DEFAULTS, IMAGE_START, IMAGE_START_UNGUIDED, STEP_GRAPHS, TINY_VAE_DECODER, BuildRanges, FamilyDefaults,
)
from diffusion_engine.export.checkpoint import CheckpointError, load_checkpoint
from diffusion_engine.export.exporter import ExportOptions, export_engine, fp32_reason
from diffusion_engine.export.families import detect_family
from diffusion_engine.train.tiny import build_tiny
from diffusion_engine.runtime.backends import Components
from diffusion_engine.runtime.denoise import HostLoop
from diffusion_engine.runtime.pipeline import Pipeline, guidance_embedding, runtime_components
from diffusion_engine.runtime.samplers import SAMPLERS, STOCHASTIC, make_plan
from diffusion_engine.runtime.session import OrtCpuSession
from diffusion_engine.runtime.tokenizer import PromptTokenizer
from tests.conftest import FAMILY_RANGES
from tests.test_pipeline import psnr

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

PROMPT = "a red circle on a blue background"
RANGES = BuildRanges(*FAMILY_RANGES)
SCHEDULERS = {
    "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler, "lcm": LCMScheduler,
}
# Per family: (sampler, steps, guidance) cases; the first is the family's default sampler.
CASES = {
    "sd1": [("ddim", 4, 7.5)],  # every other sampler: tests/test_pipeline.py, at two sizes
    # zero-terminal-SNR v-prediction on trailing timesteps (the tiny sd2 checkpoint's schedule)
    "sd2": [("ddim", 4, 7.5), ("euler", 4, 7.5), ("dpmpp_2m", 4, 7.5), ("unipc", 4, 7.5), ("euler_a", 4, 7.5)],
    "sdxl": [("euler", 4, 5.0), ("ddim", 4, 5.0), ("dpmpp_2m", 4, 5.0), ("euler_a", 4, 5.0)],
    "sd-turbo": [("euler_a", 1, 0.0), ("euler_a", 4, 0.0), ("euler", 2, 0.0), ("ddim", 2, 0.0), ("dpmpp_2m", 4, 0.0)],
    "sdxl-turbo": [("euler_a", 1, 0.0), ("euler_a", 3, 0.0), ("euler", 2, 0.0), ("ddim", 4, 0.0)],
    "lcm": [("lcm", 4, 8.5), ("lcm", 2, 3.0), ("ddim", 4, 8.5), ("dpmpp_2m", 4, 8.5), ("euler", 4, 8.5)],
}
FAMILY_CASES = [(f, *case) for f, cases in CASES.items() for case in cases]


def reference(ckpt: Path, family_name: str, sampler: str):
    """The family's diffusers pipeline with the sampler's scheduler on the checkpoint's config.

    LatentConsistencyModelPipeline only runs LCMScheduler (it passes original_inference_steps to
    set_timesteps); other samplers on LCM weights run in StableDiffusionPipeline, which feeds the
    same guidance embedding (time_cond_proj_dim) and, like us, decodes the final latents.
    """
    pipe = DiffusionPipeline.from_pretrained(ckpt)
    if family_name == "lcm" and sampler != "lcm":
        pipe = StableDiffusionPipeline(**pipe.components, requires_safety_checker=False)
    config = dict(pipe.scheduler.config)
    pipe.scheduler = SCHEDULERS[sampler].from_config(config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(ref, latents: np.ndarray, noise: np.ndarray | None, monkeypatch, **kw) -> np.ndarray:
    """Run diffusers with our latents (and our per-evaluation noise for stochastic samplers)."""
    if noise is not None:
        draws = iter(noise)
        for module in (scheduling_euler_ancestral_discrete, scheduling_lcm):
            monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: torch.from_numpy(next(draws)))
    out = ref(latents=torch.from_numpy(latents), output_type="np", **kw).images
    return (out * 255).round().astype(np.uint8)


def our_noise(pipe: Pipeline, sampler: str, steps: int, latents: np.ndarray, seed: int) -> np.ndarray | None:
    """With latents given, the seeded generator's first draws are the per-evaluation noise."""
    if sampler not in STOCHASTIC:
        return None
    plan = make_plan(sampler, pipe.manifest.scheduler_config, steps)
    return np.random.default_rng(seed).standard_normal((plan.num_evaluations,) + latents.shape, dtype=np.float32)


def latents_for(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4, height // 8, width // 8), dtype=np.float32)


@pytest.mark.parametrize(("name", "sampler", "steps", "guidance"), FAMILY_CASES)
def test_generate_matches_diffusers(family, pipelines, monkeypatch, name, sampler, steps, guidance):
    ckpt, engine = family(name)
    pipe = pipelines(engine)
    height, width = (256, 320) if steps % 2 else (256, 256)
    latents = latents_for(1, height, width)
    ours = pipe.generate(PROMPT, steps=steps, guidance_scale=guidance, scheduler=sampler, latents=latents, seed=3,
                         height=height, width=width)
    ref = diffusers_images(reference(ckpt, name, sampler), latents, our_noise(pipe, sampler, steps, latents, 3),
                           monkeypatch, prompt=PROMPT, num_inference_steps=steps, guidance_scale=guidance,
                           height=height, width=width)
    score = psnr(ours.array, ref)
    print(f"PSNR {name} {sampler} steps={steps} guidance={guidance}: {score:.1f} dB")
    assert ours.array.shape == ref.shape == (1, height, width, 3)
    assert score >= 40.0, score


@pytest.mark.parametrize("name", list(CASES))
def test_manifest_records_family_defaults_and_generate_uses_them(family, pipelines, monkeypatch, name):
    ckpt, engine = family(name)
    m = read_manifest(engine)
    table = FAMILY_DEFAULTS[name]
    assert m.family == name and m.format_version == 1
    assert m.defaults["steps"] == table.steps and m.defaults["guidance_scale"] == table.guidance_scale
    assert m.defaults["scheduler"] == CASES[name][0][0] and m.defaults["size"] == 32 * 8  # UNet sample size x VAE factor
    pipe = pipelines(engine)
    d = pipe.defaults
    assert (d.steps, d.guidance_scale, d.scheduler) == (table.steps, table.guidance_scale, CASES[name][0][0])
    assert pipe.default_scheduler == d.scheduler and pipe.default_size == 256  # 256 from the checkpoint, in range
    latents = latents_for(1, 256, 256, seed=5)
    steps = None if table.steps <= 4 else 3  # every setting left out (but 30 steps: too slow here)
    ours = pipe.generate(PROMPT, latents=latents, seed=9, steps=steps)
    steps = steps or table.steps
    assert {k: ours.parameters[k] for k in ("steps", "guidance_scale", "scheduler", "height", "width")} == {
        "steps": steps, "guidance_scale": table.guidance_scale, "scheduler": d.scheduler, "height": 256, "width": 256}
    ref = diffusers_images(reference(ckpt, name, d.scheduler), latents, our_noise(pipe, d.scheduler, steps, latents, 9),
                           monkeypatch, prompt=PROMPT, num_inference_steps=steps, guidance_scale=d.guidance_scale,
                           height=256, width=256)
    assert psnr(ours.array, ref) >= 40.0


def test_format_1_manifests_without_family_fields_still_load(family, tmp_path):
    _, engine = family("sd1")
    old = Path(shutil.copytree(engine, tmp_path / "engine"))
    d = json.loads((old / "manifest.json").read_text())
    for key in ("defaults", "tokenizer_2", "force_zeros_for_empty_prompt"):
        del d[key]
    for name in ("step_rescaled", "step_masked", "step_unguided_masked", "step_rescaled_masked"):
        del d["components"][name]  # exported before guidance rescale and inpainting
    for name in ("vae_encoder", IMAGE_START, IMAGE_START_UNGUIDED):  # and before image requests
        del d["components"][name]
    d["components"].pop(TINY_VAE_DECODER, None)  # and before the tiny decoder (conftest's sd1 engine has one)
    (old / "manifest.json").write_text(json.dumps(d))
    m = read_manifest(old)
    assert (m.defaults, m.tokenizer_2, m.force_zeros_for_empty_prompt) == ({}, None, False)
    assert runtime_components(m) == ("text_encoder", "unet", "vae_decoder", "step", "step_unguided")
    sessions = {n: OrtCpuSession(old / m.components[n].files["fp32"], m.components[n].spec(n), m.components[n].ranges())
                for n in runtime_components(m)}
    with Pipeline(old, m, Components("ort-cpu", sessions, lambda step: HostLoop(sessions["unet"], sessions[step]))) as pipe:
        # The family's defaults and the checkpoint's scheduler, as before; 512 clamped to the built 384.
        assert pipe.defaults == FamilyDefaults(384, 30, 7.5, "ddim")
        assert pipe.generate(PROMPT, steps=1, height=256, width=256, seed=0).array.shape == (1, 256, 256, 3)
        with pytest.raises(ValueError, match="has no vae_encoder .*; export it again to use image="):
            pipe.generate(PROMPT, steps=2, image=np.zeros((256, 256, 3), np.uint8))
        with pytest.raises(ValueError, match="no step_rescaled graph .* re-export it"):
            pipe.generate(PROMPT, steps=1, height=256, width=256, guidance_rescale=0.5)


@pytest.mark.parametrize(("name", "sampler"), [("sd2", "ddim"), ("sd2", "euler"), ("sdxl", "euler")])
def test_guidance_rescale_matches_diffusers(family, pipelines, monkeypatch, name, sampler):
    ckpt, engine = family(name)
    pipe = pipelines(engine)
    latents = latents_for(1, 256, 256, seed=1)
    plain = pipe.generate(PROMPT, steps=4, scheduler=sampler, latents=latents, height=256, width=256)
    ours = pipe.generate(PROMPT, steps=4, scheduler=sampler, latents=latents, height=256, width=256, guidance_rescale=0.7)
    guidance = pipe.defaults.guidance_scale
    ref = diffusers_images(reference(ckpt, name, sampler), latents, None, monkeypatch, prompt=PROMPT, num_inference_steps=4,
                           guidance_scale=guidance, guidance_rescale=0.7, height=256, width=256)
    score = psnr(ours.array, ref)
    print(f"PSNR {name} {sampler} guidance_rescale=0.7: {score:.1f} dB")
    assert score >= 40.0 and not np.array_equal(plain.array, ours.array)


def test_sdxl_negative_prompts_batches_and_size_conditioning(family, pipelines, monkeypatch):
    ckpt, engine = family("sdxl")
    pipe = pipelines(engine)
    ref = reference(ckpt, "sdxl", "euler")
    latents = latents_for(2, 256, 256, seed=2)
    # An empty negative prompt is zero conditioning (force_zeros_for_empty_prompt), as diffusers' None.
    cases = [
        (dict(prompt=[PROMPT, "a green square"], negative_prompt=["", ""]), dict(prompt=[PROMPT, "a green square"])),
        (dict(prompt=PROMPT, negative_prompt="yellow", batch_size=2), dict(prompt=PROMPT, negative_prompt="yellow",
                                                                            num_images_per_prompt=2)),
        (dict(prompt=[PROMPT, PROMPT], original_size=(512, 384), crops_coords_top_left=(16, 8), target_size=(320, 256)),
         dict(prompt=[PROMPT, PROMPT], original_size=(512, 384), crops_coords_top_left=(16, 8), target_size=(320, 256))),
    ]
    for ours_kw, ref_kw in cases:
        ours = pipe.generate(**ours_kw, steps=3, scheduler="euler", latents=latents, height=256, width=256)
        theirs = diffusers_images(ref, latents, None, monkeypatch, **ref_kw, num_inference_steps=3,
                                  guidance_scale=pipe.defaults.guidance_scale, height=256, width=256)
        assert psnr(ours.array, theirs) >= 40.0, ours_kw


def test_sdxl_tokenizers_both_saved_and_checked(family):
    ckpt, engine = family("sdxl")
    m = read_manifest(engine)
    ref = DiffusionPipeline.from_pretrained(ckpt)
    prompts = [PROMPT, "", "an astronaut riding a horse, painting"]
    for info, tokenizer in ((m.tokenizer, ref.tokenizer), (m.tokenizer_2, ref.tokenizer_2)):
        assert (engine / info["file"]).is_file()
        ours = PromptTokenizer.from_manifest(engine, info).encode(prompts).tolist()
        assert ours == tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    assert m.tokenizer_2["file"] == "tokenizer_2.json" and m.tokenizer_2["pad_token_id"] != m.tokenizer["pad_token_id"]
    assert m.force_zeros_for_empty_prompt


@pytest.mark.parametrize("name", [f for f in CASES if f != "sd1"])
def test_fp16_graphs_pass_their_check_or_stay_fp32_with_a_reason(family, name):
    _, engine = family(name)
    m = read_manifest(engine)
    generated = (*STEP_GRAPHS, IMAGE_START, IMAGE_START_UNGUIDED)
    assert set(m.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder", *generated}
    for component in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        c = m.components[component]
        for precision, results in c.parity.items():
            limit = c.tolerance["fp32" if precision == "cpu" else precision]
            assert len(results) == 2 and all(r["rel_error"] <= limit for r in results)
        # Every family's UNet and VAE attention is fused for the CPU (the SDXL UNet's 10-head levels too):
        # the graph ort-cpu opens holds no score matrix (these tiny VAEs may have no attention at all).
        if component != "text_encoder":
            assert ("cpu" in c.files or component != "unet") and list(c.score_buffers.values()) == [[]], c.score_buffers
        if c.gpu_precision == "fp16":
            assert "fp16" in c.parity
        else:  # only SDXL's VAE (force_upcast), and the manifest says why
            assert component in ("vae_decoder", "vae_encoder") and name.startswith("sdxl")
            assert any("force_upcast" in note for note in c.notes), c.notes


def test_fp16_vae_flag_and_fp16_fix_vae_lift_the_fp32_vae(family):
    ckpt = load_checkpoint(str(family("sdxl")[0]))
    assert fp32_reason(ckpt, "vae_decoder", ExportOptions()) is not None
    assert fp32_reason(ckpt, "vae_decoder", ExportOptions(fp16_vae=True)) is None
    ckpt.pipeline.vae.register_to_config(force_upcast=False)  # an fp16-fix VAE's config
    assert fp32_reason(ckpt, "vae_decoder", ExportOptions()) is None
    assert fp32_reason(ckpt, "unet", ExportOptions()) is None


def test_lcm_guidance_embedding_matches_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([7.5, 0.0, -1.0, 2.25])
    for dim in (32, 33, 256):  # diffusers' method does not use self
        ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim).numpy()
        ref64 = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
            None, w.double(), embedding_dim=dim, dtype=torch.float64).numpy()
        ours = guidance_embedding(w.numpy(), dim)
        assert ours.dtype == np.float32 and ours.shape == (4, dim)
        np.testing.assert_allclose(ours, ref64, rtol=0, atol=1e-4)  # float64 exp/sin of ~7500 differ in the 5th digit
        # diffusers' float32 arguments (1000 w freq up to 7500) carry ~5e-4 of rounding: that is the agreement.
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-3)


@pytest.mark.slow  # exports the lcm family
def test_lcm_refuses_negative_prompts_and_sd_rejects_size_conditioning(family, pipelines):
    lcm = pipelines(family("lcm")[1])
    with pytest.raises(ValueError, match="negative prompts are not supported by this lcm engine"):
        lcm.generate(PROMPT, "blurry", steps=2, height=256, width=256)
    sd1 = pipelines(family("sd1")[1])
    with pytest.raises(ValueError, match="original_size: size conditioning is an SDXL input; this is a sd1 engine"):
        sd1.generate(PROMPT, steps=1, height=256, width=256, original_size=(512, 512))
    with pytest.raises(ValueError, match=r"guidance_rescale must be a number in \[0, 1\], got 1.5"):
        sd1.generate(PROMPT, steps=1, height=256, width=256, guidance_rescale=1.5)
    xl = pipelines(family("sdxl")[1])
    with pytest.raises(ValueError, match=r"target_size must be two integers >= 0 \(height, width\), got \(256,\)"):
        xl.generate(PROMPT, steps=1, height=256, width=256, target_size=(256,))


def _fake_checkpoint(root: Path, pipeline: str, unet: dict | None = None, **index) -> Path:
    """A folder with just the configs that family detection reads (no weights)."""
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **index}))
    if unet is not None:
        (root / "unet").mkdir()
        (root / "unet" / "config.json").write_text(json.dumps(unet))
    return root


@pytest.mark.parametrize(
    ("pipeline", "unet", "index", "family_name"),
    [
        ("StableDiffusion3Pipeline", None, {}, "sd3"),
        ("FluxPipeline", None, {}, "flux"),
        ("StableDiffusionXLPipeline", {"time_cond_proj_dim": 256}, {"text_encoder": ["transformers", "CLIPTextModel"]},
         "lcm-sdxl"),
        ("KolorsPipeline", None, {}, "KolorsPipeline"),
    ],
)
def test_unsupported_checkpoints_are_refused_naming_the_family(tmp_path, capsys, pipeline, unet, index, family_name):
    ckpt = _fake_checkpoint(tmp_path / "ckpt", pipeline, unet, **index)
    message = f"{family_name} checkpoints are not supported"
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(str(ckpt))
    assert "supported families: sd1, sd2, sdxl, sd-turbo, sdxl-turbo, lcm, sdxl-refiner" in str(info.value)
    from diffusion_engine.export.cli import main

    assert main([str(ckpt), "--out", str(tmp_path / "engine")]) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "engine").exists()


@pytest.mark.parametrize("pipeline", ["StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline"])
def test_sdxl_without_its_first_text_encoder_is_refused_unless_a_refiner(tmp_path, pipeline):
    """A refiner's UNet needs its aesthetic-score time ids: only its own StableDiffusionXLImg2ImgPipeline folder says so."""
    ckpt = _fake_checkpoint(tmp_path / "ckpt", pipeline, {}, text_encoder=[None, None])
    with pytest.raises(CheckpointError, match=f"a {pipeline} without the first text encoder is not supported; an SDXL "
                                              "refiner is exported from its own StableDiffusionXLImg2ImgPipeline folder"):
        load_checkpoint(str(ckpt))
    refiner = {"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None]}
    assert detect_family("x", refiner, {}) == "sdxl-refiner"
    with pytest.raises(CheckpointError, match="--family sdxl does not fit this checkpoint .* as sdxl-refiner"):
        detect_family("x", refiner, {}, override="sdxl")


def test_family_override_stays_within_the_architecture(family):
    index = {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}
    sd2 = {"text_encoder": {"hidden_act": "gelu"}, "scheduler": {"_class_name": "DDIMScheduler"}}
    assert detect_family("x", index, sd2) == "sd2"
    assert detect_family("x", index, sd2, name="stabilityai/sd-turbo") == "sd-turbo"  # the name hint
    assert detect_family("x", index, sd2, override="sd-turbo") == "sd-turbo"
    turbo = {**sd2, "scheduler": {"_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}}
    assert detect_family("x", index, turbo) == "sd-turbo"
    assert detect_family("x", index, turbo, override="sd2") == "sd2"
    with pytest.raises(CheckpointError, match="--family sdxl does not fit this checkpoint .* as sd1, sd2, sd-turbo"):
        detect_family("x", index, sd2, override="sdxl")
    with pytest.raises(CheckpointError, match="--family lcm does not fit"):
        detect_family("x", index, sd2, override="lcm")
    with pytest.raises(CheckpointError, match="--family 'sd4' is not a family"):
        detect_family("x", index, sd2, override="sd4")
    # The turbo export forces trailing timesteps into the recorded scheduler config.
    ckpt = load_checkpoint(str(family("sd2")[0]), family="sd-turbo")
    assert ckpt.family == "sd-turbo" and ckpt.scheduler_config["timestep_spacing"] == "trailing"


IMG2IMG_CASES = (
    [("sd2", sampler, strength) for sampler in SAMPLERS if sampler != "lcm" for strength in (0.3, 0.75)]
    + [("sdxl", "euler", 0.5), ("sdxl", "dpmpp_2m", 0.75), ("sd-turbo", "euler_a", 0.5), ("sdxl-turbo", "euler_a", 0.5),
       ("lcm", "lcm", 0.5), ("lcm", "lcm", 0.3)]
)


@pytest.mark.parametrize(("name", "sampler", "strength"), IMG2IMG_CASES)
def test_img2img_matches_diffusers(family, pipelines, monkeypatch, name, sampler, strength):
    """Every sampler on the zero-SNR v-prediction sd2 at strength 0.3 and 0.75; SDXL, the turbos and LCM
    (their own img2img pipelines; LCM shortens its schedule by strength) at one or two strengths."""
    from diffusers import (
        LatentConsistencyModelImg2ImgPipeline,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionXLImg2ImgPipeline,
    )

    from tests.test_img2img import img2img_images, our_draws, picture
    from tests.test_pipeline import DIFFUSERS

    ckpt, engine = family(name)
    pipe = pipelines(engine)
    steps = 2 if name.endswith("turbo") else 4 if name == "lcm" else 6  # turbo: strength x steps must reach a step
    guidance = 0.0 if name.endswith("turbo") else 8.5 if name == "lcm" else 5.0
    image = picture(256, 256)
    ours = pipe.generate(PROMPT, image=image, strength=strength, steps=steps, scheduler=sampler, seed=5,
                         guidance_scale=guidance)
    base = DiffusionPipeline.from_pretrained(ckpt)
    cls = StableDiffusionXLImg2ImgPipeline if name.startswith("sdxl") else StableDiffusionImg2ImgPipeline
    ref = (LatentConsistencyModelImg2ImgPipeline if sampler == "lcm" else cls)(**base.components)
    scheduler_cls, forced = DIFFUSERS.get(sampler, (LCMScheduler, {}))
    ref.scheduler = scheduler_cls.from_config(dict(base.scheduler.config), **forced)
    draws = our_draws(pipe, sampler, steps, strength, 5, 1, 256, 256)
    theirs = img2img_images(ref, image, strength, draws, monkeypatch, prompt=PROMPT, num_inference_steps=steps,
                            guidance_scale=guidance)
    score = psnr(ours.array, theirs)
    print(f"PSNR img2img {name} {sampler} strength {strength}: {score:.1f} dB")
    assert score >= 40.0, score
