"""Inpainting: Pipeline.generate(image=..., mask=...) vs diffusers' StableDiffusionInpaintPipeline and
StableDiffusionXLInpaintPipeline with the same weights, scheduler config and noise, for both UNet kinds:
a plain 4-channel UNet (the masked blend in the step graph) and a 9-channel inpainting UNet; the mask's
rules; bad mask requests fail before any model runs; engine-run --mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from diffusion_engine.engine.specs import BuildRanges
from diffusion_engine.export.exporter import ExportOptions, export_engine
from diffusion_engine.runtime.pipeline import Pipeline
from diffusion_engine.runtime.request import binary_mask, fit_image, latent_mask, mask_pixels
from diffusion_engine.runtime.samplers import img2img_plan
from diffusion_engine.train.tiny import build_tiny
from tests.test_img2img import picture
from tests.test_pipeline import DIFFUSERS, PROMPT, psnr

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

SIZE = (256, 320)  # (height, width)


def box_mask(height: int, width: int) -> np.ndarray:
    """White (repaint) over a box off the centre, black elsewhere; uint8 HxW."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : height * 3 // 4, width // 5 : width * 3 // 5] = 255
    return mask


@pytest.fixture(scope="session")
def inpainting_engine(tmp_path_factory):
    """family -> (checkpoint, engine) of the tiny 9-channel inpainting checkpoints, exported on first use."""
    built: dict[str, tuple[Path, Path]] = {}
    root = tmp_path_factory.mktemp("inpainting")

    def get(name: str) -> tuple[Path, Path]:
        if name not in built:
            ckpt = build_tiny(name, root / f"ckpt-{name}", seed=0, inpainting=True)
            export_engine(str(ckpt), root / f"engine-{name}", ExportOptions(BuildRanges(256, 320, 2), fp16=False))
            built[name] = ckpt, root / f"engine-{name}"
        return built[name]

    return get


