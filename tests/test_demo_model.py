"""The built-in demo model: its images show what the prompt asks (fp32 and fp16 graphs), it matches
diffusers, and `engine-run` without `--engine` exports it once into the cache and then reuses it."""

from __future__ import annotations

import contextlib
import logging
import shutil
import importlib.util
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion_engine.engine.manifest import MANIFEST, read_manifest
from diffusion_engine.runtime import demo
from diffusion_engine.runtime.cli import main as engine_run
from diffusion_engine.runtime.pipeline import Pipeline
from tests.quality import (
    MIN_SHAPE_IOU,
    analyse,
    engine_agreement,
    engine_shape_iou,
    evaluation_pairs,
    shape_iou_pairs,
    summary,
    use_fp16_graphs,
)

PROMPT = "a red circle on a blue background"
PAIRS = evaluation_pairs(30)  # every colour as shape and as background, every shape
MIN_AGREEMENT = 0.8


@dataclass
class Run:
    code: int
    out: str
    err: str


@contextlib.contextmanager
def cache_at(path: Path):
    old = os.environ.get(demo.CACHE_ENV)
    os.environ[demo.CACHE_ENV] = str(path)
    try:
        yield
    finally:
        if old is None:
            del os.environ[demo.CACHE_ENV]
        else:
            os.environ[demo.CACHE_ENV] = old


def run_cli(args: list[str]) -> Run:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = engine_run(args)
    return Run(code, out.getvalue(), err.getvalue())


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="session")
def first_run(tmp_path_factory) -> tuple[Run, Path, Path, list[str]]:
    """engine-run without --engine on an empty cache: the session's one export of the demo model
    (with the demo module's debug log, which holds the export subprocess's output)."""
    cache = tmp_path_factory.mktemp("demo-cache")
    image = cache.parent / "first.png"
    log, records = logging.getLogger(demo.__name__), Records()
    log.addHandler(records)
    try:
        with cache_at(cache):
            run = run_cli(["--prompt", PROMPT, "--seed", "0", "--out", str(image), "-v"])
    finally:
        log.removeHandler(records)
    return run, cache, image, records.messages


@pytest.fixture(scope="session")
def demo_engine(first_run) -> Path:
    run, cache, _, _ = first_run
    assert run.code == 0, run.err
    engines = list(cache.glob("demo-*"))
    assert len(engines) == 1 and (engines[0] / MANIFEST).is_file(), engines
    return engines[0]


def test_first_run_exports_into_the_cache_and_generates(first_run, demo_engine):
    run, cache, image, _ = first_run
    assert "exporting the built-in demo model once into" in run.err
    assert "using the built-in demo model" in run.out
    assert demo_engine.parent == cache and demo_engine.name == demo.engine_dir_for(demo.checkpoint_dir()).name
    assert read_manifest(demo_engine).defaults["guidance_scale"] == demo.GUIDANCE  # the demo's, not sd1's 7.5
    assert Image.open(image).size == (64, 64)  # the trained resolution is the default


def test_second_run_reuses_the_export(first_run, demo_engine, tmp_path, monkeypatch):
    _, cache, _, _ = first_run
    manifest_time = (demo_engine / MANIFEST).stat().st_mtime_ns

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(demo, "_export", no_export)
    with cache_at(cache):
        run = run_cli(["--prompt", "a green square on a black background", "--seed", "1", "--out", str(tmp_path / "b.png")])
    assert run.code == 0, run.err
    assert "exporting" not in run.err and "using the built-in demo model" in run.out
    assert (demo_engine / MANIFEST).stat().st_mtime_ns == manifest_time
    assert analyse(np.asarray(Image.open(tmp_path / "b.png"))).background == "black"


def test_missing_export_extra_is_a_clear_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with cache_at(tmp_path / "empty-cache"):
        run = run_cli(["--prompt", PROMPT, "--out", str(tmp_path / "x.png")])
    assert run.code == 2
    assert "pip install 'diffusion-engine[export]'" in run.err and "--engine" in run.err
    assert not (tmp_path / "x.png").exists()


