"""The Python API: `Pipeline.load(engine_dir)` then `pipe.generate(prompt, ...)`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from diffusion_engine.engine.manifest import Manifest, read_manifest
from diffusion_engine.engine.specs import (
    COMPONENTS,
    ENCODER_HIDDEN_STATES,
    IMAGES,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LATENTS,
    STEP_GUIDED,
    STEP_GRAPHS,
    STEP_UNGUIDED,
    TEXT_ENCODER,
    UNET,
    VAE_DECODER,
)
from diffusion_engine.runtime.denoise import HostLoop, Progress, loop_inputs
from diffusion_engine.runtime.samplers import SAMPLERS, SamplerPlan, make_plan
from diffusion_engine.runtime.session import OrtCpuSession, Session
from diffusion_engine.runtime.tokenizer import PromptTokenizer

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "ort-cpu")
DEFAULT_SIZE = {"sd1": 512, "sd2": 768}
# The sampler that matches the checkpoint's own scheduler class.
SCHEDULER_CLASSES = {
    "DDIMScheduler": "ddim", "PNDMScheduler": "pndm", "LMSDiscreteScheduler": "lms",
    "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun", "DPMSolverMultistepScheduler": "dpmpp_2m",
    "UniPCMultistepScheduler": "unipc",
}


@dataclass
class GenerationResult:
    """Images as PIL and as uint8 NHWC, the seed that made them, per-stage seconds, parameters."""

    images: list[Image.Image]
    array: np.ndarray
    seed: int | None
    timings: dict[str, float]
    parameters: dict[str, Any] = field(default_factory=dict)


def pick_backend(name: str) -> str:
    """Resolve 'auto' to the best backend available here (ONNX Runtime CPU for now)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    chosen = "ort-cpu" if name == "auto" else name
    logger.info("backend %s (asked for %s)", chosen, name)
    return chosen


