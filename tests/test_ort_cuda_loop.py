"""The ort-cuda backend's loop on the CPU: OrtCudaSession's IOBinding path with the CPU provider standing in for
CUDA's. The loop's fixed inputs (noise, coefficient tables, UNet conditioning) cross to the device once per loop,
not once per step; each step feeds the previous step's device outputs back. CUDA numerics are the GPU suite's.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest

from diffusion_engine.engine.specs import NOISE
from diffusion_engine.runtime import cuda, ort_cuda
from diffusion_engine.runtime.pipeline import Pipeline

PROMPT = "a red circle on a blue background"


@pytest.fixture
def cpu_as_cuda(monkeypatch):
    """ort-cuda on the CPU provider; counts host->device copies by input name (IOBinding host binds, to_device)."""
    monkeypatch.setattr(ort_cuda, "PROVIDER", "CPUExecutionProvider")
    monkeypatch.setattr(ort_cuda, "DEVICE", "cpu")
    monkeypatch.setattr(cuda, "device_count", lambda: 1)
    copies: Counter = Counter()
    bind = ort.IOBinding.bind_cpu_input

    def bind_cpu_input(self, name, array):
        copies[name] += 1
        return bind(self, name, array)

    monkeypatch.setattr(ort.IOBinding, "bind_cpu_input", bind_cpu_input)
    return copies


def run(engine, copies, upload, monkeypatch, **kw):
    copies.clear()
    uploads = Counter()
    to_device = ort_cuda.to_device

    def counted(value, device_id=0):
        uploads[id(value)] += 1
        return to_device(value, device_id) if upload else value  # not uploading: host arrays bound per step

    monkeypatch.setattr(ort_cuda, "to_device", counted)
    with Pipeline.load(engine, backend="ort-cuda") as pipe:
        assert pipe.backend == "ort-cuda"
        image = pipe.generate(PROMPT, **kw).array
    return image, Counter(copies), uploads


def test_loop_inputs_cross_to_the_device_once_per_loop(cpu_as_cuda, tiny_engine, monkeypatch):
    steps = 4
    kw = dict(steps=steps, seed=3, height=256, width=256, scheduler="euler_a")  # euler_a: noise rows per step
    ours, copies, uploads = run(tiny_engine, cpu_as_cuda, True, monkeypatch, **kw)
    assert copies[NOISE] == 0 and uploads and set(uploads.values()) == {1}  # each fixed input once
    per_step, host, _ = run(tiny_engine, cpu_as_cuda, False, monkeypatch, **kw)
    assert host[NOISE] == steps  # what uploading per step costs: the whole noise tensor on every step
    np.testing.assert_array_equal(ours, per_step)
    # Every step-graph input other than the loop's first state and step counter is on the device after step 0.
    assert {n for n, c in copies.items() if c > 1} == set()
