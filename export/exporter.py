"""Export a checkpoint into an engine directory: ONNX fp32 + fp16 per component, validated."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from diffusion_engine.engine.manifest import MANIFEST, ComponentEntry, Manifest, atomic_directory, write_atomic
from diffusion_engine.engine.specs import (
    COMPONENTS,
    STEP,
    TIMESTEP,
    BuildRanges,
    ComponentSpec,
    ModelDims,
    component_specs,
    step_spec,
)
from diffusion_engine.engine.step_graph import build_step_graph, reference_step
from diffusion_engine.runtime.samplers import STATE_SIZE
from diffusion_engine.export import components, fp16, validate
from diffusion_engine.export.checkpoint import Checkpoint, load_checkpoint
from diffusion_engine.export.tokenizer import save_tokenizer

logger = logging.getLogger(__name__)

TOOLS = ("torch", "diffusers", "transformers", "onnx", "onnxscript", "onnxruntime")
# Inputs whose subgraphs stay fp32: t * freq near t = 1000 is not resolvable in fp16.
FP32_INPUTS = (TIMESTEP,)


@dataclass(frozen=True)
class ExportOptions:
    """What to build: image size and batch ranges, and whether to make fp16 graphs."""

    ranges: BuildRanges = field(default_factory=BuildRanges)
    fp16: bool = True
    overwrite: bool = False


@dataclass(frozen=True)
class ComponentReport:
    """One row of the closing table."""

    name: str
    parameters: int
    onnx_bytes: int
    fp32_error: float
    fp16_error: float | None
    seconds: float


Progress = Callable[[str], None]


def export_engine(
    source: str, out: str | Path, options: ExportOptions = ExportOptions(), config: str | None = None,
    progress: Progress = lambda stage: None,
) -> tuple[Manifest, list[ComponentReport]]:
    """Load `source`, export every component, validate it, and write the engine directory atomically."""
    progress("load checkpoint")
    ckpt = load_checkpoint(source, config=config)
    dims = ckpt.dims
    check_ranges(options.ranges, dims)
    specs = component_specs(dims)
    with atomic_directory(out, overwrite=options.overwrite) as tmp:
        progress("tokenizer")
        tokenizer = save_tokenizer(ckpt.pipeline.tokenizer, tmp)
        entries, reports = {}, []
        for name in COMPONENTS:
            progress(name)
            entries[name], report = export_one(ckpt, specs[name], options, tmp)
            reports.append(report)
        progress("step graphs")
        for guided in (True, False):
            spec = step_spec(dims, STATE_SIZE, guided)
            entries[spec.name] = export_step_graph(spec, guided, options.ranges.axis_ranges(spec, dims), tmp)
        manifest = Manifest(
            family=ckpt.family, prediction_type=ckpt.prediction_type, dims=dims, build=options.ranges,
            scheduler_config=ckpt.scheduler_config, tokenizer=tokenizer, components=entries,
            source={"checkpoint": ckpt.source, "kind": ckpt.kind, "digest": ckpt.digest},
            tool_versions=tool_versions(),
        )
        write_atomic(tmp / MANIFEST, manifest.to_json())  # written last: its presence marks a complete export
    return manifest, reports


def check_ranges(ranges: BuildRanges, dims: ModelDims) -> None:
    """Sizes must be multiples of the model's size granule (VAE factor x UNet down factor)."""
    m = dims.size_multiple
    for label, v in (("min-size", ranges.min_size), ("max-size", ranges.max_size)):
        if v % m:
            raise ValueError(
                f"{label} {v} must be a multiple of {m} for this model "
                f"(VAE factor {dims.vae_scale_factor} x UNet downsampling {dims.unet_downsample})"
            )


