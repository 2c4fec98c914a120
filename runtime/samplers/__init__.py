"""Samplers as coefficient tables: `make_plan(name, scheduler_config, steps)` -> `SamplerPlan`.

Each plan mirrors what the matching diffusers scheduler does after `from_config(config)` and
`set_timesteps(steps)`, as a fixed float64 table of linear state updates (see DESIGN.md,
"Samplers as coefficient tables"). `run_plan` is the float64 host reference executor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from . import config as _config
from .ddim import ddim, pndm
from .euler import euler, euler_ancestral, heun, lms
from .lcm import lcm
from .multistep import dpmpp_2m, unipc
from .plan import STATE_SIZE, Built, SamplerPlan, assemble, run_plan

logger = logging.getLogger(__name__)

__all__ = ["SAMPLERS", "STATE_SIZE", "SamplerPlan", "default_sampler", "denoising_end_plan", "denoising_start",
           "img2img_plan", "img2img_start", "make_plan", "run_plan"]

_Builder = Callable[[Mapping[str, Any], int, int], Built]

_DPM_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}

# name -> (diffusers class, values forced by the name, plan builder)
_REGISTRY: dict[str, tuple[_config.SchedulerClass, Mapping[str, Any], _Builder]] = {
    "ddim": (_config.DDIM, {}, ddim),
    "pndm": (_config.PNDM, {"skip_prk_steps": True}, pndm),
    "lms": (_config.LMS, {}, lms),
    "euler": (_config.EULER, {}, euler),
    "euler_a": (_config.EULER_ANCESTRAL, {}, euler_ancestral),
    "heun": (_config.HEUN, {}, heun),
    "dpmpp_2m": (_config.DPM_SOLVER, {**_DPM_2M, "use_karras_sigmas": False}, dpmpp_2m),
    "dpmpp_2m_karras": (_config.DPM_SOLVER, {**_DPM_2M, "use_karras_sigmas": True}, dpmpp_2m),
    "unipc": (_config.UNIPC, {}, unipc),
    "lcm": (_config.LCM, {}, lcm),
}

SAMPLERS: tuple[str, ...] = tuple(_REGISTRY)
# Samplers that draw fresh noise during the loop (the rest are deterministic given the initial latents).
STOCHASTIC: tuple[str, ...] = ("euler_a", "lcm")


def default_sampler(scheduler_config: Mapping[str, Any]) -> str:
    """The sampler matching a checkpoint's own scheduler class (its `_class_name`); ddim for unknown classes."""
    classes: dict[str, str] = {}
    for name, (cls, _, _) in _REGISTRY.items():
        classes.setdefault(cls.name, name)  # the first sampler of a class is its plain form
    name = classes.get(scheduler_config.get("_class_name", ""), "ddim")
    return "dpmpp_2m_karras" if name == "dpmpp_2m" and scheduler_config.get("use_karras_sigmas") else name


def make_plan(name: str, scheduler_config: Mapping[str, Any], steps: int, start: int = 0,
              lcm_strength: float = 1.0) -> SamplerPlan:
    """Build the coefficient table of sampler `name` for a diffusers scheduler config and step count.

    `start` > 0 skips the first steps of the schedule, as diffusers' img2img does (`img2img_start`):
    the plan runs the schedule's tail with the sampler's own warm-up from there; its `noising`
    gives the scheduler's add_noise at each evaluation (img2img's start, inpainting's blend).
    LCM's img2img shortens its schedule instead (`lcm_strength`); `img2img_plan` picks the rule.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    cls, forced, builder = _REGISTRY[name]
    settings = _config.resolve(name, cls, scheduler_config, forced)
    if steps > settings["num_train_timesteps"]:
        raise ValueError(f"steps={steps} exceeds num_train_timesteps={settings['num_train_timesteps']}")
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start < steps:
        raise ValueError(f"start must be an int in [0, steps={steps}), got {start!r}")
    if lcm_strength != 1.0 and name != "lcm":
        raise ValueError(f"lcm_strength is the lcm sampler's img2img rule; {name} takes start (see img2img_plan)")
    extra = (float(lcm_strength),) if name == "lcm" else ()
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        evaluations, init_noise_sigma = builder(settings, int(steps), int(start), *extra)
    plan = assemble(name, evaluations, init_noise_sigma, settings["prediction_type"])
    logger.debug("plan %s: %d steps from %d, %d evaluations", name, steps, start, plan.num_evaluations)
    return plan


def img2img_plan(name: str, scheduler_config: Mapping[str, Any], steps: int, strength: float) -> SamplerPlan:
    """The plan of an img2img request, by the sampler's own rule: the schedule's tail from img2img_start,
    or for lcm every step on a schedule shortened by strength (LCMScheduler.set_timesteps(strength))."""
    if name == "lcm":
        return make_plan(name, scheduler_config, steps, lcm_strength=float(strength))
    return make_plan(name, scheduler_config, steps, img2img_start(steps, strength))


def img2img_start(steps: int, strength: float) -> int:
    """The steps img2img skips: diffusers' get_timesteps, steps - min(int(steps * strength), steps)."""
    return steps - min(int(steps * strength), steps)


# Samplers whose steps take two UNet evaluations (diffusers' scheduler.order == 2).
_SECOND_ORDER = ("heun",)


def _cutoff(scheduler_config: Mapping[str, Any], fraction: float) -> int:
    """diffusers' discrete timestep cutoff of a denoising_start / denoising_end fraction."""
    count = int(scheduler_config.get("num_train_timesteps", 1000))
    return int(round(count - fraction * count))


def denoising_end_plan(plan: SamplerPlan, scheduler_config: Mapping[str, Any], denoising_end: float) -> SamplerPlan:
    """The evaluations a base runs before it hands over at `denoising_end` (a fraction in (0, 1)): those at
    timesteps >= the cutoff, as diffusers' SDXL pipelines cut their schedule (the tables of the
    rest are unchanged, so each kept update is the full schedule's). ValueError if none is left."""
    kept = int(np.count_nonzero(plan.timesteps >= _cutoff(scheduler_config, denoising_end)))
    if kept == 0:
        raise ValueError(f"the switch at {denoising_end} leaves the base no step of {plan.name}'s schedule "
                         f"(its first timestep is {plan.timesteps[0]:g}); lower refiner_start or raise steps")
    return plan.head(kept)


def denoising_start(name: str, scheduler_config: Mapping[str, Any], steps: int, fraction: float) -> int:
    """The step a refiner starts at for `denoising_start` = fraction (diffusers' SDXL img2img get_timesteps):
    it runs the schedule's evaluations below the cutoff (a second-order sampler's whole steps), taking the
    latents as they are. Pass it to make_plan(start=...). ValueError if it would run none, or all."""
    full = make_plan(name, scheduler_config, steps)
    remaining = int(np.count_nonzero(full.timesteps < _cutoff(scheduler_config, fraction)))
    order = 2 if name in _SECOND_ORDER else 1
    if order == 2 and remaining % 2 == 0:
        remaining += 1  # diffusers ends on a corrector: the first kept evaluation is a predictor
    start = full.num_evaluations - remaining
    if remaining == 0 or start >= full.num_evaluations:
        raise ValueError(f"the switch at {fraction} leaves the refiner no step of {steps} {name} steps; "
                         "raise refiner_start's complement (a lower refiner_start) or steps")
    if start <= 0:
        raise ValueError(f"the switch at {fraction} leaves the base no step of {steps} {name} steps; "
                         "raise refiner_start or steps")
    return start // order
