"""The TensorRT backend's wiring on the CPU: fake cudart + TensorRT contexts that run the ONNX graphs.

This checks runtime/trt.py's logic (shared buffers, the step graph writing the UNet's inputs in
place, ping-pong copies, profile choice, warm-up / capture / replay, graphs dropped when buffers
move) against the ORT CPU backend. Real TensorRT numerics are the GPU suite's job.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest

from diffusion_engine.engine import plans
from diffusion_engine.engine.manifest import read_manifest
from diffusion_engine.runtime import cuda as runtime_cuda
from diffusion_engine.runtime import trt_loader
from diffusion_engine.runtime.pipeline import Pipeline
from diffusion_engine.runtime.session import OrtCpuSession
from tests.fake_gpu import FakeCuda, FakeEngine, fake_tensorrt

PROMPT = "a red circle on a blue background"


@pytest.fixture
def fake_gpu(monkeypatch, tiny_engine):
    """Patch cudart and tensorrt; plans are the fp32 graphs with profiles for 256x256 and 384x384."""
    cuda = FakeCuda()
    manifest = read_manifest(tiny_engine)
    config = plans.BuildConfig(
        buckets=plans.size_buckets(manifest.build, manifest.dims.size_multiple, sizes=((256, 256), (384, 384))),
        max_batch=manifest.build.max_batch,
    )

    def load_plan(engine_dir, manifest, name, tc):
        entry = manifest.components[name]
        profiles = plans.derive_profiles(name, entry, manifest.dims, manifest.build, config)
        session = OrtCpuSession(engine_dir / entry.files["fp32"], entry.spec(name), entry.ranges())._session
        plan = {"file": f"{name}.plan", "profiles": [p.as_dict() for p in profiles]}
        return SimpleNamespace(runtime=None, engine=FakeEngine(cuda, session, entry.spec(name), manifest.dims.vae_scale_factor), plan=plan)

    monkeypatch.setattr(runtime_cuda, "cudart", lambda: cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    monkeypatch.setattr(trt_loader, "find_toolchain", lambda: None)
    monkeypatch.setattr(trt_loader, "load_plan", load_plan)
    return cuda


def generate(engine, backend, cuda_graphs=True, **kw):
    with Pipeline.load(engine, backend=backend, cuda_graphs=cuda_graphs) as pipe:
        return pipe.generate(PROMPT, **kw).array, pipe


@pytest.mark.parametrize("size", [(256, 256), (384, 384), (256, 320)])
def test_trt_loop_equals_ort_cpu(fake_gpu, tiny_engine, size):
    kw = dict(steps=4, seed=2, height=size[0], width=size[1], scheduler="dpmpp_2m", batch_size=2)
    ours, _ = generate(tiny_engine, "trt", **kw)
    ref, _ = generate(tiny_engine, "ort-cpu", **kw)
    np.testing.assert_array_equal(ours, ref)
    bucket = size != (256, 320)
    assert fake_gpu.captures == (1 if bucket else 0)  # graphs for buckets only; eager outside
    assert fake_gpu.launches == (kw["steps"] - 1 if bucket else 0)  # step 0 is the eager warm-up


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "euler_a"])
def test_trt_img2img_equals_ort_cpu(fake_gpu, tiny_engine, scheduler):
    """The encoder runs on the device too; the loop starts from the noised image latents."""
    from tests.test_img2img import picture

    kw = dict(steps=5, seed=2, image=picture(256, 256), strength=0.6, scheduler=scheduler)
    ours, pipe = generate(tiny_engine, "trt", **kw)
    ref, _ = generate(tiny_engine, "ort-cpu", **kw)
    np.testing.assert_array_equal(ours, ref)
    evaluations = 3  # int(5 x 0.6) steps of the schedule's tail
    assert (fake_gpu.captures, fake_gpu.launches) == (1, evaluations - 1)  # a 256x256 bucket: captured after step 0


def test_graphs_replay_across_images_and_drop_when_buffers_move(fake_gpu, tiny_engine):
    kw = dict(steps=3, seed=1, height=256, width=256, scheduler="euler_a")
    with Pipeline.load(tiny_engine, backend="trt") as pipe:
        a = pipe.generate(PROMPT, **kw).array
        b = pipe.generate(PROMPT, **kw).array  # same bucket: replays the captured step only
        assert (fake_gpu.captures, fake_gpu.launches) == (1, 2 + 3)
        c = pipe.generate(PROMPT, **{**kw, "steps": 9}).array  # longer tables: buffers grow, recapture
        assert fake_gpu.captures == 2 and len(pipe.components.loop("step").graphs) == 1
    np.testing.assert_array_equal(a, b)
    ref, _ = generate(tiny_engine, "ort-cpu", **{**kw, "steps": 9})
    np.testing.assert_array_equal(c, ref)


def test_no_cuda_graph_runs_eagerly(fake_gpu, tiny_engine):
    kw = dict(steps=3, seed=4, height=256, width=256, guidance_scale=1.0)
    ours, _ = generate(tiny_engine, "trt", cuda_graphs=False, **kw)
    ref, _ = generate(tiny_engine, "ort-cpu", **kw)
    np.testing.assert_array_equal(ours, ref)
    assert fake_gpu.captures == 0
