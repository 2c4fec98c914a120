"""Export a checkpoint into an engine directory: ONNX fp32 + fp16 per component, validated."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx

if TYPE_CHECKING:
    import torch

from diffusion_engine.engine.atomic import atomic_directory, current_umask, write_atomic
from diffusion_engine.engine.manifest import (
    MANIFEST,
    ComponentEntry,
    Manifest,
    check_engine_out,
    checksums,
    is_engine_directory,
)
from diffusion_engine.engine.specs import (
    COMPONENTS,
    CPU_GRAPH,
    FAMILY_DEFAULTS,
    MASKED_IMAGE_START,
    STATE_SIZE,
    STEP,
    TINY_VAE_DECODER,
    TIME_IDS,
    TIMESTEP,
    TIMESTEP_COND,
    VAE_DECODER,
    VAE_ENCODER,
    BuildRanges,
    ComponentSpec,
    ModelDims,
    StepFeatures,
    component_specs,
    image_graph_specs,
    step_features,
    step_spec,
)
from diffusion_engine.engine.start_graph import build_start_graph, reference_start
from diffusion_engine.engine.step_graph import build_step_graph, reference_step
from diffusion_engine.runtime.samplers import default_sampler
from diffusion_engine.export import attention, components, fp16, validate
from diffusion_engine.export.components import export_dims
from diffusion_engine.export.checkpoint import Checkpoint, load_checkpoint, text_tokenizers
from diffusion_engine.export.tiny_vae import check_tiny_vae, load_tiny_vae, read_tiny_vae_config
from diffusion_engine.export.tokenizer import TOKENIZER_2_FILE, TOKENIZER_FILE, save_tokenizer

logger = logging.getLogger(__name__)
# Components with more parameter bytes than this are traced in a child process (_traced_in_child).
CHILD_BYTES = 1 << 30

TOOLS = ("torch", "diffusers", "transformers", "onnx", "onnxscript", "onnxruntime")
# Inputs whose subgraphs stay fp32: t * freq near t = 1000 (and SDXL's size ids up to ~1000) is not
# resolvable in fp16; LCM's guidance embedding joins the timestep embedding, which stays fp32 whole.
FP32_INPUTS = (TIMESTEP, TIME_IDS, TIMESTEP_COND)


@dataclass(frozen=True)
class ExportOptions:
    """What to build: size and batch ranges, fp16 graphs, the family (None: detected), an fp16-safe VAE."""

    ranges: BuildRanges = field(default_factory=BuildRanges)
    fp16: bool = True
    overwrite: bool = False
    family: str | None = None
    fp16_vae: bool = False  # the VAE is an fp16-fix VAE: its GPU graph may be fp16 (SDXL)
    tiny_vae: str | None = None  # a diffusers AutoencoderTiny folder: exported as a second decoder
    default_guidance: float | None = None  # the manifest's default guidance_scale (None: the family's)


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
    check_engine_out(out, options.overwrite, source)  # before any loading: never the source, never a user's folder
    tiny_config = read_tiny_vae_config(options.tiny_vae) if options.tiny_vae else None
    progress("load checkpoint")
    ckpt = load_checkpoint(source, config=config, family=options.family)
    dims = ckpt.dims
    check_ranges(options.ranges, dims)
    if tiny_config is not None:  # before any export work: it must decode this checkpoint's latents
        check_tiny_vae(tiny_config, options.tiny_vae, dims.latent_channels, dims.vae_scale_factor)
    specs = component_specs(dims)
    source_record = {"checkpoint": ckpt.source, "kind": ckpt.kind, "digest": ckpt.digest}
    with atomic_directory(out, options.overwrite, source, is_engine_directory, "an engine directory") as tmp:
        progress("tokenizer")
        tokenizers = text_tokenizers(ckpt.pipeline)  # the refiner's one is its tokenizer_2
        tokenizer = save_tokenizer(tokenizers[0], tmp, TOKENIZER_FILE)
        tokenizer_2 = save_tokenizer(tokenizers[1], tmp, TOKENIZER_2_FILE) if len(tokenizers) == 2 else None
        entries, reports = {}, []
        for name in COMPONENTS:
            progress(name)
            entries[name], report = export_one(ckpt, specs[name], options, tmp, fp32_reason(ckpt, name, options))
            reports.append(report)
        if options.tiny_vae:
            progress(TINY_VAE_DECODER)
            tiny, digest = load_tiny_vae(options.tiny_vae)
            entries[TINY_VAE_DECODER], report = export_one(ckpt, specs[TINY_VAE_DECODER], options, tmp,
                                                           module=components.VaeDecoder(tiny).eval())
            reports.append(report)
            source_record.update(tiny_vae=str(options.tiny_vae), tiny_vae_digest=digest)
        progress("step graphs")
        for features in step_features(dims):
            spec = step_spec(dims, STATE_SIZE, features)
            entries[spec.name] = export_step_graph(spec, features, options.ranges.axis_ranges(spec, dims), tmp)
        progress("image-start graphs")
        for spec in image_graph_specs(dims, STATE_SIZE).values():
            entries[spec.name] = export_start_graph(spec, options.ranges.axis_ranges(spec, dims), tmp)
        manifest = Manifest(
            family=ckpt.family, prediction_type=ckpt.prediction_type, dims=dims, build=options.ranges,
            scheduler_config=ckpt.scheduler_config, tokenizer=tokenizer, components=entries,
            source=source_record,
            tool_versions=tool_versions(), defaults=generation_defaults(ckpt, options.default_guidance), tokenizer_2=tokenizer_2,
            force_zeros_for_empty_prompt=ckpt.force_zeros_for_empty_prompt, checksums=checksums(tmp),
        )
        write_atomic(tmp / MANIFEST, manifest.to_json())  # written last: its presence marks a complete export
    return manifest, reports


def generation_defaults(ckpt: Checkpoint, guidance_scale: float | None = None) -> dict:
    """The family's defaults, with the checkpoint's own image size and scheduler where it has none, and
    `guidance_scale` where given (a model trained for another guidance than its family's usual one)."""
    d = FAMILY_DEFAULTS[ckpt.family]
    return {
        "size": ckpt.native_size, "steps": d.steps,
        "guidance_scale": d.guidance_scale if guidance_scale is None else float(guidance_scale),
        "scheduler": d.scheduler or default_sampler(ckpt.scheduler_config), "steps_range": list(d.steps_range),
        "strength": d.strength,
    }


def fp32_reason(ckpt: Checkpoint, name: str, options: ExportOptions) -> str | None:
    """Why a component's GPU graph must stay fp32 whatever its fp16 check says, or None."""
    vae = ckpt.pipeline.vae.config
    sdxl_vae = name in (VAE_DECODER, VAE_ENCODER) and ckpt.dims.time_ids_size > 0  # SDXL base and refiner
    if sdxl_vae and vae.get("force_upcast", True) and not options.fp16_vae:
        # diffusers' SDXL pipelines upcast this VAE for the same reason: its activations overflow fp16.
        return ("the SDXL VAE has force_upcast=True (it overflows fp16 on real latents); "
                "export an fp16-fix VAE or pass --fp16-vae")
    return None


def check_ranges(ranges: BuildRanges, dims: ModelDims) -> None:
    """Sizes must be multiples of the model's size granule (VAE factor x UNet down factor)."""
    m = dims.size_multiple
    for label, v in (("min-size", ranges.min_size), ("max-size", ranges.max_size)):
        if v % m:
            raise ValueError(
                f"{label} {v} must be a multiple of {m} for this model "
                f"(VAE factor {dims.vae_scale_factor} x UNet downsampling {dims.unet_downsample})"
            )


def export_one(
    ckpt: Checkpoint, spec: ComponentSpec, options: ExportOptions, out: Path, keep_fp32: str | None = None,
    module: torch.nn.Module | None = None,
) -> tuple[ComponentEntry, ComponentReport]:
    """Export, convert and validate one component; return its manifest entry and report row.

    With `keep_fp32` (the reason) the GPU runs the fp32 graph whatever the fp16 check says, so a
    failed fp16 check is recorded (and that graph dropped) instead of failing the export. `module`:
    the export wrapper where it is not the checkpoint's own component (the tiny VAE decoder).
    """
    start = time.perf_counter()
    ranges = options.ranges.axis_ranges(spec, ckpt.dims)
    files = {"fp32": f"{spec.name}.fp32.onnx"}
    if module is None and ckpt.fp32_bytes(spec.name) > CHILD_BYTES:
        ckpt.release(spec.name)  # never touched here: the child process loads its own
        parameters, cases = _traced_in_child(ckpt, spec.name, ranges, out / files["fp32"])
    else:
        module = components.wrap(spec.name, ckpt.pipeline) if module is None else module
        parameters, cases = _trace(module, spec, ranges, out / files["fp32"], _vocab(ckpt))
        # PyTorch's copy of the weights is not needed again: freed before ONNX Runtime loads its own.
        del module
        ckpt.release(spec.name)
        gc.collect()
    notes = []
    if options.fp16:
        files["fp16"] = f"{spec.name}.fp16.onnx"
        kept = fp16.convert_file(out / files["fp32"], out / files["fp16"], FP32_INPUTS, load=_with_shapes,
                                 save=components.save_model, umask=current_umask())
        if kept:
            sources = ["constants", "shapes"] + [t.name for t in spec.inputs if t.name in FP32_INPUTS]
            fed_by = ", ".join(sources[:-1]) + " or " + sources[-1]
            notes.append(f"fp16 graph keeps {len(kept)} nodes fed only by {fed_by} in fp32")
    cpu_model, fused = write_cpu_graph(spec, ranges, out, files["fp32"])
    if fused:
        files[CPU_GRAPH] = f"{spec.name}.{CPU_GRAPH}.onnx"
        notes.append(f"cpu graph: {fused} attention block{'s' if fused != 1 else ''} fused into MultiHeadAttention (ONNX Runtime's CPU kernel)")
    paths = {p: out / f for p, f in files.items()}
    parity, failure = validate_component(cases, spec, paths, fp16_optional=keep_fp32 is not None)
    if failure is not None:
        (out / files.pop("fp16")).unlink()
        notes.append(f"no fp16 graph: it failed its CPU check ({failure})")
    if keep_fp32:
        passed = "; its fp16 graph passes the CPU check at the export shapes and is kept" if "fp16" in files else ""
        notes.append(f"GPU precision fp32: {keep_fp32}{passed}")
    buffers = attention.score_buffers(cpu_model, spec, ranges, export_dims(ranges, batch=1))
    entry = ComponentEntry.from_spec(
        spec, ranges, files=files, gpu_precision="fp16" if "fp16" in files and not keep_fp32 else "fp32",
        parameters=parameters,
        parity={p: [r.as_dict() for r in rs] for p, rs in parity.items()}, notes=notes,
        score_buffers={CPU_GRAPH if fused else "fp32": buffers},
    )
    size = sum(f.stat().st_size for f in out.glob(f"{spec.name}.fp32.onnx*"))
    report = ComponentReport(
        spec.name, entry.parameters, size, max(r.rel_error for r in parity["fp32"]),
        max(r.rel_error for r in parity["fp16"]) if "fp16" in parity else None, time.perf_counter() - start,
    )
    return entry, report


def export_step_graph(spec: ComponentSpec, features: StepFeatures, ranges, out: Path) -> ComponentEntry:
    """Generate a step graph, check it against its numpy definition at two shapes, record it."""
    def feeds(i: int, dims: dict[str, int]) -> dict[str, np.ndarray]:
        dims = {**dims, "evaluations": 7, "noise_rows": 7 if i else 1, "unet_batch": 2 * dims["batch"]}
        feeds = components.example_feeds(spec, dims, seed=i)
        feeds[STEP] = np.array([6 if i else 2], np.int32)  # a middle step, and the last (the next index clamps)
        return feeds

    return export_generated(spec, build_step_graph(spec, features), lambda f: reference_step(f, features), feeds,
                            ranges, out, features.parts)


def export_start_graph(spec: ComponentSpec, ranges, out: Path) -> ComponentEntry:
    """Generate an image-start graph, check it against its numpy definition at two shapes, record it."""
    masked = spec.name == MASKED_IMAGE_START
    parts = ("posterior sample",) + (("masked-image latents",) if masked else ("initial state", "first UNet input"))
    return export_generated(spec, build_start_graph(spec), lambda f: reference_start(f, spec),
                            lambda i, dims: components.example_feeds(spec, dims, seed=i), ranges, out, parts)


def export_generated(spec: ComponentSpec, model: onnx.ModelProto, reference: Callable[[dict], dict],
                     feeds: Callable[[int, dict], dict], ranges, out: Path, parts: tuple[str, ...]) -> ComponentEntry:
    """Save a generated graph, check it against its numpy definition at two shapes, record it."""
    files = {"fp32": f"{spec.name}.onnx"}
    components.save_model(model, out / files["fp32"])
    session = validate.cpu_session(out / files["fp32"])
    results = []
    for i, dims in enumerate(validate.parity_dims(ranges)):
        example = feeds(i, dims)
        expected = reference(example)
        ref = {t.name: expected[t.name].astype(np.dtype(t.dtype)) for t in spec.outputs}
        results.append(validate.check(spec, "fp32", session, example, ref, dims).as_dict())
    return ComponentEntry.from_spec(
        spec, ranges, files=files, gpu_precision="fp32", parameters=0, parity={"fp32": results},
        notes=[f"generated: {' + '.join(parts)}"],
    )


def _trace(module, spec: ComponentSpec, ranges, path: Path, vocab: int) -> tuple[int, list[tuple[dict, dict, dict]]]:
    """Export the fp32 graph to `path`; return (parameter count, reference cases) for the validation."""
    components.export_component(module, spec, ranges, path, vocab_size=vocab)
    return components.parameter_count(module), reference_cases(module, spec, ranges, vocab)


def _traced_in_child(ckpt: Checkpoint, name: str, ranges, path: Path) -> tuple[int, list[tuple[dict, dict, dict]]]:
    """export_component and reference_cases of one checkpoint component, in a fresh process.

    torch.export keeps every weight it traced alive in its process (the modules' own references go,
    the weights stay: 3.4 GB for SD1.5's UNet, 10 GB for SDXL's), so a large component is traced in a
    child process that loads the checkpoint itself and exits; this process then validates its graphs
    holding no PyTorch weights. Returns (parameter count, reference cases).
    """
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of this one's torch state
    receive, send = context.Pipe(duplex=False)
    args = (ckpt.source, ckpt.config, ckpt.family, name, ranges, str(path), _vocab(ckpt),
            components.EXTERNAL_DATA_BYTES, _ProcessSettings.now())
    child = context.Process(target=_trace_child, args=(send, *args), name=f"trace {name}")
    child.start()
    send.close()
    try:
        ok, result = receive.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"tracing {name} in a child process: it died (exit code {child.exitcode})") from None
    finally:
        receive.close()
    child.join()
    if not ok:
        raise result
    return result


