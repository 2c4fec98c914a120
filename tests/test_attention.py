"""CPU attention: the export's attention-fused graphs (MultiHeadAttention), their parity with PyTorch,
the score-buffer records and the request check built on them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from diffusion_engine.engine.manifest import read_manifest
from diffusion_engine.engine.onnx_shapes import resolved_shapes
from diffusion_engine.export import attention, components, validate
from diffusion_engine.export.components import export_dims
from diffusion_engine.runtime import memory
from diffusion_engine.runtime.pipeline import Pipeline
from tests.test_export import reference, run_graph

FUSED = ("unet", "vae_decoder", "vae_encoder")


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


@pytest.mark.parametrize("name", FUSED)
def test_cpu_graph_fuses_every_attention(tiny_engine, name):
    entry = read_manifest(tiny_engine).components[name]
    plain, fused = _ops(tiny_engine / entry.files["fp32"]), _ops(tiny_engine / entry.files["cpu"])
    print(f"{name}: {plain.count('Softmax')} softmax in the fp32 graph -> {fused.count('MultiHeadAttention')} "
          f"MultiHeadAttention, {len(plain)} -> {len(fused)} nodes")
    assert plain.count("Softmax") > 0 and fused.count("MultiHeadAttention") == plain.count("Softmax")
    assert "Softmax" not in fused and len(fused) < len(plain)
    assert entry.score_buffers == {"cpu": []} and entry.cpu_file() == entry.files["cpu"]
    assert len(entry.parity["cpu"]) == 2 and all(r["rel_error"] <= entry.tolerance["fp32"] for r in entry.parity["cpu"])


def test_text_encoder_causal_attention_is_left_alone(tiny_engine):
    """CLIP's masked (causal) attention is not the pattern: no CPU graph, its small scores recorded."""
    entry = read_manifest(tiny_engine).components["text_encoder"]
    assert "cpu" not in entry.files and entry.cpu_file() == entry.files["fp32"]
    (records,) = entry.score_buffers.values()
    assert records and all(r["power"] == 0 and r["axes"] == [] for r in records)


# Two sizes beyond the export's own parity shapes: the built range's largest, and 512x512 (4096
# tokens at the first level; the graphs are dynamic beyond the range the sessions enforce).
SIZES = [{"batch": 2, "sequence": 77, "latent_height": 48, "latent_width": 40, "height": 384, "width": 320},
         {"batch": 1, "sequence": 77, "latent_height": 64, "latent_width": 64, "height": 512, "width": 512}]


@pytest.mark.parametrize("dims", [SIZES[0], pytest.param(SIZES[1], marks=pytest.mark.slow)], ids=["384x320-batch2", "512x512"])
@pytest.mark.parametrize("name", FUSED)
def test_fused_attention_matches_pytorch(tiny_engine, tiny_pipeline, name, dims):
    m = read_manifest(tiny_engine)
    spec = m.specs()[name]
    feeds = components.example_feeds(spec, {**dims, "vocab_size": 600}, seed=11)
    ours = run_graph(tiny_engine / m.components[name].files["cpu"], feeds)
    ref = reference(tiny_pipeline, name, feeds)
    for t in spec.outputs:
        max_abs, rel = validate.measure(ours[t.name], ref[t.name])
        print(f"{name} {t.name} at {dims['height']}x{dims['width']} batch {dims['batch']}: "
              f"max abs {max_abs:.3g}, relative {rel:.3g} (tolerance {spec.tolerance.fp32:.3g})")
        assert rel <= spec.tolerance.fp32


def test_score_buffer_law_predicts_the_inferred_shapes(tiny_engine):
    """The records (two inferred sizes, a power law in the image area) give the shapes at a third size."""
    m = read_manifest(tiny_engine)
    entry = m.components["unet"]
    model = onnx.load(str(tiny_engine / entry.files["fp32"]), load_external_data=False)
    records = attention.score_buffers(model, entry.spec("unet"), entry.ranges(), export_dims(entry.ranges(), batch=1))
    assert sorted({r["power"] for r in records}) == [1, 2]  # cross-attention to text, self-attention
    third = {"batch": 1, "sequence": 77, "latent_height": 40, "latent_width": 48}
    shapes = resolved_shapes(attention._weightless(model), third, keep=("MatMul", "Softmax"))
    actual = [int(np.prod(shapes[n.output[0]])) for n in model.graph.node if n.op_type == "Softmax"]
    predicted = [r["elements"] * (40 * 48 / r["at_area"]) ** r["power"] for r in records]
    print(f"largest score tensor at 320x384: {max(actual):,} elements, predicted {max(predicted):,.0f}")
    assert predicted == pytest.approx(actual, rel=1e-12)


