"""Export of the tiny checkpoint: graphs, parity with PyTorch, fp16 checks, manifest, failures."""

from __future__ import annotations

from diffusion_engine.engine.specs import STEP_GRAPHS

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from diffusion_engine.engine.manifest import read_manifest
from diffusion_engine.engine.specs import BuildRanges, component_specs
from diffusion_engine.export import components, exporter, validate
from diffusion_engine.export.checkpoint import CheckpointError, load_checkpoint
from diffusion_engine.export.exporter import ExportOptions, export_engine, export_one
from diffusion_engine.runtime.tokenizer import PromptTokenizer
from tests.conftest import MAX_BATCH, MAX_SIZE, MIN_SIZE

# Shapes never used at export time: they prove the axes are really dynamic.
UNSEEN = {"batch": 3, "sequence": 77, "latent_height": 48, "latent_width": 40, "height": 384, "width": 320}


def run_graph(path: Path, feeds: dict) -> dict:
    sess = validate.cpu_session(path)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def reference(pipe, name: str, feeds: dict) -> dict:
    spec = component_specs(load_checkpoint_dims(pipe))[name]
    return validate.torch_outputs(components.wrap(name, pipe), spec, feeds)


def load_checkpoint_dims(pipe):
    from diffusion_engine.export.checkpoint import Checkpoint

    return Checkpoint("", "test", "sd1", pipe, "").dims


def test_manifest_lists_components_with_errors(tiny_engine):
    m = read_manifest(tiny_engine)
    generated = (*STEP_GRAPHS, "image_start", "image_start_unguided")  # no masked_image_start: a 4-channel UNet
    assert set(m.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder", "tiny_vae_decoder", *generated}
    assert (m.family, m.prediction_type) == ("sd1", "epsilon")
    assert m.build == BuildRanges(MIN_SIZE, MAX_SIZE, MAX_BATCH)
    for name in generated:  # generated, fp32 everywhere, checked against numpy
        c = m.components[name]
        assert set(c.files) == {"fp32"} and c.gpu_precision == "fp32"
        assert len(c.parity["fp32"]) == 2 and all(r["rel_error"] <= 1e-5 for r in c.parity["fp32"])
    for name, c in m.components.items():
        if name in generated:
            continue
        # The text encoder's causal attention stays as it is; the UNet's and the VAE's are fused for the CPU
        # (the tiny VAE decoder has no attention).
        fused = name not in ("text_encoder", "tiny_vae_decoder")
        assert set(c.files) == {"fp32", "fp16"} | ({"cpu"} if fused else set())
        assert all((tiny_engine / f).is_file() for f in c.files.values())
        for precision in c.files:
            shapes = c.parity[precision]
            assert len(shapes) == 2 and all(r["rel_error"] <= c.tolerance["fp32" if precision == "cpu" else precision] for r in shapes)
            dims = [r["dims"] for r in shapes]
            assert any(d["batch"] > 1 for d in dims)
            if "latent_height" in dims[0]:
                assert any(d["latent_height"] != d["latent_width"] for d in dims)
    assert m.source["digest"].startswith("sha256:") and m.tool_versions["torch"].startswith("2.")
    assert m.scheduler_config["_class_name"] == "DDIMScheduler"


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_graph_matches_pytorch_at_unseen_shape(tiny_engine, tiny_pipeline, name, precision):
    m = read_manifest(tiny_engine)
    spec = m.specs()[name]
    feeds = components.example_feeds(spec, {**UNSEEN, "vocab_size": 600}, seed=7)
    ours = run_graph(tiny_engine / m.components[name].files[precision], feeds)
    ref = reference(tiny_pipeline, name, feeds)
    for t in spec.outputs:
        assert ours[t.name].shape == ref[t.name].shape == t.shape(UNSEEN)
        assert ours[t.name].dtype == np.dtype(t.dtype)
        if np.issubdtype(ours[t.name].dtype, np.floating):
            assert np.isfinite(ours[t.name]).all()
        _, rel = validate.measure(ours[t.name], ref[t.name])
        assert rel <= getattr(spec.tolerance, precision), (name, precision, rel)


def test_fp16_graph_is_fp16_inside(tiny_engine):
    m = read_manifest(tiny_engine)
    model = onnx.load(tiny_engine / m.components["unet"].files["fp16"])
    fp16_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    fp32_weights = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) > 16]
    # Only the timestep's MLP (time_embedding, each resnet's time_emb_proj) keeps fp32 weights.
    assert len(fp16_weights) > 50 and fp32_weights and all("time_emb" in n for n in fp32_weights), fp32_weights
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT] * 3
    # The sinusoidal timestep embedding computes in fp32: t * freq near t = 1000 needs it.
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    trig = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    assert trig and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in trig)


