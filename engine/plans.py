"""Which TensorRT plan serves a request: size buckets, optimisation profiles, cache keys, plan checks.

The contract between engine-build and the TensorRT backend: the builder derives profiles and keys
and records plans in the manifest; the runtime selects a plan and a profile from those records.
Stdlib only (no onnx, no tensorrt): the ONNX digest that enters a key is the builder's.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from diffusion_engine.engine.manifest import ComponentEntry
from diffusion_engine.engine.specs import (
    BATCH, HEIGHT, LATENT_HEIGHT, LATENT_WIDTH, UNET_BATCH, WIDTH, AxisRange, BuildRanges, ModelDims,
)

BUCKETS = 3  # square size buckets a --min-size/--max-size range is split into
# Named spatial axes -> (index into a (height, width) size in pixels, whether it is in latent units).
SPATIAL = {HEIGHT: (0, False), WIDTH: (1, False), LATENT_HEIGHT: (0, True), LATENT_WIDTH: (1, True)}
# Axes that count images: their size scales with --max-batch (the UNet's and step graph's doubled batch too).
BATCH_AXES = (BATCH, UNET_BATCH)

Size = tuple[int, int]  # (height, width) in pixels


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