def test_help_says_where_the_cache_is_and_how_to_clear_it(capsys):
    with pytest.raises(SystemExit):
        engine_run(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert demo.CACHE_ENV in text and "~/.cache/diffusion-engine" in text and "delete" in text


@pytest.fixture(scope="module")
def pipe(demo_engine):
    with Pipeline.load(demo_engine, backend="ort-cpu") as p:
        yield p


def test_images_show_what_the_prompt_asks_fp32(pipe):
    rate, misses, _ = engine_agreement(pipe, PAIRS)
    print(f"demo model, fp32 graphs: {rate:.1%} of {len(PAIRS)} images agree with their prompt")
    assert rate >= MIN_AGREEMENT, misses


@pytest.mark.parametrize("shape", ["circle", "square"])
def test_circles_are_round_and_squares_square(pipe, shape):
    """The shapes are drawn cleanly: mean IoU with the ideal shape of their bounding box (train/README.md)."""
    ious = engine_shape_iou(pipe, shape_iou_pairs(shape))
    print(f"demo model, {shape} IoU with its ideal shape over {len(ious)} pairs: {summary(ious)}")
    assert np.mean(ious) >= MIN_SHAPE_IOU, ious


def test_images_show_what_the_prompt_asks_fp16_graphs(demo_engine):
    with Pipeline.load(demo_engine, backend="ort-cpu") as fp16:
        use_fp16_graphs(fp16)
        rate, misses, _ = engine_agreement(fp16, PAIRS)
    print(f"demo model, fp16 graphs: {rate:.1%} of {len(PAIRS)} images agree with their prompt")
    assert rate >= MIN_AGREEMENT, misses


def test_matches_diffusers(pipe):
    from diffusers import StableDiffusionPipeline

    from tests.test_pipeline import diffusers_images, psnr

    ref = StableDiffusionPipeline.from_pretrained(demo.checkpoint_dir(), safety_checker=None)
    prompts = [p for p, _ in PAIRS[:4]]
    latents = np.random.default_rng(0).standard_normal((4, 4, 16, 16), dtype=np.float32)
    ours = pipe.generate(prompts, steps=20, guidance_scale=7.5, latents=latents, scheduler="ddim")
    theirs = diffusers_images(ref, "ddim", latents, prompt=prompts, num_inference_steps=20, guidance_scale=7.5,
                              height=64, width=64)
    assert ours.array.shape == theirs.shape == (4, 64, 64, 3)
    score = psnr(ours.array, theirs)
    print(f"PSNR demo model vs diffusers (ddim, 20 steps, guidance 7.5): {score:.1f} dB")
    assert score >= 40.0


def test_the_export_shows_no_library_warnings(first_run):
    """torch / transformers / onnx warnings a user cannot act on are filtered from engine-export's output."""
    _, _, _, messages = first_run
    output = next(m for m in messages if m.startswith("export output:"))
    print(output[-600:])
    assert "wrote " in output and "Warning" not in output and "warn" not in output.lower()


def test_a_damaged_cache_is_exported_again(demo_engine, tmp_path, monkeypatch):
    """A flipped byte (same size) in the cached engine is found by its checksums; the engine is exported again."""
    cache = tmp_path / "cache"
    cached = cache / demo_engine.name
    shutil.copytree(demo_engine, cached)
    unet = bytearray((cached / "unet.fp32.onnx").read_bytes())
    unet[-64] ^= 0xFF
    (cached / "unet.fp32.onnx").write_bytes(bytes(unet))
    exports = []

    def export(checkpoint, out):  # stands in for the subprocess first_run already ran for real
        exports.append(out)
        shutil.rmtree(out)
        shutil.copytree(demo_engine, out)

    monkeypatch.setattr(demo, "_export", export)
    said = []
    with cache_at(cache):
        model = demo.ensure_engine(say=said.append)
        again = demo.ensure_engine(say=said.append)
    print(said)
    assert exports == [cached] and model.exported and not again.exported
    assert "again, as the cached one is damaged" in said[0] and len(said) == 1
    assert (cached / "unet.fp32.onnx").read_bytes() == (demo_engine / "unet.fp32.onnx").read_bytes()
    (cached / MANIFEST).write_text("{not json")
    with cache_at(cache), pytest.raises(demo.DemoError, match=f"{cached} is damaged .*; delete that folder"):
        demo.ensure_engine()


def test_a_cache_exported_before_fused_cpu_attention_is_exported_again(demo_engine, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cached = cache / demo_engine.name
    shutil.copytree(demo_engine, cached)
    d = json.loads((cached / MANIFEST).read_text())
    for c in d["components"].values():  # what an older export wrote: no CPU graphs, no score records
        c.pop("score_buffers", None)
        c["files"].pop("cpu", None)
    (cached / MANIFEST).write_text(json.dumps(d))
    exports = []
    monkeypatch.setattr(demo, "_export", lambda checkpoint, out: exports.append(out) or shutil.rmtree(out)
                        or shutil.copytree(demo_engine, out))
    said = []
    with cache_at(cache):
        assert demo.ensure_engine(say=said.append).exported
    assert exports == [cached] and "again, as the cached one was exported before fused CPU attention" in said[0]
    assert "cpu" in read_manifest(cached).components["unet"].files


def test_img2img_changes_the_colour_and_keeps_the_shape(pipe):
    """A generated red circle on blue, redrawn at strength 0.7 as a yellow circle, over 12 seeds."""
    source = pipe.generate(PROMPT, steps=30, seed=1).array[0]
    reading = analyse(source)
    assert (reading.background, reading.color, reading.shape) == ("blue", "red", "circle"), reading
    readings = [analyse(pipe.generate("a yellow circle on a blue background", image=source, strength=0.7, steps=30,
                                      seed=seed).array[0]) for seed in range(12)]
    rate = np.mean([(r.background, r.color, r.shape) == ("blue", "yellow", "circle") for r in readings])
    print(f"demo img2img red -> yellow circle at strength 0.7: {rate:.0%} of 12 seeds",
          [(r.background, r.color, r.shape) for r in readings])
    assert rate >= 0.8


def test_inpainting_changes_the_shape_inside_the_mask_and_keeps_the_border(pipe):
    """A generated red circle, masked over its bounding box (+2 px) and repainted as a red square, over 6 seeds:
    the shape inside the mask follows the new prompt; outside it the pixels are the input's (pasted back)."""
    from scipy import ndimage

    from tests.quality import palette_labels

    source = pipe.generate(PROMPT, steps=30, seed=1).array[0]
    labels = palette_labels(source)
    ys, xs = np.nonzero(labels != np.bincount(labels.ravel()).argmax())
    mask = np.zeros(source.shape[:2], np.uint8)
    mask[max(ys.min() - 2, 0):ys.max() + 3, max(xs.min() - 2, 0):xs.max() + 3] = 255
    outside = ndimage.distance_transform_cdt(mask == 0, metric="chessboard") >= 1
    readings, border = [], []
    for seed in range(6):
        for keep in (True, False):
            out = pipe.generate("a red square on a blue background", image=source, mask=mask, steps=30, seed=seed,
                                keep_unmasked=keep).array[0]
            change = np.abs(out.astype(int) - source).max(-1)
            border.append(int(change[outside].max()))
            if keep:
                readings.append(analyse(out))
    rate = np.mean([(r.background, r.color, r.shape) == ("blue", "red", "square") for r in readings])
    print(f"demo inpainting circle -> square: {rate:.0%} of 6 seeds; max level change outside the mask, pasted back / "
          f"decoded: {border[0::2]} / {border[1::2]}")
    assert rate >= 0.8 and max(border[0::2]) <= 3
