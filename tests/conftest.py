"""Shared fixtures: the tiny checkpoint and its exported engine, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Offline by construction: nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The engine the suite exports: small ranges keep the tiny export and its checks fast.
MIN_SIZE, MAX_SIZE, MAX_BATCH = 256, 384, 2


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly where no NVIDIA GPU is visible."""
    from tests.gpu import gpu_skip_reason

    reason = gpu_skip_reason()
    if reason:
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from diffusion_engine.train.tiny import build_tiny_sd1

    return build_tiny_sd1(tmp_path_factory.mktemp("ckpt") / "tiny-sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_checkpoint):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_checkpoint, safety_checker=None)


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint, tmp_path_factory) -> Path:
    from diffusion_engine.engine.specs import BuildRanges
    from diffusion_engine.export.exporter import ExportOptions, export_engine

    out = tmp_path_factory.mktemp("engines") / "tiny"
    export_engine(str(tiny_checkpoint), out, ExportOptions(BuildRanges(MIN_SIZE, MAX_SIZE, MAX_BATCH)))
    return out
