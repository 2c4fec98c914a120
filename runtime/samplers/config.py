"""Reading a diffusers scheduler_config.json the way `SchedulerClass.from_config` does.

Each sampler name maps to one diffusers scheduler class: keys the class takes are read from the
config or fall back to that class's defaults; a few are forced by the sampler name; options that
make the update non-linear (or that we do not implement) are refused with a ValueError.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .schedule import BETA_SCHEDULES, FINAL_SIGMA_TYPES, TIMESTEP_SPACINGS

PREDICTION_TYPES = ("epsilon", "v_prediction")

_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "timestep_spacing": "linspace",
}
_SIGMA_SCHEDULES = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_THRESHOLDING = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_MULTISTEP = {
    **_SIGMA_SCHEDULES,
    **_THRESHOLDING,
    "solver_order": 2,
    "lower_order_final": True,
    "use_flow_sigmas": False,
    "final_sigmas_type": "zero",
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
}


@dataclass(frozen=True)
class SchedulerClass:
    """A diffusers scheduler class as far as plans need it: name and constructor defaults."""

    name: str
    defaults: Mapping[str, Any]


DDIM = SchedulerClass(
    "DDIMScheduler",
    {
        **_COMMON,
        **_THRESHOLDING,
        "timestep_spacing": "leading",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "rescale_betas_zero_snr": False,
    },
)
PNDM = SchedulerClass(
    "PNDMScheduler",
    {**_COMMON, "timestep_spacing": "leading", "skip_prk_steps": False, "set_alpha_to_one": False},
)
LMS = SchedulerClass("LMSDiscreteScheduler", {**_COMMON, **_SIGMA_SCHEDULES})
EULER = SchedulerClass(
    "EulerDiscreteScheduler",
    {
        **_COMMON,
        **_SIGMA_SCHEDULES,
        "interpolation_type": "linear",
        "sigma_min": None,
        "sigma_max": None,
        "timestep_type": "discrete",
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    },
)
EULER_ANCESTRAL = SchedulerClass(
    "EulerAncestralDiscreteScheduler", {**_COMMON, "rescale_betas_zero_snr": False}
)
HEUN = SchedulerClass(
    "HeunDiscreteScheduler",
    {
        **_COMMON,
        **_SIGMA_SCHEDULES,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "clip_sample": False,
        "clip_sample_range": 1.0,
    },
)
DPM_SOLVER = SchedulerClass(
    "DPMSolverMultistepScheduler",
    {
        **_COMMON,
        **_MULTISTEP,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "euler_at_final": False,
        "use_lu_lambdas": False,
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
    },
)
UNIPC = SchedulerClass(
    "UniPCMultistepScheduler",
    {
        **_COMMON,
        **_MULTISTEP,
        "predict_x0": True,
        "solver_type": "bh2",
        "disable_corrector": [],
        "solver_p": None,
        "sigma_min": None,
        "sigma_max": None,
        "shift_terminal": None,
    },
)
LCM = SchedulerClass(
    "LCMScheduler",
    {
        **_COMMON,
        **_THRESHOLDING,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "timestep_spacing": "leading",  # taken by the class, unused by its schedule
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "timestep_scaling": 10.0,
        "rescale_betas_zero_snr": False,
    },
)

# Allowed values of the enum-like keys, where the class takes the key.
_CHOICES = {
    "prediction_type": PREDICTION_TYPES,
    "timestep_spacing": TIMESTEP_SPACINGS,
    "beta_schedule": BETA_SCHEDULES,
    "final_sigmas_type": FINAL_SIGMA_TYPES,
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete", "continuous"),
}
# Non-linear options: these become explicit step-graph nodes later, never silent table entries.
_NON_LINEAR = ("clip_sample", "thresholding")
# Linear but not implemented here: refused rather than silently ignored.
_UNSUPPORTED = (
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
    "use_flow_sigmas",
    "use_dynamic_shifting",
    "variance_type",
    "solver_p",
    "shift_terminal",
)


def resolve(
    sampler: str, cls: SchedulerClass, config: Mapping[str, Any], forced: Mapping[str, Any]
) -> Mapping[str, Any]:
    """Effective scheduler settings: config over class defaults, then forced values; validated."""
    settings = {key: config.get(key, default) for key, default in cls.defaults.items()}
    # from_config keeps unknown keys on the config object, and the Karras conversion of every class
    # but LMS looks these two up there.
    for key in ("sigma_min", "sigma_max"):
        settings.setdefault(key, config.get(key))
    settings.update(forced)
    _check(sampler, cls, settings)
    return MappingProxyType(settings)


def _check(sampler: str, cls: SchedulerClass, settings: Mapping[str, Any]) -> None:
    """Raise ValueError for unknown enum values and for options a linear plan cannot express."""
    where = f"for sampler {sampler!r} ({cls.name})"
    for key, allowed in _CHOICES.items():
        used = key in cls.defaults and not (key == "beta_schedule" and settings["trained_betas"] is not None)
        if used and settings[key] not in allowed:
            raise ValueError(f"{key}={settings[key]!r} is not supported {where}; allowed: {allowed}")
    for key in _NON_LINEAR:
        if key in cls.defaults and settings[key]:
            raise ValueError(
                f"{key}={settings[key]!r} is not supported {where}: it makes the update non-linear; "
                f"set {key} to false"
            )
    for key in _UNSUPPORTED:
        if key in cls.defaults and settings[key]:
            raise ValueError(f"{key}={settings[key]!r} is not supported {where}")
    for key, minimum in (("num_train_timesteps", 1), ("steps_offset", 0)):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{key}={value!r} must be an int >= {minimum}")
