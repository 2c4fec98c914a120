"""TensorRT plans for an engine directory: profiles per size bucket, cache keys, the build, plan checks.

Written against the TensorRT 10/11 Python API (tensorrt and cuda-python are imported lazily, so this
module imports without them). Pure parts (buckets, profiles, keys, mismatch checks) need neither.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from diffusion_engine.engine.digest import file_digest
from diffusion_engine.engine.atomic import write_atomic
from diffusion_engine.engine.manifest import MANIFEST, ComponentEntry, Manifest, checksums
from diffusion_engine.engine.specs import (
    BATCH, HEIGHT, LATENT_HEIGHT, LATENT_WIDTH, UNET_BATCH, WIDTH, AxisRange, BuildRanges, ModelDims,
)

logger = logging.getLogger(__name__)

TIMING_CACHE = "timing.cache"
MIN_TENSORRT = (10, 0)
BUCKETS = 3  # square size buckets a --min-size/--max-size range is split into
ORT_HINT = "Without them, run this engine with the ONNX Runtime backend (--backend ort-cpu)."
# Named spatial axes -> (index into a (height, width) size in pixels, whether it is in latent units).
SPATIAL = {HEIGHT: (0, False), WIDTH: (1, False), LATENT_HEIGHT: (0, True), LATENT_WIDTH: (1, True)}
# Axes that count images: their size scales with --max-batch (the UNet's and step graph's doubled batch too).
BATCH_AXES = (BATCH, UNET_BATCH)

Size = tuple[int, int]  # (height, width) in pixels


class TrtUnavailable(RuntimeError):
    """No TensorRT Python package or no CUDA GPU here; the message says which and what runs instead."""

    def __init__(self, message: str, brief: str | None = None):
        super().__init__(message)
        self.brief = brief or message  # a few words, for the backend choice's -v line


class TrtBuildError(RuntimeError):
    """TensorRT could not parse or build a graph; the message names the file."""


class PlanMismatch(RuntimeError):
    """No plan of a component was built for this GPU and TensorRT version."""


@dataclass(frozen=True)
class Bucket:
    """The image sizes of one optimisation profile, (height, width) in pixels."""

    min: Size
    opt: Size
    max: Size

    def __post_init__(self) -> None:
        if not all(lo <= opt <= hi for lo, opt, hi in zip(self.min, self.opt, self.max)):
            raise ValueError(f"bucket sizes must grow from min to opt to max, got {self.min}, {self.opt}, {self.max}")

    @property
    def label(self) -> str:
        return f"{self.max[1]}x{self.max[0]}"


@dataclass(frozen=True)
class BuildConfig:
    """What to build: size buckets, images per batch, static shapes, optimisation level, cache, refit."""

    buckets: tuple[Bucket, ...]
    max_batch: int
    static: bool = False
    opt_level: int = 3
    refittable: bool = False
    workspace_bytes: int | None = None
    timing_cache: Path | None = None  # None: <engine dir>/timing.cache

    def __post_init__(self) -> None:
        if not self.buckets:
            raise ValueError("at least one size bucket is needed")
        if self.max_batch < 1:
            raise ValueError(f"max-batch {self.max_batch} must be at least 1")
        if not 0 <= self.opt_level <= 5:  # IBuilderConfig.builder_optimization_level: 0..5, default 3
            raise ValueError(f"opt-level {self.opt_level} is outside [0, 5]")
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise ValueError(f"workspace {self.workspace_bytes} bytes must be positive")

    def options(self, precision: str, strongly_typed: bool) -> dict[str, Any]:
        """The options that change a plan: they enter its cache key and its manifest entry."""
        return {
            "precision": precision, "strongly_typed": strongly_typed, "opt_level": self.opt_level,
            "refittable": self.refittable, "static": self.static, "max_batch": self.max_batch,
            "workspace_bytes": self.workspace_bytes, "tf32": precision != "fp32",
        }


@dataclass(frozen=True)
class ShapeRange:
    """min/opt/max shape of one input in one optimisation profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: the shape range of every input of one component."""

    bucket: str
    shapes: Mapping[str, ShapeRange]

    def as_dict(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "shapes": {n: {k: list(getattr(r, k)) for k in ("min", "opt", "max")}
                                                  for n, r in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Profile":
        return cls(d["bucket"], {n: ShapeRange(*(tuple(r[k]) for k in ("min", "opt", "max"))) for n, r in d["shapes"].items()})


def parse_sizes(text: str) -> tuple[Size, ...]:
    """'512x512,1024x768' (WIDTHxHEIGHT, as image tools write it) -> ((512, 512), (768, 1024)) as (height, width)."""
    sizes = []
    for token in (t.strip() for t in text.split(",")):
        w, sep, h = token.lower().partition("x")
        if not (sep and w.isdigit() and h.isdigit()):
            raise ValueError(f"size {token!r} is not WIDTHxHEIGHT, e.g. 768x512")
        sizes.append((int(h), int(w)))
    return tuple(sizes)


def check_size(size: Size, build: BuildRanges, multiple: int) -> None:
    """Raise ValueError naming the size if it is outside the engine's built range or not a multiple."""
    for axis, v in zip(("height", "width"), size):
        if not build.min_size <= v <= build.max_size:
            raise ValueError(f"size {size[1]}x{size[0]}: {axis} {v} is outside the engine's built range "
                             f"[{build.min_size}, {build.max_size}] px")
        if v % multiple:
            raise ValueError(f"size {size[1]}x{size[0]}: {axis} {v} is not a multiple of {multiple}")


