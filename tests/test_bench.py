"""engine-bench on the tiny engine: JSON + markdown + plot, schema, baselines that agree with ours,
FLOPs against PyTorch's FLOP counter, and the realistic checkpoints' architectures (no timing thresholds)."""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest

from diffusion_engine.benchmarks import schema
from diffusion_engine.benchmarks.cli import main
from diffusion_engine.benchmarks.systems import STAGES

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


@pytest.fixture(scope="module")
def bench_run(tiny_engine, tmp_path_factory):
    """One short e2e bench with the diffusers baseline (and OpenVINO where installed)."""
    out = tmp_path_factory.mktemp("bench") / "out.json"
    baselines = "diffusers,openvino" if HAS_OPENVINO else "diffusers"
    args = ["--engine", str(tiny_engine), "--sizes", "256x256", "--steps", "2", "--runs", "2", "--warmup", "0",
            "--scheduler", "euler", "--baseline", baselines, "--json", str(out)]
    assert main(args) == 0
    return out, json.loads(out.read_text())


def test_bench_writes_valid_json_markdown_and_plot(bench_run, tiny_engine):
    out, doc = bench_run
    schema.validate(doc)
    (case,) = doc["cases"]
    assert (case["height"], case["width"], case["batch"], case["steps"]) == (256, 256, 1, 2)
    assert doc["engine"]["random_weights"] is True
    assert len(doc["engine"]["manifest_sha256"]) == 64
    assert doc["settings"]["scheduler"] == "euler" and doc["machine"]["cpu_cores"] >= 1
    ours = case["systems"]["ours"]
    assert set(ours["stages"]) == set(STAGES)
    assert ours["stages"]["unet"]["n"] == 2 * 2  # 2 runs x 2 evaluations, pooled per call
    assert ours["device_memory_bytes"] is None and ours["fraction_of_fp16_peak"]["unet"] is None
    assert 0 <= ours["overhead"]["p50_fraction"] < 1
    assert "diffusers" in case["ratios"] and case["ratios"]["diffusers"]["end_to_end"] > 0
    assert case["flops"]["unet"]["flops"] > 0 and case["flops"]["unet"]["unresolved_nodes"] == 0
    # Same weights, latents, sampler and settings: the baselines compute the same images.
    for name, system in case["systems"].items():
        if name != "ours":
            assert system["agreement"]["psnr_db"] >= 40.0, name
    md = out.with_suffix(".md").read_text()
    assert "| end to end |" in md and "diffusers / ours" in md and "random weights" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_subcommand_regenerates_outputs(bench_run, tmp_path, capsys):
    out, _ = bench_run
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    assert main(["report", str(out), "--markdown", str(md), "--plot", str(png)]) == 0
    assert md.read_text() == out.with_suffix(".md").read_text()
    assert png.read_bytes()[:4] == b"\x89PNG"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema_version": 1}))
    assert main(["report", str(bad)]) == 2
    assert "missing key 'tool'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d["cases"][0]["systems"]["ours"]["stages"]["unet"].update(p50="fast"),
         r"cases\[0\]\.systems\.ours\.stages\.unet\.p50: expected number"),
        (lambda d: d["machine"].pop("cpu_model"), r"\$\.machine: missing key 'cpu_model'"),
        (lambda d: d["cases"][0].update(steps=None), r"steps must be null exactly in unet mode"),
        (lambda d: d.update(schema_version=2), r"schema_version: 2 is not 1"),
        (lambda d: d["cases"][0]["ratios"].update(tensorrt={}), r"not measured systems"),
    ],
)
def test_schema_names_the_bad_value(bench_run, mutate, message):
    doc = copy.deepcopy(bench_run[1])
    mutate(doc)
    with pytest.raises(schema.SchemaError, match=message):
        schema.validate(doc)


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed (pip install 'diffusion-engine[bench]')")
def test_unet_mode_with_openvino_agrees_with_ours(tiny_engine):
    from diffusion_engine.benchmarks.runner import Settings, run_bench

    doc = run_bench(Settings(engine=tiny_engine, sizes=((256, 320),), mode="unet", runs=1, warmup=0,
                             baselines=("openvino",)))
    (case,) = doc["cases"]
    assert case["steps"] is None and set(case["systems"]["ours"]["stages"]) == {"unet"}
    assert case["systems"]["openvino"]["agreement"]["rel_error"] < 1e-3
    assert case["ratios"]["openvino"]["unet"] > 0


