"""ONNX Runtime on an NVIDIA GPU (onnxruntime-gpu): IOBinding, outputs left on the device."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnxruntime as ort

from diffusion_engine.engine.manifest import damaged_file
from diffusion_engine.engine.specs import AxisRange, ComponentSpec
from diffusion_engine.runtime.session import Session

logger = logging.getLogger(__name__)

PROVIDER = "CUDAExecutionProvider"
DEVICE = "cuda"  # where IOBinding puts outputs and to_device puts inputs
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
           "tensor(int64)": np.int64, "tensor(uint8)": np.uint8}


def available() -> bool:
    """Whether this onnxruntime build has the CUDA execution provider."""
    return PROVIDER in providers()


def providers() -> list[str]:
    """The execution providers this onnxruntime build has."""
    return list(ort.get_available_providers())


@dataclass(frozen=True)
class OrtDeviceArray:
    """An OrtValue on the GPU, shaped like an array for the spec checks; np.asarray copies it out."""

    value: Any  # onnxruntime.OrtValue

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape())

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_DTYPES[self.value.data_type()])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.value.numpy()
        return out if dtype is None else out.astype(dtype)


def to_device(value: Any, device_id: int = 0) -> OrtDeviceArray:
    """One host->device copy into an OrtValue (OrtValue.ortvalue_from_numpy); device arrays pass through."""
    if isinstance(value, OrtDeviceArray):
        return value
    return OrtDeviceArray(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), DEVICE, device_id))


class OrtCudaSession(Session):
    """One graph on the CUDA execution provider; inputs from host or device, outputs on the device."""

    def __init__(self, path: Path, spec: ComponentSpec, ranges: Mapping[str, AxisRange], device_id: int = 0):
        super().__init__(spec, ranges)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        providers = [(PROVIDER, {"device_id": device_id}), "CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises bare Exception subclasses (InvalidProtobuf, Fail)
            raise damaged_file(path, exc) from exc
        if PROVIDER not in self._session.get_providers():
            raise RuntimeError(f"{path}: onnxruntime could not start {PROVIDER}")
        self._device_id = device_id
        self._outputs = [o.name for o in self._session.get_outputs()]

    def _run(self, feeds: Mapping[str, Any]) -> dict[str, OrtDeviceArray]:
        binding = self._session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, OrtDeviceArray):
                binding.bind_ortvalue_input(name, value.value)  # already on the GPU: no copy
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self._outputs:
            binding.bind_output(name, DEVICE, self._device_id)  # ORT allocates on the GPU
        self._session.run_with_iobinding(binding)
        return {n: OrtDeviceArray(v) for n, v in zip(self._outputs, binding.get_outputs())}

    def close(self) -> None:
        self._session = None
        super().close()
