"""GPU suite for the runtime: TensorRT and ORT-CUDA end to end vs ORT-CPU, CUDA graphs vs eager.

Marked `gpu`: skipped cleanly without an NVIDIA GPU (tests/conftest.py); run with `make test-gpu`.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from diffusion_engine.runtime.pipeline import Pipeline
from tests.test_pipeline import psnr

pytestmark = pytest.mark.gpu
PROMPT = "a red circle on a blue background"
BUCKETS = "256x256,384x384"  # engine-build's --sizes: each is a profile's opt point
OUTSIDE = (256, 320)  # inside the built range, not a bucket: runs eagerly


@pytest.fixture(scope="module")
def built_engine(tiny_engine, tmp_path_factory):
    pytest.importorskip("tensorrt")
    from diffusion_engine.engine.cli import build_main

    engine = tmp_path_factory.mktemp("gpu") / "tiny"
    shutil.copytree(tiny_engine, engine)
    assert build_main([str(engine), "--sizes", BUCKETS, "--max-batch", "2"]) == 0
    return engine


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