class Pipeline:
    """Text-to-image generation from an engine directory; thread-safe, no torch."""

    def __init__(self, engine_dir: Path, manifest: Manifest, sessions: dict[str, Session], backend: str):
        self.engine_dir = engine_dir
        self.manifest = manifest
        self.sessions = sessions
        self.backend = backend
        self.tokenizer = PromptTokenizer.from_manifest(engine_dir, manifest.tokenizer)
        self._plan = lru_cache(maxsize=32)(self._make_plan)

    @classmethod
    def load(cls, engine_dir: str | Path, backend: str = "auto") -> "Pipeline":
        """Open every component of an engine directory on the chosen backend."""
        engine_dir = Path(engine_dir)
        manifest = read_manifest(engine_dir)
        chosen = pick_backend(backend)
        sessions: dict[str, Session] = {}
        for name in COMPONENTS + STEP_GRAPHS:
            entry = manifest.components[name]
            sessions[name] = OrtCpuSession(engine_dir / entry.files["fp32"], entry.spec(name), entry.ranges())
        return cls(engine_dir, manifest, sessions, chosen)

    @property
    def default_scheduler(self) -> str:
        cfg = self.manifest.scheduler_config
        name = SCHEDULER_CLASSES.get(cfg.get("_class_name", ""), "ddim")
        return "dpmpp_2m_karras" if name == "dpmpp_2m" and cfg.get("use_karras_sigmas") else name

    @property
    def default_size(self) -> int:
        b = self.manifest.build
        return min(max(DEFAULT_SIZE.get(self.manifest.family, 512), b.min_size), b.max_size)

    def _make_plan(self, scheduler: str, steps: int) -> SamplerPlan:
        return make_plan(scheduler, self.manifest.scheduler_config, steps)

    def generate(
        self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", steps: int = 30,
        guidance_scale: float = 7.5, scheduler: str | None = None, seed: int | None = None,
        height: int | None = None, width: int | None = None, batch_size: int = 1,
        latents: np.ndarray | None = None, progress: Progress | None = None,
    ) -> GenerationResult:
        """Generate batch_size images per prompt; latents (optional) are the initial noise."""
        start = time.perf_counter()
        prompts, negatives = _prompt_lists(prompt, negative_prompt)
        scheduler = scheduler or self.default_scheduler
        height, width = height or self.default_size, width or self.default_size
        n = len(prompts) * batch_size
        self._check(steps, guidance_scale, scheduler, height, width, batch_size, n)
        plan = self._plan(scheduler, steps)
        if seed is None and latents is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0])
        rng = np.random.default_rng(seed)
        shape = (n, self.manifest.dims.latent_channels, height // self.manifest.dims.vae_scale_factor,
                 width // self.manifest.dims.vae_scale_factor)
        latents = _initial_latents(latents, shape, rng)
        guided = guidance_scale > 1.0
        timings: dict[str, float] = {}

        t = time.perf_counter()
        # Each prompt once per image: the embeddings come out in the UNet's batch order, so no
        # host op touches them (on GPU backends they stay on the device).
        per_image = [p for p in (negatives + prompts if guided else prompts) for _ in range(batch_size)]
        ids = self.tokenizer.encode(per_image)
        timings["tokenize"] = time.perf_counter() - t
        t = time.perf_counter()
        text = self.sessions[TEXT_ENCODER].run({INPUT_IDS: ids})[LAST_HIDDEN_STATE]
        timings["text_encoder"] = time.perf_counter() - t

        loop = HostLoop(self.sessions[UNET], self.sessions[STEP_GUIDED if guided else STEP_UNGUIDED])
        inputs = loop_inputs(plan, latents, {ENCODER_HIDDEN_STATES: text}, guidance_scale if guided else None, rng)
        t = time.perf_counter()
        final, spent = loop.run(inputs, progress)
        timings["denoise"] = time.perf_counter() - t
        timings["unet"], timings["step_graph"] = spent["unet"], spent["step"]
        timings["unet_per_step"] = spent["unet"] / plan.num_evaluations

        t = time.perf_counter()
        pixels = np.asarray(self.sessions[VAE_DECODER].run({LATENTS: final})[IMAGES])  # the one device->host copy
        timings["vae_decoder"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - start
        params = {
            "prompt": prompts if len(prompts) > 1 else prompts[0],
            "negative_prompt": negatives if len(negatives) > 1 else negatives[0],
            "steps": steps, "guidance_scale": guidance_scale, "scheduler": scheduler, "seed": seed,
            "height": height, "width": width, "batch_size": batch_size, "backend": self.backend,
        }
        return GenerationResult([Image.fromarray(p) for p in pixels], pixels, seed, timings, params)

    def _check(self, steps: Any, guidance: Any, scheduler: str, height: int, width: int, batch_size: int, n: int) -> None:
        """Every request error, before any model runs."""
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if not isinstance(guidance, (int, float)) or not np.isfinite(guidance) or guidance < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance!r}")
        if scheduler not in SAMPLERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; valid: {', '.join(SAMPLERS)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        b, multiple = self.manifest.build, self.manifest.dims.size_multiple
        for label, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v % 8:
                raise ValueError(f"{label} {v!r} must be a multiple of 8")
            if not b.min_size <= v <= b.max_size or v % multiple:
                raise ValueError(
                    f"{label} {v} is outside what this engine was built for: {b.min_size}..{b.max_size} "
                    f"in multiples of {multiple}"
                )
        if n > b.max_batch:
            raise ValueError(f"{n} images per call (prompts x batch_size) exceeds the engine's max batch {b.max_batch}")

    def close(self) -> None:
        for s in self.sessions.values():
            s.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prompt_lists(prompt: str | Sequence[str], negative: str | Sequence[str]) -> tuple[list[str], list[str]]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    if len(negatives) != len(prompts) or not all(isinstance(p, str) for p in negatives):
        raise ValueError(f"negative_prompt must be a string or a list of {len(prompts)} strings, got {negative!r}")
    return prompts, negatives


def _initial_latents(latents: np.ndarray | None, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """The caller's initial noise (shape checked) or standard-normal noise from the seeded rng."""
    if latents is None:
        return rng.standard_normal(shape, dtype=np.float32)
    latents = np.asarray(latents)
    if latents.shape != shape:
        raise ValueError(f"latents have shape {latents.shape}; this request needs {shape}")
    if not np.issubdtype(latents.dtype, np.floating) or not np.isfinite(latents).all():
        raise ValueError("latents must be finite floating-point values")
    return latents.astype(np.float32)