@pytest.fixture
def unfused_engine(tiny_engine, tmp_path):
    """The tiny engine as an export without CPU graphs would be: ort-cpu runs the plain fp32 UNet."""
    out = tmp_path / "unfused"
    shutil.copytree(tiny_engine, out)
    path = out / "manifest.json"
    d = json.loads(path.read_text())
    unet = d["components"]["unet"]
    del unet["files"]["cpu"]
    model = onnx.load(str(out / unet["files"]["fp32"]), load_external_data=False)
    entry = read_manifest(tiny_engine).components["unet"]
    unet["score_buffers"] = {"fp32": attention.score_buffers(model, entry.spec("unet"), entry.ranges(),
                                                               export_dims(entry.ranges(), batch=1))}
    path.write_text(json.dumps(d))
    return out


def test_request_whose_scores_do_not_fit_is_refused_naming_the_estimate(unfused_engine, monkeypatch):
    with Pipeline.load(unfused_engine, backend="ort-cpu") as pipe:
        assert pipe.sessions["unet"] is not None
        need = memory.score_bytes(pipe.manifest.components["unet"],
                                  {"latent_height": 48, "latent_width": 48}, rows=2)
        # 384x384, guided: 2 rows x 8 heads x 2304^2 fp32 scores, and their softmax.
        assert need == 2 * 8 * 2304**2 * 4 * 2
        monkeypatch.setattr(memory, "available_bytes", lambda: need // 2)
        calls, encode = [], pipe.sessions["text_encoder"].run
        monkeypatch.setattr(pipe.sessions["text_encoder"], "run", lambda feeds: calls.append(feeds) or encode(feeds))
        with pytest.raises(ValueError) as err:
            pipe.generate("a red circle", height=384, width=384, steps=1, seed=0)
        message = str(err.value)
        print(message)
        assert "\n" not in message and f"{need / 1e9:.2f} GB" in message and "unet.fp32.onnx" in message
        assert "384x384 with 2 unet rows" in message and "export the engine again" in message and not calls
        monkeypatch.setattr(memory, "available_bytes", lambda: need)  # just enough: it runs
        assert pipe.generate("a red circle", height=384, width=384, steps=1, seed=0).array.shape[-3:] == (384, 384, 3)


def test_fused_engine_needs_no_score_memory(tiny_engine, monkeypatch):
    with Pipeline.load(tiny_engine, backend="ort-cpu") as pipe:
        sizes = {"latent_height": 48, "latent_width": 48, "height": 384, "width": 384}
        for name in FUSED:
            assert memory.score_bytes(pipe.manifest.components[name], sizes, rows=2) == 0
        monkeypatch.setattr(memory, "available_bytes", lambda: 10**6)  # only the text encoder's 77 x 77 scores fit
        pipe.prepare(pipe_request("a red circle", 384))


def pipe_request(prompt: str, size: int):
    from diffusion_engine.runtime.request import GenerationRequest

    return GenerationRequest(prompt=prompt, height=size, width=size, steps=1, seed=0)


def test_available_bytes_reads_meminfo_and_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    assert memory.available_bytes(str(meminfo), str(cgroup)) == 20000000 * 1024
    (cgroup / "memory.max").write_text("8000000000\n")
    (cgroup / "memory.current").write_text("1000000000\n")
    assert memory.available_bytes(str(meminfo), str(cgroup)) == 7000000000
    (cgroup / "memory.max").write_text("max\n")
    assert memory.available_bytes(str(meminfo), str(cgroup)) == 20000000 * 1024
    assert memory.available_bytes(str(tmp_path / "none"), str(tmp_path / "none")) is None
