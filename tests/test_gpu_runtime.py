"""GPU suite for the runtime: TensorRT and ORT-CUDA end to end vs ORT-CPU (text-to-image, img2img, both
inpainting kinds), CUDA graphs vs eager.

Marked `gpu`: skipped cleanly without an NVIDIA GPU (tests/conftest.py); run with `make test-gpu`.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from diffusion_engine.runtime.pipeline import Pipeline
from tests.test_img2img import picture
from tests.test_inpaint import box_mask
from tests.test_pipeline import psnr

pytestmark = pytest.mark.gpu
PROMPT = "a red circle on a blue background"
BUCKETS = "256x256,384x384"  # engine-build's --sizes: each is a profile's opt point
OUTSIDE = (256, 320)  # inside the built range, not a bucket: runs eagerly


def build(source, tmp_path_factory):
    """A copy of an exported engine with TensorRT plans for every component (engine-build)."""
    pytest.importorskip("tensorrt")
    from diffusion_engine.engine.cli import build_main

    engine = tmp_path_factory.mktemp("gpu") / source.name
    shutil.copytree(source, engine)
    assert build_main([str(engine), "--sizes", BUCKETS, "--max-batch", "2"]) == 0
    return engine


@pytest.fixture(scope="module")
def built_engine(tiny_engine, tmp_path_factory):
    return build(tiny_engine, tmp_path_factory)


@pytest.fixture(scope="module")
def built_inpainting_unet(inpainting_unet_engine, tmp_path_factory):
    return build(inpainting_unet_engine, tmp_path_factory)


def reference(engine, **kw) -> np.ndarray:
    with Pipeline.load(engine, backend="ort-cpu") as pipe:
        return pipe.generate(PROMPT, **kw).array


@pytest.mark.parametrize("size", [(256, 256), (384, 384), OUTSIDE])
def test_trt_end_to_end_matches_ort_cpu(built_engine, size):
    kw = dict(steps=8, seed=3, height=size[0], width=size[1], scheduler="dpmpp_2m")
    with Pipeline.load(built_engine, backend="trt") as pipe:
        ours = pipe.generate(PROMPT, **kw).array
    assert psnr(ours, reference(built_engine, **kw)) >= 30.0


@pytest.mark.parametrize("size", [(256, 256), (384, 384), OUTSIDE])
def test_cuda_graph_replay_equals_eager(built_engine, size):
    kw = dict(steps=6, seed=5, height=size[0], width=size[1], scheduler="euler_a", batch_size=2)
    with Pipeline.load(built_engine, backend="trt", cuda_graphs=True) as pipe:
        first = pipe.generate(PROMPT, **kw).array  # eager warm-up, capture, replays
        again = pipe.generate(PROMPT, **kw).array  # replays only (for buckets)
        loops = list(pipe.components.loop("step").graphs) if size != OUTSIDE else []
    with Pipeline.load(built_engine, backend="trt", cuda_graphs=False) as pipe:
        eager = pipe.generate(PROMPT, **kw).array
    assert np.abs(first.astype(int) - eager.astype(int)).max() <= 1
    np.testing.assert_array_equal(first, again)
    assert (len(loops) == 1) == (size != OUTSIDE)  # a graph for buckets only


IMAGE_CASES = [("img2img", "dpmpp_2m", 0.6), ("inpaint", "euler_a", 0.75), ("inpaint", "ddim", 1.0)]


def image_request(kind: str, scheduler: str, strength: float, size=(256, 256)) -> dict:
    kw = dict(steps=6, seed=3, image=picture(*size), strength=strength, scheduler=scheduler, batch_size=2)
    return {**kw, "mask": box_mask(*size)} if kind == "inpaint" else kw


def trt_matches_ort_cpu(engine, kw) -> float:
    """PSNR of the TensorRT image against ORT-CPU's, printed; the encoder's outputs stay on the device."""
    with Pipeline.load(engine, backend="trt") as pipe:
        assert {"image_start", "image_start_unguided"} <= set(pipe.sessions)  # the device path, not host math
        ours = pipe.generate(PROMPT, **kw).array
    score = psnr(ours, reference(engine, **kw))
    print(f"PSNR trt vs ort-cpu {'inpaint' if 'mask' in kw else 'img2img'} {kw['scheduler']} "
          f"strength {kw['strength']}: {score:.1f} dB")
    return score


@pytest.mark.parametrize(("kind", "scheduler", "strength"), IMAGE_CASES)
def test_trt_image_requests_match_ort_cpu(built_engine, kind, scheduler, strength):
    """img2img and 4-channel inpainting: the image-start graph's plan makes the start on the device."""
    assert trt_matches_ort_cpu(built_engine, image_request(kind, scheduler, strength)) >= 30.0


@pytest.mark.slow  # its own export (a 9-channel UNet) and plans
@pytest.mark.parametrize(("scheduler", "strength"), [("euler_a", 0.75), ("ddim", 1.0)])
def test_trt_inpainting_unet_matches_ort_cpu(built_inpainting_unet, scheduler, strength):
    """A 9-channel UNet: its masked-image latents come from the masked-image-start graph's plan."""
    assert trt_matches_ort_cpu(built_inpainting_unet, image_request("inpaint", scheduler, strength)) >= 30.0


def test_auto_picks_trt_when_plans_fit(built_engine, tiny_engine):
    with Pipeline.load(built_engine) as pipe:
        assert pipe.backend == "trt"
    with Pipeline.load(tiny_engine) as pipe:  # no plans: not TensorRT
        assert pipe.backend in ("ort-cuda", "ort-cpu")


def test_ort_cuda_end_to_end_matches_ort_cpu(tiny_engine):
    from diffusion_engine.runtime import ort_cuda

    if not ort_cuda.available():
        pytest.skip("onnxruntime-gpu is not installed")
    kw = dict(steps=8, seed=3, height=256, width=320)
    with Pipeline.load(tiny_engine, backend="ort-cuda") as pipe:
        ours = pipe.generate(PROMPT, **kw).array
    assert psnr(ours, reference(tiny_engine, **kw)) >= 30.0
