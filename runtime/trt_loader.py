"""The TensorRT backend's start: find TensorRT and the GPU, deserialize each component's plan for them.

Written against the TensorRT 10/11 Python API; tensorrt and cuda-python are imported lazily. Which
plan fits is the contract's decision (engine/plans.py), and the GPU identity is read as engine-build
reads it (engine/toolchain.py), through this runtime's own CUDA wrapper (runtime/cuda.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion_engine.engine.manifest import Manifest
from diffusion_engine.engine.plans import select_plan
from diffusion_engine.engine.toolchain import Toolchain, discover, read_device, trt_logger
from diffusion_engine.runtime import cuda


class PlanLoadError(RuntimeError):
    """TensorRT could not deserialize a plan; the message names the file."""


@dataclass(frozen=True)
class LoadedPlan:
    """A deserialized engine with the runtime that made it (it must outlive the engine) and its manifest entry."""

    runtime: Any
    engine: Any
    plan: dict[str, Any]


def find_toolchain() -> Toolchain:
    """Import tensorrt and find a CUDA GPU, or raise TrtUnavailable naming what is missing; reads no graphs."""
    return discover(_tensorrt, cuda_device)


def cuda_device() -> tuple[str, str]:
    """(compute capability, name) of the current CUDA device, through runtime/cuda.py's cuda-python."""
    return read_device(cuda.cudart)


def _tensorrt() -> Any:
    import tensorrt

    return tensorrt


def load_plan(engine_dir: str | Path, manifest: Manifest, name: str, tc: Toolchain) -> LoadedPlan:
    """Deserialize a component's plan for this GPU and TensorRT; PlanMismatch instead of loading a foreign one."""
    plan = select_plan(name, manifest.components[name], tc.tensorrt_version, tc.compute_capability)
    runtime = tc.trt.Runtime(trt_logger(tc.trt))
    engine = runtime.deserialize_cuda_engine((Path(engine_dir) / plan["file"]).read_bytes())
    if engine is None:
        raise PlanLoadError(f"{name}: TensorRT could not deserialize {plan['file']} (its messages are logged above)")
    return LoadedPlan(runtime, engine, plan)
