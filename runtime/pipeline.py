"""The Python API: `Pipeline.load(engine_dir)` then `pipe.generate(prompt, ...)`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from diffusion_engine.engine.manifest import Manifest, read_manifest
from diffusion_engine.engine.specs import (
    COMPONENTS,
    DEFAULT_DECODER,
    ENCODER_HIDDEN_STATES,
    EVALUATIONS,
    FAMILY_DEFAULTS,
    HEIGHT,
    IMAGE_GRAPHS,
    IMAGE_LATENTS,
    IMAGES,
    INITIAL_NOISE,
    INPUT_IDS,
    INPUT_IDS_2,
    LATENT_HEIGHT,
    LATENT_MEAN,
    LATENT_STD,
    LATENT_WIDTH,
    LATENTS,
    MASK,
    MASKED_IMAGE_LATENTS,
    MASKED_IMAGE_START,
    POSTERIOR_NOISE,
    REFINED_FAMILIES,
    REFINER_FAMILY,
    SAMPLE,
    START,
    STATE,
    STEP_GRAPHS,
    STEP_RESCALED,
    TEXT_EMBEDS,
    TEXT_ENCODER,
    TIME_IDS,
    TIMESTEP_COND,
    TINY_VAE_DECODER,
    OPTIONAL_COMPONENTS,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    WIDTH,
    FamilyDefaults,
    StepFeatures,
    image_start_name,
)
from diffusion_engine.runtime import memory
from diffusion_engine.runtime.backends import Components, open_components, pick_backend
from diffusion_engine.runtime.denoise import ImageStart, Progress, loop_inputs, start_scales, with_image_start
from diffusion_engine.runtime.samplers import (
    SAMPLERS,
    SamplerPlan,
    default_sampler,
    denoising_end_plan,
    denoising_start,
    img2img_plan,
    make_plan,
)
from diffusion_engine.runtime.request import (
    INPAINT_STRENGTH,
    GenerationRequest,
    Job,
    binary_mask,
    check_decoder,
    check_fraction,
    check_mask_size,
    check_repaints,
    check_resize_mode,
    check_score,
    check_seed,
    check_strength,
    fit_image,
    image_pixels,
    initial_noise,
    latent_mask,
    mask_pixels,
    masked_pixels,
    prompt_lists,
)
from diffusion_engine.runtime.tokenizer import PromptTokenizer

logger = logging.getLogger(__name__)

REFINER_START = 0.8  # the fraction of the schedule the base runs before the refiner (diffusers' docs' example)
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # StableDiffusionXLImg2ImgPipeline's defaults



@dataclass
class GenerationResult:
    """Images as PIL and as uint8 NHWC, the seed that made them, per-stage seconds, parameters."""

    images: list[Image.Image]
    array: np.ndarray
    seed: int | None
    timings: dict[str, float]
    parameters: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """Text-to-image, image-to-image and inpainting from an engine directory; thread-safe, no torch."""

    def __init__(self, engine_dir: Path, manifest: Manifest, components: Components):
        self.engine_dir = engine_dir
        self.manifest = manifest
        self.components = components
        self.sessions = components.sessions
        self.backend = components.backend
        self.tokenizer = PromptTokenizer.from_manifest(engine_dir, manifest.tokenizer)
        # One tokenizer per text-encoder input: SDXL's second tokenizer pads differently.
        self.tokenizers = {INPUT_IDS: self.tokenizer}
        if manifest.tokenizer_2 is not None:
            self.tokenizers[INPUT_IDS_2] = PromptTokenizer.from_manifest(engine_dir, manifest.tokenizer_2)
        self._plan = lru_cache(maxsize=32)(self._make_plan)

    @classmethod
    def load(cls, engine_dir: str | Path, backend: str = "auto", cuda_graphs: bool = True) -> "Pipeline":
        """Open every component of an engine directory on a backend (see runtime/backends.py)."""
        engine_dir = Path(engine_dir)
        manifest = read_manifest(engine_dir)
        names = runtime_components(manifest)
        chosen = pick_backend(backend, engine_dir, manifest, names)
        if chosen == "ort-cpu" and not manifest.components[UNET].score_buffers:
            logger.warning("%s was exported before fused CPU attention: its UNet holds whole attention score "
                           "matrices (17 GB per guided 1024x1024 SD1.5 call) and requests are not checked against "
                           "memory; export it again", engine_dir)
        return cls(engine_dir, manifest, open_components(engine_dir, manifest, chosen, names, cuda_graphs))

    @property
    def defaults(self) -> FamilyDefaults:
        """What generate uses where a request leaves it out: the manifest's defaults (older manifests:
        the family's, with the checkpoint's own scheduler); the size clamped to the built range."""
        m, b = self.manifest, self.manifest.build
        family, d = FAMILY_DEFAULTS.get(m.family, FAMILY_DEFAULTS["sd1"]), m.defaults
        return FamilyDefaults(
            size=min(max(int(d.get("size", family.size)), b.min_size), b.max_size),
            steps=int(d.get("steps", family.steps)),
            guidance_scale=float(d.get("guidance_scale", family.guidance_scale)),
            scheduler=d.get("scheduler") or family.scheduler or default_sampler(m.scheduler_config),
            steps_range=tuple(d.get("steps_range", family.steps_range)),
            strength=float(d.get("strength", family.strength)),
        )

    @property
    def default_scheduler(self) -> str:
        return self.defaults.scheduler

    @property
    def default_size(self) -> int:
        return self.defaults.size

    def _make_plan(self, scheduler: str, steps: int, strength: float | None = None) -> SamplerPlan:
        config = self.manifest.scheduler_config
        return make_plan(scheduler, config, steps) if strength is None else img2img_plan(scheduler, config, steps, strength)

    def _sampler_plan(self, scheduler: str, steps: int, strength: float | None = None) -> SamplerPlan:
        """The plan (img2img's with a strength), or one error naming the step limit of this sampler on
        this engine (its scheduler config, the strength, the step graph's longest table) where `steps` is past it."""
        try:
            plan = self._plan(scheduler, steps, strength)
            if plan.num_evaluations <= self._max_evaluations:
                return plan
        except ValueError:
            pass
        limit = self._max_steps(scheduler, strength)
        at = "" if strength is None else f" at strength {strength}"
        if limit is None:
            raise ValueError(f"{scheduler} cannot run{at} with this engine's scheduler config; choose another "
                             f"scheduler{'' if strength is None else ' or a higher strength'}")
        raise ValueError(f"steps {steps} is more than {scheduler} takes on this engine{at}: 1 to {limit}")

    @property
    def _max_evaluations(self) -> int:
        """The longest coefficient table (UNet evaluations per image) the step graphs were built for."""
        return min(self.manifest.components[n].axis_ranges[EVALUATIONS]["max"] for n in STEP_GRAPHS
                   if n in self.manifest.components)

    def _max_steps(self, scheduler: str, strength: float | None = None) -> int | None:
        """The most steps `scheduler` can take here (bisection: a plan that works for n works for fewer)."""
        def fits(n: int) -> bool:
            try:
                return self._plan(scheduler, n, strength).num_evaluations <= self._max_evaluations
            except ValueError:
                return False

        lo, hi = 0, int(self.manifest.scheduler_config.get("num_train_timesteps", 1000))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo or None

    def generate(
        self, prompt: str | Sequence[str] | GenerationRequest, negative_prompt: str | Sequence[str] = "",
        steps: int | None = None, guidance_scale: float | None = None, scheduler: str | None = None,
        seed: int | None = None, height: int | None = None, width: int | None = None, batch_size: int = 1,
        latents: np.ndarray | None = None, progress: Progress | None = None, guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None, image: Any = None, strength: float | None = None,
        resize_mode: str | None = None, mask: Any = None, keep_unmasked: bool = True,
        aesthetic_score: float | None = None, negative_aesthetic_score: float | None = None,
        refiner: "Pipeline | None" = None, refiner_start: float | None = None, decoder: str = DEFAULT_DECODER,
    ) -> GenerationResult:
        """Generate batch_size images per prompt: the keyword form of `run(GenerationRequest(...))`.

        A GenerationRequest may be passed as the only argument instead. See GenerationRequest for
        the fields; steps, guidance_scale, scheduler, height and width default to the engine's
        (`defaults`), height and width to the image's size with `image`.
        """
        if isinstance(prompt, GenerationRequest):
            return self.run(prompt, progress)
        given = locals()
        return self.run(GenerationRequest(**{k: given[k] for k in GenerationRequest.field_names()}), progress)

    def run(self, request: GenerationRequest, progress: Progress | None = None) -> GenerationResult:
        """One request through the stages: checks, text, latents (noise, the noised image, the inpainting
        set-up), loop, decode; with a refiner, the base's loop hands over to the refiner's stages."""
        if request.refiner is not None:
            return self._run_refined(request, progress)
        start = time.perf_counter()
        job = self.prepare(request)  # every check, before any model runs
        timings: dict[str, float] = {}
        ids = self._tokenize(job, timings)
        # GPU backends run on one stream: one request at a time there (the lock is a no-op on CPU).
        with self.components.lock:
            final = self._latents(job, ids, progress, timings)
            pixels = self._decode(final, timings, job.decoder)
        if job.pixel_mask is not None and request.keep_unmasked:  # the kept pixels are the image's own
            pixels = np.where(job.pixel_mask[None, :, :, None] > 0, pixels, job.pixels).astype(np.uint8)
        timings["total"] = time.perf_counter() - start
        return GenerationResult([Image.fromarray(p) for p in pixels], pixels, job.seed, timings, job.parameters())

    def _latents(self, job: Job, ids: dict[str, np.ndarray], progress: Progress | None, timings: dict[str, float],
                 handed: np.ndarray | None = None) -> Any:
        """The text, image and loop stages (the caller holds the lock): the final latents, on the device
        on GPU backends. `handed`: latents to continue as they are (the refiner after a base)."""
        static = self._encode_text(job, ids, timings)
        image_latents, masked_latents = self._encode_image(job, timings)
        return self._denoise(job, static, image_latents, masked_latents, progress, timings, handed)

    def _decode(self, latents: Any, timings: dict[str, float], decoder: str = VAE_DECODER) -> np.ndarray:
        """The final latents to uint8 pixels with `decoder` (the VAE decoder or the tiny one), timed under its name."""
        t = time.perf_counter()
        pixels = np.asarray(self.sessions[decoder].run({LATENTS: latents})[IMAGES])  # the one device->host copy
        timings[decoder] = time.perf_counter() - t
        return pixels

    def _run_refined(self, request: GenerationRequest, progress: Progress | None) -> GenerationResult:
        """The base denoises to refiner_start and hands its latents to the refiner, which denoises the rest
        and decodes (diffusers' SDXL base + refiner: denoising_end, then denoising_start)."""
        start = time.perf_counter()
        base, refined = self.prepare_refined(request)  # both engines' checks, before any model runs
        refiner: Pipeline = request.refiner
        first, total = base.plan.num_evaluations, base.plan.num_evaluations + refined.plan.num_evaluations
        timings: dict[str, float] = {}
        ids = self._tokenize(base, timings)
        with self.components.lock:
            report = None if progress is None else (lambda done, _: progress(done, total))
            # The hand-over goes through the host (one latent-sized copy): the two engines run on their own streams.
            handed = np.asarray(self._latents(base, ids, report, timings), np.float32)
        part: dict[str, float] = {}
        ids = refiner._tokenize(refined, part)
        with refiner.components.lock:
            report = None if progress is None else (lambda done, _: progress(first + done, total))
            pixels = refiner._decode(refiner._latents(refined, ids, report, part, handed), part, refined.decoder)
        timings.update({f"refiner_{k}" if k != refined.decoder else k: v for k, v in part.items()})
        timings["total"] = time.perf_counter() - start
        fraction = REFINER_START if request.refiner_start is None else float(request.refiner_start)
        parameters = {**base.parameters(), "decoder": request.decoder, "refiner": str(refiner.engine_dir),
                      "refiner_family": refiner.manifest.family,
                      "refiner_start": fraction, "base_evaluations": first,
                      "refiner_evaluations": refined.plan.num_evaluations}
        own = refined.parameters()
        parameters.update({f"refiner_{k}": own[k] for k in ("time_ids", "negative_time_ids") if k in own})
        return GenerationResult([Image.fromarray(p) for p in pixels], pixels, base.seed, timings, parameters)

    def prepare_refined(self, request: GenerationRequest) -> tuple[Job, Job]:
        """The base's job (its plan cut at refiner_start) and the refiner's (its plan from there, the same
        noise generator), every check of both engines made. No model runs."""
        r, refiner = request, request.refiner
        if not isinstance(refiner, Pipeline):
            raise ValueError(f"refiner must be a Pipeline (Pipeline.load of an {REFINER_FAMILY} engine), "
                             f"got {type(refiner).__name__}")
        if refiner.manifest.family != REFINER_FAMILY:
            raise ValueError(f"refiner: {refiner.engine_dir} is a {refiner.manifest.family} engine, not an "
                             f"{REFINER_FAMILY} one")
        if self.manifest.family not in REFINED_FAMILIES:
            raise ValueError(f"refiner: the SDXL refiner continues an SDXL base ({', '.join(REFINED_FAMILIES)}); "
                             f"this is a {self.manifest.family} engine")
        ours, theirs = self.manifest.dims, refiner.manifest.dims
        if (ours.latent_channels, ours.vae_scale_factor) != (theirs.latent_channels, theirs.vae_scale_factor):
            raise ValueError(f"refiner: its latents ({theirs.latent_channels} channels, factor {theirs.vae_scale_factor}) "
                             f"are not this engine's ({ours.latent_channels}, factor {ours.vae_scale_factor})")
        if r.mask is not None:
            raise ValueError("refiner= with mask= is not supported; inpaint with the base, then refine the result "
                             "(the refiner's own generate(image=..., strength=...))")
        fraction = check_fraction("refiner_start", REFINER_START if r.refiner_start is None else r.refiner_start)
        # The refiner decodes: the base's decoder is never used (the refiner's is checked in _continuation).
        base = self.prepare(replace(r, refiner=None, refiner_start=None, aesthetic_score=None,
                                    negative_aesthetic_score=None, decoder=DEFAULT_DECODER))
        try:
            base = replace(base, plan=denoising_end_plan(base.plan, self.manifest.scheduler_config, fraction))
        except ValueError as exc:
            raise ValueError(f"refiner_start {fraction}: {exc}") from exc
        return base, refiner._continuation(r, base, fraction)

    def _continuation(self, r: GenerationRequest, base: Job, fraction: float) -> Job:
        """This (refiner) engine's job continuing `base` from `fraction` of the schedule: the base's prompts,
        steps, sampler, guidance, size and noise generator; the refiner's own scheduler config and time ids."""
        try:  # the base's settings must fit this engine's build too
            self._check(base.steps, base.guidance_scale, base.scheduler, base.height, base.width, r.batch_size, base.n)
            self._check_conditioning(base.negatives, r.guidance_rescale)
            decoder = check_decoder(r.decoder, self.sessions)
        except ValueError as exc:
            raise ValueError(f"refiner {self.engine_dir}: {exc}") from exc
        config = self.manifest.scheduler_config
        if base.scheduler == "lcm":
            raise ValueError("refiner: the lcm sampler does not continue another model's latents; choose another scheduler")
        try:
            plan = make_plan(base.scheduler, config, base.steps, denoising_start(base.scheduler, config, base.steps, fraction))
        except ValueError as exc:
            raise ValueError(f"refiner_start {fraction}: {exc}") from exc
        if plan.num_evaluations > self._max_evaluations:
            raise ValueError(f"steps {base.steps}: the refiner's step graphs take at most {self._max_evaluations} "
                             "evaluations")
        size_ids, negative_ids = self._size_ids(base.height, base.width, r.original_size, r.crops_coords_top_left,
                                                None, r.aesthetic_score, r.negative_aesthetic_score)
        guided = self.manifest.dims.cfg_batch == 2 and base.guidance_scale > 1.0
        self._check_memory(base.height, base.width, base.n, guided)
        return Job(r, base.prompts, base.negatives, base.steps, base.guidance_scale, base.scheduler, base.height,
                   base.width, base.n, size_ids, plan, base.seed, base.rng, None, guided,
                   r.guidance_rescale if guided and r.guidance_rescale > 0 else None, None, None, self.backend,
                   self.manifest.family, None, negative_size_ids=negative_ids, decoder=decoder)

    def prepare(self, request: GenerationRequest) -> Job:
        """Check a request against this engine and fill in its defaults; draws the initial noise. No model runs."""
        r = request
        if not isinstance(r.keep_unmasked, bool):
            raise ValueError(f"keep_unmasked must be True or False, got {r.keep_unmasked!r}")
        if r.refiner is not None:
            raise ValueError("a request with a refiner runs through run() / generate(), which prepare both engines")
        if r.refiner_start is not None:
            raise ValueError("refiner_start applies with refiner=...; this request has no refiner")
        if self.manifest.family == REFINER_FAMILY and r.image is None:
            raise ValueError(f"this {REFINER_FAMILY} engine refines images: pass image=... (with strength), or use it "
                             "as refiner= of an SDXL base's generate")
        prompts, negatives = prompt_lists(r.prompt, r.negative_prompt)
        decoder = check_decoder(r.decoder, self.sessions)
        pixels = self._image(r)
        levels = self._mask(r, pixels)
        size = pixels.shape[:2] if pixels is not None else (None, None)
        steps, guidance_scale, scheduler, height, width = self._settings(
            r.steps, r.guidance_scale, r.scheduler, size[0] if r.height is None else r.height,
            size[1] if r.width is None else r.width)
        n = len(prompts) * r.batch_size
        self._check(steps, guidance_scale, scheduler, height, width, r.batch_size, n)
        self._check_conditioning(negatives, r.guidance_rescale)
        size_ids, negative_ids = self._size_ids(height, width, r.original_size, r.crops_coords_top_left, r.target_size,
                                                r.aesthetic_score, r.negative_aesthetic_score)
        strength = None
        if pixels is not None:
            default = self.defaults.strength if levels is None else INPAINT_STRENGTH
            strength = default if r.strength is None else r.strength
            check_strength(strength, steps, scheduler)
            strength, pixels = float(strength), fit_image(pixels, height, width, r.resize_mode)[None]
        dims, f = self.manifest.dims, self.manifest.dims.vae_scale_factor
        binary = None
        if levels is not None:
            binary = binary_mask(fit_image(levels, height, width, r.resize_mode))
            check_repaints(binary, f)
        elif dims.inpainting:  # an inpainting UNet without a mask repaints everything (A1111's rule)
            binary = np.ones((height, width), np.float32)
        plan = self._sampler_plan(scheduler, steps, strength)
        seed = check_seed(r.seed)
        if seed is None and r.latents is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0])
        rng = np.random.default_rng(seed)
        latent = (dims.latent_channels, height // f, width // f)
        # Draws in diffusers' order: the image's posterior sample (where its latents are used), the
        # initial noise, the masked image's posterior sample (an inpainting UNet), then per-step noise.
        uses_image = pixels is not None and not (dims.inpainting and strength == 1.0)
        posterior_noise = rng.standard_normal((1,) + latent, dtype=np.float32) if uses_image else None
        noise = initial_noise(r.latents, (n,) + latent, rng)
        masked, masked_noise = None, None
        if dims.inpainting:
            base = pixels[0] if pixels is not None else np.full((height, width, 3), 128, np.uint8)
            masked = masked_pixels(base, binary)[None]
            masked_noise = rng.standard_normal((1,) + latent, dtype=np.float32)
        # Guidance is a doubled UNet batch, except where the UNet embeds it (LCM: timestep_cond).
        guided = dims.cfg_batch == 2 and guidance_scale > 1.0
        self._check_memory(height, width, n, guided)
        return Job(r, prompts, negatives, steps, guidance_scale, scheduler, height, width, n, size_ids, plan, seed,
                   rng, noise, guided, r.guidance_rescale if guided and r.guidance_rescale > 0 else None,
                   pixels, posterior_noise, self.backend, self.manifest.family, strength,
                   None if binary is None else latent_mask(binary, f), masked, masked_noise,
                   binary if levels is not None else None, negative_ids, decoder)

    def _image(self, r: GenerationRequest) -> np.ndarray | None:
        """The request's init image as uint8 HxWx3, checked (this engine must have a VAE encoder)."""
        check_resize_mode(r.resize_mode)
        if r.image is None:
            for name in ("resize_mode", "strength", "mask"):
                if getattr(r, name) is not None:
                    raise ValueError(f"{name} applies to an init image (image=...); this request has no image")
            return None
        if VAE_ENCODER not in self.sessions:
            raise ValueError(
                f"this engine has no {VAE_ENCODER} (exported before image requests were supported); "
                "export it again to use image=..."
            )
        if isinstance(r.image, (list, tuple)):
            raise ValueError("image must be one image (a PIL image, a file or a uint8 HxWx3 array), not a list")
        return image_pixels(r.image)

    def _mask(self, r: GenerationRequest, pixels: np.ndarray | None) -> np.ndarray | None:
        """The request's inpainting mask as uint8 levels, the init image's size, where this engine can inpaint."""
        if r.mask is None:
            return None
        masked_step = StepFeatures(masked=True).name
        if not self.manifest.dims.inpainting and masked_step not in self.sessions:
            raise ValueError(
                f"this engine has no {masked_step} graph (exported before inpainting); export it again to use mask=..."
            )
        levels = mask_pixels(r.mask)
        check_mask_size(levels, pixels.shape[:2])
        return levels

    def _tokenize(self, job: Job, timings: dict[str, float]) -> dict[str, np.ndarray]:
        """Token ids of each prompt once per image, in the UNet's batch order (so no host op touches the
        embeddings; on GPU backends they stay on the device)."""
        t = time.perf_counter()
        ids = {name: self.tokenizers[name].encode(job.per_image) for name in _input_names(self.sessions[TEXT_ENCODER])}
        timings["tokenize"] = time.perf_counter() - t
        return ids

    def _encode_text(self, job: Job, ids: dict[str, np.ndarray], timings: dict[str, float]) -> dict[str, Any]:
        t = time.perf_counter()
        empty = [i for i, p in enumerate(job.per_image[: job.n if job.guided else 0]) if not p]
        static = self._unet_conditioning(ids, empty, job)
        timings["text_encoder"] = time.perf_counter() - t
        return static

    def _encode_image(self, job: Job, timings: dict[str, float]) -> tuple[Any, Any]:
        """The image's start (img2img, inpainting) and an inpainting UNet's masked-image latents in the UNet's
        batch, from samples of the encoder's posterior (diffusers' retrieve_latents); None where unused.

        With the image-start graphs the start is an ImageStart of backend arrays (on a GPU backend the
        encoder's outputs never leave the device); engines exported before them: host latents, one row per image.
        """
        t = time.perf_counter()
        if image_start_name(job.guided) in self.sessions:
            image, masked = self._image_start(job), self._masked_image_start(job)
        else:  # the host path: the posterior sample and its repeats in numpy
            image = self._posterior_sample(job.pixels, job.posterior_noise, job.n)
            masked = self._posterior_sample(job.masked_pixels, job.masked_posterior_noise, _unet_batch(job))
            masked = None if masked is None else masked.astype(np.float32)
        if image is not None or masked is not None:
            timings["vae_encoder"] = time.perf_counter() - t
        return image, masked

    def _posterior(self, pixels: np.ndarray | None, eps: np.ndarray | None) -> dict[str, Any] | None:
        """The encoder's posterior of one image (backend arrays) and the eps of its sample; None where unused."""
        if pixels is None or eps is None:
            return None
        out = self.sessions[VAE_ENCODER].run({IMAGES: pixels})
        return {LATENT_MEAN: out[LATENT_MEAN], LATENT_STD: out[LATENT_STD], POSTERIOR_NOISE: eps}

    def _posterior_sample(self, pixels: np.ndarray | None, eps: np.ndarray | None, n: int) -> np.ndarray | None:
        posterior = self._posterior(pixels, eps)
        if posterior is None:
            return None
        mean, std = (np.asarray(posterior[k], np.float64) for k in (LATENT_MEAN, LATENT_STD))  # device->host
        return np.repeat(mean + std * eps, n, axis=0)

    def _image_start(self, job: Job) -> ImageStart | None:
        """The image-start graph's run: the image latents, the loop's initial state and first UNet input."""
        posterior = self._posterior(job.pixels, job.posterior_noise)
        if posterior is None:
            return None
        feeds = {**posterior, INITIAL_NOISE: job.noise, START: start_scales(job.plan, job.pure_noise_start)}
        out = self.sessions[image_start_name(job.guided)].run(feeds)
        return ImageStart(out[IMAGE_LATENTS], out[STATE], out[SAMPLE])

    def _masked_image_start(self, job: Job) -> Any:
        """An inpainting UNet's masked-image latents in its batch (the mask's rows), by the graph; None where unused."""
        posterior = self._posterior(job.masked_pixels, job.masked_posterior_noise)
        if posterior is None:
            return None
        return self.sessions[MASKED_IMAGE_START].run({**posterior, MASK: _unet_mask(job)})[MASKED_IMAGE_LATENTS]

    def _denoise(self, job: Job, static: dict[str, Any], image_latents: Any, masked_latents: Any,
                 progress: Progress | None, timings: dict[str, float], handed: np.ndarray | None = None) -> Any:
        """The loop; `handed`: latents it continues as they are (the refiner after a base)."""
        blend = job.mask is not None and not self.manifest.dims.inpainting
        loop = self.components.loop(StepFeatures(job.guided, job.rescale is not None, blend).name)
        mask = None if job.mask is None else np.repeat(job.mask, job.n, axis=0)
        if masked_latents is not None:  # an inpainting UNet's own inputs, in the UNet's (doubled) batch
            static = {**static, MASK: _unet_mask(job), MASKED_IMAGE_LATENTS: masked_latents}
        start = image_latents if isinstance(image_latents, ImageStart) else None
        host = start is None  # engines before the image-start graphs: the start from host latents
        inputs = loop_inputs(job.plan, job.noise if handed is None else handed, static,
                             job.guidance_scale if job.guided else None, job.rng, job.rescale,
                             image_latents if host else None, mask if blend and host else None,
                             job.pure_noise_start, as_is=handed is not None)
        if start is not None:  # the state and first UNet input the graph made (the host start above is unused)
            inputs = with_image_start(inputs, start, job.plan, job.noise, mask if blend else None)
        t = time.perf_counter()
        final, spent = loop.run(inputs, progress)
        timings["denoise"] = time.perf_counter() - t
        if spent:  # GPU loops queue work without waiting: no per-stage split
            timings.update({"unet": spent["unet"], "step_graph": spent["step"],
                            "unet_per_step": spent["unet"] / job.plan.num_evaluations})
        return final

    def _settings(self, steps: Any, guidance_scale: Any, scheduler: Any, height: Any, width: Any) -> tuple:
        """(steps, guidance_scale, scheduler, height, width): the engine's defaults where left out (None)."""
        d = self.defaults
        steps = d.steps if steps is None else steps
        if isinstance(steps, (int, np.integer)) and not d.steps_range[0] <= steps <= d.steps_range[1]:
            logger.warning("%s is made for %d-%d steps; %d asked", self.manifest.family, *d.steps_range, steps)
        guidance_scale = d.guidance_scale if guidance_scale is None else guidance_scale
        # None (left out) takes the default; 0 is a size like any other, refused by _check.
        return (steps, guidance_scale, scheduler or d.scheduler, d.size if height is None else height,
                d.size if width is None else width)

    def _unet_conditioning(self, ids: dict[str, np.ndarray], zero_rows: list[int], job: Job) -> dict[str, Any]:
        """The UNet inputs fixed for the loop: text (and pooled text), time ids, guidance embedding.

        zero_rows: the unconditional rows of empty negative prompts, zeroed where the checkpoint asks
        (SDXL's force_zeros_for_empty_prompt) as diffusers does.
        """
        encoder = self.sessions[TEXT_ENCODER]
        out = encoder.run(ids)
        static = {ENCODER_HIDDEN_STATES: out[encoder.spec.outputs[0].name]}
        if TEXT_EMBEDS in out:
            static[TEXT_EMBEDS] = out[TEXT_EMBEDS]
        if zero_rows and self.manifest.force_zeros_for_empty_prompt:
            static = {k: _zero_rows(v, zero_rows) for k, v in static.items()}
        rows, dims = len(ids[INPUT_IDS]), self.manifest.dims
        if dims.time_ids_size:  # the unconditional rows (first when guided) may have their own (the refiner's)
            unconditional = job.n if job.guided else 0
            negative = job.size_ids if job.negative_size_ids is None else job.negative_size_ids
            static[TIME_IDS] = np.asarray([negative] * unconditional + [job.size_ids] * (rows - unconditional), np.float32)
        if dims.timestep_cond_size:  # LCM: diffusers embeds w = guidance_scale - 1
            static[TIMESTEP_COND] = guidance_embedding(np.full(rows, job.guidance_scale - 1.0), dims.timestep_cond_size)
        return static

    def _size_ids(
        self, height: int, width: int, original_size: Any, crops_coords_top_left: Any, target_size: Any,
        aesthetic_score: Any = None, negative_aesthetic_score: Any = None,
    ) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """SDXL's time ids, checked: (original size, crop top-left, target size) for every row; the refiner's
        (original size, crop top-left, aesthetic score) and its unconditional rows' (..., negative aesthetic
        score), as diffusers' _get_add_time_ids. (None, None) for other families."""
        dims, family = self.manifest.dims, self.manifest.family
        scores = {"aesthetic_score": aesthetic_score, "negative_aesthetic_score": negative_aesthetic_score}
        if not dims.aesthetic and any(v is not None for v in scores.values()):
            named = ", ".join(k for k, v in scores.items() if v is not None)
            raise ValueError(f"{named}: aesthetic-score conditioning is an input of the SDXL refiner; this is a {family} engine")
        given = {"original_size": original_size, "crops_coords_top_left": crops_coords_top_left,
                 "target_size": target_size}
        if not dims.time_ids_size:
            extra = [k for k, v in given.items() if v is not None]
            if extra:
                raise ValueError(f"{', '.join(extra)}: size conditioning is an SDXL input; this is a {family} engine")
            return None, None
        if dims.aesthetic and target_size is not None:
            raise ValueError("target_size: the SDXL refiner conditions on original_size, crops_coords_top_left and "
                             "aesthetic_score, not on a target size")
        pairs = (original_size or (height, width), crops_coords_top_left or (0, 0), target_size or (height, width))
        for name, pair in zip(given, pairs):
            if len(pair) != 2 or not all(_is_count(v) for v in pair):
                raise ValueError(f"{name} must be two integers >= 0 (height, width), got {pair!r}")
        ids = tuple(float(v) for pair in pairs for v in pair)
        if not dims.aesthetic:
            return ids, None
        positive = check_score("aesthetic_score", AESTHETIC_SCORE if aesthetic_score is None else aesthetic_score)
        negative = check_score("negative_aesthetic_score",
                               NEGATIVE_AESTHETIC_SCORE if negative_aesthetic_score is None else negative_aesthetic_score)
        return ids[:4] + (positive,), ids[:4] + (negative,)

    def _check_conditioning(self, negatives: list[str], guidance_rescale: Any) -> None:
        """Guidance rescale in [0, 1] and a step graph for it; no negative prompt where guidance is embedded."""
        number = isinstance(guidance_rescale, (int, float)) and not isinstance(guidance_rescale, bool)
        if not number or not 0 <= guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")
        if guidance_rescale > 0 and STEP_RESCALED not in self.sessions:
            raise ValueError(
                f"this engine has no {STEP_RESCALED} graph (exported before guidance rescale); re-export it"
            )
        if self.manifest.dims.cfg_batch == 1 and any(negatives):
            raise ValueError(
                f"negative prompts are not supported by this {self.manifest.family} engine: its UNet embeds guidance "
                "(distilled with an empty unconditional prompt)"
            )

    def _check(self, steps: Any, guidance: Any, scheduler: str, height: int, width: int, batch_size: int, n: int) -> None:
        """Every request error, before any model runs."""
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if not isinstance(guidance, (int, float)) or not np.isfinite(guidance) or guidance < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance!r}")
        if scheduler not in SAMPLERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; valid: {', '.join(SAMPLERS)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        b, multiple = self.manifest.build, self.manifest.dims.size_multiple
        for label, v in (("height", height), ("width", width)):
            integer = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
            if not integer or not b.min_size <= v <= b.max_size or v % multiple:
                raise ValueError(
                    f"{label} {v!r} is not a size this engine takes: a multiple of {multiple} "
                    f"from {b.min_size} to {b.max_size}"
                )
        if n > b.max_batch:
            raise ValueError(f"{n} images per call (prompts x batch_size) exceeds the engine's max batch {b.max_batch}")

    def _check_memory(self, height: int, width: int, n: int, guided: bool) -> None:
        """On ort-cpu: refuse a request whose attention scores (estimated from the manifest's records of
        what the graphs materialise) need more memory than this process can still get."""
        if self.backend != "ort-cpu":
            return
        f = self.manifest.dims.vae_scale_factor
        sizes = {HEIGHT: height, WIDTH: width, LATENT_HEIGHT: height // f, LATENT_WIDTH: width // f}
        unet_rows = n * (2 if guided else 1)
        rows = {TEXT_ENCODER: unet_rows, UNET: unet_rows, VAE_DECODER: n, TINY_VAE_DECODER: n, VAE_ENCODER: 1}
        needs = {name: memory.score_bytes(self.manifest.components[name], sizes, k)
                 for name, k in rows.items() if name in self.sessions}
        name, need = max(((k, v) for k, v in needs.items() if v), key=lambda kv: kv[1], default=(None, 0))
        free = memory.available_bytes() if need else None
        if free is None or need <= free:
            return
        entry = self.manifest.components[name]
        again = "" if entry.cpu_key() != "fp32" else (
            "; or export the engine again with this version (its CPU graphs then fuse attention and hold no scores)")
        raise ValueError(
            f"{width}x{height} with {rows[name]} {name} rows needs an estimated {memory.gigabytes(need)} for the "
            f"{name}'s attention scores on ONNX Runtime's CPU ({entry.cpu_file()} holds them whole), more than the "
            f"{memory.gigabytes(free)} available; use a smaller size or batch{again}")

    def close(self) -> None:
        self.components.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def runtime_components(manifest: Manifest) -> tuple[str, ...]:
    """The components a Pipeline opens: every exported one (the tiny VAE decoder where exported) and the
    step graphs the engine has.

    (Engines exported before guidance rescale have no step_rescaled graph.)
    """
    names = COMPONENTS + OPTIONAL_COMPONENTS + STEP_GRAPHS + IMAGE_GRAPHS
    return tuple(name for name in names if name in manifest.components)


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """Sinusoidal embedding of 1000 w, float32 [len(w), dim] (VDM; diffusers' get_guidance_scale_embedding).

    Computed in float64: diffusers' float32 arguments (1000 w freq ~ 7500) carry ~5e-4 of rounding.
    """
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) / (half - 1) * np.arange(half))
    args = np.asarray(w, np.float64)[:, None] * 1000.0 * freqs[None, :]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    return np.pad(emb, ((0, 0), (0, dim % 2))).astype(np.float32)


def _unet_batch(job: Job) -> int:
    """UNet rows of a request: one per image, doubled when guided."""
    return job.n * (2 if job.guided else 1)


def _unet_mask(job: Job) -> np.ndarray:
    """The latent mask in an inpainting UNet's batch."""
    return np.repeat(job.mask, _unet_batch(job), axis=0)


def _is_count(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0


def _input_names(session: Any) -> list[str]:
    return [t.name for t in session.spec.inputs]


def _zero_rows(values: Any, rows: list[int]) -> np.ndarray:
    """A host copy of values with the given rows zeroed (device arrays copy out: a small, rare round trip)."""
    host = np.array(values, dtype=np.float32)
    host[rows] = 0.0
    return host
