"""Component I/O declared once, as data: names, dtypes, named axes, shapes, ranges, tolerances.

Export axes, TensorRT profiles, buffer allocation and input checks all derive from these specs.
Pure Python + numpy: the lean runtime imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

import numpy as np

# Tensor names, used everywhere instead of string literals.
INPUT_IDS = "input_ids"
INPUT_IDS_2 = "input_ids_2"  # SDXL: the second tokenizer's ids
LAST_HIDDEN_STATE = "last_hidden_state"
PROMPT_EMBEDS = "prompt_embeds"  # SDXL: both encoders' penultimate hidden states, concatenated
TEXT_EMBEDS = "text_embeds"  # SDXL: the second encoder's pooled projection (a UNet input too)
SAMPLE = "sample"
TIMESTEP = "timestep"
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
TIME_IDS = "time_ids"  # SDXL: size conditioning per image (the refiner: size and aesthetic score)
SIZE_TIME_IDS = 6  # SDXL base: original size, crop top-left, target size
AESTHETIC_TIME_IDS = 5  # the SDXL refiner: original size, crop top-left, aesthetic score
TIMESTEP_COND = "timestep_cond"  # LCM: the guidance-scale embedding
NOISE_PRED = "noise_pred"
LATENTS = "latents"
IMAGES = "images"
# The VAE encoder's posterior, already in the UNet's latent space (scaled as the decoder's inverse).
LATENT_MEAN = "latent_mean"
LATENT_STD = "latent_std"
# Inpainting: the mask at latent resolution (1 = repaint); an inpainting UNet also reads the image
# with the masked region blanked, encoded.
MASK = "mask"
MASKED_IMAGE_LATENTS = "masked_image_latents"

# Named dynamic axes.
BATCH = "batch"
SEQUENCE = "sequence"
LATENT_HEIGHT = "latent_height"
LATENT_WIDTH = "latent_width"
HEIGHT = "height"
WIDTH = "width"

# The step graph's tensors (engine/step_graph.py).
STATE = "state"
NOISE = "noise"
STEP = "step"
TIMESTEPS = "timesteps"
INPUT_SCALES = "input_scales"
COEFFS = "coeffs"
GUIDANCE_SCALE = "guidance_scale"
GUIDANCE_RESCALE = "guidance_rescale"
# The masked blend (inpainting with a 4-channel UNet): the clean image latents, the noise they are
# re-noised with (the loop's initial noise) and the per-evaluation (signal, noise) scales.
IMAGE_LATENTS = "image_latents"
INITIAL_NOISE = "initial_noise"
BLEND = "blend"
STATE_OUT = "state_out"
SAMPLE_OUT = "sample_out"
TIMESTEP_OUT = "timestep_out"
STEP_OUT = "step_out"
# Step-graph axes: the UNet's batch (doubled when guided), plan length, noise rows.
UNET_BATCH = "unet_batch"
EVALUATIONS = "evaluations"
NOISE_ROWS = "noise_rows"
MAX_EVALUATIONS = 1000
STATE_SIZE = 4  # K: latent-shaped state buffers of the step graph (and of every sampler plan); state[0] is the latents

TEXT_ENCODER = "text_encoder"
UNET = "unet"
VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"  # image-conditioned requests (img2img, inpainting); engines before it lack it
COMPONENTS = (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)  # exported from the checkpoint
# A second decoder, exported from a tiny autoencoder (diffusers' AutoencoderTiny: TAESD, TAESDXL) where
# engine-export --tiny-vae gives one: the same latents -> uint8 images contract as the VAE decoder.
TINY_VAE_DECODER = "tiny_vae_decoder"
OPTIONAL_COMPONENTS = (TINY_VAE_DECODER,)
# generate(decoder=...) -> the component that decodes.
DECODERS = {"full": VAE_DECODER, "tiny": TINY_VAE_DECODER}
DEFAULT_DECODER = "full"
# A component's files: "fp32", "fp16", and "cpu": the fp32 graph with its attention fused into ONNX
# Runtime's MultiHeadAttention (flash attention on the CPU; no [Sq, Skv] scores), what ort-cpu runs.
CPU_GRAPH = "cpu"
STEP_GUIDED = "step"
STEP_UNGUIDED = "step_unguided"
STEP_RESCALED = "step_rescaled"  # guided, then guidance rescale (Lin et al. 2023, sec. 3.4)
MASKED_SUFFIX = "_masked"  # + inpainting's masked blend after the update (engines before it lack these)
# Extra UNet inputs, in graph order after sample, timestep, encoder_hidden_states.
UNET_CONDITIONING = (TEXT_EMBEDS, TIME_IDS, TIMESTEP_COND, MASK, MASKED_IMAGE_LATENTS)


@dataclass(frozen=True)
class StepFeatures:
    """What one generated step graph does after the UNet call, in order: classifier-free guidance,
    guidance rescale, the sampler's linear update (always), inpainting's masked blend."""

    guided: bool = True
    rescaled: bool = False
    masked: bool = False

    def __post_init__(self) -> None:
        if self.rescaled and not self.guided:
            raise ValueError("guidance rescale needs the guided step graph")

    @property
    def name(self) -> str:
        base = STEP_RESCALED if self.rescaled else STEP_GUIDED if self.guided else STEP_UNGUIDED
        return base + MASKED_SUFFIX if self.masked else base

    @property
    def parts(self) -> tuple[str, ...]:
        """What the graph does, in words (the manifest's note)."""
        return (("classifier-free guidance",) * self.guided + ("guidance rescale",) * self.rescaled
                + ("sampler update",) + ("masked blend",) * self.masked)


STEP_FEATURES = tuple(StepFeatures(g, r, m) for m in (False, True) for g, r in ((True, False), (False, False), (True, True)))
STEP_GRAPHS = tuple(f.name for f in STEP_FEATURES)  # generated


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, axes (named dynamic or fixed ints)."""

    name: str
    dtype: str
    axes: tuple[str | int, ...]

    def shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """Concrete shape for the given values of the named axes."""
        missing = [a for a in self.axes if isinstance(a, str) and a not in dims]
        if missing:
            raise KeyError(f"{self.name}: no value for axes {missing}")
        return tuple(int(dims[a]) if isinstance(a, str) else a for a in self.axes)

    def dynamic_axes(self) -> dict[int, str]:
        """Axis index -> axis name, for the dynamic axes only."""
        return {i: a for i, a in enumerate(self.axes) if isinstance(a, str)}


@dataclass(frozen=True)
class Tolerance:
    """Parity tolerance: max |ours - ref| / max |ref| (float outputs) or / 255 (uint8 images)."""

    fp32: float
    fp16: float

    def of(self, graph: str) -> float:
        """The tolerance of one of a component's graphs ("fp32", "fp16", or the fp32 "cpu" graph)."""
        return self.fp32 if graph == CPU_GRAPH else getattr(self, graph)


@dataclass(frozen=True)
class AxisRange:
    """Inclusive range of a named axis and the multiple its values must be."""

    min: int
    max: int
    multiple: int = 1

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.max) or self.multiple < 1:
            raise ValueError(f"invalid axis range {self}")

    def check(self, axis: str, value: int) -> None:
        """Raise ValueError if value is outside the range or not a multiple."""
        if not (self.min <= value <= self.max) or value % self.multiple:
            extra = f", a multiple of {self.multiple}" if self.multiple > 1 else ""
            raise ValueError(f"{axis}={value} is outside the built range [{self.min}, {self.max}]{extra}")


