"""Sigma-space samplers (k-diffusion family): Euler, Euler ancestral, Heun and LMS.

Latents live in variance-exploding form x = x0 + sigma * eps; the UNet sees x / sqrt(sigma^2 + 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.polynomial import Polynomial

from .plan import Built, Evaluation, eps_and_x0, model_output, noise, slot
from .schedule import (
    alphas_cumprod,
    final_sigma,
    interp_sigmas,
    karras_sigmas,
    sigma_to_t,
    spaced_timesteps,
    train_sigmas,
)

_LMS_ORDER = 4  # diffusers' LMSDiscreteScheduler.step default


def _input_scale(sigma: float) -> float:
    return 1.0 / math.sqrt(sigma**2 + 1.0)


def _derivative(x: np.ndarray, sigma: float, prediction_type: str) -> np.ndarray:
    """Probability-flow ODE slope dx/dsigma = (x - x0) / sigma (Karras et al. 2022)."""
    alpha = _input_scale(sigma)
    _, x0 = eps_and_x0(alpha * x, model_output(), alpha, sigma * alpha, prediction_type)
    return (x - x0) / sigma


def _init_noise_sigma(settings: Mapping[str, Any], sigmas: np.ndarray) -> float:
    """Initial latent scale: the largest sigma, or sqrt(sigma^2 + 1) with leading spacing (diffusers)."""
    top = float(np.max(sigmas))
    return top if settings["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(top**2 + 1.0)


def _from(evaluations: list[Evaluation], start: int, settings: Mapping[str, Any], sigmas: np.ndarray,
          per_step: int = 1) -> Built:
    """The evaluations from step `start` on: these samplers keep no state across a start (diffusers'
    begin_index indexes the full schedule)."""
    return evaluations[per_step * start:], _init_noise_sigma(settings, sigmas)


def _ve(sigma: float) -> tuple[float, float]:
    """The variance-exploding add_noise at sigma: x0 + sigma eps."""
    return 1.0, float(sigma)


def _sigma_schedule(
    settings: Mapping[str, Any], steps: int, alpha_bar: np.ndarray, *, config_range: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps and sigmas (final sigma not appended); Karras sigmas map back to t via log-sigma.

    The Karras range is the spaced schedule's own, or sigma_min / sigma_max from the config where the
    diffusers class looks them up (`config_range`).
    """
    train = train_sigmas(alpha_bar)
    timesteps = spaced_timesteps(settings, steps, round_linspace=False)
    sigmas = interp_sigmas(timesteps, train)
    if settings.get("use_karras_sigmas", False):
        low = settings["sigma_min"] if config_range and settings["sigma_min"] is not None else sigmas[-1]
        high = settings["sigma_max"] if config_range and settings["sigma_max"] is not None else sigmas[0]
        sigmas = karras_sigmas(float(low), float(high), steps)
        timesteps = sigma_to_t(sigmas, train)
    return timesteps, sigmas


def euler(settings: Mapping[str, Any], steps: int, start: int = 0) -> Built:
    """Euler's method on the probability-flow ODE in sigma (Karras et al. 2022, no churn)."""
    alpha_bar = alphas_cumprod(settings, floor_zero_snr=True)
    timesteps, sigmas = _sigma_schedule(settings, steps, alpha_bar, config_range=True)
    if settings["timestep_type"] == "continuous" and settings["prediction_type"] == "v_prediction":
        timesteps = 0.25 * np.log(sigmas)
    sigmas = np.append(sigmas, final_sigma(settings["final_sigmas_type"], alpha_bar))
    x = slot(0)
    evaluations = []
    for i, t in enumerate(timesteps):
        d = _derivative(x, sigmas[i], settings["prediction_type"])
        update = x + (sigmas[i + 1] - sigmas[i]) * d
        evaluations.append(Evaluation(float(t), _input_scale(sigmas[i]), (update,), noising=_ve(sigmas[i])))
    return _from(evaluations, start, settings, sigmas)


