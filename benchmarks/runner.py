"""The bench: every case runs every system in turn, alternating order run by run, then summarises.

Alternation (ours, theirs, theirs, ours, ...) spreads machine drift and warm-cache effects over
all systems instead of charging them to whichever ran last. All systems get the same latents,
prompt, sampler, steps and guidance in one process; RSS is sampled while each system runs.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from diffusion_engine.benchmarks import flops as flops_mod
from diffusion_engine.benchmarks.measure import (
    RssMonitor, aggregate, machine, psnr, ratio, rss_bytes, sha256_file, versions,
)
from diffusion_engine.benchmarks.schema import SCHEMA_VERSION, validate
from diffusion_engine.benchmarks.systems import (
    E2E, MODEL_STAGES, PER_CALL, STAGE_OF, STAGES, UNET_ONLY, Case, CaseInputs, OpenVinoSystem, OursSystem, System,
    component_dims, unet_feeds,
)
from diffusion_engine.engine.manifest import MANIFEST, read_manifest
from diffusion_engine.engine.specs import DECODERS, DEFAULT_DECODER, TEXT_ENCODER, TINY_VAE_DECODER, UNET
from diffusion_engine.runtime.session import cpu_threads

logger = logging.getLogger(__name__)

BASELINES = ("diffusers", "openvino", "openvino-bf16", "ours-unfused")
PROMPT = "a photo of an astronaut riding a horse"
RANDOM_WEIGHTS_NOTE = "random-weight checkpoint: the figures are for latency and memory only, never image quality"


@dataclass(frozen=True)
class Settings:
    """What one `engine-bench` invocation measures."""

    engine: Path
    backend: str = "auto"
    sizes: tuple[tuple[int, int], ...] = ((512, 512),)
    batches: tuple[int, ...] = (1,)
    steps: tuple[int, ...] = (30,)
    scheduler: str | None = None
    guidance_scale: float = 7.5
    warmup: int = 1
    runs: int = 5
    baselines: tuple[str, ...] = ()
    checkpoint: str | None = None
    mode: str = E2E
    prompt: str = PROMPT
    seed: int = 0
    decoders: tuple[str, ...] = (DEFAULT_DECODER,)  # e2e: each case once per decoder (generate's decoder=)
    tiny_vae: str | None = None  # the AutoencoderTiny folder of the diffusers baseline (default: the manifest's)
    one_at_a_time: bool = False  # load, measure and close each system in turn instead of all together

    def __post_init__(self) -> None:
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ValueError(f"unknown baseline {bad[0]!r}; valid: {', '.join(BASELINES)}, none")
        if self.runs < 1 or self.warmup < 0:
            raise ValueError(f"--runs must be >= 1 and --warmup >= 0, got {self.runs} and {self.warmup}")
        if self.mode == E2E and (not self.steps or min(self.steps) < 1):
            raise ValueError(f"--steps must be integers >= 1, got {list(self.steps)}")
        bad = [d for d in self.decoders if d not in DECODERS]
        if not self.decoders or bad:
            raise ValueError(f"--decoders: unknown decoder {(bad or [''])[0]!r}; valid: {', '.join(DECODERS)}")
        if self.mode == UNET_ONLY and self.decoders != (DEFAULT_DECODER,):
            raise ValueError(f"--decoders {','.join(self.decoders)}: unet mode decodes nothing; use --mode e2e")

    def cases(self) -> list[Case]:
        """Every size x batch x steps, each with every decoder (e2e) one after the other in the same run."""
        if self.mode == UNET_ONLY:
            return [Case(self.mode, h, w, b, None, None) for (h, w) in self.sizes for b in self.batches]
        return [Case(self.mode, h, w, b, s, d) for (h, w) in self.sizes for b in self.batches for s in self.steps
                for d in self.decoders]


def case_inputs(case: Case, manifest: Any, settings: Settings, scheduler: str) -> CaseInputs:
    """Seeded inputs shared by every system: initial latents and one guided UNet call's feeds."""
    rng = np.random.default_rng(settings.seed)
    d = manifest.dims
    shape = (case.batch, d.latent_channels, case.height // d.vae_scale_factor, case.width // d.vae_scale_factor)
    latents = rng.standard_normal(shape, dtype=np.float32)
    return CaseInputs(settings.prompt, "", settings.guidance_scale, scheduler, latents, unet_feeds(manifest, case, rng))


def case_flops(engine: Path, manifest: Any, case: Case, guided: bool) -> dict[str, dict[str, Any]]:
    """FLOPs of one call of each component at the case's shapes, from the engine's fp32 ONNX."""
    dims = component_dims(manifest, case, guided)
    names = (UNET,) if case.mode == UNET_ONLY else (TEXT_ENCODER, UNET, case.decoder_component)
    # Keyed by stage: the tiny decoder's FLOPs are the vae_decoder stage's in its cases.
    return {STAGE_OF[n]: flops_mod.graph_flops(engine / manifest.components[n].files["fp32"], dims[n]).as_dict()
            for n in names}


def system_factories(settings: Settings, manifest: Any) -> list[Callable[[str], System]]:
    """One constructor per system, ours first, each given the sampler; every argument is checked here,
    before any system loads (the diffusers baseline from the source checkpoint)."""
    threads = cpu_threads()
    tiny = "tiny" in settings.decoders  # an engine without the tiny decoder is refused by run_bench
    factories: list[Callable[[str], System]] = [lambda scheduler: OursSystem(settings.engine, settings.backend)]
    for name in settings.baselines:
        if name == "diffusers":
            from diffusion_engine.benchmarks.baselines import DiffusersSystem

            checkpoint = settings.checkpoint or manifest.source.get("checkpoint")
            if not checkpoint or not Path(checkpoint).is_dir():
                raise ValueError(f"diffusers baseline: source checkpoint {checkpoint!r} is not a local folder; pass --checkpoint DIR")
            tiny_vae = (settings.tiny_vae or manifest.source.get("tiny_vae")) if tiny else None
            if tiny and (not tiny_vae or not Path(tiny_vae).is_dir()):
                raise ValueError(f"diffusers baseline: tiny VAE {tiny_vae!r} is not a local folder; pass --tiny-vae DIR")
            factories.append(lambda scheduler, c=checkpoint, t=tiny_vae: DiffusersSystem(c, settings.mode, scheduler, threads, t))
        elif name == "ours-unfused":
            factories.append(lambda scheduler: OursSystem(settings.engine, settings.backend, unfused=True))
        else:
            precision = "f32" if name == "openvino" else "bf16"
            factories.append(lambda scheduler, p=precision: OpenVinoSystem(settings.engine, threads, p))
    return factories


def make_systems(settings: Settings, manifest: Any) -> tuple[list[System], str]:
    """Ours first, then the baselines asked for, all loaded; the sampler (the engine's default unless given)."""
    factories = system_factories(settings, manifest)
    ours = factories[0]("")
    scheduler = settings.scheduler or ours.pipe.default_scheduler
    return [ours] + [make(scheduler) for make in factories[1:]], scheduler


def measure_case(systems: list[System], case: Case, inputs: CaseInputs, warmup: int, runs: int,
                 say: Callable[[str], None], reference: np.ndarray | None = None,
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Warm up and run every system `runs` times, alternating order; summarise per system, each one's
    agreement against `reference` (ours' output) or else against the first system's. Returns the
    summaries and each system's last output."""
    warm: dict[str, int] = {}  # RSS added by compiling and warming up: lazily touched weights, arenas
    for s in systems:
        before = rss_bytes()
        s.prepare(case, inputs)
        warm[s.name] = rss_bytes() - before
    warm_case = Case(case.mode, case.height, case.width, case.batch, min(case.steps, 2) if case.steps else None)
    for i in range(warmup):
        for s in systems if i % 2 == 0 else systems[::-1]:
            before = rss_bytes()
            s.run(warm_case, inputs)
            warm[s.name] += rss_bytes() - before
    records: dict[str, list[dict[str, list[float]]]] = {s.name: [] for s in systems}
    peaks: dict[str, int] = {s.name: 0 for s in systems}
    increase: dict[str, int] = {s.name: 0 for s in systems}
    outputs: dict[str, np.ndarray] = {}
    for r in range(runs):
        for s in systems if r % 2 == 0 else systems[::-1]:
            with RssMonitor() as mon:
                before = mon.peak
                out = s.run(case, inputs)
            records[s.name].append(out.calls)
            peaks[s.name] = max(peaks[s.name], mon.peak)
            increase[s.name] = max(increase[s.name], mon.peak - before)
            outputs[s.name] = out.output
            e2e = out.calls.get("end_to_end") or out.calls.get("unet")
            say(f"  run {r + 1}/{runs} {s.name}: {sum(e2e):.3f} s")
    result = {}
    for s in systems:
        summary = _system_summary(s, case, records[s.name], peaks[s.name], increase[s.name])
        summary["warm_rss_bytes"] = int(warm[s.name])
        if reference is not None:
            summary["agreement"] = _agreement(case, reference, outputs[s.name])
        elif s.name != systems[0].name:
            summary["agreement"] = _agreement(case, outputs[systems[0].name], outputs[s.name])
        result[s.name] = summary
    return result, outputs


def _system_summary(s: System, case: Case, runs: list[dict[str, list[float]]], peak: int, increase: int) -> dict[str, Any]:
    stages = aggregate(runs, PER_CALL)
    e2e = stages.get("end_to_end")
    overhead = None
    if case.mode == E2E and all(m in r for r in runs for m in MODEL_STAGES):
        # (The TensorRT loop queues UNet calls inside CUDA graphs: no per-call times, no overhead figure.)
        # Time outside model calls: host loop, tokenisation, step graph / scheduler, copies, conversions.
        fractions = [1 - sum(sum(r.get(m, [])) for m in MODEL_STAGES) / r["end_to_end"][0] for r in runs]
        overhead = {"p50_fraction": float(np.median(fractions)), "max_fraction": float(max(fractions))}
    device_memory = getattr(s, "device_memory_bytes", lambda: None)()
    return {
        "device": s.device,
        "stages": {k: stages[k] for k in STAGES if k in stages},
        "images_per_second": case.batch / e2e["p50"] if e2e else None,
        "overhead": overhead,
        "load_rss_bytes": int(s.load_rss_bytes),
        "peak_rss_bytes": int(peak),
        "run_rss_increase_bytes": int(increase),
        "device_memory_bytes": device_memory,
    }


def _agreement(case: Case, ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    """Same weights and inputs, so outputs should agree: PSNR of images, relative error of a UNet call."""
    if case.mode == UNET_ONLY:
        a, b = ours.astype(np.float64), theirs.astype(np.float64)
        return {"rel_error": float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))}
    return {"psnr_db": min(psnr(ours, theirs), 999.0)}


def add_figures(case_result: dict[str, Any], case_flops_: dict[str, dict[str, Any]], gpu_name: str | None) -> None:
    """Achieved TFLOP/s per model stage (and fraction of fp16 peak on a GPU); ratios theirs / ours."""
    peak = flops_mod.fp16_peak_tflops(gpu_name) if gpu_name else None
    systems = case_result["systems"]
    for summary in systems.values():
        achieved, fraction = {}, {}
        for stage in MODEL_STAGES:
            if stage in case_flops_ and stage in summary["stages"]:
                tflops = case_flops_[stage]["flops"] / summary["stages"][stage]["p50"] / 1e12
                achieved[stage] = tflops
                fraction[stage] = tflops / peak if (peak and summary["device"] == "cuda") else None
        summary["achieved_tflops"] = achieved
        summary["fraction_of_fp16_peak"] = fraction
    ours = systems["ours"]["stages"]
    case_result["ratios"] = {
        name: {stage: ratio(s["stages"].get(stage, {}).get("p50"), ours.get(stage, {}).get("p50"))
               for stage in STAGES if stage in ours and stage in s["stages"]}
        for name, s in systems.items() if name != "ours"
    }


def engine_info(engine: Path, manifest: Any) -> dict[str, Any]:
    checkpoint = manifest.source.get("checkpoint")
    info: dict[str, Any] = {}
    for marker in ("bench_checkpoint.json", "tiny_checkpoint.json"):
        path = Path(checkpoint or "") / marker
        if checkpoint and path.is_file():
            info = {"builder": json.loads(path.read_text()), "random_weights": True}
    return {
        "dir": str(engine), "manifest_sha256": sha256_file(engine / MANIFEST), "family": manifest.family,
        "source_checkpoint": checkpoint, "source_digest": manifest.source.get("digest"),
        "parameters": {k: v.parameters for k, v in manifest.components.items() if v.parameters},
        "random_weights": info.get("random_weights", False), "checkpoint_info": info.get("builder"),
    }


def run_bench(settings: Settings, say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Measure every case on every system; return the result document (checked against the schema)."""
    engine = Path(settings.engine)
    manifest = read_manifest(engine)
    started = dt.datetime.now(dt.timezone.utc)
    threads = cpu_threads()
    mach = machine(threads)
    gpu_name = mach["gpus"][0]["name"] if mach["gpus"] else None
    if "tiny" in settings.decoders and TINY_VAE_DECODER not in manifest.components:
        raise ValueError(f"--decoders tiny: {settings.engine} has no {TINY_VAE_DECODER}; export it with "
                         "engine-export --tiny-vae PATH")
    guided = settings.mode == UNET_ONLY or settings.guidance_scale > 1.0
    per_case = [dict(case=case, flops=case_flops(engine, manifest, case, guided), systems={}) for case in settings.cases()]
    if settings.one_at_a_time:
        scheduler = _measure_one_system_at_a_time(settings, manifest, per_case, say)
    else:
        systems, scheduler = make_systems(settings, manifest)
        try:
            for entry in per_case:
                case = entry["case"]
                say(f"{case.label}: {', '.join(s.name for s in systems)}")
                inputs = case_inputs(case, manifest, settings, scheduler)
                entry["systems"], _ = measure_case(systems, case, inputs, settings.warmup, settings.runs, say)
        finally:
            for s in systems:
                s.close()
    results = []
    for entry in per_case:
        result = {**asdict(entry["case"]), "flops": entry["flops"], "systems": entry["systems"]}
        add_figures(result, result["flops"], gpu_name)
        results.append(result)
    mach["load_average_end"] = list(os.getloadavg())
    doc = {
        "schema_version": SCHEMA_VERSION, "tool": "engine-bench",
        "created": started.isoformat(timespec="seconds"),
        "duration_s": (dt.datetime.now(dt.timezone.utc) - started).total_seconds(),
        "command": " ".join(["engine-bench"] + sys.argv[1:]) if sys.argv else "engine-bench",
        "machine": mach, "versions": versions(), "engine": engine_info(engine, manifest),
        "settings": {**_settings_dict(settings), "scheduler": scheduler, "threads": threads},
        "cases": results, "notes": notes(settings, engine_info(engine, manifest), mach),
    }
    validate(doc)
    return doc


def _measure_one_system_at_a_time(settings: Settings, manifest: Any, per_case: list[dict[str, Any]],
                                  say: Callable[[str], None]) -> str:
    """--one-at-a-time: load one system, run every case on it, close it, then the next, for models that do not
    fit in memory twice (SDXL's fp32 UNet is 10 GB in ONNX Runtime and again in PyTorch). Ours runs first;
    its outputs are what the others' agreement is measured against. Returns the sampler."""
    factories = system_factories(settings, manifest)  # every argument checked before anything loads
    scheduler = settings.scheduler
    reference: list[np.ndarray] = []
    for i, make in enumerate(factories):
        system = make(scheduler or "")
        try:
            if scheduler is None:
                scheduler = system.pipe.default_scheduler
            for j, entry in enumerate(per_case):
                case = entry["case"]
                say(f"{case.label}: {system.name} (one system at a time)")
                result, outputs = measure_case([system], case, case_inputs(case, manifest, settings, scheduler),
                                               settings.warmup, settings.runs, say, reference[j] if i else None)
                entry["systems"].update(result)
                if i == 0:
                    reference.append(outputs[system.name])
        finally:
            system.close()
            del system
    return scheduler


def _settings_dict(s: Settings) -> dict[str, Any]:
    d = asdict(s)
    d["engine"] = str(s.engine)
    d["sizes"] = [list(x) for x in s.sizes]
    d["batches"], d["steps"], d["baselines"] = list(s.batches), list(s.steps), list(s.baselines)
    d["decoders"] = list(s.decoders)
    return d


def notes(settings: Settings, engine: dict[str, Any], mach: dict[str, Any]) -> list[str]:
    """What a reader must know to read the figures right."""
    out = []
    if engine["random_weights"]:
        out.append(RANDOM_WEIGHTS_NOTE)
    if settings.one_at_a_time:
        out.append(f"one system at a time (--one-at-a-time): each system loaded, run on every case and closed before the "
                   f"next, no alternation, so machine drift between systems is not spread; {settings.runs} measured runs "
                   f"after {settings.warmup} warm-up runs (warm-ups use at most 2 steps); p50/p90 of per-call stages "
                   f"(unet, step_graph) pool every call")
    else:
        out.append(f"alternating order run by run; {settings.runs} measured runs after {settings.warmup} warm-up runs "
                   f"(warm-ups use at most 2 steps); p50/p90 of per-call stages (unet, step_graph) pool every call")
    loaded = "only that system is loaded" if settings.one_at_a_time else "every system is loaded in the one process"
    out.append(f"memory: peak_rss_bytes is the whole process ({loaded}); "
               "load_rss_bytes is what constructing a system added, warm_rss_bytes what its compile and warm-up runs "
               "for the case added (mmap-loaded weights become resident only when first used), "
               "run_rss_increase_bytes the largest rise during one measured run")
    if not mach["gpus"]:
        out.append("CPU only: device memory and fraction of fp16 peak are null")
    if "diffusers" in settings.baselines:
        out.append("diffusers: eager PyTorch (SDPA attention), fp32 on CPU / fp16 on GPU, torch threads = ORT threads; "
                   "its step_graph stage is scheduler.step (guidance is in the pipeline body), its tokenize stage the "
                   "tokenizer calls, its vae_decoder stage vae.decode without post-processing")
    if "tiny" in settings.decoders:
        out.append("tiny decoder cases: ours decodes with the engine's tiny_vae_decoder graph (engine-export --tiny-vae), "
                   "diffusers with the same AutoencoderTiny (pipe.vae = AutoencoderTiny); their vae_decoder stage is that "
                   "decoder")
    if any(b.startswith("openvino") for b in settings.baselines):
        out.append("openvino: CPU plugin on the engine's fp32 ONNX reshaped to static shapes and compiled per case "
                   "(compile time not measured), PERFORMANCE_HINT=LATENCY, INFERENCE_PRECISION_HINT=f32 for 'openvino' "
                   "(its default on AVX512_BF16/AMX CPUs is bf16: 'openvino-bf16'); our step graph on ONNX Runtime")
    if "ours-unfused" in settings.baselines:
        out.append("ours-unfused: ours on the plain fp32 graphs (attention as MatMul, Softmax, MatMul over the full "
                   "[batch, heads, Sq, Skv] scores), what ort-cpu ran before the export's attention-fused CPU graphs")
    loads = [mach["load_average_start"][0], mach.get("load_average_end", [0.0])[0]]
    if max(loads) > 0.5 * mach["cpu_affinity"]:
        out.append(f"the machine was shared (1-minute load average {loads[0]:.1f} at the start, {loads[1]:.1f} at "
                   f"the end, on {mach['cpu_affinity']} CPUs): expect noise; compare ratios within a run, not across runs")
    return out