def export_one(ckpt: Checkpoint, spec: ComponentSpec, options: ExportOptions, out: Path) -> tuple[ComponentEntry, ComponentReport]:
    """Export, convert and validate one component; return its manifest entry and report row."""
    start = time.perf_counter()
    module = components.wrap(spec.name, ckpt.pipeline)
    ranges = options.ranges.axis_ranges(spec, ckpt.dims)
    files = {"fp32": f"{spec.name}.fp32.onnx"}
    components.export_component(module, spec, ranges, out / files["fp32"], vocab_size=_vocab(ckpt))
    notes = []
    if options.fp16:
        files["fp16"] = f"{spec.name}.fp16.onnx"
        half, kept = fp16.to_fp16(_with_shapes(out / files["fp32"]), FP32_INPUTS)
        components.save_model(half, out / files["fp16"])
        if kept:
            notes.append(f"fp16 graph keeps {len(kept)} nodes fed only by constants, shapes or {', '.join(FP32_INPUTS)} in fp32")
    parity = validate_component(module, spec, ranges, {p: out / f for p, f in files.items()}, _vocab(ckpt))
    entry = ComponentEntry.from_spec(
        spec, ranges, files=files, gpu_precision="fp16" if options.fp16 else "fp32",
        parameters=sum(p.numel() for p in module.parameters()),
        parity={p: [r.as_dict() for r in rs] for p, rs in parity.items()}, notes=notes,
    )
    size = sum(f.stat().st_size for f in out.glob(f"{spec.name}.fp32.onnx*"))
    report = ComponentReport(
        spec.name, entry.parameters, size, max(r.rel_error for r in parity["fp32"]),
        max(r.rel_error for r in parity["fp16"]) if "fp16" in parity else None, time.perf_counter() - start,
    )
    return entry, report


def export_step_graph(spec: ComponentSpec, guided: bool, ranges, out: Path) -> ComponentEntry:
    """Generate a step graph, check it against its numpy definition at two shapes, record it."""
    files = {"fp32": f"{spec.name}.onnx"}
    components.save_model(build_step_graph(spec, guided), out / files["fp32"])
    session = validate.cpu_session(out / files["fp32"])
    results = []
    for i, dims in enumerate(validate.parity_dims(ranges)):
        dims = {**dims, "evaluations": 7, "noise_rows": 7 if i else 1, "unet_batch": 2 * dims["batch"]}
        feeds = components.example_feeds(spec, dims, seed=i)
        feeds[STEP] = np.array([6 if i else 2], np.int32)  # a middle step, and the last (the next index clamps)
        expected = reference_step(feeds, guided)
        ref = {t.name: expected[t.name].astype(np.dtype(t.dtype)) for t in spec.outputs}
        results.append(validate.check(spec, "fp32", session, feeds, ref, dims).as_dict())
    return ComponentEntry.from_spec(
        spec, ranges, files=files, gpu_precision="fp32", parameters=0, parity={"fp32": results},
        notes=["generated: classifier-free guidance + sampler update" if guided else "generated: sampler update"],
    )


def validate_component(module, spec: ComponentSpec, ranges, paths: dict[str, Path], vocab: int) -> dict[str, list[validate.Parity]]:
    """Every graph against PyTorch at two shapes (non-square batch 1; batch 2); raises on failure."""
    sessions = {p: validate.cpu_session(path) for p, path in paths.items()}
    results: dict[str, list[validate.Parity]] = {p: [] for p in paths}
    for i, dims in enumerate(validate.parity_dims(ranges)):
        feeds = components.example_feeds(spec, {**dims, "vocab_size": vocab}, seed=i + 1)
        ref = validate.torch_outputs(module, spec, feeds)
        for precision, session in sessions.items():
            results[precision].append(validate.check(spec, precision, session, feeds, ref, dims))
    return results


def _with_shapes(path: Path) -> onnx.ModelProto:
    """Load a graph with inferred intermediate types (the fp16 converter needs them)."""
    inferred = path.with_name(f".{path.name}.shapes")
    onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
    try:
        model = onnx.load(str(inferred), load_external_data=False)
        onnx.load_external_data_for_model(model, str(path.parent))  # weights stay beside the original
        return model
    finally:
        inferred.unlink(missing_ok=True)


def _vocab(ckpt: Checkpoint) -> int:
    return int(ckpt.pipeline.text_encoder.config.vocab_size)


def tool_versions() -> dict[str, str]:
    """Versions of the tools that made the graphs."""
    out = {}
    for name in TOOLS + ("diffusion-engine",):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
