"""Latent consistency sampling (LCMScheduler): consistency-function jumps to x0, re-noised between steps."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .ddim import _alpha_bar_at, alpha_noising
from .plan import Built, Evaluation, eps_and_x0, model_output, noise, slot
from .schedule import alphas_cumprod

_SIGMA_DATA = 0.5  # the consistency parametrisation's data scale (Song et al. 2023), fixed in diffusers


def lcm_timesteps(settings: Mapping[str, Any], steps: int, strength: float = 1.0) -> np.ndarray:
    """Descending timesteps: `steps` evenly spaced indices into the distillation schedule (k * i - 1).

    img2img `strength` keeps the schedule's first int(original_inference_steps * strength) points, as
    LCMScheduler.set_timesteps(strength=...) does: every step still runs, from a lower timestep.
    """
    original, count = settings["original_inference_steps"], settings["num_train_timesteps"]
    if isinstance(original, bool) or not isinstance(original, int) or not 1 <= original <= count:
        raise ValueError(f"original_inference_steps={original!r} must be an int in [1, {count}]")
    length = int(original * strength)
    if steps > length:
        raise ValueError(
            f"steps={steps} exceeds original_inference_steps={original}, the LCM schedule's length; "
            f"use at most {original}" if strength == 1.0 else
            f"steps={steps} exceeds int(original_inference_steps x strength) = int({original} x {strength}) = "
            f"{length}, the LCM schedule's length at this strength; use at most {length} steps or a higher strength"
        )
    origin = (np.arange(1, length + 1) * (count // original) - 1)[::-1]
    picks = np.floor(np.linspace(0, length, num=steps, endpoint=False)).astype(np.int64)
    return origin[picks].astype(np.float64)


def boundary_scalings(timestep: float, timestep_scaling: float) -> tuple[float, float]:
    """(c_skip, c_out) of the consistency boundary condition f(x, t) = c_skip x + c_out x0 (Song et al. 2023)."""
    scaled = timestep * timestep_scaling
    c_skip = _SIGMA_DATA**2 / (scaled**2 + _SIGMA_DATA**2)
    c_out = scaled / math.sqrt(scaled**2 + _SIGMA_DATA**2)
    return c_skip, c_out


def lcm(settings: Mapping[str, Any], steps: int, start: int = 0, strength: float = 1.0) -> Built:
    """Multistep latent consistency sampling (Luo et al. 2023): jump to x0, re-noise to the next timestep, repeat.

    img2img shortens the schedule by `strength` instead of skipping steps (LCMScheduler's own rule).
    """
    if start:
        raise ValueError("the lcm sampler does not skip steps; its img2img rule is strength (make_plan's strength)")
    alpha_bar = alphas_cumprod(settings, floor_zero_snr=False)
    final = 1.0 if settings["set_alpha_to_one"] else float(alpha_bar[0])
    timesteps = lcm_timesteps(settings, steps, strength)
    x = slot(0)
    evaluations = []
    for i, t in enumerate(timesteps):
        a_t = _alpha_bar_at(alpha_bar, t, final)
        _, x0 = eps_and_x0(x, model_output(), math.sqrt(a_t), math.sqrt(1 - a_t), settings["prediction_type"])
        c_skip, c_out = boundary_scalings(t, settings["timestep_scaling"])
        denoised = c_out * x0 + c_skip * x
        noising = alpha_noising(alpha_bar, t, final)
        if i + 1 == len(timesteps):  # the last step returns the consistency estimate itself, unnoised
            evaluations.append(Evaluation(float(t), 1.0, (denoised,), noising=noising))
            continue
        a_next = _alpha_bar_at(alpha_bar, timesteps[i + 1], final)
        update = math.sqrt(a_next) * denoised + math.sqrt(1 - a_next) * noise()
        evaluations.append(Evaluation(float(t), 1.0, (update,), uses_noise=True, noising=noising))
    return evaluations, 1.0
