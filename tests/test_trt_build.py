"""engine-build on the CPU: fail-fast without TensorRT, profiles, cache keys, plan checks, the build flow."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from diffusion_engine.engine import cli, trt_build
from diffusion_engine.engine.manifest import ComponentEntry, read_manifest
from diffusion_engine.engine.specs import (
    ENCODER_HIDDEN_STATES,
    INPUT_IDS,
    LATENTS,
    SAMPLE,
    TEXT_ENCODER,
    TIMESTEP,
    UNET,
    VAE_DECODER,
    BuildRanges,
    ModelDims,
    component_specs,
)
from diffusion_engine.engine.plans import (
    Bucket,
    BuildConfig,
    PlanMismatch,
    derive_profiles,
    merge_plans,
    parse_sizes,
    plan_key,
    plan_mismatch,
    select_plan,
    select_profile,
    size_buckets,
)
from diffusion_engine.engine.toolchain import Toolchain, TrtUnavailable
from diffusion_engine.engine.trt_build import onnx_digest
from diffusion_engine.runtime import cuda as runtime_cuda
from diffusion_engine.runtime import trt_loader
from tests.conftest import MAX_BATCH, MAX_SIZE, MIN_SIZE

DIMS = ModelDims(latent_channels=4, vae_scale_factor=8, unet_downsample=2, text_hidden_size=32, max_text_length=77)
BUILD = BuildRanges(MIN_SIZE, MAX_SIZE, MAX_BATCH)
MULTIPLE = DIMS.size_multiple  # 16


def entry(name: str) -> ComponentEntry:
    """A manifest entry exactly as export records it, without exporting anything."""
    spec = component_specs(DIMS)[name]
    return ComponentEntry.from_spec(spec, BUILD.axis_ranges(spec, DIMS), files={"fp16": f"{name}.fp16.onnx"},
                                    gpu_precision="fp16", parameters=0, parity={})


def config(buckets, **kw) -> BuildConfig:
    return BuildConfig(buckets=tuple(buckets), max_batch=kw.pop("max_batch", MAX_BATCH), **kw)


def pixel_dims(batch: int, size: tuple[int, int]) -> dict[str, int]:
    h, w = size
    return {"batch": batch, "sequence": DIMS.max_text_length, "latent_height": h // 8, "latent_width": w // 8}


# --- fail fast without TensorRT / GPU ------------------------------------------------------------


@pytest.fixture
def no_tensorrt(monkeypatch):
    """This machine has no tensorrt; where it is installed, hide it (a None entry makes import fail)."""
    if importlib.util.find_spec("tensorrt") is not None:
        monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ImportError):
        import tensorrt  # noqa: F401


def test_engine_build_fails_at_once_without_tensorrt(no_tensorrt, monkeypatch, capsys, tmp_path):
    def forbidden(*a, **k):
        raise AssertionError("engine-build read the engine before checking for TensorRT")

    monkeypatch.setattr(cli, "read_manifest", forbidden)
    monkeypatch.setattr(trt_build, "onnx_digest", forbidden)
    assert cli.build_main([str(tmp_path / "not-even-there")]) == 1
    err = capsys.readouterr().err
    assert "the `tensorrt` Python package is not installed" in err
    assert "--backend ort-cpu" in err and "ONNX Runtime" in err


def test_engine_build_names_a_missing_gpu(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.7.0.23"))

    def no_gpu():
        raise TrtUnavailable("no CUDA GPU is visible (cudaGetDeviceCount: cudaErrorNoDevice, 0 devices)")

    monkeypatch.setattr(trt_build, "cuda_device", no_gpu)
    assert cli.build_main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no CUDA GPU is visible" in err and "--backend ort-cpu" in err
    assert "tensorrt` Python package is not installed" not in err


# engine-build and the runtime read TensorRT and the GPU alike (engine/toolchain.py), each through its own
# cuda-python loader: (module with find_toolchain / cuda_device, the object holding its loader, its name).
DISCOVERY = [
    pytest.param(trt_build, trt_build, "_cudart", id="engine-build"),
    pytest.param(trt_loader, runtime_cuda, "cudart", id="runtime"),
]
SIDES = [pytest.param(p.values[0], id=p.id) for p in DISCOVERY]


@pytest.mark.parametrize("side", SIDES)
def test_old_tensorrt_is_refused(monkeypatch, side):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    monkeypatch.setattr(side, "cuda_device", lambda: ("8.9", "GPU"))
    with pytest.raises(TrtUnavailable, match=r"tensorrt 8\.6\.1 is too old"):
        side.find_toolchain()


@pytest.mark.parametrize("side, holder, loader", DISCOVERY)
@pytest.mark.parametrize("count, message", [
    ((35, None), r"no CUDA GPU is visible \(cudaGetDeviceCount: cudaErrorInsufficientDriver\)"),
    ((0, 0), r"no CUDA GPU is visible \(cudaGetDeviceCount: 0 devices\)"),
])
def test_cuda_errors_are_named(monkeypatch, count, message, side, holder, loader):
    class Err:
        cudaSuccess = 0

    code, n = count
    err = types.SimpleNamespace(name="cudaErrorInsufficientDriver") if code else 0
    fake = types.SimpleNamespace(cudaError_t=Err, cudaGetDeviceCount=lambda: (err, n))
    monkeypatch.setattr(holder, loader, lambda: fake)
    with pytest.raises(TrtUnavailable, match=message):
        side.cuda_device()


@pytest.mark.parametrize("side", SIDES)
def test_missing_cuda_python_is_named(monkeypatch, side):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)  # a None entry makes the import fail
    with pytest.raises(TrtUnavailable, match="no CUDA GPU can be found: cuda-python is not installed") as info:
        side.cuda_device()
    assert info.value.brief == "no CUDA GPU (cuda-python missing)"


@pytest.mark.parametrize("side, holder, loader", DISCOVERY)
def test_toolchain_reads_the_device_through_cuda_python(monkeypatch, side, holder, loader):
    class Err:
        cudaSuccess = 0

    fake = types.SimpleNamespace(
        cudaError_t=Err,
        cudaGetDeviceCount=lambda: (0, 2),
        cudaGetDevice=lambda: (0, 1),
        cudaGetDeviceProperties=lambda d: (0, types.SimpleNamespace(major=9, minor=0, name=b"NVIDIA H100 80GB HBM3\0")),
    )
    monkeypatch.setattr(holder, loader, lambda: fake)
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.7.0.23"))
    tc = side.find_toolchain()
    assert (tc.tensorrt_version, tc.compute_capability, tc.device) == ("10.7.0.23", "9.0", "NVIDIA H100 80GB HBM3")


# --- sizes and buckets ---------------------------------------------------------------------------


def test_parse_sizes_is_width_by_height():
    assert parse_sizes("320x256, 384x384") == ((256, 320), (384, 384))
    for bad in ("384", "384x", "ax256", "384*384"):
        with pytest.raises(ValueError, match="is not WIDTHxHEIGHT"):
            parse_sizes(bad)


def test_buckets_from_sizes():
    sizes = ((384, 384), (256, 320), (256, 320))
    dynamic = size_buckets(BUILD, MULTIPLE, sizes=sizes)
    assert [b.label for b in dynamic] == ["320x256", "384x384"]  # deduplicated, smallest first
    assert all(b.min == (MIN_SIZE, MIN_SIZE) and b.opt == b.max for b in dynamic)
    static = size_buckets(BUILD, MULTIPLE, sizes=sizes, static=True)
    assert all(b.min == b.opt == b.max for b in static)


def test_buckets_split_the_range():
    dynamic = size_buckets(BUILD, MULTIPLE)  # the engine's whole built range, split in 3
    assert [b.max[0] for b in dynamic] == [304, 352, 384]
    assert all(b.min == (MIN_SIZE, MIN_SIZE) for b in dynamic)
    assert all(v % MULTIPLE == 0 for b in dynamic for v in b.max)
    static = size_buckets(BUILD, MULTIPLE, min_size=256, max_size=384, static=True)
    assert [b.max[0] for b in static] == [256, 320, 384] and all(b.min == b.max for b in static)
    assert [b.max for b in size_buckets(BUILD, MULTIPLE, min_size=320, max_size=320)] == [(320, 320)]


@pytest.mark.parametrize("kwargs, message", [
    ({"sizes": ((512, 512),)}, r"size 512x512: height 512 is outside the engine's built range \[256, 384\] px"),
    ({"sizes": ((256, 200),)}, r"size 200x256: width 200 is outside the engine's built range \[256, 384\]"),
    ({"sizes": ((256, 264),)}, r"size 264x256: width 264 is not a multiple of 16"),
    ({"min_size": 128}, r"height 128 is outside the engine's built range \[256, 384\]"),
    ({"max_size": 400}, r"400 is outside the engine's built range"),
    ({"min_size": 384, "max_size": 256}, r"min-size 384 is larger than max-size 256"),
    ({"sizes": ((256, 256),), "min_size": 256}, r"--sizes and --min-size/--max-size exclude each other"),
])
def test_bucket_errors_name_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        size_buckets(BUILD, MULTIPLE, **kwargs)


def test_build_config_errors():
    b = size_buckets(BUILD, MULTIPLE)
    with pytest.raises(ValueError, match=r"opt-level 7 is outside \[0, 5\]"):
        config(b, opt_level=7)
    with pytest.raises(ValueError, match="max-batch 0 must be at least 1"):
        config(b, max_batch=0)
    with pytest.raises(ValueError, match="at least one size bucket"):
        config(())


# --- profiles ------------------------------------------------------------------------------------


def test_unet_profiles_cover_the_doubled_guidance_batch():
    spec = component_specs(DIMS)[UNET]
    buckets = size_buckets(BUILD, MULTIPLE, sizes=((256, 320), (384, 384)))
    profiles = derive_profiles(UNET, entry(UNET), DIMS, BUILD, config(buckets))
    assert [p.bucket for p in profiles] == ["320x256", "384x384"]
    for p, b in zip(profiles, buckets):
        top = 2 * MAX_BATCH  # unconditional + conditional rows per image
        r = p.shapes[SAMPLE]
        assert r.min == spec.tensor(SAMPLE).shape(pixel_dims(1, (MIN_SIZE, MIN_SIZE)))
        assert r.opt == r.max == spec.tensor(SAMPLE).shape(pixel_dims(top, b.max))
        assert p.shapes[TIMESTEP].min == p.shapes[TIMESTEP].max == spec.tensor(TIMESTEP).shape({})
        text = p.shapes[ENCODER_HIDDEN_STATES]
        assert text.min == spec.tensor(ENCODER_HIDDEN_STATES).shape({"batch": 1, "sequence": 1})
        assert text.max == spec.tensor(ENCODER_HIDDEN_STATES).shape({"batch": top, "sequence": 77})


def test_vae_and_text_encoder_profiles():
    specs = component_specs(DIMS)
    buckets = size_buckets(BUILD, MULTIPLE, sizes=((384, 256),))
    (vae,) = derive_profiles(VAE_DECODER, entry(VAE_DECODER), DIMS, BUILD, config(buckets, max_batch=1))
    assert vae.shapes[LATENTS].max == specs[VAE_DECODER].tensor(LATENTS).shape(pixel_dims(1, (384, 256)))
    (text,) = derive_profiles(TEXT_ENCODER, entry(TEXT_ENCODER), DIMS, BUILD, config(buckets))
    assert text.shapes[INPUT_IDS].min == (1, 1) and text.shapes[INPUT_IDS].max == (2 * MAX_BATCH, 77)


def test_static_profiles_fix_every_axis():
    buckets = size_buckets(BUILD, MULTIPLE, sizes=((256, 256), (384, 320)), static=True)
    for name in (TEXT_ENCODER, UNET, VAE_DECODER):
        for p in derive_profiles(name, entry(name), DIMS, BUILD, config(buckets, static=True)):
            assert all(r.min == r.opt == r.max for r in p.shapes.values()), (name, p)


def test_profiles_refuse_a_batch_beyond_the_build():
    buckets = size_buckets(BUILD, MULTIPLE)
    with pytest.raises(ValueError, match=r"max-batch 3 is outside the engine's built range \[1, 2\]"):
        derive_profiles(UNET, entry(UNET), DIMS, BUILD, config(buckets, max_batch=3))


def test_profiles_refuse_sizes_outside_the_recorded_axis_range():
    bucket = Bucket((256, 256), (512, 512), (512, 512))  # bypasses size_buckets: the axis check still holds
    with pytest.raises(ValueError, match=r"unet\.latent_height \(bucket 512x512\)=64 is outside the built range \[32, 48\]"):
        derive_profiles(UNET, entry(UNET), DIMS, BUILD, config([bucket]))


def test_every_component_of_the_tiny_engine_gets_profiles(tiny_engine):
    m = read_manifest(tiny_engine)
    cfg = config(size_buckets(m.build, m.dims.size_multiple))
    for name, e in m.components.items():
        profiles = derive_profiles(name, e, m.dims, m.build, cfg)
        assert len(profiles) == 3
        for p in profiles:
            assert set(p.shapes) == {t["name"] for t in e.inputs}
            ranges = e.ranges()
            for t in e.inputs:  # every named axis of every shape lies in the recorded range
                r = p.shapes[t["name"]]
                for i, axis in enumerate(t["axes"]):
                    if isinstance(axis, str):
                        assert ranges[axis].min <= r.min[i] <= r.opt[i] <= r.max[i] <= ranges[axis].max


# --- cache keys, digests ---------------------------------------------------------------------------


KEY_ARGS = {
    "onnx_digest": "sha256:" + "a" * 64,
    "options": BuildConfig(size_buckets(BUILD, MULTIPLE), MAX_BATCH).options("fp16", True),
    "profiles": derive_profiles(UNET, entry(UNET), DIMS, BUILD, config(size_buckets(BUILD, MULTIPLE))),
    "tensorrt_version": "10.7.0.23",
    "compute_capability": "8.9",
}
CHANGES = {
    "onnx_digest": "sha256:" + "b" * 64,
    "options": BuildConfig(size_buckets(BUILD, MULTIPLE), MAX_BATCH, opt_level=4).options("fp16", True),
    "profiles": derive_profiles(UNET, entry(UNET), DIMS, BUILD, config(size_buckets(BUILD, MULTIPLE, static=True), static=True)),
    "tensorrt_version": "10.8.0.43",
    "compute_capability": "9.0",
}


def test_plan_key_is_stable():
    again = {**KEY_ARGS, "options": dict(reversed(list(KEY_ARGS["options"].items())))}
    assert plan_key(**KEY_ARGS) == plan_key(**again)
    assert len(plan_key(**KEY_ARGS)) == 64


@pytest.mark.parametrize("changed", sorted(CHANGES))
def test_plan_key_changes_with_each_input(changed):
    assert plan_key(**KEY_ARGS) != plan_key(**{**KEY_ARGS, changed: CHANGES[changed]})


@pytest.mark.parametrize("option", [{"refittable": True}, {"workspace_bytes": 2**30}, {"max_batch": 1}])
def test_plan_key_changes_with_build_options(option):
    buckets = size_buckets(BUILD, MULTIPLE)
    other = BuildConfig(buckets, **{"max_batch": MAX_BATCH, **option}).options("fp16", True)
    assert plan_key(**KEY_ARGS) != plan_key(**{**KEY_ARGS, "options": other})


def test_onnx_digest_covers_external_data(tmp_path):
    weight = numpy_helper.from_array(np.arange(256, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256])], [weight],
    )
    path = tmp_path / "g.onnx"
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True, location="g.weights", size_threshold=0)
    assert trt_build.external_data_files(path) == [tmp_path / "g.weights"]
    first = onnx_digest(path)
    assert onnx_digest(path) == first
    data = bytearray((tmp_path / "g.weights").read_bytes())
    data[0] ^= 1
    (tmp_path / "g.weights").write_bytes(bytes(data))
    assert onnx_digest(path) != first
    (tmp_path / "g.weights").unlink()
    with pytest.raises(FileNotFoundError, match="external data files are missing"):
        onnx_digest(path)


# --- plan compatibility and selection ----------------------------------------------------------------


PLAN = {"file": "unet.0123456789abcdef.plan", "key": "k1", "tensorrt_version": "10.7.0.23",
        "compute_capability": "8.9", "device": "NVIDIA L4",
        "profiles": [p.as_dict() for p in KEY_ARGS["profiles"]]}


def test_plan_mismatch():
    assert plan_mismatch(PLAN, "10.7.0.23", "8.9") is None
    trt = plan_mismatch(PLAN, "10.8.0.43", "8.9")
    assert "built with TensorRT 10.7.0.23, this is TensorRT 10.8.0.43" in trt and "unet.0123456789abcdef.plan" in trt
    gpu = plan_mismatch(PLAN, "10.7.0.23", "9.0")
    assert "compute capability 8.9 (NVIDIA L4), this GPU has 9.0" in gpu and "TensorRT" not in gpu.split(";")[0]
    both = plan_mismatch(PLAN, "11.0.0.1", "12.0")
    assert "TensorRT 11.0.0.1" in both and "12.0" in both and both.endswith("rebuild it with engine-build")


def test_select_plan_never_picks_a_foreign_plan():
    e = entry(UNET)
    with pytest.raises(PlanMismatch, match="no TensorRT plan is built; run engine-build"):
        select_plan(UNET, e, "10.7.0.23", "8.9")
    other = {**PLAN, "key": "k2", "file": "unet.other.plan", "compute_capability": "9.0"}
    e.plans = [PLAN, other]
    assert select_plan(UNET, e, "10.7.0.23", "9.0") is other
    with pytest.raises(PlanMismatch, match=r"TensorRT 10\.7\.0\.23, this is TensorRT 10\.9\.0\.34"):
        select_plan(UNET, e, "10.9.0.34", "9.0")


def test_select_profile_picks_the_smallest_that_fits():
    spec = component_specs(DIMS)[UNET]

    def shapes(batch, size):
        return {t.name: spec.tensor(t.name).shape(pixel_dims(batch, size)) for t in spec.inputs}

    assert select_profile(PLAN, shapes(2, (256, 256))) == 0  # buckets 304, 352, 384: the first holds it
    assert select_profile(PLAN, shapes(4, (320, 336))) == 1
    assert select_profile(PLAN, shapes(2, (384, 256))) == 2
    assert select_profile(PLAN, shapes(6, (256, 256))) is None  # batch beyond every profile


def test_merge_plans_puts_the_new_plan_first_and_replaces_its_key():
    old = [{"key": "a", "file": "x.a.plan"}, {"key": "b", "file": "x.b.plan"}]
    assert [p["key"] for p in merge_plans(old, {"key": "b", "file": "x.b.plan", "new": 1})] == ["b", "a"]
    assert [p["key"] for p in merge_plans(old, {"key": "c"})] == ["c", "a", "b"]


# --- the build flow, with TensorRT replaced by a stand-in --------------------------------------------


@pytest.fixture
def engine_copy(tiny_engine, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_engine, tmp_path / "engine"))


def fake_toolchain() -> Toolchain:
    flags = types.SimpleNamespace(STRONGLY_TYPED=0)
    return Toolchain(types.SimpleNamespace(NetworkDefinitionCreationFlag=flags), "10.7.0.23", "8.9", "Stand-in GPU")


def test_build_flow_writes_plans_manifest_and_timing_cache(engine_copy, monkeypatch):
    built = []

    def fake_build(tc, onnx_path, profiles, cfg, precision, timing):
        built.append((onnx_path.name, precision, len(profiles)))
        return b"plan of " + onnx_path.name.encode(), timing + b"+" + onnx_path.name.encode()

    monkeypatch.setattr(trt_build, "build_plan", fake_build)
    m = read_manifest(engine_copy)
    cfg = config(size_buckets(m.build, m.dims.size_multiple, sizes=((256, 320), (384, 384))))
    results = trt_build.build_engine(engine_copy, m, cfg, fake_toolchain())
    assert [r.component for r in results] == list(m.components) and not any(r.cache_hit for r in results)
    assert [b[0] for b in built] == [c.files[c.gpu_precision] for c in m.components.values()]
    after = read_manifest(engine_copy)
    for name, c in after.components.items():
        (plan,) = c.plans
        assert plan["file"].startswith(f"{name}.") and plan["file"].endswith(".plan")
        assert (engine_copy / plan["file"]).read_bytes() == b"plan of " + c.files[c.gpu_precision].encode()
        assert plan["key"] == results[list(after.components).index(name)].plan["key"]
        assert (plan["tensorrt_version"], plan["compute_capability"]) == ("10.7.0.23", "8.9")
        assert plan["onnx"] == c.files[c.gpu_precision] and plan["onnx_digest"].startswith("sha256:")
        assert plan["build"]["precision"] == c.gpu_precision and plan["build"]["strongly_typed"] is True
        assert [p["bucket"] for p in plan["profiles"]] == ["320x256", "384x384"]
    assert (engine_copy / "timing.cache").read_bytes().count(b"+") == len(m.components)

    # A second build with the same inputs reuses every plan and rewrites nothing.
    stamps = {p: p.stat().st_mtime_ns for p in engine_copy.glob("*.plan")}
    again = trt_build.build_engine(engine_copy, read_manifest(engine_copy), cfg, fake_toolchain())
    assert all(r.cache_hit for r in again) and len(built) == len(m.components)
    assert {p: p.stat().st_mtime_ns for p in engine_copy.glob("*.plan")} == stamps
    assert read_manifest(engine_copy).components[UNET].plans == after.components[UNET].plans

    # Another option is another key: a new plan, listed first, the old one kept.
    trt_build.build_engine(engine_copy, read_manifest(engine_copy), config(cfg.buckets, opt_level=5), fake_toolchain())
    plans = read_manifest(engine_copy).components[UNET].plans
    assert len(plans) == 2 and plans[0]["build"]["opt_level"] == 5 and plans[1] == after.components[UNET].plans[0]


def test_timing_cache_path_is_honoured(engine_copy, monkeypatch, tmp_path):
    monkeypatch.setattr(trt_build, "build_plan", lambda tc, p, pr, c, prec, t: (b"plan", t + b"x"))
    m = read_manifest(engine_copy)
    cache = tmp_path / "caches" / "shared.cache"
    cfg = config(size_buckets(m.build, m.dims.size_multiple), timing_cache=cache)
    trt_build.build_engine(engine_copy, m, cfg, fake_toolchain())
    assert cache.read_bytes() == b"x" * len(m.components) and not (engine_copy / "timing.cache").exists()


def test_build_errors_come_before_any_build(engine_copy, monkeypatch):
    monkeypatch.setattr(trt_build, "build_plan", lambda *a: pytest.fail("built despite a bad request"))
    m = read_manifest(engine_copy)
    with pytest.raises(ValueError, match="max-batch 5 is outside"):
        trt_build.build_engine(engine_copy, m, config(size_buckets(m.build, m.dims.size_multiple), max_batch=5),
                               fake_toolchain())
