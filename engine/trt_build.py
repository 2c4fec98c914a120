"""engine-build's TensorRT work: the ONNX digest in a plan's cache key, the build, the timing cache.

Written against the TensorRT 10/11 Python API; tensorrt and cuda-python (the [trt] extra) are
imported lazily, so this module imports without them. What the runtime needs too (profiles, cache
keys, plan selection: engine/plans.py; the TensorRT and GPU identity: engine/toolchain.py) is in the
contract, and this builder imports nothing from the runtime: its device query goes through
toolchain.read_device with its own cuda-python import, so builder and runtime read one identity.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from diffusion_engine.engine.atomic import write_atomic
from diffusion_engine.engine.digest import file_digest
from diffusion_engine.engine.manifest import MANIFEST, ComponentEntry, Manifest, checksums
from diffusion_engine.engine.plans import BuildConfig, Profile, derive_profiles, merge_plans, plan_key
from diffusion_engine.engine.toolchain import NO_CUDA_PYTHON, Toolchain, discover, read_device, trt_logger

logger = logging.getLogger(__name__)

TIMING_CACHE = "timing.cache"


class TrtBuildError(RuntimeError):
    """TensorRT could not parse or build a graph; the message names the file."""


def onnx_digest(path: Path) -> str:
    """sha256 over the ONNX file and every external-data file it names, streamed in file-name order."""
    return file_digest([path, *external_data_files(path)])


def external_data_files(path: Path) -> list[Path]:
    """The external-data files an ONNX graph refers to, found without loading them."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {e.value for t in _tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL
             for e in t.external_data if e.key == "location"}
    files = sorted(path.parent / n for n in names)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{path.name}: external data files are missing: {', '.join(missing)}")
    return files


def _tensors(model: Any) -> Iterator[Any]:
    """Initializers and Constant values of the graph, its subgraphs and local functions."""
    def walk(nodes: Sequence[Any], inits: Sequence[Any]) -> Iterator[Any]:
        yield from inits
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from walk(g.node, g.initializer)

    yield from walk(model.graph.node, model.graph.initializer)
    for f in model.functions:
        yield from walk(f.node, [])


def find_toolchain() -> Toolchain:
    """Import tensorrt and find the CUDA GPU to build for, or raise TrtUnavailable naming what is missing."""
    return discover(_tensorrt, cuda_device)


def cuda_device() -> tuple[str, str]:
    """(compute capability, name) of the GPU plans are built for, read as the runtime reads it (toolchain)."""
    return read_device(_cudart)


def _tensorrt() -> Any:
    import tensorrt

    return tensorrt


def _cudart() -> Any:
    """cuda-python's runtime API (cuda.bindings.runtime from 12.6 on; cuda.cudart before), the builder's own import."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as exc:
            raise RuntimeError(NO_CUDA_PYTHON) from exc
    return runtime


def build_plan(tc: Toolchain, onnx_path: Path, profiles: Sequence[Profile], config: BuildConfig, precision: str,
               timing_cache: bytes) -> tuple[Any, bytes]:
    """Parse the ONNX graph and build a serialized plan, one optimisation profile per bucket; (plan, timing cache)."""
    trt = tc.trt
    builder = trt.Builder(trt_logger(trt))
    # NetworkDefinitionCreationFlag: EXPLICIT_BATCH is ignored in TensorRT 10 (always explicit batch) and gone
    # in 11; STRONGLY_TYPED makes every tensor's type follow the graph, so the fp16 ONNX decides precision
    # (required for that on 10.x, always on and ignored in 11).
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, trt_logger(trt))  # owns the weights: keep it alive until the build ends
    # parse_from_file (not parse(bytes)): the parser resolves external data relative to the file's folder.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TrtBuildError(f"{onnx_path.name}: the TensorRT ONNX parser failed: {errors}")
    cfg = _builder_config(tc, builder, network, profiles, config, precision)
    cache = _attach_timing_cache(cfg, timing_cache)
    plan = builder.build_serialized_network(network, cfg)  # IHostMemory, or None on failure
    if plan is None:
        raise TrtBuildError(f"{onnx_path.name}: TensorRT could not build a plan (its messages are logged above)")
    return plan, bytes(memoryview(cache.serialize()))


def _builder_config(tc: Toolchain, builder: Any, network: Any, profiles: Sequence[Profile], config: BuildConfig,
                    precision: str) -> Any:
    """IBuilderConfig: optimisation level, refit, workspace limit, and one optimisation profile per bucket."""
    trt = tc.trt
    cfg = builder.create_builder_config()
    cfg.builder_optimization_level = config.opt_level
    if config.refittable:
        cfg.set_flag(trt.BuilderFlag.REFIT)
    if config.workspace_bytes:
        cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        # TensorRT may run fp32 convolutions and matmuls on TF32 Tensor Cores by default; an fp32 graph is fp32
        # on purpose (range or exactness, e.g. the step graphs), so keep full fp32 there.
        cfg.clear_flag(trt.BuilderFlag.TF32)
    if not tc.strongly_typed and precision == "fp16":
        # Only a weakly typed TensorRT needs the FP16 flag; with STRONGLY_TYPED precision flags are not allowed.
        cfg.set_flag(trt.BuilderFlag.FP16)
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    for p in profiles:
        if set(p.shapes) != names:
            raise TrtBuildError(f"profile {p.bucket} covers inputs {sorted(p.shapes)}, the network has {sorted(names)}")
        profile = builder.create_optimization_profile()
        for name, r in p.shapes.items():
            profile.set_shape(name, r.min, r.opt, r.max)
        if cfg.add_optimization_profile(profile) < 0:  # -1: TensorRT rejected the profile
            raise TrtBuildError(f"TensorRT rejected the optimisation profile of bucket {p.bucket}: {p.as_dict()}")
    return cfg


def _attach_timing_cache(cfg: Any, blob: bytes) -> Any:
    """Load the serialized timing cache (b'' starts an empty one); one from another GPU/TensorRT is replaced."""
    cache = cfg.create_timing_cache(blob)
    if cache is None or not cfg.set_timing_cache(cache, ignore_mismatch=False):
        logger.warning("the timing cache was made on another GPU or TensorRT version; starting a new one")
        cache = cfg.create_timing_cache(b"")
        cfg.set_timing_cache(cache, ignore_mismatch=False)
    return cache


@dataclass(frozen=True)
class PlanResult:
    """One component's plan after engine-build: its manifest entry and whether it was reused."""

    component: str
    plan: dict[str, Any]
    cache_hit: bool
    seconds: float