@dataclass(frozen=True)
class ComponentSpec:
    """The I/O contract of one exported component."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerance: Tolerance
    # Maps the engine-wide axes (batch = images, height/width in pixels) to this component's.
    batch_factor: int = 1
    extra_dims: Mapping[str, int] = field(default_factory=dict)

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return self.inputs + self.outputs

    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r}; it has {[t.name for t in self.tensors]}")

    def axis_names(self) -> tuple[str, ...]:
        names: list[str] = []
        for t in self.tensors:
            names += [a for a in t.axes if isinstance(a, str) and a not in names]
        return tuple(names)

    def check_feeds(self, feeds: Mapping[str, np.ndarray], ranges: Mapping[str, AxisRange]) -> dict[str, int]:
        """Check names, dtypes, fixed dims, axis consistency and ranges; return the axis values."""
        expected = {t.name for t in self.inputs}
        if set(feeds) != expected:
            raise ValueError(f"{self.name}: inputs {sorted(feeds)} given, expected {sorted(expected)}")
        dims: dict[str, int] = {}
        for t in self.inputs:
            arr = feeds[t.name]
            if arr.dtype != np.dtype(t.dtype) or arr.ndim != len(t.axes):
                raise ValueError(
                    f"{self.name}.{t.name}: got {arr.dtype}{list(arr.shape)}, expected {t.dtype} with axes {list(t.axes)}"
                )
            for axis, size in zip(t.axes, arr.shape):
                if isinstance(axis, int):
                    if size != axis:
                        raise ValueError(f"{self.name}.{t.name}: dimension is {size}, expected {axis}")
                elif dims.setdefault(axis, size) != size:
                    raise ValueError(f"{self.name}: axis {axis} is {dims[axis]} in one input and {size} in {t.name}")
        for axis, value in dims.items():
            if axis in ranges:
                ranges[axis].check(f"{self.name}.{axis}", value)
        return dims


@dataclass(frozen=True)
class ModelDims:
    """The few numbers of a checkpoint that the specs need."""

    latent_channels: int
    vae_scale_factor: int
    unet_downsample: int  # the UNet's total down factor: latent sizes must be multiples of it
    text_hidden_size: int  # width of the text conditioning the UNet reads (SDXL: both encoders')
    max_text_length: int
    text_encoders: int = 1  # SDXL: 2, run as one graph; the SDXL refiner: 1 (the OpenCLIP one) with pooled text
    pooled_size: int = 0  # SDXL: width of the pooled text embedding (the UNet's text_embeds)
    time_ids_size: int = 0  # SDXL: 6 size-conditioning values per image; the refiner: 5 (AESTHETIC_TIME_IDS)
    timestep_cond_size: int = 0  # LCM: width of the guidance-scale embedding
    # An inpainting UNet (9 input channels in SD): it reads [latents, mask, masked-image latents].
    inpainting: bool = False

    def __post_init__(self) -> None:
        if self.text_encoders not in (1, 2) or (self.text_encoders == 2 and not self.pooled_size):
            raise ValueError(f"{self}: one or two text encoders; two come with a pooled embedding")
        if self.time_ids_size not in (0, SIZE_TIME_IDS, AESTHETIC_TIME_IDS) or bool(self.time_ids_size) != bool(self.pooled_size):
            raise ValueError(f"{self}: time ids ({SIZE_TIME_IDS} size ids, or {AESTHETIC_TIME_IDS} with the aesthetic "
                             "score) come with a pooled text embedding, as SDXL's added embedding reads both")

    @property
    def aesthetic(self) -> bool:
        """The SDXL refiner's time ids: original size, crop top-left, aesthetic score (no target size)."""
        return self.time_ids_size == AESTHETIC_TIME_IDS

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this (VAE factor times UNet down factor)."""
        return self.vae_scale_factor * self.unet_downsample

    @property
    def cfg_batch(self) -> int:
        """UNet rows per image: 2 with classifier-free guidance, 1 where guidance is embedded (LCM)."""
        return 1 if self.timestep_cond_size else 2

    def unet_conditioning(self) -> tuple[TensorSpec, ...]:
        """The UNet inputs beyond sample, timestep and text: pooled text, size ids, guidance embedding,
        an inpainting UNet's mask and masked-image latents."""
        sizes = {TEXT_EMBEDS: self.pooled_size, TIME_IDS: self.time_ids_size, TIMESTEP_COND: self.timestep_cond_size}
        latent = (LATENT_HEIGHT, LATENT_WIDTH)
        axes = {name: (BATCH, size) for name, size in sizes.items() if size}
        if self.inpainting:
            axes.update({MASK: (BATCH, 1) + latent, MASKED_IMAGE_LATENTS: (BATCH, self.latent_channels) + latent})
        return tuple(TensorSpec(name, "float32", axes[name]) for name in UNET_CONDITIONING if name in axes)