def test_tokenizer_matches_checkpoint(tiny_engine, tiny_pipeline):
    m = read_manifest(tiny_engine)
    prompts = ["a red circle on a blue background", "an astronaut riding a horse, painting", ""]
    ours = PromptTokenizer.from_manifest(tiny_engine, m.tokenizer).encode(prompts)
    ref = tiny_pipeline.tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    assert ours.dtype == np.int32 and ours.tolist() == ref


def test_engine_info_prints_manifest(tiny_engine, capsys):
    from diffusion_engine.engine.cli import info_main

    assert info_main([str(tiny_engine)]) == 0
    out = capsys.readouterr().out
    for word in ("sd1", "text_encoder", "unet", "vae_decoder", "fp32+fp16", "DDIMScheduler"):
        assert word in out


def _plant(model: onnx.ModelProto, op: str, value: float) -> onnx.ModelProto:
    """Append `output <op> value` to the graph's first output (NaN via 0*inf, or a scaled result)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    out = model.graph.output[0].name
    model.graph.initializer.append(helper.make_tensor("planted_c", onnx.TensorProto.FLOAT, [], [value]))
    for node in model.graph.node:
        node.output[:] = [f"{out}_pre" if o == out else o for o in node.output]
    model.graph.node.append(helper.make_node(op, [f"{out}_pre", "planted_c"], [out], name="planted"))
    return model


@pytest.mark.parametrize("planted,match", [(("Mul", float("inf")), "NaN/Inf"), (("Mul", 1.2), "differs from PyTorch")])
def test_planted_bad_graph_fails_check(tiny_engine, tiny_pipeline, tmp_path, planted, match):
    m = read_manifest(tiny_engine)
    spec = m.specs()["text_encoder"]
    bad = _plant(onnx.load(tiny_engine / m.components["text_encoder"].files["fp16"]), *planted)
    onnx.save(bad, tmp_path / "bad.onnx")
    dims = {"batch": 2, "sequence": 77, "vocab_size": 600}
    feeds = components.example_feeds(spec, dims)
    with pytest.raises(validate.ParityError, match=match):
        validate.check(spec, "fp16", validate.cpu_session(tmp_path / "bad.onnx"), feeds, reference(tiny_pipeline, "text_encoder", feeds), dims)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_nan_fp16_graph_fails_export_and_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    from diffusion_engine.export import fp16

    real = fp16.to_fp16
    monkeypatch.setattr(fp16, "to_fp16", lambda model, keep=(): (_plant(real(model, keep)[0], "Mul", float("nan")), []))
    out = tmp_path / "engine"
    with pytest.raises(validate.ParityError, match="text_encoder fp16: last_hidden_state has .* NaN"):
        export_engine(str(tiny_checkpoint), out, ExportOptions(BuildRanges(MIN_SIZE, MAX_SIZE, 1)))
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "args,message",
    [
        (["--min-size", "250"], "min-size 250 must be a positive multiple of 8"),
        (["--max-size", "1020"], "max-size 1020 must be a positive multiple of 8"),
        (["--min-size", "512", "--max-size", "256"], "min-size 512 is larger than max-size 256"),
        (["--max-batch", "0"], "max-batch 0 must be at least 1"),
        (["--min-size", "264"], "min-size 264 must be a multiple of 16 for this model"),
        (["--default-guidance", "-1"], "--default-guidance must be a finite number >= 0, got -1.0"),
        (["--default-guidance", "nan"], "--default-guidance must be a finite number >= 0, got nan"),
    ],
)
def test_cli_rejects_bad_ranges(tiny_checkpoint, tmp_path, capsys, args, message):
    from diffusion_engine.export.cli import main

    assert main([str(tiny_checkpoint), "--out", str(tmp_path / "e"), *args]) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "e").exists() and leftovers(tmp_path) == []


def test_bad_checkpoints_give_clear_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_checkpoint(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty is not a diffusers checkpoint: it has no model_index.json"):
        load_checkpoint(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{broken}: could not load the checkpoint"):
        load_checkpoint(str(broken))
    with pytest.raises(CheckpointError, match="could not download from the model hub"):
        load_checkpoint("nonexistent-org/nonexistent-model")


def test_cli_failure_leaves_no_engine_dir(tiny_checkpoint, tmp_path, capsys):
    from diffusion_engine.export.cli import main

    out = tmp_path / "e"
    assert main([str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []


def test_existing_out_needs_overwrite(tiny_engine, tiny_checkpoint):
    before = (tiny_engine / "manifest.json").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_engine(str(tiny_checkpoint), tiny_engine, ExportOptions(BuildRanges(MIN_SIZE, MAX_SIZE, MAX_BATCH)))
    assert (tiny_engine / "manifest.json").read_text() == before


def test_large_weights_go_to_external_data(tiny_engine, tmp_path, monkeypatch):
    monkeypatch.setattr(components, "EXTERNAL_DATA_BYTES", 0)
    model = onnx.load(tiny_engine / "text_encoder.fp32.onnx")
    weights = components.weight_bytes(model)
    components.save_model(model, tmp_path / "te.onnx")
    assert (tmp_path / "te.onnx.data").stat().st_size >= 0.95 * weights  # tensors under 1 KiB stay inline
    assert (tmp_path / "te.onnx").stat().st_size <= (tiny_engine / "text_encoder.fp32.onnx").stat().st_size - 0.95 * weights
    feeds = {"input_ids": np.ones((1, 77), np.int32)}
    ref = run_graph(tiny_engine / "text_encoder.fp32.onnx", feeds)["last_hidden_state"]
    np.testing.assert_array_equal(run_graph(tmp_path / "te.onnx", feeds)["last_hidden_state"], ref)


def test_read_manifest_errors(tiny_engine, tmp_path):
    from diffusion_engine.engine.manifest import ManifestError

    with pytest.raises(ManifestError, match="no such engine directory"):
        read_manifest(tmp_path / "nope")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_engine, copy)
    d = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**d, "format_version": 99}))
    with pytest.raises(ManifestError, match="format version 99 is newer"):
        read_manifest(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="corrupt manifest"):
        read_manifest(copy)
    (copy / "manifest.json").write_text(json.dumps(d))
    (copy / "unet.fp16.onnx").unlink()
    with pytest.raises(ManifestError, match="missing: unet.fp16.onnx"):
        read_manifest(copy)


def test_trace_dims_keep_every_multiple_axis_dynamic():
    """A multiple-of axis is never traced at 1 x its multiple (torch.export would fix the quotient to 1)."""
    from diffusion_engine.engine.specs import AxisRange

    ranges = {"batch": AxisRange(1, 2), "height": AxisRange(16, 64, 16), "width": AxisRange(16, 64, 16),
              "latent_height": AxisRange(2, 8, 2), "sequence": AxisRange(1, 77), "one": AxisRange(16, 16, 16)}
    dims = components.export_dims(ranges)
    print("trace dims at the size granule:", dims)
    for axis, r in ranges.items():
        assert r.min <= dims[axis] <= r.max
        if r.multiple > 1 and r.max >= 2 * r.multiple:
            assert dims[axis] // r.multiple >= 2, axis
    assert dims["one"] == 16 and dims["height"] != dims["width"]


@pytest.mark.slow
def test_min_size_at_the_size_granule_exports_and_runs(tiny_checkpoint, tmp_path):
    """--min-size equal to the granule (VAE factor 8 x UNet downsampling 2 = 16: the UNet's innermost map is
    1x1 there) exports, passes its parity checks at that size, and generates at it."""
    from diffusion_engine.runtime.pipeline import Pipeline

    manifest, _ = export_engine(str(tiny_checkpoint), tmp_path / "e",
                                ExportOptions(BuildRanges(16, 48, 1), fp16=False))
    checked = {name: [r["dims"] for r in entry.parity["fp32"]] for name, entry in manifest.components.items()
               if name in ("unet", "vae_encoder")}
    print("parity shapes:", checked)
    assert {"latent_height": 2, "latent_width": 2} == {k: checked["unet"][1][k] for k in ("latent_height", "latent_width")}
    with Pipeline.load(tmp_path / "e") as pipe:
        small = pipe.generate("a red circle", steps=2, seed=0, height=16, width=16)
        image = pipe.generate("a red circle", steps=2, seed=0, height=16, width=16, image=small.images[0], strength=0.5)
    assert small.array.shape == image.array.shape == (1, 16, 16, 3)


def _graph_and_weights(path: Path) -> tuple[list, dict[str, np.ndarray]]:
    model = onnx.load(str(path))  # external weights loaded from beside the graph
    nodes = [(n.op_type, list(n.input), list(n.output), [a.SerializeToString() for a in n.attribute])
             for n in model.graph.node]
    return nodes, {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.slow  # a second full export of the tiny checkpoint (~100 s)
def test_streamed_export_writes_the_same_graphs_as_the_in_memory_one(tiny_checkpoint, tiny_engine, tmp_path, monkeypatch):
    """With every graph's weights external (as the UNet's are on real checkpoints), the export streams
    them (onnx_ir's save, fp16.convert_file) instead of holding a proto copy: the graphs and weights
    must be exactly the in-memory path's (the session engine's, whose tiny weights are inline)."""
    monkeypatch.setattr(components, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "streamed"
    export_engine(str(tiny_checkpoint), out, ExportOptions(BuildRanges(MIN_SIZE, MAX_SIZE, MAX_BATCH)))
    manifest, inline = read_manifest(out), read_manifest(tiny_engine)
    compared = 0
    for name, entry in manifest.components.items():
        for precision, file in entry.files.items():
            if not (tiny_engine / file).is_file() or file.endswith(".data"):
                continue
            nodes, weights = _graph_and_weights(out / file)
            ref_nodes, ref_weights = _graph_and_weights(tiny_engine / file)
            assert nodes == ref_nodes, f"{file}: graph differs"
            assert weights.keys() == ref_weights.keys(), f"{file}: initializers differ"
            for key, value in weights.items():
                assert value.dtype == ref_weights[key].dtype and np.array_equal(value, ref_weights[key]), f"{file}: {key}"
            compared += 1
        assert entry.parity == inline.components[name].parity, f"{name}: parity differs"
    external = sorted(p.name for p in out.glob("*.data"))
    print(f"compared {compared} graphs; external data files: {external}")
    assert {f"{n}.fp32.onnx.data" for n in ("text_encoder", "unet", "vae_decoder", "vae_encoder")} <= set(external)
    assert {f"{n}.fp16.onnx.data" for n in ("text_encoder", "unet", "vae_decoder", "vae_encoder")} <= set(external)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left"


def test_a_component_traced_in_a_child_process_is_the_one_traced_here(tiny_checkpoint, tiny_engine, tmp_path, monkeypatch):
    """Components over CHILD_BYTES are traced in a spawned process (torch.export keeps what it traced
    alive in its process): same graph, same weights, same parity figures as tracing in this process;
    this process's UNet weights are never needed (released to the meta device before the child runs)."""
    monkeypatch.setattr(exporter, "CHILD_BYTES", 0)
    ckpt = load_checkpoint(str(tiny_checkpoint))
    spec = component_specs(ckpt.dims)["unet"]
    options = ExportOptions(BuildRanges(MIN_SIZE, MAX_SIZE, MAX_BATCH))
    entry, report = export_one(ckpt, spec, options, tmp_path)
    assert all(p.device.type == "meta" for p in ckpt.pipeline.unet.parameters())
    reference = read_manifest(tiny_engine).components["unet"]
    for file in ("unet.fp32.onnx", "unet.fp16.onnx", "unet.cpu.onnx"):
        nodes, weights = _graph_and_weights(tmp_path / file)
        ref_nodes, ref_weights = _graph_and_weights(tiny_engine / file)
        assert nodes == ref_nodes, f"{file}: graph differs"
        assert weights.keys() == ref_weights.keys() and all(np.array_equal(v, ref_weights[k]) for k, v in weights.items())
    print(f"child-traced unet: {report.parameters:,} parameters, fp32 error {report.fp32_error:.2e}, "
          f"fp16 error {report.fp16_error:.2e} (in-process export: {max(r['rel_error'] for r in reference.parity['fp32']):.2e})")
    assert entry.parity == reference.parity and entry.parameters == reference.parameters


