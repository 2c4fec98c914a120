"""GPU suite: TensorRT plans of the tiny engine: built, reused from the cache, equal to ONNX Runtime, never foreign."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest

from diffusion_engine.engine import trt_build
from diffusion_engine.engine.cli import build_main
from diffusion_engine.engine.manifest import Manifest, read_manifest
from diffusion_engine.engine.plans import PlanMismatch, select_profile
from diffusion_engine.engine.toolchain import Toolchain, TrtUnavailable, trt_logger
from diffusion_engine.runtime import cuda as runtime_cuda
from diffusion_engine.runtime.trt_loader import LoadedPlan, load_plan
from diffusion_engine.engine.trt_ops import check_engine

pytestmark = pytest.mark.gpu

SIZES = "320x256,384x384"  # WIDTHxHEIGHT, inside the tiny engine's 256..384 px
BUILD_ARGS = ["--sizes", SIZES, "--opt-level", "2"]
# Axis values of the parity run: a 320x256 image, batch 2, a 7-evaluation sampler plan for the step graphs.
RUN_DIMS = {"batch": 2, "sequence": 77, "latent_height": 32, "latent_width": 40, "height": 256, "width": 320,
            "unet_batch": 4, "evaluations": 7, "noise_rows": 7}


@pytest.fixture(scope="module")
def toolchain() -> Toolchain:
    pytest.importorskip("tensorrt")
    try:
        return trt_build.find_toolchain()
    except TrtUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def engine(tiny_engine, toolchain, tmp_path_factory) -> Path:
    """A copy of the tiny engine with plans built by engine-build."""
    root = Path(shutil.copytree(tiny_engine, tmp_path_factory.mktemp("gpu") / "engine"))
    assert build_main([str(root), *BUILD_ARGS]) == 0
    return root


def cuda(result: tuple) -> Any:
    """Unpack a cuda-python (error, value...) tuple, failing on an error."""
    err, *values = result
    assert err == runtime_cuda.cudart().cudaError_t.cudaSuccess, err
    return values[0] if values else None


def run_plan(loaded: LoadedPlan, feeds: Mapping[str, np.ndarray], trt: Any) -> dict[str, np.ndarray]:
    """Run a deserialized engine once on host arrays: name-based I/O (TensorRT 10) and cuda-python memory."""
    cudart, engine = runtime_cuda.cudart(), loaded.engine
    context = engine.create_execution_context()
    profile = select_profile(loaded.plan, {n: a.shape for n, a in feeds.items()})
    assert profile is not None, f"no profile of {loaded.plan['file']} holds {[a.shape for a in feeds.values()]}"
    stream, pointers, outputs = cuda(cudart.cudaStreamCreate()), [], {}

    def device(nbytes: int) -> int:
        pointers.append(cuda(cudart.cudaMalloc(max(nbytes, 1))))
        return pointers[-1]

    try:
        assert context.set_optimization_profile_async(profile, int(stream))
        for name, array in feeds.items():
            array = np.ascontiguousarray(array)
            assert context.set_input_shape(name, array.shape), name
            ptr = device(array.nbytes)
            cuda(cudart.cudaMemcpy(ptr, array.ctypes.data, array.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
            assert context.set_tensor_address(name, ptr)
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                out = np.empty(tuple(context.get_tensor_shape(name)), trt.nptype(engine.get_tensor_dtype(name)))
                outputs[name] = (out, device(out.nbytes))
                assert context.set_tensor_address(name, outputs[name][1])
        assert context.execute_async_v3(int(stream))
        cuda(cudart.cudaStreamSynchronize(stream))
        for out, ptr in outputs.values():
            cuda(cudart.cudaMemcpy(out.ctypes.data, ptr, out.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        return {name: out for name, (out, _) in outputs.items()}
    finally:
        for ptr in pointers:
            cudart.cudaFree(ptr)
        cudart.cudaStreamDestroy(stream)


def vocab(manifest: Manifest) -> int:
    t = manifest.tokenizer
    return 1 + max(t["pad_token_id"], t["bos_token_id"], t["eos_token_id"])


def test_one_plan_per_component(engine, toolchain):
    m = read_manifest(engine)
    for name, c in m.components.items():
        (plan,) = c.plans
        assert (engine / plan["file"]).stat().st_size > 0
        assert plan["tensorrt_version"] == toolchain.trt.__version__
        assert plan["compute_capability"] == toolchain.compute_capability
        assert [p["bucket"] for p in plan["profiles"]] == ["320x256", "384x384"]
        loaded = load_plan(engine, m, name, toolchain)
        assert loaded.engine.num_optimization_profiles == 2
        names = {loaded.engine.get_tensor_name(i) for i in range(loaded.engine.num_io_tensors)}
        assert names == {t["name"] for t in c.inputs + c.outputs}
    assert (engine / "timing.cache").stat().st_size > 0


def test_second_build_is_a_cache_hit(engine, caplog):
    before = read_manifest(engine)
    stamps = {p.name: p.stat().st_mtime_ns for p in engine.glob("*.plan")}
    caplog.set_level(logging.INFO, logger=trt_build.__name__)
    assert build_main([str(engine), *BUILD_ARGS]) == 0
    hits = [r.getMessage() for r in caplog.records if "cache hit" in r.getMessage()]
    assert len(hits) == len(before.components)
    assert {p.name: p.stat().st_mtime_ns for p in engine.glob("*.plan")} == stamps
    after = read_manifest(engine)
    assert {n: c.plans for n, c in after.components.items()} == {n: c.plans for n, c in before.components.items()}


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder", "step", "step_unguided"])
def test_plan_matches_onnx_runtime_fp32(engine, toolchain, name):
    from diffusion_engine.export import components, validate

    m = read_manifest(engine)
    if name not in m.components:
        pytest.skip(f"this engine has no {name}")
    c = m.components[name]
    spec = c.spec(name)
    feeds = components.example_feeds(spec, {**RUN_DIMS, "vocab_size": vocab(m)}, seed=3)
    if "step" in feeds:
        feeds["step"] = np.array([2], np.int32)  # an index into the 7-evaluation plan
    session = validate.cpu_session(engine / c.files["fp32"])
    ref = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    ours = run_plan(load_plan(engine, m, name, toolchain), feeds, toolchain.trt)
    limit = c.tolerance[c.gpu_precision]
    for t in spec.outputs:
        assert ours[t.name].dtype == ref[t.name].dtype and ours[t.name].shape == ref[t.name].shape
        if np.issubdtype(ours[t.name].dtype, np.floating):
            assert np.all(np.isfinite(ours[t.name])), f"{name}.{t.name} has NaN/Inf"
        max_abs, rel = validate.measure(ours[t.name], ref[t.name])
        assert rel <= limit, f"{name}.{t.name}: TensorRT differs from ORT fp32 by {rel:.3g} (max abs {max_abs:.3g}) > {limit}"


def test_foreign_plans_are_refused(engine, toolchain):
    m = read_manifest(engine)
    for plan in m.components["unet"].plans:
        plan["tensorrt_version"] = "0.0.0"
    version = re.escape(toolchain.tensorrt_version)
    with pytest.raises(PlanMismatch, match=rf"built with TensorRT 0\.0\.0, this is TensorRT {version}"):
        load_plan(engine, m, "unet", toolchain)
    for plan in m.components["vae_decoder"].plans:
        plan["compute_capability"] = "1.0"
    with pytest.raises(PlanMismatch, match=r"built for compute capability 1\.0"):
        load_plan(engine, m, "vae_decoder", toolchain)


def test_parser_supports_the_ops_the_table_passes(engine, toolchain):
    trt = toolchain.trt
    builder = trt.Builder(trt_logger(trt))  # outlives the network it creates
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger(trt))
    if not hasattr(parser, "supports_operator"):
        pytest.skip("this TensorRT's OnnxParser has no supports_operator")
    checks = check_engine(engine, read_manifest(engine))
    assert all(c.ok for c in checks)
    unsupported = sorted(op for c in checks for op in c.ops if not parser.supports_operator(op))
    assert not unsupported, f"the table passes ops this TensorRT's parser lacks: {unsupported}"
