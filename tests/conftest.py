"""Shared fixtures: the tiny checkpoint and its exported engine, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Offline by construction: nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The engine the suite exports: small ranges keep the tiny export and its checks fast.
MIN_SIZE, MAX_SIZE, MAX_BATCH = 256, 384, 2
FAMILY_RANGES = (256, 320, 2)  # the other families' engines (tests/test_families.py)


# Families whose tests (each needs its own export) run in the slow suite: the turbos share sd2's and
# SDXL's architectures, LCM's distinct parts are its sampler (tests/test_samplers.py) and embedding.
SLOW_FAMILIES = ("sd-turbo", "sdxl-turbo", "lcm")


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly where no NVIDIA GPU is visible; other families' tests are marked slow."""
    from tests.gpu import gpu_skip_reason

    reason = gpu_skip_reason()
    for item in items:
        if reason and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("name") in SLOW_FAMILIES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from diffusion_engine.train.tiny import build_tiny_sd1

    return build_tiny_sd1(tmp_path_factory.mktemp("ckpt") / "tiny-sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_checkpoint):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_checkpoint, safety_checker=None)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> Path:
    """A tiny AutoencoderTiny (TAESD's architecture, toy width) for the tiny checkpoints' latents."""
    from diffusion_engine.train.tiny import build_tiny_vae

    return build_tiny_vae(tmp_path_factory.mktemp("tiny-vae") / "taesd", seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint, tiny_vae, tmp_path_factory) -> Path:
    """The tiny checkpoint's engine, with the tiny VAE as its second decoder (generate(decoder="tiny"))."""
    from diffusion_engine.engine.specs import BuildRanges
    from diffusion_engine.export.exporter import ExportOptions, export_engine

    out = tmp_path_factory.mktemp("engines") / "tiny"
    export_engine(str(tiny_checkpoint), out,
                  ExportOptions(BuildRanges(MIN_SIZE, MAX_SIZE, MAX_BATCH), tiny_vae=str(tiny_vae)))
    return out


@pytest.fixture(scope="session")
def engine_without_tiny(tiny_engine, tmp_path_factory) -> Path:
    """The tiny engine as an export without --tiny-vae writes it (no tiny_vae_decoder, its files or checksums)."""
    import json
    import shutil

    copy = tmp_path_factory.mktemp("no-tiny") / "engine"
    shutil.copytree(tiny_engine, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = manifest["components"].pop("tiny_vae_decoder")
    for name in entry["files"].values():
        (copy / name).unlink()
        manifest["checksums"].pop(name)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.fixture(scope="session")
def inpainting_unet_engine(tmp_path_factory) -> Path:
    """The tiny sd1 checkpoint with a 9-channel inpainting UNet, exported like tiny_engine (fp32 graphs only)."""
    from diffusion_engine.engine.specs import BuildRanges
    from diffusion_engine.export.exporter import ExportOptions, export_engine
    from diffusion_engine.train.tiny import build_tiny

    root = tmp_path_factory.mktemp("inpainting-unet")
    ckpt = build_tiny("sd1", root / "ckpt", seed=0, inpainting=True)
    export_engine(str(ckpt), root / "engine", ExportOptions(BuildRanges(MIN_SIZE, MAX_SIZE, MAX_BATCH), fp16=False))
    return root / "engine"


@pytest.fixture(scope="session")
def family(tmp_path_factory, tiny_checkpoint, tiny_engine):
    """family -> (checkpoint, engine dir): sd1 from conftest, the others built and exported on first use."""
    from diffusion_engine.engine.specs import BuildRanges
    from diffusion_engine.export.exporter import ExportOptions, export_engine
    from diffusion_engine.train.tiny import build_tiny

    built = {"sd1": (tiny_checkpoint, tiny_engine)}
    root = tmp_path_factory.mktemp("families")

    def get(name: str) -> tuple[Path, Path]:
        if name not in built:
            ckpt = build_tiny(name, root / f"ckpt-{name}", seed=0)
            export_engine(str(ckpt), root / f"engine-{name}", ExportOptions(BuildRanges(*FAMILY_RANGES)))
            built[name] = ckpt, root / f"engine-{name}"
        return built[name]

    return get


@pytest.fixture(scope="session")
def pipelines():
    """Open engines, one per engine dir, for the session."""
    from diffusion_engine.runtime.pipeline import Pipeline

    opened: dict = {}

    def get(engine: Path):
        if engine not in opened:
            opened[engine] = Pipeline.load(engine)
        return opened[engine]

    yield get
    for p in opened.values():
        p.close()
