"""The generated step graph: run by ONNX Runtime, it drives every sampler exactly as run_plan does
(with inpainting's masked blend too)."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_engine.engine.specs import STEP, BuildRanges, ModelDims, StepFeatures, step_spec
from diffusion_engine.engine.step_graph import build_step_graph, reference_step
from diffusion_engine.runtime.denoise import HostLoop, loop_inputs
from diffusion_engine.runtime.samplers import SAMPLERS, STATE_SIZE, make_plan, run_plan
from diffusion_engine.runtime.session import OrtCpuSession

DIMS = ModelDims(latent_channels=4, vae_scale_factor=8, unet_downsample=2, text_hidden_size=8, max_text_length=77)
CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
          "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}


class ToyUNet:
    """A smooth analytic stand-in for the UNet, behind the same session interface (host arrays)."""

    def run(self, feeds):
        x, t = feeds["sample"].astype(np.float64), float(feeds["timestep"][0])
        # Conditional and unconditional halves differ so guidance matters.
        text = feeds["encoder_hidden_states"].astype(np.float64).mean(axis=(1, 2))[:, None, None, None]
        return {"noise_pred": (np.tanh(0.5 * x) * np.cos(t / 300) + 0.1 * x + 0.05 * text).astype(np.float32)}


def session(tmp_path, guided: bool, masked: bool = False) -> OrtCpuSession:
    features = StepFeatures(guided=guided, masked=masked)
    spec = step_spec(DIMS, STATE_SIZE, features)
    path = tmp_path / f"{spec.name}.onnx"
    path.write_bytes(build_step_graph(spec, features).SerializeToString())
    return OrtCpuSession(path, spec, BuildRanges(256, 384, 2).axis_ranges(spec, DIMS))


@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_step_graph_loop_matches_run_plan(tmp_path, sampler, guided):
    plan = make_plan(sampler, CONFIG, 7)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 32, 34), dtype=np.float32)
    text = rng.standard_normal((4 if guided else 2, 77, 8), dtype=np.float32)
    inputs = loop_inputs(plan, latents, {"encoder_hidden_states": text}, 6.0 if guided else None, np.random.default_rng(1))
    ours, _ = HostLoop(ToyUNet(), session(tmp_path, guided)).run(inputs)

    def model(x, t):
        feeds = {"sample": np.concatenate([x, x]) if guided else x, "timestep": np.array([t]), "encoder_hidden_states": text}
        out = ToyUNet().run(feeds)["noise_pred"].astype(np.float64)
        if not guided:
            return out
        uncond, cond = np.split(out, 2)
        return uncond + 6.0 * (cond - uncond)

    ref = run_plan(plan, model, latents, noise=inputs.noise.astype(np.float64))
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, rel  # float32 graph vs float64 host reference


def test_step_graph_matches_its_definition_at_last_step(tmp_path):
    spec = step_spec(DIMS, STATE_SIZE, StepFeatures())
    rng = np.random.default_rng(2)
    feeds = {
        "noise_pred": rng.standard_normal((4, 4, 32, 32), dtype=np.float32),
        "state": rng.standard_normal((STATE_SIZE, 2, 4, 32, 32), dtype=np.float32),
        "noise": rng.standard_normal((5, 2, 4, 32, 32), dtype=np.float32),
        STEP: np.array([4], np.int32),
        "timesteps": np.arange(5, dtype=np.float32),
        "input_scales": rng.uniform(0.5, 1, 5).astype(np.float32),
        "coeffs": rng.standard_normal((5, STATE_SIZE, STATE_SIZE + 2)).astype(np.float32),
        "guidance_scale": np.array([7.5], np.float32),
    }
    out = session(tmp_path, True).run(feeds)
    ref = reference_step(feeds, StepFeatures())
    for name, value in out.items():
        np.testing.assert_allclose(value, ref[name], rtol=1e-5, atol=1e-5)
    assert out["step_out"][0] == 5 and out["timestep_out"][0] == 4.0  # the next index clamps at the end
    assert spec.name == "step"


@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "heun", "unipc"])
def test_masked_step_graph_loop_matches_run_plan(tmp_path, sampler, guided):
    """The masked blend in the graph (kept region re-noised per blend_table) equals run_plan's, mid-schedule."""
    plan = make_plan(sampler, CONFIG, 8, start=3)
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((2, 4, 32, 34), dtype=np.float32)
    image = rng.standard_normal((2, 4, 32, 34), dtype=np.float32)
    mask = (rng.random((2, 1, 32, 34)) < 0.4).astype(np.float32)
    text = rng.standard_normal((4 if guided else 2, 77, 8), dtype=np.float32)
    inputs = loop_inputs(plan, latents, {"encoder_hidden_states": text}, 5.0 if guided else None,
                         np.random.default_rng(4), image_latents=image, mask=mask)
    ours, _ = HostLoop(ToyUNet(), session(tmp_path, guided, masked=True)).run(inputs)

    def model(x, t):
        feeds = {"sample": np.concatenate([x, x]) if guided else x, "timestep": np.array([t]), "encoder_hidden_states": text}
        out = ToyUNet().run(feeds)["noise_pred"].astype(np.float64)
        uncond, cond = np.split(out, 2) if guided else (out, out)
        return uncond + 5.0 * (cond - uncond) if guided else out

    ref = run_plan(plan, model, latents, noise=inputs.noise.astype(np.float64), image=image, mask=mask)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    kept = np.abs(ours - image)[np.broadcast_to(mask, ours.shape) == 0].max()
    print(f"{sampler} guided={guided}: relative error {rel:.1e}; kept region vs image {kept:.1e}")
    assert rel < 1e-4 and kept < 1e-5  # after the last evaluation the kept region is the image itself
