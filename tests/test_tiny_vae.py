"""The tiny autoencoder as a second decoder (engine-export --tiny-vae, generate(decoder="tiny")): its graphs
against PyTorch, generation against diffusers with `vae=AutoencoderTiny`, the refusals, engine-run, TensorRT wiring."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny, StableDiffusionPipeline
from PIL import Image

from diffusion_engine.engine.manifest import read_manifest
from diffusion_engine.engine.specs import IMAGES, TINY_VAE_DECODER, VAE_DECODER, BuildRanges
from diffusion_engine.export import components, validate
from diffusion_engine.export.errors import CheckpointError
from diffusion_engine.export.exporter import ExportOptions, export_engine
from diffusion_engine.runtime.pipeline import Pipeline
from tests.test_pipeline import PROMPT, diffusers_images, latents_for, psnr

UNSEEN = {"batch": 3, "latent_height": 48, "latent_width": 40}  # never used at export time


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    with Pipeline.load(tiny_engine) as p:
        yield p


@pytest.fixture(scope="module")
def tiny_vae_pipeline(tiny_checkpoint, tiny_vae):
    """diffusers' StableDiffusionPipeline on the tiny checkpoint with `pipe.vae = AutoencoderTiny(...)`."""
    ref = StableDiffusionPipeline.from_pretrained(tiny_checkpoint, safety_checker=None)
    ref.vae = AutoencoderTiny.from_pretrained(tiny_vae)
    return ref


def test_manifest_records_the_tiny_decoder(tiny_engine, tiny_vae):
    m = read_manifest(tiny_engine)
    entry = m.components[TINY_VAE_DECODER]
    assert set(entry.files) == {"fp32", "fp16"} and entry.gpu_precision == "fp16"
    assert [t["name"] for t in entry.inputs] == ["latents"] and [t["name"] for t in entry.outputs] == ["images"]
    assert entry.inputs == m.components[VAE_DECODER].inputs and entry.outputs == m.components[VAE_DECODER].outputs
    for precision, results in entry.parity.items():
        print(f"tiny_vae_decoder {precision} parity: {[r['rel_error'] for r in results]}")
        assert len(results) == 2 and all(r["rel_error"] <= entry.tolerance[precision] for r in results)
    vae = AutoencoderTiny.from_pretrained(tiny_vae)
    assert entry.parameters == sum(p.numel() for p in vae.decoder.parameters())
    assert m.source["tiny_vae"] == str(tiny_vae) and m.source["tiny_vae_digest"].startswith("sha256:")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tiny_decoder_graph_matches_pytorch_at_unseen_shape(tiny_engine, tiny_vae, precision):
    m = read_manifest(tiny_engine)
    spec = m.specs()[TINY_VAE_DECODER]
    feeds = components.example_feeds(spec, UNSEEN, seed=7)
    session = validate.cpu_session(tiny_engine / m.components[TINY_VAE_DECODER].files[precision])
    ours = session.run(None, feeds)[0]
    ref = validate.torch_outputs(components.VaeDecoder(AutoencoderTiny.from_pretrained(tiny_vae)).eval(), spec, feeds)[IMAGES]
    assert ours.shape == ref.shape == (3, 384, 320, 3)
    worst = np.abs(ours.astype(int) - ref.astype(int)).max()
    print(f"tiny_vae_decoder {precision} at {UNSEEN}: max error {worst} levels, PSNR {psnr(ours, ref):.1f} dB")
    assert worst / 255 <= spec.tolerance.of(precision)


