"""The sampler plan contract: per-evaluation timesteps, input scales and linear update tables.

A plan is data: after UNet evaluation e, every state buffer is replaced by a fixed linear
combination of the state buffers, the model output and (optionally) fresh noise. Samplers build
those combinations symbolically as float64 vectors over the basis
(state[0], ..., state[K-1], model_output, noise); see `slot`, `model_output`, `noise`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from diffusion_engine.engine.specs import STATE_SIZE

logger = logging.getLogger(__name__)

_MODEL_OUTPUT = STATE_SIZE
_NOISE = STATE_SIZE + 1
_WIDTH = STATE_SIZE + 2


def slot(index: int) -> np.ndarray:
    """Vector selecting state buffer `index` (0 is the current latents)."""
    if not 0 <= index < STATE_SIZE:
        raise ValueError(f"state slot {index} outside [0, {STATE_SIZE})")
    return _unit(index)


def model_output() -> np.ndarray:
    """Vector selecting this evaluation's raw (guided) model output."""
    return _unit(_MODEL_OUTPUT)


def noise() -> np.ndarray:
    """Vector selecting this evaluation's fresh standard-normal noise."""
    return _unit(_NOISE)


def zero() -> np.ndarray:
    """The zero vector."""
    return np.zeros(_WIDTH, dtype=np.float64)


def _unit(index: int) -> np.ndarray:
    vector = zero()
    vector[index] = 1.0
    return vector


def eps_and_x0(
    x: np.ndarray, out: np.ndarray, alpha: float, sigma: float, prediction_type: str
) -> tuple[np.ndarray, np.ndarray]:
    """Noise and clean-sample estimates of x = alpha * x0 + sigma * eps from an eps or v output."""
    # The only place that knows the model's parametrisation (k-diffusion's wrapper idea).
    if prediction_type == "epsilon":
        return out, (x - sigma * out) / alpha
    if prediction_type == "v_prediction":
        return alpha * out + sigma * x, alpha * x - sigma * out
    raise ValueError(f"prediction_type {prediction_type!r} is not one of ('epsilon', 'v_prediction')")


@dataclass(frozen=True, eq=False)
class Evaluation:
    """One UNet evaluation: its timestep, input scale and the new value of each state buffer."""

    timestep: float
    input_scale: float
    update: tuple[np.ndarray, ...]  # new state[j] for j < len(update); later buffers become 0
    uses_noise: bool = False
    # The scheduler's add_noise at the noise level of this evaluation's input latents (its step
    # index): x = noising[0] * x0 + noising[1] * eps. img2img starts there; inpainting re-noises
    # the kept image there before the evaluation.
    noising: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True, eq=False)
class SamplerPlan:
    """A sampler as float64 tables: model inputs and the linear state update per evaluation."""

    name: str
    timesteps: np.ndarray  # float64 [E]
    input_scales: np.ndarray  # float64 [E]
    # after evaluation e: new_state[j] = coeffs[e, j, :K] @ state + coeffs[e, j, K] * model_output
    #                                   + coeffs[e, j, K + 1] * noise
    coeffs: np.ndarray  # float64 [E, K, K + 2]
    uses_noise: np.ndarray  # bool [E]
    init_noise_sigma: float  # initial state[0] = init_noise_sigma * latents; other buffers start at 0
    prediction_type: str
    # The scheduler's add_noise per evaluation (see Evaluation.noising), float64 [E, 2].
    noising: np.ndarray

    def __post_init__(self) -> None:
        tables = {
            "timesteps": (self.timesteps, np.float64),
            "input_scales": (self.input_scales, np.float64),
            "coeffs": (self.coeffs, np.float64),
            "uses_noise": (self.uses_noise, np.bool_),
            "noising": (self.noising, np.float64),
        }
        for field_name, (value, dtype) in tables.items():
            array = np.array(value, dtype=dtype)  # a private copy, then frozen
            array.flags.writeable = False
            object.__setattr__(self, field_name, array)
        count = self.timesteps.shape
        if len(count) != 1 or self.input_scales.shape != count or self.uses_noise.shape != count \
                or self.noising.shape != count + (2,):
            raise ValueError(f"{self.name}: per-evaluation tables disagree in shape")
        if self.coeffs.shape != (count[0], STATE_SIZE, _WIDTH):
            expected = (count[0], STATE_SIZE, _WIDTH)
            raise ValueError(f"{self.name}: coeffs shape {self.coeffs.shape} != {expected}")
        if np.any(self.coeffs[~self.uses_noise, :, _NOISE] != 0.0):
            raise ValueError(f"{self.name}: noise coefficient set on an evaluation without noise")
        object.__setattr__(self, "init_noise_sigma", float(self.init_noise_sigma))

    @property
    def num_evaluations(self) -> int:
        """Number of UNet evaluations (E)."""
        return int(self.timesteps.shape[0])

    @property
    def add_noise(self) -> tuple[float, float]:
        """Starting from an image (img2img): state[0] = add_noise[0] * image latents + add_noise[1] * noise,
        the scheduler's add_noise at the plan's first timestep."""
        return float(self.noising[0, 0]), float(self.noising[0, 1])

    def head(self, count: int) -> "SamplerPlan":
        """The plan's first `count` evaluations (a base that hands its latents to the refiner: denoising_end)."""
        if not 1 <= count <= self.num_evaluations:
            raise ValueError(f"{self.name}: cannot keep {count} of {self.num_evaluations} evaluations")
        return SamplerPlan(self.name, self.timesteps[:count], self.input_scales[:count], self.coeffs[:count],
                           self.uses_noise[:count], self.init_noise_sigma, self.prediction_type, self.noising[:count])

    def blend_table(self) -> np.ndarray:
        """Inpainting's masked blend after each evaluation e, float64 [E, 2]: the kept region becomes
        blend[e, 0] * image latents + blend[e, 1] * initial noise, the image noised to the next
        evaluation's level (diffusers' add_noise at timesteps[e + 1]); after the last, the image itself."""
        return np.concatenate([self.noising[1:], [[1.0, 0.0]]])