def component_specs(m: ModelDims) -> dict[str, ComponentSpec]:
    """The text encoder, UNet, VAE decoder and encoder (and the optional tiny VAE decoder) specs of a model
    (SD1.x/2.x, SDXL, LCM by its dims)."""
    ids = (INPUT_IDS, INPUT_IDS_2)[: m.text_encoders]
    # SDXL's encoders give their penultimate hidden states (prompt_embeds) and a pooled projection.
    text = TensorSpec(PROMPT_EMBEDS if m.pooled_size else LAST_HIDDEN_STATE, "float32",
                      (BATCH, SEQUENCE, m.text_hidden_size))
    pooled = (TensorSpec(TEXT_EMBEDS, "float32", (BATCH, m.pooled_size)),) if m.pooled_size else ()
    text_encoder = ComponentSpec(
        name=TEXT_ENCODER,
        inputs=tuple(TensorSpec(name, "int32", (BATCH, SEQUENCE)) for name in ids),
        outputs=(text,) + pooled,
        tolerance=Tolerance(fp32=1e-3, fp16=5e-2),
        batch_factor=m.cfg_batch,  # unconditional and conditional prompts in one run
    )
    latent = (BATCH, m.latent_channels, LATENT_HEIGHT, LATENT_WIDTH)
    unet = ComponentSpec(
        name=UNET,
        inputs=(
            TensorSpec(SAMPLE, "float32", latent),
            TensorSpec(TIMESTEP, "float32", (1,)),
            TensorSpec(ENCODER_HIDDEN_STATES, "float32", (BATCH, SEQUENCE, m.text_hidden_size)),
        ) + m.unet_conditioning(),
        outputs=(TensorSpec(NOISE_PRED, "float32", latent),),
        tolerance=Tolerance(fp32=1e-3, fp16=5e-2),
        batch_factor=m.cfg_batch,  # the doubled classifier-free-guidance batch
    )
    vae_decoder = ComponentSpec(
        name=VAE_DECODER,
        inputs=(TensorSpec(LATENTS, "float32", latent),),
        outputs=(TensorSpec(IMAGES, "uint8", (BATCH, HEIGHT, WIDTH, 3)),),
        # In 0..255 levels / 255: fp32 allows rounding flips, fp16 a few levels.
        tolerance=Tolerance(fp32=2 / 255, fp16=12 / 255),
    )
    tiny_vae_decoder = replace(vae_decoder, name=TINY_VAE_DECODER)
    vae_encoder = ComponentSpec(
        name=VAE_ENCODER,
        inputs=(TensorSpec(IMAGES, "uint8", (BATCH, HEIGHT, WIDTH, 3)),),
        outputs=(TensorSpec(LATENT_MEAN, "float32", latent), TensorSpec(LATENT_STD, "float32", latent)),
        tolerance=Tolerance(fp32=1e-3, fp16=5e-2),
    )
    return {s.name: s for s in (text_encoder, unet, vae_decoder, vae_encoder, tiny_vae_decoder)}


