"""A1111's web UI API (`/sdapi/v1/*`) in terms of GenerationRequests: its fields, its seeds, its answers.

Every field of A1111's txt2img and img2img requests falls in one of three sets: the ones this engine
runs (prompt, seed, sampler, steps, CFG scale, size, batch_size x n_iter, init images, strength, resize
mode, mask); the ones that change the image and that it does not run (hires fix, subseeds, face
restoration, scripts, ...), refused with 422 naming the field unless they hold their no-op value; and
UI and saving settings, accepted and ignored. Fields left out take the engine's defaults, not A1111's
UI defaults (a 512x512 default means nothing to a 64x64 engine).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Any, Mapping

from PIL import Image

from diffusion_engine.runtime.infotext import A1111_SAMPLERS, a1111_name, sampler_from_a1111
from diffusion_engine.runtime.request import GenerationRequest

MAX_SEED = 4294967294  # A1111 draws random seeds in [0, 2**32 - 2]

# Our resize modes by A1111's resize_mode number (3, "latent upscale", has no counterpart).
RESIZE_MODES = {0: "just-resize", 1: "crop-and-resize", 2: "resize-and-fill"}

# Fields that change the image and that this engine does not run: field -> the values that leave the
# image alone (a request may send those).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "subseed_strength": (0, 0.0, None),
    "seed_resize_from_h": (-1, 0, None),
    "seed_resize_from_w": (-1, 0, None),
    "restore_faces": (False, None),
    "tiling": (False, None),
    "enable_hr": (False, None),
    "eta": (None,),
    "s_min_uncond": (0, 0.0, None),
    "s_churn": (0, 0.0, None),
    "s_tmin": (0, 0.0, None),
    "s_tmax": (None,),
    "s_noise": (1, 1.0, None),
    "refiner_checkpoint": (None, "", "None"),
    "refiner_switch_at": (None,),
    "script_name": (None, ""),
    "alwayson_scripts": (None, {}),
    "infotext": (None, ""),
    "firstpass_image": (None,),
    "styles": (None, []),
    # img2img
    "image_cfg_scale": (None,),  # instruct-pix2pix models only
    "initial_noise_multiplier": (None, 1, 1.0),
    "latent_mask": (None,),
    "mask_blur": (None, 0),
    "mask_blur_x": (None, 0),
    "mask_blur_y": (None, 0),
    "inpainting_fill": (None, 1),  # 1, "original": the noised image, as diffusers' inpainting
    "inpaint_full_res": (None, False, 0),  # "only masked" crops around the mask: not run here
}

# Fields that do not change the image: accepted and ignored (saving, UI, hires settings without enable_hr, ...).
IGNORED = frozenset({
    "do_not_save_samples", "do_not_save_grid", "save_images", "comments", "force_task_id",
    "disable_extra_networks", "override_settings_restore_afterwards", "firstphase_width", "firstphase_height",
    "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name",
    "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_cfg", "hr_distilled_cfg",
    "subseed", "script_args", "sampler_index", "send_images", "include_init_images", "inpaint_full_res_padding",
    "mask_round", "denoising_strength", "clip_skip", "user", "distilled_cfg_scale",
})

TXT2IMG = frozenset({"prompt", "negative_prompt", "seed", "sampler_name", "scheduler", "steps", "cfg_scale", "width",
                     "height", "batch_size", "n_iter", "override_settings"})
IMG2IMG = TXT2IMG | {"init_images", "resize_mode", "mask", "inpainting_mask_invert"}

# Options (`override_settings`, POST /sdapi/v1/options) that would change the image: option -> no-op values.
RESULT_OPTIONS: dict[str, tuple[Any, ...]] = {
    "CLIP_stop_at_last_layers": (1,),
    "eta_ddim": (0, 0.0),
    "eta_ancestral": (1, 1.0),
    "sd_vae": ("Automatic", "None", None),
    "s_churn": (0, 0.0), "s_tmin": (0, 0.0), "s_noise": (1, 1.0),
    "randn_source": ("CPU",),  # our noise is numpy's, on the CPU, whatever the backend
}


@dataclass(frozen=True)
class Model:
    """What the API says about the loaded model (sd-models, options, infotexts)."""

    name: str
    short_hash: str | None
    sha256: str | None
    filename: str

    @property
    def title(self) -> str:
        return f"{self.name} [{self.short_hash}]" if self.short_hash else self.name


def check_options(options: Any, model: Model, field: str = "override_settings") -> None:
    """An options mapping: sd_model_checkpoint must name the loaded model; result-changing options their no-op value."""
    if options is None:
        return
    if not isinstance(options, Mapping):
        raise ValueError(f"{field} must be an object of options, got {type(options).__name__}")
    for key, value in options.items():
        if key == "sd_model_checkpoint":
            if value not in (model.title, model.name, model.short_hash, model.sha256):
                raise ValueError(f"{field}.sd_model_checkpoint {value!r}: this server runs one model, {model.title!r}")
        elif key in RESULT_OPTIONS and value not in RESULT_OPTIONS[key]:
            raise ValueError(f"{field}.{key} {value!r} would change the image and this engine does not run it; "
                             f"allowed: {', '.join(map(repr, RESULT_OPTIONS[key]))}")


def _int(body: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = body.get(key, default)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"{key} must be an integer, got {value!r}")


def _number(body: Mapping[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    return float(value)


def check_fields(body: Any, allowed: frozenset[str]) -> None:
    """Every field is run, ignored, or refused with one line naming it."""
    if not isinstance(body, Mapping):
        raise ValueError(f"the request body must be a JSON object, got {type(body).__name__}")
    for key, value in body.items():
        if key in allowed or key in IGNORED:
            continue
        if key in UNSUPPORTED:
            if value not in UNSUPPORTED[key]:
                ok = ", ".join(map(repr, UNSUPPORTED[key]))
                raise ValueError(f"{key} {value!r} changes the image and this engine does not run it; allowed: {ok}")
            continue
        raise ValueError(f"unknown field {key!r}")


def random_seed() -> int:
    return random.SystemRandom().randrange(MAX_SEED + 1)


def sampler(body: Mapping[str, Any]) -> str | None:
    """Our sampler for the request's sampler_name (or the older sampler_index) and scheduler; None: the engine's."""
    name = body.get("sampler_name") or body.get("sampler_index")
    schedule = body.get("scheduler")
    if name is None:
        if schedule not in (None, "", "Automatic"):
            raise ValueError(f"scheduler {schedule!r} needs a sampler_name")
        return None
    return sampler_from_a1111(name, schedule)


def images_and_seeds(body: Mapping[str, Any], max_images: int) -> tuple[int, int, list[int]]:
    """(batch_size, n_iter, one seed per image): A1111's seed + i for image i, a random first seed for -1."""
    batch_size, n_iter = _int(body, "batch_size", 1), _int(body, "n_iter", 1)
    for key, v in (("batch_size", batch_size), ("n_iter", n_iter)):
        if v < 1:
            raise ValueError(f"{key} must be at least 1, got {v}")
    if batch_size * n_iter > max_images:
        raise ValueError(f"batch_size {batch_size} x n_iter {n_iter} is {batch_size * n_iter} images; this server "
                         f"makes at most {max_images} per request")
    seed = _int(body, "seed", -1)
    if seed is None or seed == -1:
        seed = random_seed()
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be -1 (random) or an integer in [0, {MAX_SEED}], got {seed}")
    return batch_size, n_iter, [(seed + i) % (MAX_SEED + 1) for i in range(batch_size * n_iter)]