def euler_ancestral(settings: Mapping[str, Any], steps: int, start: int = 0) -> Built:
    """Euler ancestral: deterministic step down to sigma_down, then fresh noise of scale sigma_up."""
    alpha_bar = alphas_cumprod(settings, floor_zero_snr=True)
    timesteps, sigmas = _sigma_schedule(settings, steps, alpha_bar, config_range=False)
    sigmas = np.append(sigmas, 0.0)
    x = slot(0)
    evaluations = []
    for i, t in enumerate(timesteps):
        s_from, s_to = sigmas[i], sigmas[i + 1]
        sigma_up = math.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
        sigma_down = math.sqrt(s_to**2 - sigma_up**2)
        d = _derivative(x, s_from, settings["prediction_type"])
        update = x + (sigma_down - s_from) * d + sigma_up * noise()
        # diffusers draws noise at every step (sigma_up is 0 at the last), so draws stay aligned.
        evaluations.append(Evaluation(float(t), _input_scale(s_from), (update,), uses_noise=True, noising=_ve(s_from)))
    return _from(evaluations, start, settings, sigmas)


def heun(settings: Mapping[str, Any], steps: int, start: int = 0) -> Built:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1): Euler predictor, trapezoid corrector.

    Buffers: state[1] is the sample the step started from, state[2] the predictor's slope.
    The last step (to sigma 0) stays a plain Euler step.
    """
    alpha_bar = alphas_cumprod(settings, floor_zero_snr=False)
    timesteps, sigmas = _sigma_schedule(settings, steps, alpha_bar, config_range=True)
    sigmas = np.append(sigmas, 0.0)
    x, origin, slope = slot(0), slot(1), slot(2)
    prediction_type = settings["prediction_type"]
    evaluations = []
    for i, t in enumerate(timesteps):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = _derivative(x, s, prediction_type)
        evaluations.append(Evaluation(float(t), _input_scale(s), (x + (s_next - s) * d, x, d), noising=_ve(s)))
        if i + 1 < len(timesteps):
            d_next = _derivative(x, s_next, prediction_type)
            update = origin + (s_next - s) * (slope + d_next) / 2
            evaluations.append(Evaluation(float(timesteps[i + 1]), _input_scale(s_next), (update,), noising=_ve(s_next)))
    return _from(evaluations, start, settings, sigmas, per_step=2)  # predictor + corrector


def _lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """Integrals over [sigma_i, sigma_i+1] of the Lagrange basis on the last `order` sigmas (exact)."""
    nodes = [float(sigmas[i - k]) for k in range(order)]
    coefficients = []
    for k, node in enumerate(nodes):
        basis = Polynomial([1.0])
        for other in nodes[:k] + nodes[k + 1 :]:
            basis = basis * Polynomial([-other, 1.0]) / (node - other)
        integral = basis.integ()
        coefficients.append(float(integral(sigmas[i + 1]) - integral(sigmas[i])))
    return coefficients


def lms(settings: Mapping[str, Any], steps: int, start: int = 0) -> Built:
    """Linear multistep (4th order) in sigma, as k-diffusion's sample_lms.

    Buffers: state[1..3] hold the previous slopes, newest first.
    """
    alpha_bar = alphas_cumprod(settings, floor_zero_snr=False)
    timesteps, sigmas = _sigma_schedule(settings, steps, alpha_bar, config_range=False)
    sigmas = np.append(sigmas, 0.0)
    x = slot(0)
    evaluations = []
    for i, t in enumerate(timesteps):
        d = _derivative(x, sigmas[i], settings["prediction_type"])
        slopes = (d, slot(1), slot(2), slot(3))
        weights = _lms_coefficients(sigmas, i, min(i + 1, _LMS_ORDER))
        update = x + sum(w * slope for w, slope in zip(weights, slopes))
        evaluations.append(Evaluation(float(t), _input_scale(sigmas[i]), (update, d, slot(1), slot(2)), noising=_ve(sigmas[i])))
    return _from(evaluations, start, settings, sigmas)
