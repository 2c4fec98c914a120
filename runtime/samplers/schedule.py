"""Noise schedules as diffusers' discrete schedulers define them, computed in float64."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMA_TYPES = ("zero", "sigma_min")

# diffusers pins the last alpha_bar of a zero-terminal-SNR schedule to 2**-24 in its sigma-space
# schedulers so that sigma stays finite.
_ZERO_SNR_FLOOR = 2.0**-24


def betas(config: Mapping[str, Any]) -> np.ndarray:
    """Per-timestep betas from trained_betas or beta_schedule (optionally zero-terminal-SNR rescaled)."""
    count = int(config["num_train_timesteps"])
    if config["trained_betas"] is not None:
        values = np.asarray(config["trained_betas"], dtype=np.float64)
        if values.shape != (count,):
            raise ValueError(f"trained_betas has {values.size} values, num_train_timesteps is {count}")
    elif config["beta_schedule"] == "linear":
        values = np.linspace(config["beta_start"], config["beta_end"], count, dtype=np.float64)
    elif config["beta_schedule"] == "scaled_linear":
        roots = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, count, dtype=np.float64)
        values = roots**2
    else:
        values = _cosine_betas(count)
    if config.get("rescale_betas_zero_snr", False):
        values = _rescale_zero_terminal_snr(values)
    return values


def _cosine_betas(count: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide / improved-DDPM cosine schedule ("squaredcos_cap_v2"), betas capped at max_beta."""
    t = np.arange(count + 1, dtype=np.float64) / count
    alpha_bar = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def _rescale_zero_terminal_snr(values: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so the last timestep has zero SNR (Lin et al. 2023, Alg. 1)."""
    root = np.sqrt(np.cumprod(1.0 - values))
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    alpha_bar = root**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def alphas_cumprod(config: Mapping[str, Any], *, floor_zero_snr: bool) -> np.ndarray:
    """alpha_bar_t = prod(1 - beta); optionally floored at the last step as the sigma-space schedulers do."""
    values = np.cumprod(1.0 - betas(config))
    if floor_zero_snr and config.get("rescale_betas_zero_snr", False):
        values[-1] = _ZERO_SNR_FLOOR
    return values


def train_sigmas(alpha_bar: np.ndarray) -> np.ndarray:
    """Variance-exploding sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for every train timestep."""
    return np.sqrt((1.0 - alpha_bar) / alpha_bar)


def spaced_timesteps(
    config: Mapping[str, Any], steps: int, *, round_linspace: bool, extra: int = 0, last: int | None = None
) -> np.ndarray:
    """Descending inference timesteps per timestep_spacing (Lin et al. 2023, Table 2).

    `extra` points are laid out and the smallest dropped (the multistep solvers use 1);
    `last` replaces num_train_timesteps as the end of the range (lambda clipping).
    """
    count = int(config["num_train_timesteps"])
    last = count if last is None else last
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        points = np.linspace(0, last - 1, steps + extra, dtype=np.float64)
        points = points.round() if round_linspace else points
        return points[::-1][:steps].copy()
    if spacing == "leading":
        ratio = last // (steps + extra)
        points = (np.arange(steps + extra) * ratio).astype(np.float64)[::-1][:steps]
        return points + config["steps_offset"]
    # trailing: the arange may hold one point more or less than `steps`, as in diffusers
    return np.round(np.arange(last, 0, -count / steps)).astype(np.float64) - 1


def interp_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Sigma at (possibly fractional) timesteps, linear in t."""
    return np.interp(timesteps, np.arange(sigmas.size, dtype=np.float64), sigmas)


def karras_sigmas(sigma_min: float, sigma_max: float, count: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (eq. 5) schedule: linear in sigma^(1/rho), descending."""
    ramp = np.linspace(0.0, 1.0, count, dtype=np.float64)
    high, low = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (high + ramp * (low - high)) ** rho


def sigma_to_t(sigmas: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Fractional train timestep of each sigma by interpolation in log-sigma, clamped to the range."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    return np.interp(log_sigma, np.log(train), np.arange(train.size, dtype=np.float64))


def final_sigma(kind: str, alpha_bar: np.ndarray) -> float:
    """Sigma appended after the last step: 0, or the smallest train sigma."""
    if kind == "zero":
        return 0.0
    if kind == "sigma_min":
        return float(train_sigmas(alpha_bar[:1])[0])
    raise ValueError(f"final_sigmas_type {kind!r} is not one of {FINAL_SIGMA_TYPES}")