def _trace_child(send, source, config, family, name, ranges, path, vocab, external_bytes, settings) -> None:
    """In the child: trace the component and send (True, (parameters, cases)) or (False, the exception)."""
    try:
        settings.apply()
        components.EXTERNAL_DATA_BYTES = external_bytes
        ckpt = load_checkpoint(source, config=config, family=family)
        spec = component_specs(ckpt.dims)[name]
        message = True, _trace(components.wrap(name, ckpt.pipeline), spec, ranges, Path(path), vocab)
    except Exception as exc:  # raised again in the parent, where the export's error handling is
        message = False, exc
    try:
        send.send(message)
    except Exception as exc:  # an exception that does not pickle
        send.send((False, RuntimeError(f"tracing {name} in a child process: {type(exc).__name__}: {message[1]}")))
    finally:
        send.close()


@dataclass
class _ProcessSettings:
    """What a child process needs to behave as this one does: warning filters and library log levels."""

    warning_filters: list
    log_levels: dict[str, int]

    LOGGERS = ("diffusion_engine", "torch.onnx", "onnx_ir", "onnxscript", "diffusers", "transformers")

    @classmethod
    def now(cls) -> _ProcessSettings:
        return cls(list(warnings.filters), {n: logging.getLogger(n).getEffectiveLevel() for n in cls.LOGGERS})

    def apply(self) -> None:
        warnings.filters[:] = self.warning_filters
        for name, level in self.log_levels.items():
            logging.getLogger(name).setLevel(level)
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity(self.log_levels["diffusers"])
        transformers.utils.logging.set_verbosity(self.log_levels["transformers"])
        if self.log_levels["diffusers"] > logging.INFO:
            diffusers.utils.logging.disable_progress_bar()
            transformers.utils.logging.disable_progress_bar()


