"""Which TensorRT and GPU a plan is for: the toolchain identity engine-build and the runtime both read.

A plan is specific to a TensorRT version and a GPU's compute capability (plans.plan_mismatch
compares them), so the builder and the runtime's TensorRT backend must read that identity the same
way, with the same messages. This module holds that reading but imports no binding: each caller
passes in how to load the `tensorrt` module and cuda-python's runtime API. The runtime's GPU code
(runtime/trt_loader.py) passes its own CUDA wrapper's loader; the builder (engine/trt_build.py)
imports cuda-python itself, since the build layer may not import the runtime nor the runtime the
builder. So the contract stays stdlib-only and the one device query lives here, not in two copies;
so does the one logger bridge both hand to TensorRT (it too takes the tensorrt module as a value).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

logger = logging.getLogger(__name__)

MIN_TENSORRT = (10, 0)
ORT_HINT = "Without them, run this engine with the ONNX Runtime backend (--backend ort-cpu)."
NO_CUDA_PYTHON = "cuda-python is not installed: install diffusion-engine[trt], or use --backend ort-cpu"


class TrtUnavailable(RuntimeError):
    """No TensorRT Python package or no CUDA GPU here; the message says which and what runs instead."""

    def __init__(self, message: str, brief: str | None = None):
        super().__init__(message)
        self.brief = brief or message  # a few words, for the backend choice's -v line


@dataclass(frozen=True)
class Toolchain:
    """The tensorrt module and the GPU it builds for."""

    trt: Any
    tensorrt_version: str
    compute_capability: str
    device: str

    @property
    def strongly_typed(self) -> bool:
        return hasattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")


def discover(load_tensorrt: Callable[[], Any], device: Callable[[], tuple[str, str]]) -> Toolchain:
    """Load tensorrt and find a CUDA GPU, or raise TrtUnavailable naming everything missing; reads no graphs."""
    missing, brief, trt, gpu = [], [], None, None
    try:
        trt = load_tensorrt()
    except ImportError as exc:
        missing.append(f"the `tensorrt` Python package is not installed ({exc}; pip install 'diffusion-engine[trt]')")
        brief.append("no tensorrt package")
    else:
        if _version_tuple(trt.__version__) < MIN_TENSORRT:
            missing.append(f"tensorrt {trt.__version__} is too old: TensorRT >= 10.0 is needed")
            brief.append(f"tensorrt {trt.__version__} < 10")
    try:
        gpu = device()
    except TrtUnavailable as exc:
        missing.append(str(exc))
        brief.append(exc.brief)
    if missing:
        raise TrtUnavailable(
            f"TensorRT plans need the `tensorrt` package and a CUDA GPU: {'; '.join(missing)}. {ORT_HINT}",
            brief="; ".join(brief),
        )
    return Toolchain(trt, trt.__version__, *gpu)


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:2] if x.isdigit())


def read_device(load_cudart: Callable[[], Any]) -> tuple[str, str]:
    """(compute capability 'major.minor', name) of the current CUDA device via cudaGetDeviceProperties."""
    try:
        cudart = load_cudart()  # cuda-python's runtime API; RuntimeError where it is missing
    except RuntimeError as exc:
        raise TrtUnavailable(f"no CUDA GPU can be found: {exc}", brief="no CUDA GPU (cuda-python missing)") from exc
    ok = cudart.cudaError_t.cudaSuccess
    err, count = cudart.cudaGetDeviceCount()  # cuda-python returns (error, value...) tuples
    if err != ok:
        raise TrtUnavailable(f"no CUDA GPU is visible (cudaGetDeviceCount: {getattr(err, 'name', err)})", "no CUDA GPU")
    if count < 1:
        raise TrtUnavailable("no CUDA GPU is visible (cudaGetDeviceCount: 0 devices)", "no CUDA GPU")
    err, device = cudart.cudaGetDevice()
    err2, prop = cudart.cudaGetDeviceProperties(device) if err == ok else (err, None)
    if err2 != ok:
        raise TrtUnavailable(f"CUDA device properties are unavailable ({getattr(err2, 'name', err2)})")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return f"{prop.major}.{prop.minor}", name.rstrip("\0").strip()


@lru_cache(maxsize=None)
def trt_logger(trt: Any) -> Any:
    """One TensorRT logger per process that forwards to Python logging (the default prints to stderr)."""
    levels = {trt.ILogger.INTERNAL_ERROR: logging.CRITICAL, trt.ILogger.ERROR: logging.ERROR,
              trt.ILogger.WARNING: logging.WARNING, trt.ILogger.INFO: logging.DEBUG, trt.ILogger.VERBOSE: logging.DEBUG}

    class Bridge(trt.ILogger):  # ILogger docs: a subclass must call the base __init__ explicitly
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            logger.log(levels.get(severity, logging.INFO), "TensorRT: %s", msg)

    return Bridge()
