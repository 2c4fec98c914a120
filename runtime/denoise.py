"""The denoising loop: UNet then the fused step graph, E times, with no host math in between."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from diffusion_engine.engine.specs import (
    BLEND,
    COEFFS,
    GUIDANCE_RESCALE,
    GUIDANCE_SCALE,
    IMAGE_LATENTS,
    INITIAL_NOISE,
    INPUT_SCALES,
    MASK,
    NOISE,
    NOISE_PRED,
    SAMPLE,
    SAMPLE_OUT,
    STATE,
    STATE_OUT,
    STEP,
    STEP_OUT,
    TIMESTEP,
    TIMESTEP_OUT,
    TIMESTEPS,
)
from diffusion_engine.runtime.samplers import STATE_SIZE, SamplerPlan
from diffusion_engine.runtime.samplers.plan import initial_latents
from diffusion_engine.runtime.session import Session

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (evaluations done, evaluations in all)


@dataclass(frozen=True)
class LoopInputs:
    """Everything one denoising loop reads: the plan's tables, initial values, noise, text."""

    # Step-graph inputs fixed for the loop: timesteps, input_scales, coeffs as float32 (+ guidance_scale,
    # guidance_rescale; the masked blend's mask, image_latents, initial_noise and blend table).
    tables: dict[str, np.ndarray]
    state: np.ndarray  # float32 [K, N, C, h, w]
    sample: np.ndarray  # float32 [G*N, C, h, w]: the first UNet input
    timestep: np.ndarray  # float32 [1]
    noise: np.ndarray  # float32 [rows, N, C, h, w]; rows = E for noisy plans, else 1 (zeros)
    # UNet inputs fixed for the whole loop: encoder_hidden_states [G*N, seq, hidden], ordered
    # [unconditional; conditional] when guided (and, per family, pooled embeddings, time ids, ...).
    unet_static: dict[str, np.ndarray]

    @property
    def evaluations(self) -> int:
        return int(self.tables[TIMESTEPS].shape[0])


def loop_inputs(
    plan: SamplerPlan, latents: np.ndarray, unet_static: dict[str, np.ndarray], guidance: float | None,
    rng: np.random.Generator, guidance_rescale: float | None = None, image_latents: np.ndarray | None = None,
    mask: np.ndarray | None = None, pure_noise_start: bool = False, as_is: bool = False,
) -> LoopInputs:
    """Initial state and device tables of one loop; per-step noise drawn from rng after the latents.

    `latents` is the initial noise; with `image_latents` (img2img) the loop starts from them noised
    to the plan's first timestep, unless `pure_noise_start` (inpainting at strength 1); with `as_is`
    `latents` are the state itself (a refiner continuing a base's latents: denoising_start). `guidance`
    None runs unguided; `guidance_rescale` (with guidance) feeds the rescaled step graph; `mask`
    ([N, 1, h, w], 1 = repaint, with image_latents) feeds a masked step graph's blend.
    """
    state = np.zeros((STATE_SIZE,) + latents.shape, np.float32)
    state[0] = latents if as_is else initial_latents(plan, latents, None if pure_noise_start else image_latents)
    sample = (plan.input_scales[0] * state[0].astype(np.float64)).astype(np.float32)
    guided = guidance is not None
    if plan.uses_noise.any():
        noise = rng.standard_normal((plan.num_evaluations,) + latents.shape, dtype=np.float32)
    else:
        noise = np.zeros((1,) + latents.shape, np.float32)
    tables = {
        TIMESTEPS: plan.timesteps.astype(np.float32),
        INPUT_SCALES: plan.input_scales.astype(np.float32),
        COEFFS: plan.coeffs.astype(np.float32),
    }
    if guided:
        tables[GUIDANCE_SCALE] = np.array([guidance], np.float32)
    if guided and guidance_rescale is not None:
        tables[GUIDANCE_RESCALE] = np.array([guidance_rescale], np.float32)
    if mask is not None:
        if image_latents is None:
            raise ValueError("the masked blend needs the image latents it keeps")
        tables.update(blend_tables(plan, mask, image_latents.astype(np.float32), latents))
    return LoopInputs(
        tables=tables, state=state, sample=np.concatenate([sample, sample]) if guided else sample,
        timestep=np.array([plan.timesteps[0]], np.float32), noise=noise, unet_static=unet_static,
    )


