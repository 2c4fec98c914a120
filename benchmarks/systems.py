"""The systems a bench compares: ours (the engine's Pipeline) and OpenVINO on the same ONNX graphs.

Every system has the same surface: `prepare(case, inputs)` (untimed: compile, convert inputs),
`run(case, inputs) -> RunOutput` (one timed run: an image batch end to end, or one UNet call)
and `close()`. Stage times are recorded around the public session calls, from the outside.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np

from diffusion_engine.benchmarks.measure import StageTimes, TimedSession, rss_bytes
from diffusion_engine.engine.manifest import read_manifest
from diffusion_engine.engine.specs import (
    DECODERS,
    DEFAULT_DECODER,
    ENCODER_HIDDEN_STATES,
    IMAGES,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LATENTS,
    NOISE_PRED,
    STEP_GRAPHS,
    STEP_GUIDED,
    STEP_UNGUIDED,
    TEXT_ENCODER,
    TIMESTEP,
    TINY_VAE_DECODER,
    UNET,
    VAE_DECODER,
)
from diffusion_engine.runtime.denoise import HostLoop, loop_inputs
from diffusion_engine.runtime.pipeline import Pipeline
from diffusion_engine.runtime.samplers import make_plan
from diffusion_engine.runtime.session import OrtCpuSession
from diffusion_engine.runtime.tokenizer import PromptTokenizer

logger = logging.getLogger(__name__)

E2E, UNET_ONLY = "e2e", "unet"
MODES = (E2E, UNET_ONLY)
STAGES = ("tokenize", "text_encoder", "unet", "step_graph", "vae_decoder", "end_to_end")
PER_CALL = ("unet", "step_graph")  # summarised per call; other stages per run
MODEL_STAGES = ("text_encoder", "unet", "vae_decoder")
# Both decoders time as the vae_decoder stage: a case names the one it ran (Case.decoder).
STAGE_OF = {TEXT_ENCODER: "text_encoder", UNET: "unet", VAE_DECODER: "vae_decoder", TINY_VAE_DECODER: "vae_decoder",
            **{name: "step_graph" for name in STEP_GRAPHS}}


@dataclass(frozen=True)
class Case:
    """One measured configuration: image size, images per call, denoising steps (None: UNet only), and the
    decoder (generate's decoder=: "full" or "tiny"; None: UNet only)."""

    mode: str
    height: int
    width: int
    batch: int
    steps: int | None
    decoder: str | None = DEFAULT_DECODER

    @property
    def label(self) -> str:
        tail = f" {self.steps} steps" if self.steps else " one guided UNet call"
        return f"{self.width}x{self.height} batch {self.batch}{tail}{decoder_tail(self.decoder)}"

    @property
    def decoder_component(self) -> str:
        """The component that decodes this case's images."""
        return DECODERS[self.decoder or DEFAULT_DECODER]


def decoder_tail(decoder: str | None) -> str:
    """A case label's note of a decoder other than the default."""
    return f" {decoder} decoder" if decoder not in (None, DEFAULT_DECODER) else ""


@dataclass
class CaseInputs:
    """What every system is given for one case: the same latents, prompt and UNet feeds."""

    prompt: str
    negative_prompt: str
    guidance_scale: float
    scheduler: str
    latents: np.ndarray  # initial noise [batch, C, h, w]
    unet_feeds: dict[str, np.ndarray]  # one guided UNet call: sample [2*batch, ...], timestep, text


@dataclass
class RunOutput:
    calls: dict[str, list[float]]
    output: np.ndarray  # uint8 images (e2e) or the noise prediction (UNet only)


class System(Protocol):
    name: str
    device: str
    load_rss_bytes: int

    def prepare(self, case: Case, inputs: CaseInputs) -> None: ...

    def run(self, case: Case, inputs: CaseInputs) -> RunOutput: ...

    def close(self) -> None: ...


def component_dims(manifest: Any, case: Case, guided: bool) -> dict[str, dict[str, int]]:
    """The named axes of each component for one case (UNet rows doubled by guidance)."""
    d = manifest.dims
    rows = getattr(d, "cfg_batch", 2) * case.batch if guided else case.batch
    lat = {"latent_height": case.height // d.vae_scale_factor, "latent_width": case.width // d.vae_scale_factor}
    return {
        TEXT_ENCODER: {"batch": rows, "sequence": d.max_text_length},
        UNET: {"batch": rows, "sequence": d.max_text_length, **lat},
        case.decoder_component: {"batch": case.batch, **lat},
    }


def component_shapes(manifest: Any, case: Case, guided: bool) -> dict[str, dict[str, tuple[int, ...]]]:
    """Concrete input shapes of each component for one case, from the recorded specs."""
    dims = component_dims(manifest, case, guided)
    return {name: {t.name: t.shape(dims[name]) for t in manifest.components[name].spec(name).inputs} for name in dims}


def unet_feeds(manifest: Any, case: Case, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs of one guided UNet call: noise latents and text, timestep 500, plausible size ids."""
    feeds = {}
    for name, shape in component_shapes(manifest, case, guided=True)[UNET].items():
        if name == TIMESTEP:
            feeds[name] = np.full(shape, 500.0, np.float32)
        elif name == "time_ids":  # SDXL: original size, crop, target size
            row = [case.height, case.width, 0, 0, case.height, case.width]
            feeds[name] = np.tile(np.array(row, np.float32), (shape[0], 1))
        else:
            feeds[name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


class OursSystem:
    """The engine itself: Pipeline.load on the chosen backend, its sessions wrapped in place by timers."""

    name = "ours"

    def __init__(self, engine_dir: Path, backend: str, unfused: bool = False):
        """unfused: ort-cpu on the plain fp32 graphs (attention as the exporter wrote it: MatMul, Softmax,
        MatMul over the full scores), what ort-cpu ran before the export wrote attention-fused CPU graphs."""
        before = rss_bytes()
        self.pipe = Pipeline.load(engine_dir, backend=backend)
        if unfused:
            if self.pipe.backend != "ort-cpu":
                raise ValueError(f"the ours-unfused baseline runs on ort-cpu; this bench runs {self.pipe.backend}")
            self.name = "ours-unfused"
            for name, session in list(self.pipe.sessions.items()):
                entry = self.pipe.manifest.components[name]
                if entry.cpu_key() != "fp32":  # in place: the loop reads this dict
                    session.close()
                    self.pipe.sessions[name] = OrtCpuSession(Path(engine_dir) / entry.files["fp32"], entry.spec(name),
                                                             entry.ranges())
        # TensorRT sessions only queue work on their stream: a stage's time is until that work is done.
        streams = {id(s.stream): s.stream for s in self.pipe.sessions.values() if getattr(s, "stream", None)}
        self.times = StageTimes(sync=next(iter(streams.values())).synchronize if len(streams) == 1 else None)
        # In place: the backend's loop reads the same dict, so UNet and step-graph calls are timed too.
        for name, session in list(self.pipe.sessions.items()):
            if name in STAGE_OF:  # text-to-image stages (the VAE encoder runs for image requests only)
                self.pipe.sessions[name] = TimedSession(session, STAGE_OF[name], self.times)
        self.device = "cpu" if self.pipe.backend == "ort-cpu" else "cuda"
        self.load_rss_bytes = rss_bytes() - before

    def prepare(self, case: Case, inputs: CaseInputs) -> None:
        pass

    def run(self, case: Case, inputs: CaseInputs) -> RunOutput:
        self.times.reset()
        if case.mode == UNET_ONLY:
            out = self.pipe.sessions[UNET].run(inputs.unet_feeds)[NOISE_PRED]
            return RunOutput(dict(self.times.calls), np.asarray(out))
        start = time.perf_counter()
        result = self.pipe.generate(
            inputs.prompt, inputs.negative_prompt, steps=case.steps, guidance_scale=inputs.guidance_scale,
            scheduler=inputs.scheduler, height=case.height, width=case.width, batch_size=case.batch,
            latents=inputs.latents, decoder=case.decoder or DEFAULT_DECODER,
        )
        total = time.perf_counter() - start
        calls = {**self.times.calls, "tokenize": [result.timings["tokenize"]], "end_to_end": [total]}
        return RunOutput(calls, result.array)

    def close(self) -> None:
        self.pipe.close()


class OpenVinoSession:
    """One compiled OpenVINO model with static input shapes, behind the session `run(feeds)` surface."""

    def __init__(self, core: Any, path: Path, shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any]):
        import openvino as ov

        model = core.read_model(str(path))
        model.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})
        compiled = core.compile_model(model, "CPU", dict(config))
        self._request = compiled.create_infer_request()
        self._outputs = [(port, port.get_any_name()) for port in compiled.outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self._request.infer(dict(feeds))
        return {name: np.array(result[port]) for port, name in self._outputs}  # copies: buffers are reused

    def close(self) -> None:
        self._request = None


class OpenVinoSystem:
    """OpenVINO (CPU plugin) on the engine's fp32 ONNX graphs, compiled per case for static shapes,
    driven by the runtime's own host loop with our step graph on ONNX Runtime between UNet calls."""

    device = "cpu"

    def __init__(self, engine_dir: Path, threads: int, precision: str = "f32"):
        import openvino as ov

        before = rss_bytes()
        self.name = "openvino" if precision == "f32" else f"openvino-{precision}"
        self.core = ov.Core()
        # OpenVINO runs fp32 graphs in bf16 on CPUs with AVX512_BF16/AMX unless told otherwise.
        self.config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                       "INFERENCE_NUM_THREADS": threads}
        self.engine_dir = Path(engine_dir)
        self.manifest = read_manifest(self.engine_dir)
        self.tokenizer = PromptTokenizer.from_manifest(self.engine_dir, self.manifest.tokenizer)
        self.times = StageTimes()
        self.sessions: dict[str, Any] = {}
        for name in (n for n in STEP_GRAPHS if n in self.manifest.components):  # models: compiled per case
            entry = self.manifest.components[name]
            step = OrtCpuSession(self.engine_dir / entry.files["fp32"], entry.spec(name), entry.ranges(), threads)
            self.sessions[name] = TimedSession(step, "step_graph", self.times)
        self._compiled_for: tuple | None = None
        self.load_rss_bytes = rss_bytes() - before

    def prepare(self, case: Case, inputs: CaseInputs) -> None:
        m = self.manifest
        shapes = component_shapes(m, case, guided=case.mode == UNET_ONLY or inputs.guidance_scale > 1.0)
        key = (case.mode, tuple(sorted((k, tuple(sorted(v.items()))) for k, v in shapes.items())))
        if key == self._compiled_for:
            return
        for name in (TEXT_ENCODER, UNET, *DECODERS.values()):
            old = self.sessions.pop(name, None)
            if old is not None:
                old.close()
        names = (UNET,) if case.mode == UNET_ONLY else (TEXT_ENCODER, UNET, case.decoder_component)
        start = time.perf_counter()
        for name in names:
            session = OpenVinoSession(self.core, self.engine_dir / m.components[name].files["fp32"], shapes[name], self.config)
            self.sessions[name] = TimedSession(session, STAGE_OF[name], self.times)
        self._compiled_for = key
        logger.info("openvino: compiled %s for %s in %.1f s", ", ".join(names), case.label, time.perf_counter() - start)

    def run(self, case: Case, inputs: CaseInputs) -> RunOutput:
        self.times.reset()
        if case.mode == UNET_ONLY:
            out = self.sessions[UNET].run(inputs.unet_feeds)[NOISE_PRED]
            return RunOutput(dict(self.times.calls), out)
        start = time.perf_counter()
        pixels = self._generate(case, inputs)
        return RunOutput({**self.times.calls, "end_to_end": [time.perf_counter() - start]}, pixels)

    def _generate(self, case: Case, inputs: CaseInputs) -> np.ndarray:
        """Pipeline.generate's flow on these sessions: tokenize, encode, host loop, decode."""
        guided = inputs.guidance_scale > 1.0
        t = time.perf_counter()
        prompts = ([inputs.negative_prompt] * case.batch if guided else []) + [inputs.prompt] * case.batch
        ids = self.tokenizer.encode(prompts)
        self.times.add("tokenize", time.perf_counter() - t)
        text = self.sessions[TEXT_ENCODER].run({INPUT_IDS: ids})[LAST_HIDDEN_STATE]
        plan = make_plan(inputs.scheduler, self.manifest.scheduler_config, case.steps)
        rng = np.random.default_rng(0)  # only noisy samplers draw from it
        x = loop_inputs(plan, inputs.latents, {ENCODER_HIDDEN_STATES: text}, inputs.guidance_scale if guided else None, rng)
        loop = HostLoop(self.sessions[UNET], self.sessions[STEP_GUIDED if guided else STEP_UNGUIDED])
        final, _ = loop.run(x)
        return self.sessions[case.decoder_component].run({LATENTS: np.ascontiguousarray(final)})[IMAGES]

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()