def step_spec(m: ModelDims, state_size: int, features: StepFeatures) -> ComponentSpec:
    """The fused guidance (+ rescale) + sampler-update (+ masked blend) graph after each UNet call
    (see engine/step_graph.py)."""
    guided, rescaled = features.guided, features.rescaled
    latent = (m.latent_channels, LATENT_HEIGHT, LATENT_WIDTH)
    unet_batch = UNET_BATCH if guided else BATCH
    state = (state_size, BATCH) + latent
    inputs = (
        TensorSpec(NOISE_PRED, "float32", (unet_batch,) + latent),
        TensorSpec(STATE, "float32", state),
        TensorSpec(NOISE, "float32", (NOISE_ROWS, BATCH) + latent),
        TensorSpec(STEP, "int32", (1,)),
        TensorSpec(TIMESTEPS, "float32", (EVALUATIONS,)),
        TensorSpec(INPUT_SCALES, "float32", (EVALUATIONS,)),
        TensorSpec(COEFFS, "float32", (EVALUATIONS, state_size, state_size + 2)),
    ) + ((TensorSpec(GUIDANCE_SCALE, "float32", (1,)),) if guided else ()) + (
        (TensorSpec(GUIDANCE_RESCALE, "float32", (1,)),) if rescaled else ()
    ) + ((
        TensorSpec(MASK, "float32", (BATCH, 1, LATENT_HEIGHT, LATENT_WIDTH)),
        TensorSpec(IMAGE_LATENTS, "float32", (BATCH,) + latent),
        TensorSpec(INITIAL_NOISE, "float32", (BATCH,) + latent),
        TensorSpec(BLEND, "float32", (EVALUATIONS, 2)),
    ) if features.masked else ())
    outputs = (
        TensorSpec(STATE_OUT, "float32", state),
        TensorSpec(SAMPLE_OUT, "float32", (unet_batch,) + latent),
        TensorSpec(TIMESTEP_OUT, "float32", (1,)),
        TensorSpec(STEP_OUT, "int32", (1,)),
    )
    return ComponentSpec(features.name, inputs, outputs, Tolerance(fp32=1e-5, fp16=1e-5))