def test_bad_arguments_exit_with_usage_errors(tiny_engine, capsys):
    for bad in (["--sizes", "512"], ["--baseline", "tensorflow"], ["--batch", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(["--engine", str(tiny_engine)] + bad)
        assert exc.value.code == 2
    assert "unknown baseline 'tensorflow'" in capsys.readouterr().err


def test_flops_equal_pytorch_flop_counter(tiny_checkpoint, tiny_engine, tiny_pipeline):
    """Our ONNX MAC count equals torch's FlopCounterMode on the same module (SDPA as plain matmuls)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from diffusion_engine.benchmarks.flops import graph_flops
    from diffusion_engine.export.components import wrap

    cases = {
        "unet": ((torch.randn(2, 4, 16, 20), torch.tensor([500.0]), torch.randn(2, 77, 32)),
                 {"batch": 2, "sequence": 77, "latent_height": 16, "latent_width": 20}),
        "text_encoder": ((torch.randint(0, 300, (2, 77), dtype=torch.int32),), {"batch": 2, "sequence": 77}),
        "vae_decoder": ((torch.randn(1, 4, 16, 20),), {"batch": 1, "latent_height": 16, "latent_width": 20}),
    }
    for name, (args, dims) in cases.items():
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            wrap(name, tiny_pipeline)(*args)
        ours = graph_flops(tiny_engine / f"{name}.fp32.onnx", dims)
        assert ours.unresolved == ()
        assert ours.flops == counter.get_total_flops(), name


def test_realistic_architectures_have_the_real_parameter_counts():
    """SD1.5 and SDXL builders on the meta device: exact parameter counts of the published models."""
    from accelerate import init_empty_weights

    from diffusion_engine.benchmarks import models

    for name in ("sd15", "sdxl"):
        with init_empty_weights():
            parts = models.BUILDERS[name](0)
        assert models.parameter_counts(parts) == models.PARAMETERS[name]
    tok = models.clip_tokenizer()
    ids = tok("a photo of an astronaut riding a horse").input_ids
    assert len(tok) == models.CLIP_VOCAB and (ids[0], ids[-1]) == (49406, 49407) and tok.pad_token_id == 49407
    assert max(ids[1:-1]) < 1000  # the tiny vocabulary's words, remapped below the fillers
    assert models.clip_tokenizer(pad_token="!").pad_token_id == 0


def test_overhead_and_stage_sums_are_consistent(bench_run):
    """End to end covers the stages: the model stages never add up to more than the whole."""
    case = bench_run[1]["cases"][0]
    for system in case["systems"].values():
        st = system["stages"]
        assert st["text_encoder"]["min"] + 2 * st["unet"]["min"] + st["vae_decoder"]["min"] <= st["end_to_end"]["p90"]
        assert np.isfinite(system["images_per_second"])


def test_report_without_matplotlib_skips_the_default_plot_and_refuses_an_asked_one(bench_run, tmp_path, monkeypatch,
                                                                                     capsys):
    """Without the [bench] extra: markdown still, no default plot; --plot is a one-line error before any work."""
    import importlib.util

    out, _ = bench_run
    result = tmp_path / "r.json"
    result.write_bytes(out.read_bytes())
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "matplotlib" else real(name, *a, **k))
    assert main(["report", str(result)]) == 0
    assert result.with_suffix(".md").is_file() and not result.with_suffix(".png").exists()
    capsys.readouterr()
    assert main(["report", str(result), "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip()
    print(err)
    assert err == f"engine-bench report: error: --plot {tmp_path / 'p.png'} needs matplotlib: pip install 'diffusion-engine[bench]'"
    assert not (tmp_path / "p.png").exists()


def test_bench_on_the_trt_backend_with_a_fake_gpu(tiny_engine, tmp_path, monkeypatch):
    """engine-bench --backend trt (what make gpu-check runs) on the fake device: the timing proxies must leave
    the TensorRT loop its sessions' streams, addresses and buffer generations; ours agrees with diffusers."""
    from tests.fake_gpu import install_fake_gpu

    cuda = install_fake_gpu(monkeypatch)
    out = tmp_path / "trt.json"
    args = ["--engine", str(tiny_engine), "--backend", "trt", "--sizes", "256x256", "--steps", "3", "--runs", "2",
            "--warmup", "1", "--scheduler", "euler", "--baseline", "diffusers", "--json", str(out)]
    assert main(args) == 0
    doc = json.loads(out.read_text())
    schema.validate(doc)
    (case,) = doc["cases"]
    ours = case["systems"]["ours"]
    assert doc["settings"]["backend"] == "trt" and ours["device"] == "cuda"
    assert case["systems"]["diffusers"]["agreement"]["psnr_db"] >= 40.0
    # Warm-up (2 steps) and 2 runs of 3 steps in one 256x256 bucket: captured once per step count, replayed after.
    assert cuda.captures == 2 and cuda.launches == (2 - 1) + 2 * 3 - 1
    assert {"text_encoder", "vae_decoder", "end_to_end"} <= set(ours["stages"])
    assert "unet" not in ours["stages"] and ours["overhead"] is None  # the loop's UNet calls are not timed one by one


@pytest.mark.slow
def test_unet_mode_against_the_unfused_graph(tiny_engine):
    """--baseline ours-unfused: ours on the plain fp32 UNet (whole score matrices) in the same run."""
    from diffusion_engine.benchmarks.runner import Settings, run_bench

    doc = run_bench(Settings(engine=tiny_engine, sizes=((384, 384),), mode="unet", runs=1, warmup=0,
                             baselines=("ours-unfused",)))
    (case,) = doc["cases"]
    theirs, ours = case["systems"]["ours-unfused"], case["systems"]["ours"]
    print(f"unet at 384x384: ours {ours['stages']['unet']['p50']:.3f} s, unfused {theirs['stages']['unet']['p50']:.3f} s, "
          f"run RSS increase ours {ours['run_rss_increase_bytes'] / 1e6:.0f} MB, unfused "
          f"{theirs['run_rss_increase_bytes'] / 1e6:.0f} MB, rel error {theirs['agreement']['rel_error']:.2g}")
    assert theirs["agreement"]["rel_error"] < 1e-5 and case["ratios"]["ours-unfused"]["unet"] > 0


def test_bench_full_and_tiny_decoders_in_one_run(tiny_engine, tiny_vae, tmp_path):
    """--decoders full,tiny: each case once per decoder in the same run; diffusers decodes its tiny cases with the
    same AutoencoderTiny (the manifest's tiny_vae), so both decoders' images agree with ours."""
    from diffusion_engine.benchmarks.flops import graph_flops

    out = tmp_path / "tiny.json"
    args = ["--engine", str(tiny_engine), "--sizes", "256x256", "--steps", "1,2", "--runs", "1", "--warmup", "0",
            "--scheduler", "euler", "--baseline", "diffusers", "--decoders", "full,tiny", "--json", str(out)]
    assert main(args) == 0
    doc = json.loads(out.read_text())
    schema.validate(doc)
    assert [(c["steps"], c["decoder"]) for c in doc["cases"]] == [(1, "full"), (1, "tiny"), (2, "full"), (2, "tiny")]
    dims = {"batch": 1, "latent_height": 32, "latent_width": 32}
    for case in doc["cases"]:
        name = {"full": "vae_decoder", "tiny": "tiny_vae_decoder"}[case["decoder"]]
        psnr_db = case["systems"]["diffusers"]["agreement"]["psnr_db"]
        print(f"{case['steps']} steps, {case['decoder']} decoder: ours vs diffusers {psnr_db:.1f} dB, vae_decoder p50 "
              f"ours {case['systems']['ours']['stages']['vae_decoder']['p50'] * 1e3:.1f} ms, diffusers "
              f"{case['systems']['diffusers']['stages']['vae_decoder']['p50'] * 1e3:.1f} ms")
        assert psnr_db >= 40.0
        assert case["flops"]["vae_decoder"]["flops"] == graph_flops(tiny_engine / f"{name}.fp32.onnx", dims).flops
        assert all("vae_decoder" in s["stages"] for s in case["systems"].values())
    assert "tiny decoder" in out.with_suffix(".md").read_text()
    assert any("AutoencoderTiny" in n for n in doc["notes"])


def test_bench_tiny_decoder_refusals(engine_without_tiny, tiny_engine, capsys):
    from diffusion_engine.benchmarks.runner import Settings

    assert main(["--engine", str(engine_without_tiny), "--decoders", "full,tiny", "--runs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--decoders tiny: {engine_without_tiny} has no tiny_vae_decoder" in err
    with pytest.raises(SystemExit):
        main(["--engine", str(tiny_engine), "--decoders", "small"])
    assert "unknown decoder 'small'; valid: full, tiny" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unet mode decodes nothing"):
        Settings(engine=tiny_engine, mode="unet", decoders=("tiny",))


def test_random_taesd_fits_the_realistic_checkpoints():
    """models.taesd (written by `python -m diffusion_engine.benchmarks.models sd15 --tiny-vae`) decodes the SD1.5 and
    SDXL architectures' latents: engine-export --tiny-vae accepts it for both."""
    from diffusion_engine.benchmarks import models
    from diffusion_engine.export.tiny_vae import check_tiny_vae, tiny_vae_factor

    config = dict(models.taesd(0).config)
    factor = 2 ** (len(models.SD_VAE["block_out_channels"]) - 1)
    print(f"TAESD architecture: {config['latent_channels']} latent channels, factor {tiny_vae_factor(config)}; "
          f"SD VAE: {models.SD_VAE['latent_channels']}, factor {factor}")
    check_tiny_vae(config, "taesd", models.SD_VAE["latent_channels"], factor)


def test_one_system_at_a_time_loads_each_alone_and_still_compares(tiny_engine, monkeypatch):
    """--one-at-a-time (models that do not fit twice in memory): each system is loaded, measured on every case
    and closed before the next loads; the baseline's agreement is still measured against ours' outputs."""
    from diffusion_engine.benchmarks import runner

    events = []
    real = runner.system_factories

    def logged(settings, manifest):
        def wrap(make):
            def made(scheduler):
                system = make(scheduler)
                events.append(("load", system.name))
                close = system.close
                system.close = lambda: (events.append(("close", system.name)), close())
                return system
            return made
        return [wrap(m) for m in real(settings, manifest)]

    monkeypatch.setattr(runner, "system_factories", logged)
    doc = runner.run_bench(runner.Settings(engine=tiny_engine, sizes=((256, 256), (256, 320)), mode="unet", runs=1,
                                           warmup=0, baselines=("diffusers",), one_at_a_time=True))
    assert events == [("load", "ours"), ("close", "ours"), ("load", "diffusers"), ("close", "diffusers")], events
    errors = [case["systems"]["diffusers"]["agreement"]["rel_error"] for case in doc["cases"]]
    print("one system at a time, diffusers' UNet against ours:", [f"{e:.2g}" for e in errors])
    assert len(errors) == 2 and max(errors) < 1e-4
    assert doc["settings"]["one_at_a_time"] and any("one system at a time" in n for n in doc["notes"])