@pytest.mark.parametrize(("scheduler", "height", "width", "guidance"), [("ddim", 256, 320, 7.5), ("euler", 256, 256, 1.0)])
def test_generate_with_the_tiny_decoder_matches_diffusers(pipe, tiny_vae_pipeline, scheduler, height, width, guidance):
    latents = latents_for(pipe, 1, height, width)
    kw = dict(steps=4, scheduler=scheduler, latents=latents, height=height, width=width, guidance_scale=guidance)
    ours = pipe.generate(PROMPT, decoder="tiny", **kw)
    ref = diffusers_images(tiny_vae_pipeline, scheduler, latents, prompt=PROMPT, num_inference_steps=4,
                           guidance_scale=guidance, height=height, width=width)
    full = pipe.generate(PROMPT, **kw)
    score, apart = psnr(ours.array, ref), psnr(ours.array, full.array)
    print(f"PSNR tiny decoder vs diffusers (AutoencoderTiny) {scheduler} {height}x{width} guidance {guidance}: "
          f"{score:.1f} dB; vs our full decoder: {apart:.1f} dB; image std {ours.array.std():.1f} levels")
    assert score >= 40.0
    assert apart < 40.0  # the two decoders differ: the tiny one really ran
    assert ours.parameters["decoder"] == "tiny" and full.parameters["decoder"] == "full"
    assert TINY_VAE_DECODER in ours.timings and VAE_DECODER not in ours.timings


def test_batch_of_prompts_with_the_tiny_decoder_matches_diffusers(pipe, tiny_vae_pipeline):
    latents = latents_for(pipe, 2, 256, 256, seed=3)
    prompts = [PROMPT, "a green square on a white background"]
    ours = pipe.generate(prompts, decoder="tiny", steps=3, scheduler="ddim", latents=latents, height=256, width=256)
    ref = diffusers_images(tiny_vae_pipeline, "ddim", latents, prompt=prompts, num_inference_steps=3,
                           guidance_scale=7.5, height=256, width=256)
    print(f"PSNR tiny decoder vs diffusers, batch of 2 prompts: {psnr(ours.array, ref):.1f} dB")
    assert ours.array.shape == (2, 256, 256, 3) and psnr(ours.array, ref) >= 40.0


@pytest.fixture
def no_model_runs(pipe, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("a model ran")

    for session in pipe.sessions.values():
        monkeypatch.setattr(session, "_run", forbidden)


@pytest.mark.parametrize("decoder", ["big", None, "TINY", ["tiny"]])
def test_unknown_decoder_is_refused_before_any_model_runs(pipe, no_model_runs, decoder):
    with pytest.raises(ValueError, match=r"decoder must be one of 'full', 'tiny', got "):
        pipe.generate(PROMPT, decoder=decoder, height=256, width=256)


def test_engine_without_the_tiny_decoder_refuses_it(engine_without_tiny, monkeypatch):
    with Pipeline.load(engine_without_tiny) as p:
        assert TINY_VAE_DECODER not in p.sessions
        for session in p.sessions.values():
            monkeypatch.setattr(session, "_run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a model ran")))
        with pytest.raises(ValueError) as exc:
            p.generate(PROMPT, decoder="tiny", height=256, width=256)
    message = str(exc.value)
    print(message)
    assert "\n" not in message
    assert message == ("decoder 'tiny': this engine has no tiny_vae_decoder (export it with engine-export --tiny-vae "
                       "PATH); its decoders: 'full'")