def step_features(m: ModelDims) -> tuple[StepFeatures, ...]:
    """The step graphs an engine of these dims has: the masked blend only for a plain (4-channel)
    UNet; an inpainting UNet inpaints by itself, as in diffusers."""
    return tuple(f for f in STEP_FEATURES if not (f.masked and m.inpainting))


def step_specs(m: ModelDims, state_size: int) -> dict[str, ComponentSpec]:
    """Every generated step graph's spec of an engine, by name."""
    return {f.name: step_spec(m, state_size, f) for f in step_features(m)}


# The image start (img2img, inpainting), generated (engine/start_graph.py): the encoder's posterior
# sample, repeated to the rows that read it, and the loop's initial values, so that on a GPU backend
# the encoder's outputs never leave the device (engines before these graphs do this on the host).
POSTERIOR_NOISE = "posterior_noise"  # eps of the posterior sample: mean + std * eps (diffusers' retrieve_latents)
# (signal, noise, input scale): state[0] = signal * image latents + noise * initial noise, the first
# UNet input = input scale * state[0] (doubled when guided).
START = "start"
IMAGE_START = "image_start"
IMAGE_START_UNGUIDED = "image_start_unguided"
MASKED_IMAGE_START = "masked_image_start"  # an inpainting UNet's masked-image latents, in the mask's rows
IMAGE_GRAPHS = (IMAGE_START, IMAGE_START_UNGUIDED, MASKED_IMAGE_START)


def image_start_name(guided: bool) -> str:
    """The image-start graph of a guided (doubled UNet batch) or unguided loop."""
    return IMAGE_START if guided else IMAGE_START_UNGUIDED


def _posterior_inputs(m: ModelDims) -> tuple[TensorSpec, ...]:
    """The encoder's posterior of one image and the eps of its sample."""
    one = (1, m.latent_channels, LATENT_HEIGHT, LATENT_WIDTH)
    return tuple(TensorSpec(name, "float32", one) for name in (LATENT_MEAN, LATENT_STD, POSTERIOR_NOISE))


def image_graph_specs(m: ModelDims, state_size: int) -> dict[str, ComponentSpec]:
    """The generated image-start graphs of an engine, by name: the loop's start from an image (guided and
    unguided) and, for an inpainting UNet, its masked-image latents."""
    latent = (m.latent_channels, LATENT_HEIGHT, LATENT_WIDTH)
    exact = Tolerance(fp32=1e-5, fp16=1e-5)
    specs = {}
    for guided in (True, False):
        name = image_start_name(guided)
        inputs = _posterior_inputs(m) + (TensorSpec(INITIAL_NOISE, "float32", (BATCH,) + latent),
                                         TensorSpec(START, "float32", (3,)))
        outputs = (
            TensorSpec(IMAGE_LATENTS, "float32", (BATCH,) + latent),
            TensorSpec(STATE, "float32", (state_size, BATCH) + latent),
            TensorSpec(SAMPLE, "float32", (UNET_BATCH if guided else BATCH,) + latent),
        )
        specs[name] = ComponentSpec(name, inputs, outputs, exact)
    if m.inpainting:  # the mask's rows are the UNet's (doubled) batch
        specs[MASKED_IMAGE_START] = ComponentSpec(
            MASKED_IMAGE_START, _posterior_inputs(m) + (TensorSpec(MASK, "float32", (BATCH, 1, LATENT_HEIGHT, LATENT_WIDTH)),),
            (TensorSpec(MASKED_IMAGE_LATENTS, "float32", (BATCH,) + latent),), exact, batch_factor=m.cfg_batch,
        )
    return specs