def blend_tables(plan: SamplerPlan, mask: np.ndarray, image_latents: Any, latents: np.ndarray) -> dict[str, Any]:
    """The masked blend's step-graph inputs: mask, the float32 image latents it keeps (a backend array),
    the initial noise they are re-noised with, the blend table."""
    return {MASK: mask.astype(np.float32), IMAGE_LATENTS: image_latents, INITIAL_NOISE: latents.astype(np.float32),
            BLEND: plan.blend_table().astype(np.float32)}


@dataclass(frozen=True)
class ImageStart:
    """The image-start graph's outputs, as backend arrays (on the device for GPU backends)."""

    image_latents: Any  # float32 [N, C, h, w]: the posterior sample, one row per image
    state: Any  # float32 [K, N, C, h, w]: the loop's initial state
    sample: Any  # float32 [G*N, C, h, w]: the first UNet input


def start_scales(plan: SamplerPlan, pure_noise_start: bool) -> np.ndarray:
    """The image-start graph's START input, float32 (signal, noise, input scale): the plan's initial state
    from the image latents and the initial noise (pure noise with `pure_noise_start`), its first input scale."""
    # initial_latents is linear in (noise, image): its coefficients are its values at the unit vectors.
    signal = initial_latents(plan, 0.0, None if pure_noise_start else 1.0)
    noise = initial_latents(plan, 1.0, None if pure_noise_start else 0.0)
    return np.array([signal, noise, plan.input_scales[0]], np.float32)


def with_image_start(x: LoopInputs, start: ImageStart, plan: SamplerPlan, latents: np.ndarray,
                     mask: np.ndarray | None = None) -> LoopInputs:
    """Loop inputs that start from the image-start graph's state and first UNet input instead of x's host
    start (noise alone); with `mask`, the masked blend's tables keep its image latents."""
    tables = x.tables if mask is None else {**x.tables, **blend_tables(plan, mask, start.image_latents, latents)}
    return replace(x, state=start.state, sample=start.sample, tables=tables)


class HostLoop:
    """The loop for backends that take and return host arrays (ONNX Runtime on the CPU)."""

    def __init__(self, unet: Session, step: Session, upload: Callable[[Any], Any] | None = None):
        self.unet = unet
        self.step = step
        self.upload = upload  # a device backend's host->device copy (ort-cuda): the loop's fixed inputs, once

    def run(self, x: LoopInputs, progress: Progress | None = None) -> tuple[np.ndarray, dict[str, float]]:
        """Run every evaluation; return the final latents and time spent in the UNet and step graph."""
        state, sample, timestep = x.state, x.sample, x.timestep
        fixed, static = {NOISE: x.noise, **x.tables}, x.unet_static
        if self.upload is not None:  # not once per step: the noise alone is E x the latents
            fixed, static = ({k: self.upload(v) for k, v in d.items()} for d in (fixed, static))
        step = np.zeros(1, np.int32)
        spent = {"unet": 0.0, "step": 0.0}
        for e in range(x.evaluations):
            t0 = time.perf_counter()
            noise_pred = self.unet.run({SAMPLE: sample, TIMESTEP: timestep, **static})[NOISE_PRED]
            t1 = time.perf_counter()
            out = self.step.run({NOISE_PRED: noise_pred, STATE: state, STEP: step, **fixed})
            spent["unet"] += t1 - t0
            spent["step"] += time.perf_counter() - t1
            state, sample, timestep, step = out[STATE_OUT], out[SAMPLE_OUT], out[TIMESTEP_OUT], out[STEP_OUT]
            if progress is not None:
                progress(e + 1, x.evaluations)
        # A device backend's state (an OrtValue) has no slicing: its K x latents come back once, at the end.
        return (state if isinstance(state, np.ndarray) else np.asarray(state))[0], spent