def test_engine_run_tiny_vae(tiny_engine, engine_without_tiny, tmp_path, capsys):
    from diffusion_engine.runtime.cli import main

    out = tmp_path / "tiny.png"
    args = ["--prompt", PROMPT, "--steps", "2", "--scheduler", "euler", "--seed", "5", "--height", "256",
            "--width", "256", "--tiny-vae", "--out", str(out)]
    assert main(["--engine", str(tiny_engine)] + args) == 0
    params = json.loads(Image.open(out).text["diffusion-engine"])
    assert params["decoder"] == "tiny" and "tiny decoder" in capsys.readouterr().out
    with Pipeline.load(tiny_engine) as p:  # the PNG holds what generate(decoder="tiny") makes
        again = p.generate(PROMPT, steps=2, scheduler="euler", seed=5, height=256, width=256, decoder="tiny")
    np.testing.assert_array_equal(np.asarray(Image.open(out)), again.array[0])
    missing = tmp_path / "missing.png"
    assert main(["--engine", str(engine_without_tiny)] + args[:-1] + [str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "this engine has no tiny_vae_decoder" in err and not missing.exists()


def _config_only_vae(folder, **config):
    """A folder with only an AutoencoderTiny config.json: what the checks before loading read."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny", **config}))
    return folder


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"latent_channels": 16}, r"decodes 16-channel latents; the checkpoint's have 4 \(TAESD fits SD1.x/2.x, TAESDXL fits SDXL\)"),
        ({"num_decoder_blocks": [3, 3, 1]}, r"upsamples latents 4x; the checkpoint's VAE factor is 8"),
    ],
)
def test_engine_export_refuses_a_tiny_vae_that_does_not_fit(tiny_checkpoint, tmp_path, capsys, config, message):
    from diffusion_engine.export.cli import main

    vae = _config_only_vae(tmp_path / "vae", **config)
    start = time.perf_counter()
    code = main([str(tiny_checkpoint), "--out", str(tmp_path / "engine"), "--tiny-vae", str(vae)])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    print(f"{err.strip()} ({seconds:.2f} s)")
    assert code == 2 and err.count("\n") == 1 and f"--tiny-vae {vae} " in err
    assert re.search(message, err)
    assert not (tmp_path / "engine").exists()


def test_export_api_checks_the_loaded_checkpoint_before_any_export_work(tiny_checkpoint, tmp_path, monkeypatch):
    """Sources read only once loaded (single files, hub ids) are checked after loading, before any graph."""
    def forbidden(*a, **k):
        raise AssertionError("export work started")

    monkeypatch.setattr("diffusion_engine.export.exporter.export_one", forbidden)
    vae = _config_only_vae(tmp_path / "vae", latent_channels=16)
    options = ExportOptions(BuildRanges(256, 384, 2), tiny_vae=str(vae))
    with pytest.raises(CheckpointError, match="decodes 16-channel latents; the checkpoint's have 4"):
        export_engine(str(tiny_checkpoint), tmp_path / "engine", options)
    assert not (tmp_path / "engine").exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp, ckpt: tmp / "nowhere", r"no such folder; --tiny-vae needs a local diffusers AutoencoderTiny folder \(e.g. a download of madebyollin/taesd\)"),
        (lambda tmp, ckpt: ckpt / "vae", "its config.json is for 'AutoencoderKL', not AutoencoderTiny"),
        (lambda tmp, ckpt: ckpt, r"unreadable config.json \(FileNotFoundError\)"),
    ],
)
def test_engine_export_refuses_what_is_not_a_tiny_vae(tiny_checkpoint, tmp_path, capsys, make, message):
    from diffusion_engine.export.cli import main

    path = make(tmp_path, tiny_checkpoint)
    assert main([str(tiny_checkpoint), "--out", str(tmp_path / "engine"), "--tiny-vae", str(path)]) == 2
    err = capsys.readouterr().err
    print(err.strip())
    assert err.count("\n") == 1 and f"--tiny-vae {path}: " in err and re.search(message, err)
    assert not (tmp_path / "engine").exists()


def test_trt_tiny_decoder_equals_ort_cpu(monkeypatch, tiny_engine):
    """On the fake GPU the tiny decoder reads the loop's latents on the device; its image is the one copy back."""
    from tests.fake_gpu import install_fake_gpu

    cuda = install_fake_gpu(monkeypatch)
    kw = dict(steps=3, seed=4, height=256, width=256, scheduler="euler", decoder="tiny")
    cuda.copies.clear()
    with Pipeline.load(tiny_engine, backend="trt") as p:
        ours = p.generate(PROMPT, **kw).array
        address = p.sessions[TINY_VAE_DECODER].addresses[IMAGES]
    d2h = [(src, n) for kind, _, src, n in cuda.copies if kind == "D2H"]
    with Pipeline.load(tiny_engine, backend="ort-cpu") as p:
        ref = p.generate(PROMPT, **kw).array
    print(f"trt (fake) vs ort-cpu, tiny decoder: max abs difference {np.abs(ours.astype(int) - ref.astype(int)).max()}")
    np.testing.assert_array_equal(ours, ref)
    assert d2h == [(address, ours.nbytes)]