@dataclass(frozen=True)
class BuildRanges:
    """What an engine is built for: image sizes in pixels and images per batch."""

    min_size: int = 256
    max_size: int = 1024
    max_batch: int = 4

    def __post_init__(self) -> None:
        validate_build_ranges(self.min_size, self.max_size, self.max_batch)

    def axis_ranges(self, spec: ComponentSpec, m: ModelDims) -> dict[str, AxisRange]:
        """The range of every named axis of one component."""
        f = m.vae_scale_factor
        lat = AxisRange(self.min_size // f, self.max_size // f, m.unet_downsample)
        pix = AxisRange(self.min_size, self.max_size, m.size_multiple)
        table = {
            BATCH: AxisRange(1, self.max_batch * spec.batch_factor),
            SEQUENCE: AxisRange(1, m.max_text_length),
            LATENT_HEIGHT: lat,
            LATENT_WIDTH: lat,
            HEIGHT: pix,
            WIDTH: pix,
            UNET_BATCH: AxisRange(2, 2 * self.max_batch, 2),
            EVALUATIONS: AxisRange(1, MAX_EVALUATIONS),
            NOISE_ROWS: AxisRange(1, MAX_EVALUATIONS),
        }
        return {a: table[a] for a in spec.axis_names()}


def validate_build_ranges(min_size: int, max_size: int, max_batch: int, multiple: int = 8) -> None:
    """Raise ValueError naming the bad value if sizes or batch are not buildable."""
    for label, v in (("min-size", min_size), ("max-size", max_size)):
        if v < multiple or v % multiple:
            raise ValueError(f"{label} {v} must be a positive multiple of {multiple}")
    if min_size > max_size:
        raise ValueError(f"min-size {min_size} is larger than max-size {max_size}")
    if max_batch < 1:
        raise ValueError(f"max-batch {max_batch} must be at least 1")


@dataclass(frozen=True)
class FamilyDefaults:
    """A model family's generation defaults: what `generate` uses where a request leaves them out."""

    size: int  # image side in pixels (export records the checkpoint's own: UNet sample size x VAE factor)
    steps: int
    guidance_scale: float
    scheduler: str | None  # a sampler name; None: the one matching the checkpoint's own scheduler
    steps_range: tuple[int, int] = (1, MAX_EVALUATIONS)  # what the family is distilled for; outside: a warning
    strength: float = 0.8  # img2img without a strength (diffusers' StableDiffusionImg2ImgPipeline default)


FAMILY_DEFAULTS: Mapping[str, FamilyDefaults] = {
    "sd1": FamilyDefaults(512, 30, 7.5, None),
    "sd2": FamilyDefaults(768, 30, 7.5, None),  # 768 for the v-prediction models, 512 for the base
    "sdxl": FamilyDefaults(1024, 30, 5.0, None),
    # Adversarial diffusion distillation: 1-4 steps, no guidance, Euler ancestral on trailing timesteps.
    "sd-turbo": FamilyDefaults(512, 1, 0.0, "euler_a", (1, 4)),
    "sdxl-turbo": FamilyDefaults(512, 1, 0.0, "euler_a", (1, 4)),
    # Latent consistency distillation: 2-8 steps, guidance embedded in the UNet (diffusers' defaults).
    "lcm": FamilyDefaults(512, 4, 8.5, "lcm", (2, 8)),
    # The SDXL refiner: an image-to-image model (StableDiffusionXLImg2ImgPipeline's defaults), run on an
    # image or as the last denoising steps of an SDXL base (Pipeline.generate(refiner=...)).
    "sdxl-refiner": FamilyDefaults(1024, 30, 5.0, None, strength=0.3),
}
REFINER_FAMILY = "sdxl-refiner"
REFINED_FAMILIES = ("sdxl", "sdxl-turbo")  # the bases whose latents the refiner continues
FAMILIES: tuple[str, ...] = tuple(FAMILY_DEFAULTS)
