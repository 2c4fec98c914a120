"""Exponential-integrator multistep solvers in variance-preserving form: DPM-Solver++ (2M) and UniPC.

Latents are x = alpha * x0 + sigma * eps with alpha = 1 / sqrt(s^2 + 1), sigma = s * alpha for
the variance-exploding s of the schedule; the log-SNR is lambda = -log(s).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .plan import Built, Evaluation, eps_and_x0, model_output, slot, zero
from .schedule import (
    alphas_cumprod,
    final_sigma,
    interp_sigmas,
    karras_sigmas,
    sigma_to_t,
    spaced_timesteps,
    train_sigmas,
)

# solver_type as the config says it -> as the class uses it (each class remaps the other's names).
_DPM_SOLVER_TYPES = {
    "midpoint": "midpoint",
    "heun": "heun",
    "logrho": "midpoint",
    "bh1": "midpoint",
    "bh2": "midpoint",
}
_UNIPC_SOLVER_TYPES = {"bh1": "bh1", "bh2": "bh2", "midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}
# Order p keeps p - 1 past outputs; with the latents and the corrector carry that fills STATE_SIZE.
_UNIPC_MAX_ORDER = 3


def _vp(s: float) -> tuple[float, float]:
    """(alpha, sigma) of the variance-preserving form for variance-exploding sigma s."""
    alpha = 1.0 / math.sqrt(s**2 + 1.0)
    return alpha, s * alpha


def _log_snr(s: float) -> np.float64:
    """lambda = log(alpha / sigma) = -log(s); a numpy scalar so that s = 0 gives inf, not an exception."""
    with np.errstate(divide="ignore"):
        return -np.log(np.float64(s))


def _solver_type(settings: Mapping[str, Any], sampler: str, known: Mapping[str, str]) -> str:
    """The solver_type the class actually runs, after diffusers' renaming of foreign names."""
    value = settings["solver_type"]
    if value not in known:
        raise ValueError(
            f"solver_type={value!r} is not supported for sampler {sampler!r}; allowed: {tuple(known)}"
        )
    return known[value]