def test_release_frees_the_weights_and_keeps_the_configs(tiny_checkpoint):
    ckpt = load_checkpoint(str(tiny_checkpoint))
    dims = ckpt.dims
    ckpt.release("unet")
    assert all(p.device.type == "meta" for p in ckpt.pipeline.unet.parameters())
    assert all(p.device.type == "cpu" for p in ckpt.pipeline.vae.parameters())  # the decoder and encoder need it
    ckpt.release("vae_encoder")
    assert all(p.device.type == "meta" for p in ckpt.pipeline.vae.parameters())
    assert ckpt.dims == dims and ckpt.native_size > 0


def test_fp16_graphs_are_checked_in_unoptimised_sessions(tiny_checkpoint, tiny_engine, monkeypatch):
    """validate_component opens fp32 graphs with ONNX Runtime's optimiser and fp16 graphs without it (its
    constant folding turns every fp16 weight into an extra fp32 copy); both still pass within the spec tolerance."""
    opened = []
    real = validate.cpu_session

    def recording(path, optimize=True):
        opened.append((Path(path).name, optimize))
        return real(path, optimize)

    monkeypatch.setattr(validate, "cpu_session", recording)
    m = read_manifest(tiny_engine)
    spec = m.specs()["unet"]
    ckpt = load_checkpoint(tiny_checkpoint)
    cases = exporter.reference_cases(components.wrap("unet", ckpt.pipeline), spec, m.components["unet"].ranges(),
                                     exporter._vocab(ckpt))
    paths = {p: tiny_engine / m.components["unet"].files[p] for p in ("fp32", "fp16")}
    results, failure = exporter.validate_component(cases, spec, paths)
    assert failure is None and opened == [(paths["fp32"].name, True), (paths["fp16"].name, False)], opened
    errors = {p: max(r.rel_error for r in results[p]) for p in results}
    print("unet parity, fp32 graph optimised / fp16 graph unoptimised:", {p: f"{e:.2e}" for p, e in errors.items()})
    assert errors["fp16"] <= spec.tolerance.fp16 and errors["fp32"] <= spec.tolerance.fp32
