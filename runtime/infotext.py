"""A1111's names for our samplers, and its `parameters` text (what its "PNG Info" tab and image sites read)."""

from __future__ import annotations

from typing import Any, Mapping

from diffusion_engine.runtime.samplers import SAMPLERS

# Our sampler -> (A1111's display name, its aliases). The names are those of A1111's sampler list
# (`GET /sdapi/v1/samplers`); the aliases are its k-diffusion / compvis ids, which it also accepts.
A1111_SAMPLERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ddim": ("DDIM", ("ddim",)),
    "pndm": ("PLMS", ("plms",)),
    "lms": ("LMS", ("k_lms",)),
    "euler": ("Euler", ("k_euler",)),
    "euler_a": ("Euler a", ("k_euler_a", "k_euler_ancestral")),
    "heun": ("Heun", ("k_heun",)),
    "dpmpp_2m": ("DPM++ 2M", ("k_dpmpp_2m",)),
    "dpmpp_2m_karras": ("DPM++ 2M Karras", ("k_dpmpp_2m_ka",)),
    "unipc": ("UniPC", ("unipc",)),
    "lcm": ("LCM", ("k_lcm",)),
}
assert set(A1111_SAMPLERS) == set(SAMPLERS), "every sampler needs an A1111 name"

# A1111 1.9+ sends the noise schedule apart from the sampler ("DPM++ 2M" + "Karras"). "Automatic" is
# the sampler's own; a schedule maps only where one of our samplers is that combination.
AUTOMATIC_SCHEDULE = "Automatic"
_SCHEDULED = {("dpmpp_2m", "karras"): "dpmpp_2m_karras"}

_BY_NAME = {k.lower(): ours for ours, (name, aliases) in A1111_SAMPLERS.items() for k in (name, *aliases)}


def a1111_name(sampler: str) -> str:
    return A1111_SAMPLERS[sampler][0]


def sampler_from_a1111(name: Any, schedule: Any = None) -> str:
    """Our sampler for A1111's sampler name (or alias, any case) and schedule type; ValueError names both."""
    valid = ", ".join(repr(n) for n, _ in A1111_SAMPLERS.values())
    if not isinstance(name, str) or name.lower() not in _BY_NAME:
        raise ValueError(f"sampler_name {name!r} is not one this engine runs; valid: {valid}")
    ours = _BY_NAME[name.lower()]
    if schedule is None or (isinstance(schedule, str) and schedule.lower() in ("", AUTOMATIC_SCHEDULE.lower())):
        return ours
    if isinstance(schedule, str):
        if (ours, schedule.lower()) in _SCHEDULED:
            return _SCHEDULED[(ours, schedule.lower())]
        if ours == "dpmpp_2m_karras" and schedule.lower() == "karras":
            return ours
    raise ValueError(f"scheduler {schedule!r} with sampler {name!r}: this engine runs {AUTOMATIC_SCHEDULE!r} "
                     "(the sampler's own schedule), and 'Karras' only with 'DPM++ 2M'")


def infotext(parameters: Mapping[str, Any], model: str | None = None, model_hash: str | None = None) -> str:
    """A1111's `parameters` text for one image's parameters (a GenerationResult's, with its own seed):

        a red circle on a blue background
        Negative prompt: blurry
        Steps: 30, Sampler: DDIM, CFG scale: 2.0, Seed: 7, Size: 64x64, Model hash: 0123456789, Model: demo
    """
    prompt, negative = parameters["prompt"], parameters.get("negative_prompt") or ""
    if not isinstance(prompt, str) or not isinstance(negative, str):
        raise ValueError("infotext describes one image: give its own prompt and negative prompt")
    fields: list[tuple[str, Any]] = [
        ("Steps", parameters["steps"]), ("Sampler", a1111_name(parameters["scheduler"])),
        ("CFG scale", parameters["guidance_scale"]), ("Seed", parameters["seed"]),
        ("Size", f"{parameters['width']}x{parameters['height']}"),
    ]
    if model_hash:
        fields.append(("Model hash", model_hash))
    if model:
        fields.append(("Model", model))
    if parameters.get("strength") is not None:
        fields.append(("Denoising strength", parameters["strength"]))
    if parameters.get("guidance_rescale"):
        fields.append(("CFG Rescale phi", parameters["guidance_rescale"]))  # the name A1111's CFG-rescale extension writes
    if parameters.get("decoder") == "tiny":
        fields.append(("VAE", "TAESD"))
    lines = [prompt] + ([f"Negative prompt: {negative}"] if negative else [])
    lines.append(", ".join(f"{k}: {_value(v)}" for k, v in fields if v is not None))
    return "\n".join(lines)


def per_image(parameters: Mapping[str, Any], images: int) -> list[dict[str, Any]]:
    """Each image's own parameters of a result's (`images` images, prompt-major): its prompt and negative
    prompt of a list, its index."""
    prompts = parameters["prompt"] if isinstance(parameters["prompt"], list) else [parameters["prompt"]]
    negatives = parameters["negative_prompt"]
    negatives = negatives if isinstance(negatives, list) else [negatives] * len(prompts)
    per = images // len(prompts)
    return [{**parameters, "prompt": prompts[i // per], "negative_prompt": negatives[i // per], "index": i}
            for i in range(images)]


def _value(v: Any) -> str:
    """A field value as A1111 writes it: text with a comma, colon or quote quoted (JSON-style)."""
    text = str(v)
    if any(c in text for c in ',:"\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def model_identity(source: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(Model, Model hash) for an engine's manifest `source`: the checkpoint's folder or file name without
    its suffix, and the first 10 hex digits of its sha256 (A1111's short hash is its file's)."""
    checkpoint, digest = source.get("checkpoint"), source.get("digest")
    name = None
    if isinstance(checkpoint, str) and checkpoint:
        last = checkpoint.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
        name = last.rsplit(".", 1)[0] if last.endswith((".safetensors", ".ckpt")) else last
    short = digest.split(":", 1)[-1][:10] if isinstance(digest, str) and digest else None
    return name, short
