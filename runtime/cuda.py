"""A thin, checked layer over cuda-python's runtime API: device buffers, a stream, CUDA graphs.

Imported only by the GPU backends; cuda-python is the `[trt]` extra. Every call's error code is
checked. Nothing here synchronises the host except `DeviceArray.numpy()` and `Stream.synchronize()`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffusion_engine.engine.toolchain import NO_CUDA_PYTHON

logger = logging.getLogger(__name__)


def cudart() -> Any:
    """cuda-python's runtime module (cuda.bindings.runtime from 12.6 on; cuda.cudart before)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as exc:
            raise RuntimeError(NO_CUDA_PYTHON) from exc
    return runtime


# Errors that mean "no usable GPU here" rather than a bug: the message says what runs instead.
NO_GPU_ERRORS = ("cudaErrorInsufficientDriver", "cudaErrorNoDevice")


def check(result: Any) -> Any:
    """Raise on a CUDA error; return the call's value (cuda-python returns (err, *values))."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        raise RuntimeError(error_message(err))
    return values[0] if len(values) == 1 else (tuple(values) or None)


def error_message(err: Any) -> str:
    """One line: the CUDA error's name and description (cudaGetErrorName / cudaGetErrorString), and,
    where there is no usable driver or GPU, what to run instead."""
    rt = cudart()
    name, what = _text(rt.cudaGetErrorName(err)[1]), _text(rt.cudaGetErrorString(err)[1])
    hint = "; no usable NVIDIA driver and GPU here: use --backend ort-cpu" if name in NO_GPU_ERRORS else ""
    return f"CUDA error {name}: {what}{hint}"


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def device_count() -> int:
    """Visible CUDA devices; 0 where there is no driver or no GPU."""
    try:
        return int(check(cudart().cudaGetDeviceCount()))
    except Exception:  # no driver, no library: no GPU for our purposes
        return 0


class Stream:
    """A non-blocking stream (capture is not allowed on the legacy default stream)."""

    def __init__(self) -> None:
        rt = cudart()
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle))

    def close(self) -> None:
        if self.handle is not None:
            check(cudart().cudaStreamDestroy(self.handle))
            self.handle = None


class DeviceBuffer:
    """One cudaMalloc allocation, freed by close() (never by __del__)."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(cudart().cudaMalloc(self.nbytes)))

    def close(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr))
            self.ptr = 0


@dataclass(frozen=True)
class DeviceArray:
    """A typed view of device memory: what GPU sessions take and return instead of numpy arrays."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    stream: Stream

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def numpy(self) -> np.ndarray:
        """Copy to the host after all work queued on the stream: the one host synchronisation."""
        out = np.empty(self.shape, self.dtype)
        rt = cudart()
        check(rt.cudaMemcpyAsync(out.ctypes.data, self.ptr, self.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream.handle))
        self.stream.synchronize()
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.numpy()
        return out if dtype is None else out.astype(dtype)


def copy_async(dst: int, src: np.ndarray | DeviceArray, stream: Stream) -> None:
    """Queue a host->device or device->device copy into dst."""
    rt = cudart()
    if isinstance(src, DeviceArray):
        check(rt.cudaMemcpyAsync(dst, src.ptr, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream.handle))
        return
    src = np.ascontiguousarray(src)
    # From pageable memory the copy is staged before the call returns, so src may be freed after.
    check(rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle))


class CudaGraph:
    """Work queued on a stream, captured once and replayed (cudaStreamBeginCapture / cudaGraphLaunch)."""

    def __init__(self, stream: Stream, enqueue: Any):
        rt = cudart()
        # Global mode: any unsafe CUDA call from any thread during capture is an error, not a hang.
        check(rt.cudaStreamBeginCapture(stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
        try:
            enqueue()
        finally:
            graph = check(rt.cudaStreamEndCapture(stream.handle))
        self._graph = graph
        self._exec = check(rt.cudaGraphInstantiate(graph, 0))
        self.stream = stream

    def launch(self) -> None:
        check(cudart().cudaGraphLaunch(self._exec, self.stream.handle))

    def close(self) -> None:
        rt = cudart()
        if self._exec is not None:
            check(rt.cudaGraphExecDestroy(self._exec))
            check(rt.cudaGraphDestroy(self._graph))
            self._exec = self._graph = None
