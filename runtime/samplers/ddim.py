"""DDIM (eta = 0) and PLMS (PNDM with skip_prk_steps) plans, in alpha-bar space as diffusers runs them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .plan import Built, Evaluation, eps_and_x0, model_output, slot, zero
from .schedule import alphas_cumprod, spaced_timesteps

# Adams-Bashforth weights on (newest, ..., oldest) model outputs, by history length (PLMS).
_ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _alpha_bar_at(alpha_bar: np.ndarray, timestep: float, final: float) -> float:
    """alpha_bar at an integer timestep; `final` before timestep 0 (set_alpha_to_one)."""
    if timestep < 0:
        return final
    if timestep >= alpha_bar.size:
        raise ValueError(
            f"timestep {timestep:g} is outside [0, {alpha_bar.size}); "
            "lower steps_offset or change timestep_spacing"
        )
    return float(alpha_bar[int(timestep)])


def alpha_noising(alpha_bar: np.ndarray, timestep: float, final: float) -> tuple[float, float]:
    """(signal, noise) scales of DDPM's forward process at a timestep: x_t = sqrt(a) x0 + sqrt(1 - a) eps."""
    a = _alpha_bar_at(alpha_bar, timestep, final)
    return math.sqrt(a), math.sqrt(1.0 - a)


def ddim(settings: Mapping[str, Any], steps: int, start: int = 0) -> Built:
    """Deterministic DDIM (Song et al. 2020, eq. 12 with eta = 0), from step `start` on."""
    prediction_type = settings["prediction_type"]
    alpha_bar = alphas_cumprod(settings, floor_zero_snr=False)
    final = 1.0 if settings["set_alpha_to_one"] else float(alpha_bar[0])
    stride = settings["num_train_timesteps"] // steps
    evaluations = []
    timesteps = spaced_timesteps(settings, steps, round_linspace=True)[start:]
    for t in timesteps:
        a_t, a_prev = _alpha_bar_at(alpha_bar, t, final), _alpha_bar_at(alpha_bar, t - stride, final)
        eps, x0 = eps_and_x0(slot(0), model_output(), math.sqrt(a_t), math.sqrt(1 - a_t), prediction_type)
        update = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        evaluations.append(Evaluation(float(t), 1.0, (update,), noising=alpha_noising(alpha_bar, t, final)))
    return evaluations, 1.0


def _pndm_transfer(
    sample: np.ndarray, output: np.ndarray, a_from: float, a_to: float, prediction_type: str
) -> np.ndarray:
    """Move a sample from alpha_bar a_from to a_to along a (combined) model output (PNDM eq. 9)."""
    eps, _ = eps_and_x0(sample, output, math.sqrt(a_from), math.sqrt(1 - a_from), prediction_type)
    denominator = a_from * math.sqrt(1 - a_to) + math.sqrt(a_from * (1 - a_from) * a_to)
    return math.sqrt(a_to / a_from) * sample - (a_to - a_from) / denominator * eps


def pndm(settings: Mapping[str, Any], steps: int, start: int = 0) -> Built:
    """PLMS: pseudo linear multistep (Liu et al. 2022) with diffusers' skip_prk_steps warm-up.

    From `start` on, the warm-up restarts (diffusers' counter does), on the schedule's tail.

    Buffers: state[1..3] hold past raw model outputs (newest first); during the two warm-up
    evaluations state[3] holds the sample the second one restarts from.
    """
    alpha_bar = alphas_cumprod(settings, floor_zero_snr=False)
    final = 1.0 if settings["set_alpha_to_one"] else float(alpha_bar[0])
    stride = settings["num_train_timesteps"] // steps
    ascending = spaced_timesteps(settings, steps, round_linspace=True)[::-1]
    # Without Runge-Kutta warm-up the second evaluation revisits the second timestep.
    order = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1][start:]
    x, out = slot(0), model_output()
    evaluations = []
    for counter, t in enumerate(order):
        if counter == 0:
            combined, sample, t_from, t_to, keep = out, x, t, t - stride, (out, zero(), x)
        elif counter == 1:
            combined, sample, t_from, t_to, keep = (out + slot(1)) / 2, slot(3), t + stride, t, (slot(1),)
        else:
            history = (out, slot(1), slot(2), slot(3))
            weights = _ADAMS_BASHFORTH[min(counter, 4)]
            combined = sum(w * h for w, h in zip(weights, history))
            sample, t_from, t_to, keep = x, t, t - stride, (out, slot(1), slot(2))
        a_from, a_to = _alpha_bar_at(alpha_bar, t_from, final), _alpha_bar_at(alpha_bar, t_to, final)
        prev = _pndm_transfer(sample, combined, a_from, a_to, settings["prediction_type"])
        evaluations.append(Evaluation(float(t), 1.0, (prev, *keep), noising=alpha_noising(alpha_bar, t, final)))
    return evaluations, 1.0