def size_buckets(
    build: BuildRanges, multiple: int, sizes: Sequence[Size] | None = None, min_size: int | None = None,
    max_size: int | None = None, static: bool = False, count: int = BUCKETS,
) -> tuple[Bucket, ...]:
    """One bucket per requested size (min = the built minimum), or `count` square buckets splitting [min, max]."""
    if sizes and (min_size or max_size):
        raise ValueError("--sizes and --min-size/--max-size exclude each other")
    if sizes:
        for s in sizes:
            check_size(s, build, multiple)
        low = (build.min_size, build.min_size)
        ordered = sorted(set(sizes), key=lambda s: (s[0] * s[1], s))
        return tuple(Bucket(s if static else low, s, s) for s in ordered)
    lo, hi = min_size or build.min_size, max_size or build.max_size
    check_size((lo, lo), build, multiple)
    check_size((hi, hi), build, multiple)
    if lo > hi:
        raise ValueError(f"min-size {lo} is larger than max-size {hi}")
    edges = bucket_edges(lo, hi, multiple, count, include_low=static)
    return tuple(Bucket((e, e) if static else (lo, lo), (e, e), (e, e)) for e in edges)


def bucket_edges(lo: int, hi: int, multiple: int, count: int, include_low: bool) -> list[int]:
    """`count` sizes spread over (lo, hi] (or [lo, hi]), rounded up to the multiple, ending at hi."""
    steps, parts = (range(count), max(count - 1, 1)) if include_low else (range(1, count + 1), count)
    edges: list[int] = []
    for k in steps:
        v = min(hi, lo + math.ceil((hi - lo) * k / parts / multiple) * multiple)
        if v not in edges:
            edges.append(v)
    return edges


def batch_factor(name: str, axis: str, recorded: AxisRange, build: BuildRanges) -> int:
    """Rows per image on a batch axis (2 for the guidance batch), from its recorded range."""
    factor, rest = divmod(recorded.max, build.max_batch)
    if rest or factor < 1:
        raise ValueError(f"{name}: recorded {axis} range max {recorded.max} is not a multiple of the "
                         f"engine's max batch {build.max_batch}")
    return factor


