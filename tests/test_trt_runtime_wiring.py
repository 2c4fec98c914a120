"""The TensorRT backend's wiring on the CPU: fake cudart + TensorRT contexts that run the ONNX graphs.

This checks runtime/trt.py's logic (shared buffers, the step graph writing the UNet's inputs in
place, ping-pong copies, profile choice, warm-up / capture / replay, graphs dropped when buffers
move; image requests whose encoder outputs stay on the device) against the ORT CPU backend. Real
TensorRT numerics are the GPU suite's job.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from diffusion_engine.engine.specs import IMAGE_GRAPHS, IMAGES, LATENT_MEAN, LATENT_STD, VAE_DECODER, VAE_ENCODER
from diffusion_engine.runtime.pipeline import Pipeline
from tests.fake_gpu import install_fake_gpu

PROMPT = "a red circle on a blue background"


@pytest.fixture
def fake_gpu(monkeypatch):
    """Patch cudart and tensorrt; plans are the fp32 graphs with profiles for 256x256 and 384x384."""
    return install_fake_gpu(monkeypatch)


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


def generate_image(engine, cuda, **kw):
    """trt and ort-cpu images of one image request, their max abs difference printed; the encoder's
    and the decoder's output addresses on the fake device; the fake's device->host copies of it."""
    cuda.copies.clear()
    ours, pipe = generate(engine, "trt", **kw)
    d2h = [(src, n) for kind, _, src, n in cuda.copies if kind == "D2H"]
    ref, _ = generate(engine, "ort-cpu", **kw)
    print(f"trt vs ort-cpu {pipe.manifest.family}{' 9-channel' * pipe.manifest.dims.inpainting} "
          f"{kw.get('scheduler')} strength {kw.get('strength')}: max abs difference "
          f"{np.abs(ours.astype(int) - ref.astype(int)).max()}")
    np.testing.assert_array_equal(ours, ref)
    encoder = pipe.sessions[VAE_ENCODER].addresses
    return ours, d2h, (encoder[LATENT_MEAN], encoder[LATENT_STD]), pipe.sessions[VAE_DECODER].addresses[IMAGES]


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "euler_a"])
def test_trt_img2img_equals_ort_cpu(fake_gpu, tiny_engine, scheduler):
    """The encoder runs on the device too; the image-start graph makes the loop's start there from the
    encoder's outputs, which never come back to the host: the one device->host copy is the image."""
    from tests.test_img2img import picture

    kw = dict(steps=5, seed=2, image=picture(256, 256), strength=0.6, scheduler=scheduler)
    ours, d2h, _, decoder = generate_image(tiny_engine, fake_gpu, **kw)
    assert d2h == [(decoder, ours.nbytes)]
    evaluations = 3  # int(5 x 0.6) steps of the schedule's tail
    assert (fake_gpu.captures, fake_gpu.launches) == (1, evaluations - 1)  # a 256x256 bucket: captured after step 0


@pytest.mark.parametrize(("scheduler", "strength"), [("euler_a", 0.75), ("ddim", 1.0)])
def test_trt_inpainting_equals_ort_cpu(fake_gpu, tiny_engine, scheduler, strength):
    """A 4-channel UNet: the masked step graph blends with the image latents the image-start graph left on
    the device (at strength 1 the start is pure noise, the image still kept outside the mask)."""
    from tests.test_img2img import picture
    from tests.test_inpaint import box_mask

    kw = dict(steps=4, seed=7, image=picture(256, 256), mask=box_mask(256, 256), strength=strength,
              scheduler=scheduler, batch_size=2)
    ours, d2h, _, decoder = generate_image(tiny_engine, fake_gpu, **kw)
    assert d2h == [(decoder, ours.nbytes)]
    evaluations = int(4 * strength)
    assert (fake_gpu.captures, fake_gpu.launches) == (1, evaluations - 1)


@pytest.mark.slow  # its own export (a 9-channel UNet)
@pytest.mark.parametrize(("scheduler", "strength", "guidance"), [("dpmpp_2m", 0.6, 7.5), ("euler_a", 1.0, 7.5),
                                                                 ("ddim", 0.8, 1.0)])
def test_trt_inpainting_unet_equals_ort_cpu(fake_gpu, inpainting_unet_engine, scheduler, strength, guidance):
    """A 9-channel UNet reads the masked-image latents the masked-image-start graph wrote on the device, in
    its (doubled when guided) batch; below strength 1 the loop starts from the image's start graph too."""
    from tests.test_img2img import picture
    from tests.test_inpaint import box_mask

    kw = dict(steps=5, seed=4, image=picture(256, 256), mask=box_mask(256, 256), strength=strength,
              scheduler=scheduler, guidance_scale=guidance)
    ours, d2h, _, decoder = generate_image(inpainting_unet_engine, fake_gpu, **kw)
    assert d2h == [(decoder, ours.nbytes)]
    assert (fake_gpu.captures, fake_gpu.launches) == (1, int(5 * strength) - 1)


def test_engines_before_the_image_start_graphs_take_the_host_path(fake_gpu, tiny_engine, tmp_path):
    """Without the image-start graphs (an engine exported before them) the posterior sample is host math:
    the encoder's outputs come back to the host, trt still equals ort-cpu, and both agree with the graphs'
    start to within float32 rounding."""
    from tests.test_img2img import picture
    from tests.test_inpaint import box_mask

    old = tmp_path / "old"
    shutil.copytree(tiny_engine, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for name in IMAGE_GRAPHS:
        if name in manifest["components"]:
            del manifest["components"][name]
            (old / f"{name}.onnx").unlink()
            manifest["checksums"].pop(f"{name}.onnx", None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    kw = dict(steps=4, seed=7, image=picture(256, 256), mask=box_mask(256, 256), strength=0.75, scheduler="euler_a")
    ours, d2h, encoder, decoder = generate_image(old, fake_gpu, **kw)
    assert sorted(d2h) == sorted([(a, 4 * 4 * 32 * 32) for a in encoder] + [(decoder, ours.nbytes)])
    graphs, _ = generate(tiny_engine, "ort-cpu", **kw)
    worst = np.abs(graphs.astype(int) - ours.astype(int)).max()
    print(f"image-start graphs vs the host path (ort-cpu): max abs difference {worst} levels")
    assert worst <= 1


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