def our_draws(pipe: Pipeline, scheduler: str, steps: int, strength: float, seed: int, n: int, height: int,
              width: int) -> list[np.ndarray]:
    """What an inpainting request draws from default_rng(seed), as diffusers' randn_tensor calls see them:
    the image's posterior eps (where its latents are used), the initial noise, the masked image's posterior
    eps (diffusers encodes it for both UNet kinds; a 4-channel engine does not, so zeros stand in),
    then the per-step noise."""
    latent = (4, height // 8, width // 8)
    rng = np.random.default_rng(seed)
    inpainting_unet = pipe.manifest.dims.inpainting
    draws = []
    if not (inpainting_unet and strength == 1.0):
        draws.append(rng.standard_normal((1,) + latent, dtype=np.float32))
    draws.append(rng.standard_normal((n,) + latent, dtype=np.float32))
    draws.append(rng.standard_normal((1,) + latent, dtype=np.float32) if inpainting_unet else np.zeros((1,) + latent, np.float32))
    plan = img2img_plan(scheduler, pipe.manifest.scheduler_config, steps, strength)
    if plan.uses_noise.any():
        draws += list(rng.standard_normal((plan.num_evaluations, n) + latent, dtype=np.float32))
    return draws


def diffusers_inpaint(ckpt: Path, scheduler: str, image, mask, strength, draws, monkeypatch, **kw) -> np.ndarray:
    """The checkpoint's diffusers inpaint pipeline (SD or SDXL) with sampler `scheduler`; every randn_tensor
    call takes the next of `draws`."""
    import diffusers.models.autoencoders.vae as vae
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as sd
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as sdxl
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    base = DiffusionPipeline.from_pretrained(ckpt)
    xl = hasattr(base, "text_encoder_2")
    ref = (StableDiffusionXLInpaintPipeline if xl else StableDiffusionInpaintPipeline)(**base.components)
    cls, forced = DIFFUSERS[scheduler]
    ref.scheduler = cls.from_config(dict(base.scheduler.config), **forced)
    ref.set_progress_bar_config(disable=True)
    queue = iter(draws)
    for module in (vae, sd, sdxl, ea):
        monkeypatch.setattr(module, "randn_tensor", lambda shape, *a, **k: torch.from_numpy(next(queue)).reshape(shape))
    out = ref(image=Image.fromarray(image), mask_image=Image.fromarray(mask), strength=strength, output_type="np",
              height=image.shape[0], width=image.shape[1], **kw).images
    return (out * 255).round().astype(np.uint8)


def compare(pipe: Pipeline, ckpt: Path, label: str, scheduler: str, strength: float, monkeypatch, steps: int = 6,
            guidance: float = 7.5, size: tuple[int, int] = SIZE, seed: int = 3) -> float:
    image, mask = picture(*size), box_mask(*size)
    ours = pipe.generate(PROMPT, image=image, mask=mask, strength=strength, steps=steps, scheduler=scheduler,
                         seed=seed, guidance_scale=guidance, keep_unmasked=False)  # diffusers pastes nothing back
    draws = our_draws(pipe, scheduler, steps, strength, seed, 1, *size)
    theirs = diffusers_inpaint(ckpt, scheduler, image, mask, strength, draws, monkeypatch, prompt=PROMPT,
                               num_inference_steps=steps, guidance_scale=guidance)
    score = psnr(ours.array, theirs)
    print(f"PSNR inpaint {label} {scheduler} strength {strength}: {score:.1f} dB")
    assert ours.array.shape == (1, *size, 3) and ours.parameters["strength"] == strength
    return score


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    with Pipeline.load(tiny_engine) as p:
        yield p


@pytest.mark.parametrize(("scheduler", "strength"), [
    ("ddim", 1.0), ("ddim", 0.6), ("euler_a", 1.0), ("heun", 0.75), ("unipc", 0.6),
    *[pytest.param(s, t, marks=pytest.mark.slow) for s, t in (("euler", 0.75), ("dpmpp_2m", 1.0), ("pndm", 0.75), ("lms", 1.0))],
])
def test_masked_blend_matches_diffusers(pipe, tiny_checkpoint, scheduler, strength, monkeypatch):
    """A plain 4-channel UNet: diffusers' masked blend after every step (our masked step graph)."""
    assert compare(pipe, tiny_checkpoint, "sd1 4-channel", scheduler, strength, monkeypatch) >= 40.0


@pytest.mark.slow  # its own export (a 9-channel UNet)
@pytest.mark.parametrize(("scheduler", "strength"), [("ddim", 1.0), ("euler_a", 0.75), ("dpmpp_2m", 0.6)])
def test_inpainting_unet_matches_diffusers(inpainting_engine, pipelines, scheduler, strength, monkeypatch):
    """A 9-channel inpainting UNet reads [latents, mask, masked-image latents]; no blend (as diffusers)."""
    ckpt, engine = inpainting_engine("sd1")
    pipe = pipelines(engine)
    assert pipe.manifest.dims.inpainting and pipe.manifest.dims.latent_channels == 4
    assert compare(pipe, ckpt, "sd1 9-channel", scheduler, strength, monkeypatch) >= 40.0


@pytest.mark.parametrize("kind", ["4-channel", pytest.param("9-channel", marks=pytest.mark.slow)])
def test_sdxl_inpainting_matches_diffusers(family, inpainting_engine, pipelines, kind, monkeypatch):
    ckpt, engine = family("sdxl") if kind == "4-channel" else inpainting_engine("sdxl")
    score = compare(pipelines(engine), ckpt, f"sdxl {kind}", "euler", 0.8, monkeypatch, steps=5, guidance=5.0,
                    size=(256, 256))
    assert score >= 40.0


def test_unmasked_pixels_are_the_images_own(pipe):
    """keep_unmasked (the default) pastes the image back outside the mask; without it the kept region is the
    VAE's round trip of the image (the blend keeps its latents), which the tiny random VAE changes."""
    image, mask = picture(*SIZE), box_mask(*SIZE)
    kept = pipe.generate(PROMPT, image=image, mask=mask, steps=3, seed=1).array[0]
    raw = pipe.generate(PROMPT, image=image, mask=mask, steps=3, seed=1, keep_unmasked=False).array[0]
    outside = mask == 0
    print(f"outside the mask, max level change: pasted back {np.abs(kept.astype(int) - image)[outside].max()}, "
          f"decoded {np.abs(raw.astype(int) - image)[outside].max()}")
    assert (kept[outside] == image[outside]).all() and (kept[~outside] == raw[~outside]).all()


def test_mask_rules():
    """Grayscale levels, binarised at 128; colour converted with PIL's luma; bool arrays; fitted like the image."""
    rgb = Image.fromarray(np.stack([box_mask(64, 64)] * 3, axis=-1))
    assert (mask_pixels(rgb) == box_mask(64, 64)).all()
    assert (mask_pixels(box_mask(64, 64) > 0) == box_mask(64, 64)).all()
    levels = np.array([[127, 128], [0, 255]], np.uint8)
    assert binary_mask(levels).tolist() == [[0.0, 1.0], [0.0, 1.0]]
    binary = binary_mask(box_mask(64, 64))
    assert latent_mask(binary, 8).shape == (1, 1, 8, 8) and latent_mask(binary, 8)[0, 0, 4, 4] == 1.0
    fitted = fit_image(box_mask(100, 50), 64, 128, "resize-and-fill")
    assert fitted.shape == (64, 128) and fitted.dtype == np.uint8


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(image=None), r"mask applies to an init image \(image=...\); this request has no image"),
        (dict(mask=np.zeros(SIZE, np.uint8)), "mask is all black: it marks nothing to repaint"),
        (dict(mask=np.pad(np.full((1, 1), 255, np.uint8), ((3, SIZE[0] - 4), (3, SIZE[1] - 4)))),
         "mask's white area covers no latent cell"),
        (dict(mask=box_mask(128, 128)), "mask is 128x128 but the image is 320x256; give a mask the image's size"),
        (dict(mask=Image.new("RGBA", (SIZE[1], SIZE[0]))), r"mask has an alpha channel \(mode RGBA\)"),
        (dict(mask=np.zeros((*SIZE, 3), np.float32)), "mask must be a PIL image, a file or a uint8 or bool HxW array"),
        (dict(mask="/nonexistent/mask.png"), "mask '/nonexistent/mask.png' cannot be read as an image"),
        (dict(strength=0.0), r"strength must be a number in \(0, 1\], got 0.0"),
    ],
)
def test_bad_mask_requests_fail_before_any_model_runs(pipe, kwargs, message, monkeypatch):
    for session in pipe.sessions.values():
        monkeypatch.setattr(session, "_run", lambda feeds: pytest.fail("a model ran"))
    request = {"image": picture(*SIZE), "mask": box_mask(*SIZE), "steps": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe.generate(PROMPT, **request)


def test_engines_before_inpainting_refuse_masks(tiny_engine, tmp_path):
    """An engine without the masked step graphs (exported before inpainting) says to re-export."""
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_engine, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for name in [n for n in manifest["components"] if n.endswith("_masked")]:
        del manifest["components"][name]
        (old / f"{name}.onnx").unlink()
        manifest["checksums"].pop(f"{name}.onnx", None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    with Pipeline.load(old) as p, pytest.raises(ValueError, match="has no step_masked graph .*export it again"):
        p.generate(PROMPT, image=picture(*SIZE), mask=box_mask(*SIZE), steps=2)


def test_engine_run_mask(tiny_engine, tmp_path):
    import json

    from diffusion_engine.runtime.cli import main

    Image.fromarray(picture(*SIZE)).save(tmp_path / "in.png")
    Image.fromarray(box_mask(*SIZE)).save(tmp_path / "mask.png")
    args = ["--engine", str(tiny_engine), "--prompt", PROMPT, "--image", str(tmp_path / "in.png"), "--mask",
            str(tmp_path / "mask.png"), "--steps", "3", "--seed", "1", "--out", str(tmp_path / "out.png")]
    assert main(args) == 0
    with Image.open(tmp_path / "out.png") as out:
        params = json.loads(out.text["diffusion-engine"])
    assert (params["strength"], params["inpainting"]) == (1.0, "masked blend")
    assert main(args[:2] + ["--prompt", PROMPT, "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "x.png")]) == 2