def derive_profiles(name: str, entry: ComponentEntry, dims: ModelDims, build: BuildRanges, config: BuildConfig) -> list[Profile]:
    """One profile per size bucket: every input's min/opt/max from its named axes and the recorded ranges."""
    if config.max_batch > build.max_batch:
        raise ValueError(f"max-batch {config.max_batch} is outside the engine's built range [1, {build.max_batch}]")
    ranges = entry.ranges()
    axes = dict.fromkeys(a for t in entry.inputs for a in t["axes"] if isinstance(a, str))
    missing = [a for a in axes if a not in ranges]
    if missing:
        raise ValueError(f"{name}: input axes {missing} have no recorded range in the manifest")
    profiles = []
    for bucket in config.buckets:
        values = {a: axis_values(name, a, ranges[a], bucket, dims, build, config) for a in axes}
        for axis, triple in values.items():
            for v in triple:
                ranges[axis].check(f"{name}.{axis} (bucket {bucket.label})", v)
        shapes = {
            t["name"]: ShapeRange(*(tuple(a if isinstance(a, int) else values[a][k] for a in t["axes"]) for k in range(3)))
            for t in entry.inputs
        }
        profiles.append(Profile(bucket.label, shapes))
    return profiles


def axis_values(name: str, axis: str, recorded: AxisRange, bucket: Bucket, dims: ModelDims, build: BuildRanges,
                config: BuildConfig) -> tuple[int, int, int]:
    """(min, opt, max) of one named axis in one bucket; static profiles have min = opt = max."""
    if axis in BATCH_AXES:
        top = config.max_batch * batch_factor(name, axis, recorded, build)
        return (top, top, top) if config.static else (recorded.min, top, top)
    if axis in SPATIAL:
        index, latent = SPATIAL[axis]
        scale = dims.vae_scale_factor if latent else 1
        lo, opt, hi = (getattr(bucket, k)[index] // scale for k in ("min", "opt", "max"))
        return (lo, opt, hi)
    return (recorded.max,) * 3 if config.static else (recorded.min, recorded.max, recorded.max)


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


def plan_key(onnx_digest: str, options: Mapping[str, Any], profiles: Sequence[Profile], tensorrt_version: str,
             compute_capability: str) -> str:
    """sha256 of everything that decides a plan: graph, build options, profiles, TensorRT version, GPU."""
    payload = {
        "onnx": onnx_digest, "options": dict(options), "profiles": [p.as_dict() for p in profiles],
        "tensorrt": tensorrt_version, "compute_capability": compute_capability,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def plan_mismatch(plan: Mapping[str, Any], tensorrt_version: str, compute_capability: str) -> str | None:
    """None if this TensorRT and GPU may load the plan, else why not: plans are specific to both."""
    why = []
    if plan.get("tensorrt_version") != tensorrt_version:
        why.append(f"it was built with TensorRT {plan.get('tensorrt_version')}, this is TensorRT {tensorrt_version}")
    if plan.get("compute_capability") != compute_capability:
        why.append(f"it was built for compute capability {plan.get('compute_capability')} ({plan.get('device', '?')}), "
                   f"this GPU has {compute_capability}")
    return f"plan {plan.get('file', '?')}: {'; '.join(why)}; rebuild it with engine-build" if why else None


def select_plan(name: str, entry: ComponentEntry, tensorrt_version: str, compute_capability: str) -> dict[str, Any]:
    """The first listed plan built for this TensorRT and GPU; PlanMismatch says why none fits."""
    if not entry.plans:
        raise PlanMismatch(f"{name}: no TensorRT plan is built; run engine-build")
    reasons = []
    for plan in entry.plans:
        why = plan_mismatch(plan, tensorrt_version, compute_capability)
        if why is None:
            return plan
        reasons.append(why)
    raise PlanMismatch(f"{name}: no plan fits this GPU and TensorRT: " + " | ".join(reasons))


def select_profile(plan: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> int | None:
    """Index of the smallest profile whose ranges hold every input shape, or None."""
    fits = []
    for i, d in enumerate(plan["profiles"]):
        p = Profile.from_dict(d)
        if all(n in p.shapes and p.shapes[n].contains(s) for n, s in shapes.items()):
            fits.append((sum(math.prod(r.max) for r in p.shapes.values()), i))
    return min(fits)[1] if fits else None


def merge_plans(plans: Sequence[Mapping[str, Any]], new: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The new plan first (it wins selection), then the others; same key replaces."""
    return [dict(new)] + [dict(p) for p in plans if p.get("key") != new["key"]]


@dataclass(frozen=True)
class Toolchain:
    """The tensorrt module and the GPU it builds for."""

    trt: Any
    tensorrt_version: str
    compute_capability: str
    device: str

    @property
    def strongly_typed(self) -> bool:
        return hasattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")


def find_toolchain() -> Toolchain:
    """Import tensorrt and find a CUDA GPU, or raise TrtUnavailable naming what is missing; reads no graphs."""
    missing, brief, trt, gpu = [], [], None, None
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        missing.append(f"the `tensorrt` Python package is not installed ({exc}; pip install 'diffusion-engine[trt]')")
        brief.append("no tensorrt package")
    else:
        if _version_tuple(trt.__version__) < MIN_TENSORRT:
            missing.append(f"tensorrt {trt.__version__} is too old: TensorRT >= 10.0 is needed")
            brief.append(f"tensorrt {trt.__version__} < 10")
    try:
        gpu = cuda_device()
    except TrtUnavailable as exc:
        missing.append(str(exc))
        brief.append(exc.brief)
    if missing:
        raise TrtUnavailable(
            f"TensorRT plans need the `tensorrt` package and a CUDA GPU: {'; '.join(missing)}. {ORT_HINT}",
            brief="; ".join(brief),
        )
    return Toolchain(trt, trt.__version__, *gpu)


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:2] if x.isdigit())


def _cudart() -> Any:
    """cuda-python's runtime API module (the runtime's loader), or TrtUnavailable naming what is missing."""
    from diffusion_engine.runtime.cuda import cudart

    try:
        return cudart()
    except RuntimeError as exc:
        raise TrtUnavailable(f"no CUDA GPU can be found: {exc}", brief="no CUDA GPU (cuda-python missing)") from exc


def cuda_device() -> tuple[str, str]:
    """(compute capability 'major.minor', name) of the current CUDA device via cudaGetDeviceProperties."""
    cudart = _cudart()
    ok = cudart.cudaError_t.cudaSuccess
    err, count = cudart.cudaGetDeviceCount()  # cuda-python returns (error, value...) tuples
    if err != ok:
        raise TrtUnavailable(f"no CUDA GPU is visible (cudaGetDeviceCount: {getattr(err, 'name', err)})", "no CUDA GPU")
    if count < 1:
        raise TrtUnavailable("no CUDA GPU is visible (cudaGetDeviceCount: 0 devices)", "no CUDA GPU")
    err, device = cudart.cudaGetDevice()
    err2, prop = cudart.cudaGetDeviceProperties(device) if err == ok else (err, None)
    if err2 != ok:
        raise TrtUnavailable(f"CUDA device properties are unavailable ({getattr(err2, 'name', err2)})")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return f"{prop.major}.{prop.minor}", name.rstrip("\0").strip()


@lru_cache(maxsize=None)
def trt_logger(trt: Any) -> Any:
    """One TensorRT logger per process that forwards to Python logging (the default prints to stderr)."""
    levels = {trt.ILogger.INTERNAL_ERROR: logging.CRITICAL, trt.ILogger.ERROR: logging.ERROR,
              trt.ILogger.WARNING: logging.WARNING, trt.ILogger.INFO: logging.DEBUG, trt.ILogger.VERBOSE: logging.DEBUG}

    class Bridge(trt.ILogger):  # ILogger docs: a subclass must call the base __init__ explicitly
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            logger.log(levels.get(severity, logging.INFO), "TensorRT: %s", msg)

    return Bridge()


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


@dataclass(frozen=True)
class LoadedPlan:
    """A deserialized engine with the runtime that made it (it must outlive the engine) and its manifest entry."""

    runtime: Any
    engine: Any
    plan: dict[str, Any]


def load_plan(engine_dir: str | Path, manifest: Manifest, name: str, tc: Toolchain) -> LoadedPlan:
    """Deserialize a component's plan for this GPU and TensorRT; PlanMismatch instead of loading a foreign one."""
    plan = select_plan(name, manifest.components[name], tc.tensorrt_version, tc.compute_capability)
    runtime = tc.trt.Runtime(trt_logger(tc.trt))
    engine = runtime.deserialize_cuda_engine((Path(engine_dir) / plan["file"]).read_bytes())
    if engine is None:
        raise TrtBuildError(f"{name}: TensorRT could not deserialize {plan['file']} (its messages are logged above)")
    return LoadedPlan(runtime, engine, plan)