# What a sampler builder returns: the evaluations from its start step and init_noise_sigma.
Built = tuple[list[Evaluation], float]


def assemble(
    name: str, evaluations: Sequence[Evaluation], init_noise_sigma: float, prediction_type: str,
) -> SamplerPlan:
    """Stack per-evaluation updates into a plan; reject non-finite tables."""
    coeffs = np.zeros((len(evaluations), STATE_SIZE, _WIDTH), dtype=np.float64)
    for e, evaluation in enumerate(evaluations):
        if len(evaluation.update) > STATE_SIZE:
            raise ValueError(f"{name}: evaluation {e} needs {len(evaluation.update)} > {STATE_SIZE} buffers")
        for j, row in enumerate(evaluation.update):
            coeffs[e, j] = row
    timesteps = np.array([ev.timestep for ev in evaluations], dtype=np.float64)
    input_scales = np.array([ev.input_scale for ev in evaluations], dtype=np.float64)
    noising = np.array([ev.noising for ev in evaluations], dtype=np.float64).reshape(-1, 2)
    if not all(np.isfinite(table).all() for table in (coeffs, timesteps, input_scales, init_noise_sigma, noising)):
        # diffusers produces NaN / inf latents for these configs; refuse instead.
        raise ValueError(
            f"sampler {name!r}: this scheduler config gives non-finite coefficients "
            "(e.g. epsilon prediction at a zero-SNR timestep, or a log-SNR step of infinite length)"
        )
    return SamplerPlan(
        name=name,
        timesteps=timesteps,
        input_scales=input_scales,
        coeffs=coeffs,
        uses_noise=np.array([ev.uses_noise for ev in evaluations], dtype=bool),
        init_noise_sigma=init_noise_sigma,
        prediction_type=prediction_type,
        noising=noising,
    )


NoiseSource = Callable[[int], np.ndarray] | Sequence[np.ndarray] | None


def run_plan(
    plan: SamplerPlan,
    model: Callable[[np.ndarray, float], np.ndarray],
    latents: np.ndarray,
    noise: NoiseSource = None,
    return_all: bool = False,
    image: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    pure_noise_start: bool = False,
) -> np.ndarray | list[np.ndarray]:
    """Host reference executor in float64: evaluate, then apply the linear update, per evaluation.

    `latents` is the initial noise; with `image` (img2img's clean image latents) the start is
    `add_noise` of the two (or `init_noise_sigma * latents` with `pure_noise_start`), else
    `init_noise_sigma * latents`. With `mask` (1 = repaint, broadcast against the latents) the
    kept region is replaced after every evaluation by the image noised per `blend_table` with
    the same initial noise (diffusers' 4-channel inpainting). `noise` is indexed by evaluation
    (callable(e) or sequence[e]) and read only where `plan.uses_noise[e]`. With `return_all`,
    returns state[0] after every evaluation.
    """
    latents = np.asarray(latents, dtype=np.float64)
    if noise is None and plan.uses_noise.any():
        raise ValueError(f"sampler {plan.name!r} needs noise; pass a callable or a sequence")
    if mask is not None and image is None:
        raise ValueError("a mask needs the image latents it keeps")
    state = np.zeros((STATE_SIZE,) + latents.shape, dtype=np.float64)
    state[0] = initial_latents(plan, latents, None if pure_noise_start else image)
    blend = plan.blend_table()
    history = []
    for e in range(plan.num_evaluations):
        out = np.asarray(model(plan.input_scales[e] * state[0], float(plan.timesteps[e])), dtype=np.float64)
        if out.shape != latents.shape:
            raise ValueError(f"model output shape {out.shape} != latents shape {latents.shape}")
        fresh = _noise_at(noise, e, latents.shape) if plan.uses_noise[e] else np.zeros_like(latents)
        inputs = np.concatenate([state, out[None], fresh[None]])
        state = np.tensordot(plan.coeffs[e], inputs, axes=1)
        if mask is not None:
            kept = blend[e, 0] * np.asarray(image, np.float64) + blend[e, 1] * latents
            state[0] = kept + np.asarray(mask, np.float64) * (state[0] - kept)
        if return_all:
            history.append(state[0].copy())
    logger.debug("ran %s: %d evaluations", plan.name, plan.num_evaluations)
    return history if return_all else state[0]


def initial_latents(plan: SamplerPlan, noise: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
    """state[0] before the first evaluation, float64: scaled noise, or the image latents noised to the first timestep."""
    noise = np.asarray(noise, dtype=np.float64)
    if image is None:
        return plan.init_noise_sigma * noise
    signal, scale = plan.add_noise
    return signal * np.asarray(image, dtype=np.float64) + scale * noise


def _noise_at(noise: NoiseSource, e: int, shape: tuple[int, ...]) -> np.ndarray:
    fresh = np.asarray(noise(e) if callable(noise) else noise[e], dtype=np.float64)
    if fresh.shape != shape:
        raise ValueError(f"noise for evaluation {e} has shape {fresh.shape}, expected {shape}")
    return fresh