def _multistep_sigmas(
    settings: Mapping[str, Any], steps: int, alpha_bar: np.ndarray, last: int
) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps (fractional for Karras sigmas) and sigmas of the multistep schedulers, no final sigma."""
    train = train_sigmas(alpha_bar)
    timesteps = spaced_timesteps(settings, steps, round_linspace=True, extra=1, last=last)
    if not settings["use_karras_sigmas"]:
        return timesteps, interp_sigmas(timesteps, train)
    # These classes span the whole train range (not the spaced one) unless the config pins it.
    low = train[0] if settings["sigma_min"] is None else settings["sigma_min"]
    high = train[-1] if settings["sigma_max"] is None else settings["sigma_max"]
    sigmas = karras_sigmas(float(low), float(high), steps)
    return sigma_to_t(sigmas, train), sigmas


def dpmpp_2m(settings: Mapping[str, Any], steps: int, start: int = 0) -> Built:
    """DPM-Solver++(2M), data prediction, multistep (Lu et al. 2022, Alg. 2), from step `start` on.

    Buffers: state[1] holds the previous x0 estimate. The first step from `start` is first order
    (diffusers' lower_order_nums counts from its begin_index); the final-step rule sees the full schedule.
    """
    solver_type = _solver_type(settings, "dpmpp_2m", _DPM_SOLVER_TYPES)
    alpha_bar = alphas_cumprod(settings, floor_zero_snr=True)
    # lambda_min_clipped drops the noisiest train timesteps whose log-SNR is below it.
    lambdas = np.log(np.sqrt(alpha_bar)) - np.log(np.sqrt(1.0 - alpha_bar))
    clipped = int(np.searchsorted(lambdas[::-1], settings["lambda_min_clipped"]))
    last = settings["num_train_timesteps"] - clipped
    timesteps, sigmas = _multistep_sigmas(settings, steps, alpha_bar, last)
    if settings["use_karras_sigmas"] and settings["beta_schedule"] != "squaredcos_cap_v2":
        timesteps = np.round(timesteps)
    timesteps = np.trunc(timesteps)  # diffusers casts to int64
    sigmas = np.append(sigmas, final_sigma(settings["final_sigmas_type"], alpha_bar))
    count = len(timesteps)
    x, previous = slot(0), slot(1)
    evaluations = []
    for i, t in enumerate(timesteps[start:], start):
        alpha_s, sigma_s = _vp(sigmas[i])
        alpha_t, sigma_t = _vp(sigmas[i + 1])
        _, x0 = eps_and_x0(x, model_output(), alpha_s, sigma_s, settings["prediction_type"])
        decay = sigmas[i + 1] / sigmas[i]  # exp(-h)
        update = (sigma_t / sigma_s) * x - alpha_t * (decay - 1.0) * x0
        final_first_order = i == count - 1 and (
            settings["euler_at_final"]
            or (settings["lower_order_final"] and count < 15)
            or settings["final_sigmas_type"] == "zero"
        )
        if i > start and not final_first_order:
            h = _log_snr(sigmas[i + 1]) - _log_snr(sigmas[i])
            d1 = (x0 - previous) * h / (_log_snr(sigmas[i]) - _log_snr(sigmas[i - 1]))
            if solver_type == "midpoint":
                update = update - 0.5 * alpha_t * (decay - 1.0) * d1
            else:
                update = update + alpha_t * ((decay - 1.0) / h + 1.0) * d1
        evaluations.append(Evaluation(float(t), 1.0, (update, x0), noising=_vp(sigmas[i])))
    return evaluations, 1.0


def _unipc_b(hh: np.float64, solver_type: str, order: int) -> tuple[float, np.ndarray]:
    """B(h) and the right-hand side b of UniPC's order conditions R rho = b (Zhao et al. 2023)."""
    b_h = hh if solver_type == "bh1" else np.expm1(hh)
    h_phi_k = np.expm1(hh) / hh - 1.0  # h * phi_2(h); the loop steps to h * phi_{k+1}(h)
    factorial = 1
    b = []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return float(b_h), np.array(b)


def _unipc_step(
    x: np.ndarray,
    outputs: tuple[np.ndarray, ...],
    sigmas: np.ndarray,
    i: int,
    order: int,
    settings: Mapping[str, Any],
    with_corrector: bool,
) -> tuple[np.ndarray, np.ndarray, float]:
    """UniPC from sigma_i to sigma_i+1: predictor, and the corrector as (part known now, weight of m_i+1)."""
    predict_x0 = settings["predict_x0"]
    alpha_s, sigma_s = _vp(sigmas[i])
    alpha_t, sigma_t = _vp(sigmas[i + 1])
    h = _log_snr(sigmas[i + 1]) - _log_snr(sigmas[i])
    hh = -h if predict_x0 else h
    rks = np.array([(_log_snr(sigmas[i - k]) - _log_snr(sigmas[i])) / h for k in range(1, order)] + [1.0])
    b_h, b = _unipc_b(hh, settings["solver_type"], order)
    powers = np.vander(rks, order, increasing=True).T  # powers[j, k] = rks[k] ** j
    m0 = outputs[0]
    differences = [(outputs[k] - m0) / rks[k - 1] for k in range(1, order)]
    if predict_x0:
        base, scale = (sigma_t / sigma_s) * x - alpha_t * np.expm1(hh) * m0, alpha_t * b_h
    else:
        base, scale = (alpha_t / alpha_s) * x - sigma_t * np.expm1(hh) * m0, sigma_t * b_h
    rhos_p = np.full(order - 1, 0.5) if order <= 2 else np.linalg.solve(powers[:-1, :-1], b[:-1])
    predicted = base - scale * sum((r * d for r, d in zip(rhos_p, differences)), zero())
    if not with_corrector:
        return predicted, zero(), 0.0
    rhos_c = np.array([0.5]) if order == 1 else np.linalg.solve(powers, b)
    known = sum((r * d for r, d in zip(rhos_c[:-1], differences)), zero()) - rhos_c[-1] * m0
    return predicted, base - scale * known, float(-scale * rhos_c[-1])


def unipc(settings: Mapping[str, Any], steps: int, start: int = 0) -> Built:
    """UniPC predictor-corrector (Zhao et al. 2023); the corrector folds into the next evaluation.

    Buffers: state[1] carries the next corrector's terms known one evaluation early (it is
    linear in the next model output), state[2..3] the previous converted model outputs. From
    `start` on the warm-up restarts (no corrector, order 1 first) as diffusers' does after set_timesteps.
    """
    order_limit = settings["solver_order"]
    if not 1 <= order_limit <= _UNIPC_MAX_ORDER:
        raise ValueError(f"solver_order={order_limit!r} is not supported for sampler 'unipc'; allowed: 1..3")
    settings = {**settings, "solver_type": _solver_type(settings, "unipc", _UNIPC_SOLVER_TYPES)}
    alpha_bar = alphas_cumprod(settings, floor_zero_snr=True)
    timesteps, sigmas = _multistep_sigmas(settings, steps, alpha_bar, settings["num_train_timesteps"])
    timesteps = np.round(timesteps)
    if settings["use_karras_sigmas"] and settings["final_sigmas_type"] == "sigma_min":
        sigmas = np.append(sigmas, sigmas[-1])  # UniPC's Karras branch ends at its own smallest sigma
    else:
        sigmas = np.append(sigmas, final_sigma(settings["final_sigmas_type"], alpha_bar))
    count, skipped = len(timesteps), set(settings["disable_corrector"])
    x, carry = slot(0), slot(1)
    corrector_weight = 0.0
    evaluations = []
    for i, t in enumerate(timesteps[start:], start):
        alpha_s, sigma_s = _vp(sigmas[i])
        eps, x0 = eps_and_x0(x, model_output(), alpha_s, sigma_s, settings["prediction_type"])
        m = x0 if settings["predict_x0"] else eps
        corrected = carry + corrector_weight * m if i > start and i - 1 not in skipped else x
        order = min(order_limit, count - i) if settings["lower_order_final"] else order_limit
        order = min(order, i - start + 1)  # warm-up: only i - start past outputs exist
        with_corrector = i + 1 < count and i not in skipped
        predicted, corrector, corrector_weight = _unipc_step(
            corrected, (m, slot(2), slot(3)), sigmas, i, order, settings, with_corrector
        )
        evaluations.append(Evaluation(float(t), 1.0, (predicted, corrector, m, slot(2)), noising=_vp(sigmas[i])))
    return evaluations, 1.0