def requests(body: Mapping[str, Any], model: Model, max_images: int,
             init_image: Image.Image | None = None, mask: Image.Image | None = None) -> list[GenerationRequest]:
    """One GenerationRequest per image (each with its own seed; the scheduler batches them again)."""
    check_options(body.get("override_settings"), model)
    prompt, negative = body.get("prompt", ""), body.get("negative_prompt", "")
    for key, value in (("prompt", prompt), ("negative_prompt", negative)):
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {type(value).__name__}")
    _, _, seeds = images_and_seeds(body, max_images)
    common: dict[str, Any] = dict(
        prompt=prompt, negative_prompt=negative, steps=_int(body, "steps"), guidance_scale=_number(body, "cfg_scale"),
        scheduler=sampler(body), height=_int(body, "height"), width=_int(body, "width"))
    if init_image is not None:
        mode = _int(body, "resize_mode", 0)
        if mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {mode} is not one this engine runs; valid: "
                             + ", ".join(f"{k} ({v})" for k, v in RESIZE_MODES.items()))
        common.update(image=init_image, strength=_number(body, "denoising_strength"), resize_mode=RESIZE_MODES[mode])
        if mask is not None:
            common["mask"] = mask
    return [GenerationRequest(**common, seed=s) for s in seeds]


def flatten(image: Image.Image) -> Image.Image:
    """An init image as A1111 takes it: transparency flattened onto white (its default background), RGB."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def mask_levels(mask: Image.Image, invert: Any) -> Image.Image:
    """A1111's mask: an RGBA mask with real transparency is its alpha channel, binarised (> 128 repaints);
    else its grayscale; `inpainting_mask_invert` 1 swaps repaint and keep."""
    if invert not in (None, 0, 1, False, True):
        raise ValueError(f"inpainting_mask_invert must be 0 or 1, got {invert!r}")
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        levels = mask.getchannel("A").point(lambda x: 255 if x > 128 else 0)
    else:
        levels = mask.convert("L")
    if invert:
        levels = levels.point(lambda x: 255 - x)
    return levels


def samplers() -> list[dict[str, Any]]:
    """GET /sdapi/v1/samplers: A1111's shape, one entry per sampler this engine runs."""
    return [{"name": name, "aliases": list(aliases), "options": {}} for name, aliases in A1111_SAMPLERS.values()]


def info(results: list[Any], infotexts: list[str], body: Mapping[str, Any], model: Model, seeds: list[int]) -> str:
    """The `info` JSON string of a txt2img/img2img answer (the keys A1111 clients read)."""
    first = results[0].parameters
    batch_size = _int(body, "batch_size", 1)
    return json.dumps({
        "prompt": first["prompt"], "all_prompts": [r.parameters["prompt"] for r in results],
        "negative_prompt": first["negative_prompt"],
        "all_negative_prompts": [r.parameters["negative_prompt"] for r in results],
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0,
        "width": first["width"], "height": first["height"], "sampler_name": a1111_name(first["scheduler"]),
        "cfg_scale": first["guidance_scale"], "steps": first["steps"], "batch_size": batch_size,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": model.name,
        "sd_model_hash": model.short_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": first.get("strength"),
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": first.get("inpainting") == "inpainting UNet",
        "version": "diffusion-engine",
    })
