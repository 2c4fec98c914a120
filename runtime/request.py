"""One generation request as a frozen value, and the input image's and mask's checks and resize modes."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from diffusion_engine.engine.specs import DEFAULT_DECODER, DECODERS, VAE_DECODER
from diffusion_engine.runtime.samplers import SamplerPlan, img2img_start

# A1111's img2img resize modes: stretch to the size; scale to cover, then crop the centre; scale to
# fit, then fill the borders with the image's edge pixels.
RESIZE_MODES = ("just-resize", "crop-and-resize", "resize-and-fill")
DEFAULT_STRENGTH = 0.8  # diffusers' img2img default (the engine's family may have its own: defaults.strength)
INPAINT_STRENGTH = 1.0  # diffusers' inpainting default: the masked region starts from pure noise
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """Everything one `Pipeline.generate` call asks for; None means the engine's default.

    `image` (PIL image, HxWx3 uint8 array or a path) starts from that image (img2img): `strength` in
    (0, 1] is how much of the schedule reruns (None: 0.8, or 1.0 with a mask); its size must be the
    request's (height and width default to it) unless `resize_mode` (RESIZE_MODES) says how to fit it.
    `mask` (with an image; grayscale, the image's size, fitted as it is) repaints where it is white
    (>= 128) and keeps the rest: see `mask_pixels`; with `keep_unmasked` the kept pixels are the
    image's own, pasted back after decoding (A1111's overlay; False: the decoded image as diffusers
    returns it, where the VAE's round trip changes them a little). `latents` is the initial noise. SDXL size
    conditioning: original_size, crops_coords_top_left, target_size; the SDXL refiner's: original_size,
    crops_coords_top_left and `aesthetic_score` / `negative_aesthetic_score` (None: 6.0 / 2.5, diffusers').
    `refiner` (a Pipeline of an sdxl-refiner engine, on an SDXL base) takes over the base's latents at
    `refiner_start` (a fraction of the schedule in (0, 1); None: 0.8) and denoises the rest: diffusers'
    base + refiner "ensemble of experts" (denoising_end / denoising_start); it decodes the image.
    `decoder` (DECODERS): "full", the checkpoint's VAE, or "tiny", the engine's tiny autoencoder
    (TAESD / TAESDXL, exported with engine-export --tiny-vae).
    """

    prompt: str | Sequence[str]
    negative_prompt: str | Sequence[str] = ""
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 1
    latents: np.ndarray | None = None
    guidance_rescale: float = 0.0
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    image: Any = None
    strength: float | None = None
    resize_mode: str | None = None
    mask: Any = None
    keep_unmasked: bool = True
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    refiner: Any = None
    refiner_start: float | None = None
    decoder: str = DEFAULT_DECODER

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def _open(image: Any, what: str) -> Any:
    """A PIL image read from a path (whole, the file closed), or `image` itself."""
    if not isinstance(image, (str, Path)):
        return image
    try:
        with Image.open(image) as opened:
            opened.load()
            return opened.copy()
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what} {str(image)!r} cannot be read as an image ({exc})") from exc


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def image_pixels(image: Any) -> np.ndarray:
    """uint8 HxWx3 RGB pixels of a PIL image, an array or a file; an alpha channel is refused, not dropped."""
    image = _open(image, "image")
    if isinstance(image, Image.Image):
        if _has_alpha(image):
            raise ValueError(
                f"image has an alpha channel (mode {image.mode}); flatten it onto a background first "
                "(e.g. Image.alpha_composite) or convert it to RGB"
            )
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image) if isinstance(image, np.ndarray) else None
    if array is None or array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        described = f"{array.dtype} array of shape {array.shape}" if array is not None else type(image).__name__
        raise ValueError(f"image must be a PIL image, a file or a uint8 HxWx3 RGB array, got a {described}")
    return array


def mask_pixels(mask: Any) -> np.ndarray:
    """uint8 HxW levels of a mask (a PIL image, a file, a uint8 or bool HxW array); white repaints.

    Colour masks are converted to grayscale (ITU-R 601 luma, as PIL and diffusers do); a mask with an
    alpha channel is refused (is transparent "keep" or "repaint"? say it in grey levels).
    """
    mask = _open(mask, "mask")
    if isinstance(mask, Image.Image):
        if _has_alpha(mask):
            raise ValueError(
                f"mask has an alpha channel (mode {mask.mode}); give a grayscale mask: white (>= 128) repaints, "
                "black keeps (e.g. mask.getchannel('A') to repaint where it is opaque)"
            )
        return np.asarray(mask.convert("L"))
    array = np.asarray(mask) if isinstance(mask, np.ndarray) else None
    if array is None or array.ndim != 2 or array.dtype not in (np.uint8, np.bool_):
        described = f"{array.dtype} array of shape {array.shape}" if array is not None else type(mask).__name__
        raise ValueError(f"mask must be a PIL image, a file or a uint8 or bool HxW array, got a {described}")
    return array.astype(np.uint8) * 255 if array.dtype == np.bool_ else array


def binary_mask(levels: np.ndarray) -> np.ndarray:
    """1.0 where a mask repaints (level >= 128, diffusers' binarisation at 0.5), else 0.0; float32 HxW."""
    return (levels >= 128).astype(np.float32)


def latent_mask(binary: np.ndarray, factor: int) -> np.ndarray:
    """The mask at latent resolution, float32 [1, 1, h, w]: the top-left pixel of each factor x factor
    cell (torch's nearest interpolation, as diffusers' prepare_mask_latents)."""
    return np.ascontiguousarray(binary[::factor, ::factor])[None, None]


def check_mask_size(levels: np.ndarray, image_size: tuple[int, int]) -> None:
    """The mask must be the init image's size (both are then fitted to the request alike)."""
    if levels.shape != image_size:
        (h, w), (ih, iw) = levels.shape, image_size
        raise ValueError(f"mask is {w}x{h} but the image is {iw}x{ih}; give a mask the image's size")


def check_repaints(binary: np.ndarray, factor: int) -> None:
    """The (fitted, binarised) mask repaints something, at pixel and at latent resolution."""
    if not binary.any():
        raise ValueError("mask is all black: it marks nothing to repaint (white, >= 128, repaints); "
                         "leave the mask out for img2img")
    if not latent_mask(binary, factor).any():
        raise ValueError(f"mask's white area covers no latent cell (the top-left pixel of a {factor}x{factor} "
                         f"block); make it at least {factor} pixels wide and tall")


def masked_pixels(pixels: np.ndarray, binary: np.ndarray) -> np.ndarray:
    """An inpainting UNet's conditioning image: the image with the repainted area mid-grey (diffusers:
    image * (mask < 0.5) in [-1, 1], i.e. level 127.5; uint8 pixels take 128)."""
    return np.where(binary[..., None] > 0, np.uint8(128), pixels)


def fit_image(pixels: np.ndarray, height: int, width: int, resize_mode: str | None) -> np.ndarray:
    """The pixels (HxWx3, or HxW levels) at height x width: unchanged if already that size, else per
    resize_mode (None: an error)."""
    h, w = pixels.shape[:2]
    if (h, w) == (height, width):
        return pixels
    if resize_mode is None:
        raise ValueError(
            f"image is {w}x{h} but the request is {width}x{height}; leave width and height out to use the "
            f"image's size, or pass resize_mode, one of {', '.join(RESIZE_MODES)}"
        )
    image = Image.fromarray(pixels)
    if resize_mode == "just-resize":
        return np.asarray(image.resize((width, height), Image.LANCZOS))
    cover = resize_mode == "crop-and-resize"
    scale = max(width / w, height / h) if cover else min(width / w, height / h)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    scaled = np.asarray(image.resize((sw, sh), Image.LANCZOS))
    if cover:
        top, left = (sh - height) // 2, (sw - width) // 2
        return scaled[top : top + height, left : left + width]
    top, left = (height - sh) // 2, (width - sw) // 2
    pad = ((top, height - sh - top), (left, width - sw - left)) + ((0, 0),) * (pixels.ndim - 2)
    return np.pad(scaled, pad, mode="edge")


def check_resize_mode(resize_mode: Any) -> None:
    if resize_mode is not None and resize_mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize_mode {resize_mode!r}; valid: {', '.join(RESIZE_MODES)}")


def check_strength(strength: Any, steps: int, scheduler: str) -> None:
    """strength in (0, 1], leaving at least one step to run (diffusers' get_timesteps rule; lcm instead
    shortens its schedule, which its plan checks)."""
    number = isinstance(strength, (int, float, np.floating)) and not isinstance(strength, bool)
    if not number or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    if scheduler != "lcm" and img2img_start(steps, float(strength)) >= steps:
        raise ValueError(
            f"strength {strength} with {steps} steps reruns no step (int({steps} x {strength}) = 0); "
            "raise strength or steps"
        )


@dataclass(frozen=True, eq=False)
class Job:
    """A request checked against the engine, with its defaults filled in and its initial noise drawn."""

    request: GenerationRequest
    prompts: list[str]
    negatives: list[str]
    steps: int
    guidance_scale: float
    scheduler: str
    height: int
    width: int
    n: int  # images: prompts x batch_size
    size_ids: tuple[float, ...] | None
    plan: SamplerPlan
    seed: int | None
    rng: np.random.Generator
    # The initial latents (txt2img) or the noise added to the image latents (img2img); None where the
    # loop continues another model's latents (the refiner after a base).
    noise: np.ndarray | None
    guided: bool
    rescale: float | None
    pixels: np.ndarray | None  # img2img: the init image, uint8 [1, H, W, 3] at the request's size
    posterior_noise: np.ndarray | None  # eps of the image's encoder posterior sample, where its latents are used
    backend: str
    family: str
    strength: float | None  # the image's strength, its default filled in
    # Inpainting: the mask at latent resolution (1 = repaint), float32 [1, 1, h, w]; for an inpainting
    # UNet the masked image (uint8 [1, H, W, 3]) and the eps of its posterior sample.
    mask: np.ndarray | None = None
    masked_pixels: np.ndarray | None = None
    masked_posterior_noise: np.ndarray | None = None
    pixel_mask: np.ndarray | None = None  # the request's own mask, binarised, float32 [H, W]: the paste-back
    negative_size_ids: tuple[float, ...] | None = None  # the unconditional rows' time ids where they differ (refiner)
    decoder: str = VAE_DECODER  # the component that decodes the final latents (DECODERS[request.decoder])

    @property
    def pure_noise_start(self) -> bool:
        """Inpainting at strength 1 starts from noise alone (diffusers' is_strength_max), not the noised image."""
        return self.mask is not None and self.strength == 1.0

    @property
    def per_image(self) -> list[str]:
        """Each prompt once per image, unconditional rows first when guided: the UNet's batch order."""
        prompts = self.negatives + self.prompts if self.guided else self.prompts
        return [p for p in prompts for _ in range(self.request.batch_size)]

    def parameters(self) -> dict[str, Any]:
        """What made the images (saved in the PNGs)."""
        params = {
            "prompt": self.prompts if len(self.prompts) > 1 else self.prompts[0],
            "negative_prompt": self.negatives if len(self.negatives) > 1 else self.negatives[0],
            "steps": self.steps, "guidance_scale": self.guidance_scale,
            "guidance_rescale": self.request.guidance_rescale, "scheduler": self.scheduler, "seed": self.seed,
            "height": self.height, "width": self.width, "batch_size": self.request.batch_size,
            "backend": self.backend, "family": self.family, "decoder": self.request.decoder,
        }
        if self.size_ids is not None:
            params["time_ids"] = list(self.size_ids)
        if self.negative_size_ids is not None:
            params["negative_time_ids"] = list(self.negative_size_ids)
        if self.pixels is not None:
            params.update(strength=self.strength, resize_mode=self.request.resize_mode)
        if self.mask is not None:
            params["inpainting"] = "inpainting UNet" if self.masked_pixels is not None else "masked blend"
        return params


def check_fraction(name: str, value: Any) -> float:
    """A fraction of the schedule strictly inside (0, 1) (diffusers' denoising_start / denoising_end)."""
    number = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if not number or not 0 < value < 1:
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def check_score(name: str, value: Any) -> float:
    """An aesthetic score: a finite number (the refiner was trained on LAION aesthetic scores, ~1..10)."""
    number = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if not number or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_decoder(decoder: Any, available: Any) -> str:
    """The component that decodes for `decoder` (DECODERS), which must be one of the engine's (`available`)."""
    if not isinstance(decoder, str) or decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(map(repr, DECODERS))}, got {decoder!r}")
    name = DECODERS[decoder]
    if name not in available:
        have = ", ".join(repr(k) for k, v in DECODERS.items() if v in available)
        raise ValueError(f"decoder {decoder!r}: this engine has no {name} (export it with engine-export --tiny-vae "
                         f"PATH); its decoders: {have}")
    return name


def check_seed(seed: Any) -> int | None:
    """None or -1 (A1111's convention): a random seed; else an integer >= 0."""
    integer = isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)
    if seed is None or (integer and seed == -1):
        return None
    if not integer or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, or -1 (or None) for a random seed, got {seed!r}")
    return int(seed)



def prompt_lists(prompt: str | Sequence[str], negative: str | Sequence[str]) -> tuple[list[str], list[str]]:
    prompts = as_list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    negatives = as_list("" if negative is None else negative, len(prompts))
    if negatives is None or len(negatives) != len(prompts) or not all(isinstance(p, str) for p in negatives):
        raise ValueError(f"negative_prompt must be a string or a list of {len(prompts)} strings, got {negative!r}")
    return prompts, negatives



def as_list(text: Any, repeat: int = 1) -> list | None:
    """A string repeated `repeat` times, a list or tuple as a list, anything else None (the caller's error)."""
    if isinstance(text, str):
        return [text] * repeat
    return list(text) if isinstance(text, (list, tuple)) else None



def initial_noise(latents: np.ndarray | None, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """The caller's initial noise (shape checked) or standard-normal noise from the seeded rng."""
    if latents is None:
        return rng.standard_normal(shape, dtype=np.float32)
    latents = np.asarray(latents)
    if latents.shape != shape:
        raise ValueError(f"latents have shape {latents.shape}; this request needs {shape}")
    if not np.issubdtype(latents.dtype, np.floating) or not np.isfinite(latents).all():
        raise ValueError("latents must be finite floating-point values")
    return latents.astype(np.float32)