def build_engine(engine_dir: str | Path, manifest: Manifest, config: BuildConfig, tc: Toolchain) -> list[PlanResult]:
    """Build (or reuse) one plan per manifest component, keep the timing cache, list the plans in the manifest."""
    root = Path(engine_dir)
    profiles = {n: derive_profiles(n, e, manifest.dims, manifest.build, config) for n, e in manifest.components.items()}
    cache_path = Path(config.timing_cache) if config.timing_cache else root / TIMING_CACHE
    timing = cache_path.read_bytes() if cache_path.is_file() else b""
    results = []
    for name, entry in manifest.components.items():
        result, timing = build_component(root, name, entry, profiles[name], config, tc, timing, cache_path)
        entry.plans = merge_plans(entry.plans, result.plan)
        manifest.checksums.update(checksums(root, [result.plan["file"]]))
        results.append(result)
        write_atomic(root / MANIFEST, manifest.to_json())  # after each plan: an interrupted build keeps what it made
    return results


def build_component(root: Path, name: str, entry: ComponentEntry, profiles: Sequence[Profile], config: BuildConfig,
                    tc: Toolchain, timing: bytes, cache_path: Path) -> tuple[PlanResult, bytes]:
    """Reuse the plan whose cache key exists, else build it and write plan and timing cache atomically."""
    start = time.perf_counter()
    precision = entry.gpu_precision
    if precision not in entry.files:
        raise ValueError(f"{name}: the manifest has no {precision} graph (files: {sorted(entry.files)})")
    onnx_file = entry.files[precision]
    digest = onnx_digest(root / onnx_file)
    options = config.options(precision, tc.strongly_typed)
    key = plan_key(digest, options, profiles, tc.tensorrt_version, tc.compute_capability)
    plan = {
        "file": f"{name}.{key[:16]}.plan", "key": key, "onnx": onnx_file, "onnx_digest": digest,
        "tensorrt_version": tc.tensorrt_version, "compute_capability": tc.compute_capability, "device": tc.device,
        "profiles": [p.as_dict() for p in profiles], "build": options,
    }
    if (root / plan["file"]).is_file():
        logger.info("%s: cache hit, reusing %s", name, plan["file"])
        return PlanResult(name, plan, True, time.perf_counter() - start), timing
    logger.info("%s: building %s from %s (%d profiles)", name, plan["file"], onnx_file, len(profiles))
    serialized, timing = build_plan(tc, root / onnx_file, profiles, config, precision, timing)
    write_atomic(root / plan["file"], memoryview(serialized))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cache_path, timing)
    return PlanResult(name, plan, False, time.perf_counter() - start), timing
