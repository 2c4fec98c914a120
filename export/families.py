"""Which model family a checkpoint is, from its configs alone (model_index.json, component configs).

The rule, in order:
1. The pipeline class names the architecture: StableDiffusionPipeline (SD 1.x / 2.x),
   StableDiffusionXLPipeline (SDXL base: two text encoders), LatentConsistencyModelPipeline, and
   the inpainting and SDXL image-to-image classes (the same families: whether the UNet is an
   inpainting one, 9 input channels, is read from its config at export). A
   StableDiffusionXLImg2ImgPipeline without the first text encoder is the SDXL refiner
   (`sdxl-refiner`: one OpenCLIP encoder, aesthetic-score time ids). Any other class (SD3, Flux,
   ...) is refused, naming its family.
2. A UNet with `time_cond_proj_dim` (a guidance-scale embedding input) is LCM-distilled: `lcm`.
3. SD 2.x is told from SD 1.x by its OpenCLIP text encoder: `gelu` activation (SD 1.x's CLIP uses
   `quick_gelu`) or 1024-wide cross-attention.
4. Turbo checkpoints (adversarial diffusion distillation) are architecturally SD 2.1 / SDXL. They
   are recognised by their sampling set-up, which the distillation fixes: an Euler or Euler
   ancestral scheduler on `trailing` timesteps with epsilon prediction (and no zero-SNR rescale),
   or by "turbo" in the checkpoint's name. `engine-export --family NAME` overrides the rule within
   the architecture (e.g. `--family sdxl` for an SDXL fine-tune that ships a trailing Euler config).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusion_engine.engine.specs import FAMILIES, REFINER_FAMILY
from diffusion_engine.export.errors import CheckpointError

# Architecture (pipeline class) -> the families that share it; the first is the plain one.
ARCHITECTURES = {
    "StableDiffusionPipeline": ("sd1", "sd2", "sd-turbo", "lcm"),
    "StableDiffusionXLPipeline": ("sdxl", "sdxl-turbo"),
    "LatentConsistencyModelPipeline": ("lcm",),
    "StableDiffusionInpaintPipeline": ("sd1", "sd2", "sd-turbo", "lcm"),
    "StableDiffusionXLInpaintPipeline": ("sdxl", "sdxl-turbo"),
    "StableDiffusionXLImg2ImgPipeline": ("sdxl", "sdxl-turbo"),  # without text_encoder: the refiner
}
REFINER_CLASS = "StableDiffusionXLImg2ImgPipeline"
SDXL_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline", REFINER_CLASS)
# Pipeline classes of families we do not export, named in the refusal.
OTHER_FAMILIES = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "StableDiffusionUpscalePipeline": "sd-upscaler",
    "StableDiffusionDepth2ImgPipeline": "sd2-depth",
    "StableCascadeCombinedPipeline": "stable-cascade",
    "PixArtAlphaPipeline": "pixart",
    "PixArtSigmaPipeline": "pixart",
    "KandinskyV22Pipeline": "kandinsky",
    "IFPipeline": "deepfloyd-if",
    "AuraFlowPipeline": "auraflow",
    "SanaPipeline": "sana",
    "HunyuanDiTPipeline": "hunyuan-dit",
}
TURBO_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
# What a family requires of the scheduler config the engine records (applied at export).
SCHEDULER_REQUIREMENTS: Mapping[str, Mapping[str, Any]] = {
    "sd-turbo": {"timestep_spacing": "trailing"},
    "sdxl-turbo": {"timestep_spacing": "trailing"},
}


def refuse(where: str, family: str, why: str = "") -> CheckpointError:
    return CheckpointError(
        f"{where}: {family} checkpoints are not supported{why}; supported families: {', '.join(FAMILIES)}"
    )


def detect_family(
    where: str, index: Mapping[str, Any], configs: Mapping[str, Mapping[str, Any]], name: str = "",
    override: str | None = None,
) -> str:
    """The family of a checkpoint from model_index.json and its unet/text_encoder/scheduler configs."""
    cls = index.get("_class_name", "?")
    if cls not in ARCHITECTURES:
        raise refuse(where, OTHER_FAMILIES.get(cls, cls), f" ({cls})")
    unet, scheduler = configs.get("unet", {}), configs.get("scheduler", {})
    if cls in SDXL_CLASSES and not _has(index, "text_encoder"):
        if cls != REFINER_CLASS:
            raise CheckpointError(
                f"{where}: a {cls} without the first text encoder is not supported; an SDXL refiner is "
                f"exported from its own {REFINER_CLASS} folder (family {REFINER_FAMILY})"
            )
        detected = REFINER_FAMILY
    elif unet.get("time_cond_proj_dim"):
        if cls in SDXL_CLASSES:
            raise refuse(where, "lcm-sdxl", " (an SDXL UNet with a guidance embedding)")
        detected = "lcm"
    elif cls == "LatentConsistencyModelPipeline":
        raise refuse(where, "lcm-lora", " (a LatentConsistencyModelPipeline whose UNet has no time_cond_proj_dim)")
    elif cls in SDXL_CLASSES:
        detected = "sdxl-turbo" if _looks_turbo(scheduler, name) else "sdxl"
    elif _openclip(configs.get("text_encoder", {}), unet):
        detected = "sd-turbo" if _looks_turbo(scheduler, name) else "sd2"
    else:
        detected = "sd1"
    return detected if override is None else _check_override(where, cls, detected, override)


def _check_override(where: str, cls: str, detected: str, override: str) -> str:
    """--family: any family of the same architecture; lcm only with its guidance-embedding UNet."""
    if override not in FAMILIES:
        raise CheckpointError(f"--family {override!r} is not a family; valid: {', '.join(FAMILIES)}")
    if detected == REFINER_FAMILY:
        allowed = [REFINER_FAMILY]
    else:
        allowed = [f for f in ARCHITECTURES[cls] if (f == "lcm") == (detected == "lcm")]
    if override not in allowed:
        raise CheckpointError(
            f"{where}: --family {override} does not fit this checkpoint ({cls}, detected {detected}); "
            f"it can be exported as {', '.join(allowed)}"
        )
    return override


def _has(index: Mapping[str, Any], component: str) -> bool:
    """model_index.json lists a component as [library, class]; [null, null] when it is absent."""
    entry = index.get(component)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def _openclip(text_encoder: Mapping[str, Any], unet: Mapping[str, Any]) -> bool:
    """SD 2.x's OpenCLIP ViT-H text encoder: gelu (CLIP ViT-L uses quick_gelu), 1024 wide."""
    return text_encoder.get("hidden_act") == "gelu" or unet.get("cross_attention_dim") == 1024


def _looks_turbo(scheduler: Mapping[str, Any], name: str) -> bool:
    """The sampling set-up adversarial diffusion distillation fixes, or 'turbo' in the name."""
    setup = (
        scheduler.get("_class_name") in TURBO_SCHEDULERS
        and scheduler.get("timestep_spacing") == "trailing"
        and scheduler.get("prediction_type", "epsilon") == "epsilon"
        and not scheduler.get("rescale_betas_zero_snr", False)
    )
    return setup or "turbo" in name.lower()
