"""The diffusers PyTorch baseline: eager, fp32 on CPU / fp16 on GPU, same weights and settings as ours."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from diffusion_engine.benchmarks.measure import StageTimes, rss_bytes
from diffusion_engine.benchmarks.systems import UNET_ONLY, Case, CaseInputs, RunOutput
from diffusion_engine.engine.specs import DEFAULT_DECODER, ENCODER_HIDDEN_STATES, SAMPLE, TIMESTEP

logger = logging.getLogger(__name__)

# Our sampler name -> the diffusers scheduler class and the options that make it the same sampler.
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


class _TimedTokenizer:
    """Times the tokenizer's __call__ (a dunder cannot be patched on the instance); delegates the rest."""

    def __init__(self, inner: Any, times: StageTimes):
        self._inner = inner
        self._call = times.wrap("tokenize", inner.__call__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class DiffusersSystem:
    """diffusers' StableDiffusionPipeline (or its UNet alone) from the source checkpoint, eager PyTorch."""

    name = "diffusers"

    def __init__(self, checkpoint: str, mode: str, scheduler: str, threads: int, tiny_vae: str | None = None):
        """tiny_vae: an AutoencoderTiny folder; cases with decoder "tiny" decode with it (pipe.vae swapped)."""
        import torch

        before = rss_bytes()
        torch.set_num_threads(threads)
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.times = StageTimes(sync=torch.cuda.synchronize if self.device == "cuda" else None)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.mode = mode
        if mode == UNET_ONLY:
            from diffusers import UNet2DConditionModel

            self.unet = UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet", torch_dtype=self.dtype)
            self.unet.to(self.device).eval()
            self.unet.forward = self.times.wrap("unet", self.unet.forward)
        else:
            self.pipe = self._load_pipeline(checkpoint, scheduler)
            self.vaes = {DEFAULT_DECODER: self.pipe.vae}
            if tiny_vae is not None:
                self.vaes["tiny"] = self._load_tiny_vae(tiny_vae)
        self._feeds: dict[str, Any] = {}
        self.load_rss_bytes = rss_bytes() - before

    def _load_pipeline(self, checkpoint: str, scheduler: str) -> Any:
        import diffusers

        pipe = diffusers.DiffusionPipeline.from_pretrained(
            checkpoint, torch_dtype=self.dtype, safety_checker=None, local_files_only=True)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        cls_name, forced = DIFFUSERS_SCHEDULERS[scheduler]
        pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **forced)
        t = self.times
        pipe.scheduler.step = t.wrap("step_graph", pipe.scheduler.step)
        pipe.text_encoder.forward = t.wrap("text_encoder", pipe.text_encoder.forward)
        pipe.unet.forward = t.wrap("unet", pipe.unet.forward)
        pipe.vae.decode = t.wrap("vae_decoder", pipe.vae.decode)
        # Pipelines re-register components on setattr; the proxy is not a component.
        object.__setattr__(pipe, "tokenizer", _TimedTokenizer(pipe.tokenizer, t))
        return pipe

    def _load_tiny_vae(self, folder: str) -> Any:
        from diffusers import AutoencoderTiny

        vae = AutoencoderTiny.from_pretrained(folder, torch_dtype=self.dtype, local_files_only=True).to(self.device)
        vae.decode = self.times.wrap("vae_decoder", vae.decode)
        return vae.eval()

    def prepare(self, case: Case, inputs: CaseInputs) -> None:
        if case.mode != UNET_ONLY:  # the case's decoder: registered as the pipeline's vae, as a user swaps it
            decoder = case.decoder or DEFAULT_DECODER
            if decoder not in self.vaes:
                raise ValueError(f"diffusers baseline: no {decoder} decoder loaded (pass its AutoencoderTiny folder)")
            self.pipe.vae = self.vaes[decoder]
        if case.mode == UNET_ONLY:
            self._feeds = {k: self.torch.from_numpy(v).to(self.device, self.dtype) for k, v in inputs.unet_feeds.items()}

    def run(self, case: Case, inputs: CaseInputs) -> RunOutput:
        torch = self.torch
        self.times.reset()
        with torch.inference_mode():
            if case.mode == UNET_ONLY:
                f = self._feeds
                extra = {k: f[k] for k in ("text_embeds", "time_ids") if k in f}  # SDXL's added conditions
                out = self.unet(f[SAMPLE], f[TIMESTEP], f[ENCODER_HIDDEN_STATES], return_dict=False,
                                added_cond_kwargs=extra or None, timestep_cond=f.get("timestep_cond"))[0]
                return RunOutput(dict(self.times.calls), out.float().cpu().numpy())
            start = time.perf_counter()
            images = self.pipe(
                prompt=inputs.prompt, negative_prompt=inputs.negative_prompt, num_inference_steps=case.steps,
                guidance_scale=inputs.guidance_scale, height=case.height, width=case.width,
                num_images_per_prompt=case.batch, output_type="np",
                latents=torch.from_numpy(inputs.latents).to(self.device, self.dtype),
            ).images
            if self.device == "cuda":
                torch.cuda.synchronize()
            total = time.perf_counter() - start
        pixels = (np.asarray(images, np.float64) * 255).round().clip(0, 255).astype(np.uint8)
        return RunOutput({**self.times.calls, "end_to_end": [total]}, pixels)

    def device_memory_bytes(self) -> int | None:
        return int(self.torch.cuda.max_memory_allocated()) if self.device == "cuda" else None

    def close(self) -> None:
        self.pipe = self.unet = None
        self.vaes = {}
