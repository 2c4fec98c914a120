"""Backend choice and set-up: every component's session and the denoising loop, per backend."""

from __future__ import annotations

import logging
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

from diffusion_engine.engine.manifest import Manifest
from diffusion_engine.engine.specs import UNET
from diffusion_engine.runtime.denoise import HostLoop
from diffusion_engine.runtime.session import BackendUnavailable, OrtCpuSession, Session

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "trt")


@dataclass
class Components:
    """Open sessions of one engine on one backend, and the loop that drives UNet + step graph."""

    backend: str
    sessions: dict[str, Session]
    loop: Callable[[str], Any]  # step-graph name -> an object with run(LoopInputs, progress)
    lock: ContextManager = field(default_factory=nullcontext)  # GPU backends: one stream, one caller
    closer: Callable[[], None] | None = None

    def close(self) -> None:
        if self.closer is not None:
            self.closer()
        for s in self.sessions.values():
            s.close()


def trt_unavailable(manifest: Manifest, names: tuple[str, ...]) -> BackendUnavailable | None:
    """None if TensorRT, a GPU and fitting plans for every component are here; else why not."""
    try:
        from diffusion_engine.engine.plans import select_plan
        from diffusion_engine.runtime.trt_loader import find_toolchain

        tc = find_toolchain()
        for n in names:
            select_plan(n, manifest.components[n], tc.tensorrt_version, tc.compute_capability)
    except Exception as exc:  # TrtUnavailable, PlanMismatch, missing packages: all mean "not trt"
        return BackendUnavailable(f"--backend trt: {exc}", getattr(exc, "brief", None))
    return None


def ort_cuda_unavailable() -> BackendUnavailable | None:
    """None if onnxruntime has its CUDA provider and a GPU is visible; else why not."""
    from diffusion_engine.runtime import cuda, ort_cuda

    if not ort_cuda.available():
        return BackendUnavailable(
            f"--backend ort-cuda needs onnxruntime-gpu (this onnxruntime has {', '.join(ort_cuda.providers())}): "
            "pip uninstall onnxruntime && pip install onnxruntime-gpu, or use --backend ort-cpu",
            brief="no onnxruntime-gpu",
        )
    if cuda.device_count() < 1:
        return BackendUnavailable("--backend ort-cuda needs a CUDA GPU and none is visible; use --backend ort-cpu",
                                  brief="no CUDA GPU")
    return None


def pick_backend(name: str, engine_dir: Path, manifest: Manifest, names: tuple[str, ...]) -> str:
    """'auto': trt with a GPU, TensorRT and matching plans, else ort-cuda if usable, else ort-cpu.

    A backend named outright must be usable here, else BackendUnavailable says why and what to do.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name == "ort-cuda" and (why := ort_cuda_unavailable()) is not None:
        raise why
    if name != "auto":
        return name  # trt: TrtBackend loads the plans and says what is missing
    chosen, reasons = "ort-cpu", []
    for candidate, check in (("trt", lambda: trt_unavailable(manifest, names)), ("ort-cuda", ort_cuda_unavailable)):
        why = check()
        if why is None:
            chosen = candidate
            break
        reasons.append(f"; not {candidate}: {why.brief}")
    logger.debug("backend %s (auto%s)", chosen, "".join(reasons))
    return chosen


def open_components(engine_dir: Path, manifest: Manifest, backend: str, names: tuple[str, ...],
                    cuda_graphs: bool = True) -> Components:
    """Open `names` on a concrete backend."""
    if backend == "trt":
        from diffusion_engine.runtime.trt import TrtBackend

        trt = TrtBackend(engine_dir, manifest, names, cuda_graphs=cuda_graphs)
        return Components("trt", trt.sessions, lambda step: trt.loop(UNET, step), threading.Lock(), trt.close)
    if backend == "ort-cuda":
        from diffusion_engine.runtime import ort_cuda

        sessions = {n: ort_cuda.OrtCudaSession(engine_dir / _gpu_file(manifest, n), *_spec(manifest, n)) for n in names}
        loop = lambda step: HostLoop(sessions[UNET], sessions[step], upload=ort_cuda.to_device)  # noqa: E731
        return Components("ort-cuda", sessions, loop, threading.Lock())
    if backend == "ort-cpu":
        sessions = {n: OrtCpuSession(engine_dir / manifest.components[n].cpu_file(), *_spec(manifest, n)) for n in names}
        return Components("ort-cpu", sessions, lambda step: HostLoop(sessions[UNET], sessions[step]))
    raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS[1:])}")


def _spec(manifest: Manifest, name: str) -> tuple:
    entry = manifest.components[name]
    return entry.spec(name), entry.ranges()


def _gpu_file(manifest: Manifest, name: str) -> str:
    """The graph a GPU runs: the fp16 one, or fp32 where the manifest says fp16 is unsafe."""
    entry = manifest.components[name]
    return entry.files[entry.gpu_precision]