def reference_cases(module, spec: ComponentSpec, ranges, vocab: int) -> list[tuple[dict, dict, dict]]:
    """The validation's two shapes (non-square batch 1; batch 2): (dims, feeds, PyTorch's outputs) each."""
    cases = []
    for i, dims in enumerate(validate.parity_dims(ranges)):
        feeds = components.example_feeds(spec, {**dims, "vocab_size": vocab}, seed=i + 1)
        cases.append((dims, feeds, validate.torch_outputs(module, spec, feeds)))
    return cases


def validate_component(
    cases: list[tuple[dict, dict, dict]], spec: ComponentSpec, paths: dict[str, Path], fp16_optional: bool = False,
) -> tuple[dict[str, list[validate.Parity]], validate.ParityError | None]:
    """Every graph against PyTorch's outputs (reference_cases); raises on failure.

    With `fp16_optional` an fp16 failure is returned (and that graph's results dropped) instead.
    """
    results: dict[str, list[validate.Parity]] = {}
    failure = None
    for precision, path in paths.items():  # one session at a time: one copy of the weights in ONNX Runtime
        session = validate.cpu_session(path, optimize=precision != "fp16")
        try:
            results[precision] = [validate.check(spec, precision, session, feeds, ref, dims) for dims, feeds, ref in cases]
        except validate.ParityError as exc:
            if precision != "fp16" or not fp16_optional:
                raise
            failure = exc
        finally:
            del session
    return results, failure


