"""The generated image-start graphs: run by ONNX Runtime, the loop they start (img2img, inpainting's
masked blend, pure-noise starts) follows run_plan's float64 host reference; the masked-image latents
are the posterior sample in every UNet row."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_engine.engine.specs import (
    LATENT_MEAN, LATENT_STD, MASK, MASKED_IMAGE_LATENTS, MASKED_IMAGE_START, POSTERIOR_NOISE, BuildRanges,
    ModelDims, image_graph_specs, image_start_name,
)
from diffusion_engine.engine.start_graph import build_start_graph
from diffusion_engine.runtime.denoise import HostLoop, ImageStart, loop_inputs, start_scales, with_image_start
from diffusion_engine.runtime.samplers import STATE_SIZE, img2img_plan, run_plan
from diffusion_engine.runtime.session import OrtCpuSession
from tests.test_step_graph import CONFIG, DIMS, ToyUNet
from tests.test_step_graph import session as step_session

LATENT = (4, 32, 40)


def start_session(tmp_path, name: str, dims: ModelDims = DIMS) -> OrtCpuSession:
    spec = image_graph_specs(dims, STATE_SIZE)[name]
    path = tmp_path / f"{spec.name}.onnx"
    path.write_bytes(build_start_graph(spec).SerializeToString())
    return OrtCpuSession(path, spec, BuildRanges(256, 384, 2).axis_ranges(spec, dims))


def posterior(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {LATENT_MEAN: rng.standard_normal((1,) + LATENT, dtype=np.float32),
            LATENT_STD: rng.uniform(0.01, 0.5, (1,) + LATENT).astype(np.float32),
            POSTERIOR_NOISE: rng.standard_normal((1,) + LATENT, dtype=np.float32)}


@pytest.mark.parametrize(("sampler", "strength", "masked"), [
    ("ddim", 0.6, False), ("euler_a", 0.75, False), ("dpmpp_2m", 0.5, True), ("heun", 0.75, True),
    ("euler", 1.0, True), ("unipc", 1.0, True),  # inpainting at strength 1: a pure-noise start
])
@pytest.mark.parametrize("guided", [True, False])
def test_image_start_loop_matches_run_plan(tmp_path, sampler, strength, masked, guided):
    plan = img2img_plan(sampler, CONFIG, 8, strength)
    pure = masked and strength == 1.0
    rng = np.random.default_rng(3)
    post = posterior(rng)
    latents = rng.standard_normal((2,) + LATENT, dtype=np.float32)
    mask = (rng.random((2, 1) + LATENT[1:]) < 0.5).astype(np.float32) if masked else None
    text = rng.standard_normal((4 if guided else 2, 77, 8), dtype=np.float32)
    guidance = 6.0 if guided else None
    out = start_session(tmp_path, image_start_name(guided)).run(
        {**post, "initial_noise": latents, "start": start_scales(plan, pure)})
    start = ImageStart(out["image_latents"], out["state"], out["sample"])
    inputs = loop_inputs(plan, latents, {"encoder_hidden_states": text}, guidance, np.random.default_rng(1),
                         pure_noise_start=pure)
    inputs = with_image_start(inputs, start, plan, latents, mask)
    ours, _ = HostLoop(ToyUNet(), step_session(tmp_path, guided, masked)).run(inputs)

    def model(x, t):
        feeds = {"sample": np.concatenate([x, x]) if guided else x, "timestep": np.array([t]), "encoder_hidden_states": text}
        pred = ToyUNet().run(feeds)["noise_pred"].astype(np.float64)
        if not guided:
            return pred
        uncond, cond = np.split(pred, 2)
        return uncond + 6.0 * (cond - uncond)

    image = post[LATENT_MEAN].astype(np.float64) + post[LATENT_STD].astype(np.float64) * post[POSTERIOR_NOISE]
    ref = run_plan(plan, model, latents, noise=inputs.noise.astype(np.float64), image=np.repeat(image, 2, axis=0),
                   mask=mask, pure_noise_start=pure)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"image start {sampler} strength {strength} masked {masked} guided {guided}: relative error {rel:.2e}")
    assert rel < 1e-4, rel  # float32 graphs vs float64 host reference


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_masked_image_start_is_the_posterior_sample_in_every_unet_row(tmp_path, rows):
    dims = ModelDims(latent_channels=4, vae_scale_factor=8, unet_downsample=2, text_hidden_size=8,
                     max_text_length=77, inpainting=True)
    post = posterior(np.random.default_rng(rows))
    mask = np.ones((rows, 1) + LATENT[1:], np.float32)
    ours = start_session(tmp_path, MASKED_IMAGE_START, dims).run({**post, MASK: mask})[MASKED_IMAGE_LATENTS]
    sample = post[LATENT_MEAN].astype(np.float64) + post[LATENT_STD].astype(np.float64) * post[POSTERIOR_NOISE]
    assert ours.shape == (rows,) + LATENT
    np.testing.assert_allclose(ours, np.repeat(sample, rows, axis=0), rtol=1e-6, atol=1e-6)


def test_an_inpainting_unet_has_a_masked_image_start_and_a_plain_one_not():
    plain = image_graph_specs(DIMS, STATE_SIZE)
    inpainting = image_graph_specs(ModelDims(4, 8, 2, 8, 77, inpainting=True), STATE_SIZE)
    assert MASKED_IMAGE_START not in plain and MASKED_IMAGE_START in inpainting
    assert set(inpainting) - set(plain) == {MASKED_IMAGE_START}