def write_cpu_graph(spec: ComponentSpec, ranges, out: Path, fp32_file: str) -> tuple[onnx.ModelProto, int]:
    """Write `<name>.cpu.onnx`: the fp32 graph with its attention fused (export/attention.py), its
    weights the fp32 graph's own (the same external data file). Return the graph ort-cpu will open
    (without weights: the fused one, or the fp32 one where nothing was fused and nothing written) and
    how many attention blocks were fused."""
    model = onnx.load(str(out / fp32_file), load_external_data=False)
    fused = attention.fuse_attention(model, export_dims(ranges, batch=1))
    if fused:
        write_atomic(out / f"{spec.name}.{CPU_GRAPH}.onnx", writer=lambda tmp: onnx.save(model, str(tmp)))
    return model, fused


def _with_shapes(path: Path) -> onnx.ModelProto:
    """Load a graph with inferred intermediate types (the fp16 converter needs them); external
    weights are not loaded (fp16.convert_file streams them)."""
    inferred = path.with_name(f".{path.name}.shapes")
    onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
    try:
        return onnx.load(str(inferred), load_external_data=False)
    finally:
        inferred.unlink(missing_ok=True)


def _vocab(ckpt: Checkpoint) -> int:
    pipe = ckpt.pipeline
    return int((pipe.text_encoder or pipe.text_encoder_2).config.vocab_size)


def tool_versions() -> dict[str, str]:
    """Versions of the tools that made the graphs."""
    out = {}
    for name in TOOLS + ("diffusion-engine",):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
