"""A CPU stand-in for cuda-python's runtime and TensorRT's execution context, for wiring tests.

Device memory is a heap of bytearrays; a "plan" is the component's ONNX graph run by ONNX Runtime
when the fake context executes. Work queued on a capturing stream is recorded, not run, and a
graph launch replays it, as CUDA does. It checks the logic of runtime/trt.py and runtime/cuda.py
(addresses, copies, profiles, capture/replay order); it says nothing about real GPU numerics.
"""

from __future__ import annotations

import ctypes
import sys
import types
from enum import Enum

import numpy as np

SUCCESS = 0


class _Enum(Enum):
    pass


class FakeCuda:
    """The subset of cuda.bindings.runtime that runtime/cuda.py calls."""

    def __init__(self) -> None:
        self.cudaError_t = types.SimpleNamespace(cudaSuccess=SUCCESS)
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3)
        self.cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeGlobal=0)
        self.cudaStreamNonBlocking = 1
        self.heap: dict[int, bytearray] = {}
        self.next_ptr = 1 << 20
        self.capturing: dict[int, list] = {}
        self.launches = 0
        self.captures = 0
        self.copies: list[tuple[str, int, int, int]] = []  # (direction, dst, src, bytes), as queued

    # memory
    def cudaMalloc(self, n):
        ptr = self.next_ptr
        self.heap[ptr] = bytearray(n)
        self.next_ptr += n + 4096
        return SUCCESS, ptr

    def cudaFree(self, ptr):
        del self.heap[ptr]
        return (SUCCESS,)

    def view(self, ptr: int, n: int) -> memoryview:
        for base, buf in self.heap.items():
            if base <= ptr and ptr + n <= base + len(buf):
                return memoryview(buf)[ptr - base : ptr - base + n]
        raise AssertionError(f"address {ptr:#x}+{n} is not allocated device memory")

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        def op():
            if kind == 1:
                self.view(dst, n)[:] = ctypes.string_at(src, n)
            elif kind == 2:
                ctypes.memmove(dst, bytes(self.view(src, n)), n)
            else:
                self.view(dst, n)[:] = bytes(self.view(src, n))

        if kind == 2 and stream in self.capturing:
            raise AssertionError("device->host copy inside a captured step")
        self.copies.append(({1: "H2D", 2: "D2H", 3: "D2D"}[kind], dst, src, n))
        self.enqueue(stream, op)
        return (SUCCESS,)

    def enqueue(self, stream, op) -> None:
        if stream in self.capturing:
            self.capturing[stream].append(op)
        else:
            op()

    # streams and graphs
    def cudaStreamCreateWithFlags(self, flags):
        self.next_ptr += 16
        return SUCCESS, self.next_ptr

    def cudaStreamSynchronize(self, stream):
        assert stream not in self.capturing, "synchronize during capture"
        return (SUCCESS,)

    def cudaStreamDestroy(self, stream):
        return (SUCCESS,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing[stream] = []
        return (SUCCESS,)

    def cudaStreamEndCapture(self, stream):
        self.captures += 1
        return SUCCESS, self.capturing.pop(stream)

    def cudaGraphInstantiate(self, graph, flags):
        return SUCCESS, list(graph)

    def cudaGraphLaunch(self, exec_, stream):
        self.launches += 1
        for op in exec_:
            op()
        return (SUCCESS,)

    def cudaGraphExecDestroy(self, exec_):
        return (SUCCESS,)

    def cudaGraphDestroy(self, graph):
        return (SUCCESS,)

    def cudaGetErrorName(self, err):
        return SUCCESS, b"fake error"

    def cudaGetErrorString(self, err):
        return SUCCESS, b"fake error description"

    def cudaGetDeviceCount(self):
        return SUCCESS, 1


class FakeContext:
    """IExecutionContext over an ONNX Runtime session; inputs and outputs live on the fake heap."""

    def __init__(self, engine: "FakeEngine"):
        self.engine, self.shapes, self.addresses = engine, {}, {}
        self.memory = None
        self.profile = 0

    def set_device_memory(self, ptr, size):
        assert size >= self.engine.device_memory_size_v2
        self.memory = ptr

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        self.shapes = {}  # TensorRT: shapes must be set again after a profile switch

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        spec, f = self.engine.spec, self.engine.vae_scale_factor
        dims = {a: s for t in spec.inputs for a, s in zip(t.axes, self.shapes[t.name])}
        if "latent_height" in dims:  # the VAE decoder's pixel axes
            dims.update(height=dims["latent_height"] * f, width=dims["latent_width"] * f)
        elif "height" in dims:  # the VAE encoder's latent axes
            dims.update(latent_height=dims["height"] // f, latent_width=dims["width"] // f)
        try:
            return spec.tensor(name).shape(dims)
        except KeyError:  # an output axis no input names (TensorRT infers it): the shape the last run wrote
            assert name in self.engine.output_shapes, f"{name}: shape unknown before the first execution"
            return self.engine.output_shapes[name]

    def execute_async_v3(self, stream):
        assert self.memory is not None, "no activation memory"
        shapes = dict(self.shapes)
        addresses = dict(self.addresses)  # captured work keeps the addresses bound at capture time

        def op():
            cuda, spec = self.engine.cuda, self.engine.spec
            feeds = {}
            for t in spec.inputs:
                n = int(np.prod(shapes[t.name])) * np.dtype(t.dtype).itemsize
                feeds[t.name] = np.frombuffer(bytes(cuda.view(addresses[t.name], n)), t.dtype).reshape(shapes[t.name])
            outs = self.engine.session.run(None, feeds)
            for t, value in zip(spec.outputs, outs):
                self.engine.output_shapes[t.name] = tuple(value.shape)
                data = np.ascontiguousarray(value, dtype=t.dtype).tobytes()
                cuda.view(addresses[t.name], len(data))[:] = data

        self.engine.cuda.enqueue(stream, op)
        return True


class FakeEngine:
    def __init__(self, cuda: FakeCuda, session, spec, vae_scale_factor: int):
        self.cuda, self.session, self.spec = cuda, session, spec
        self.vae_scale_factor = vae_scale_factor
        self.device_memory_size_v2 = 1 << 16
        self.output_shapes: dict[str, tuple[int, ...]] = {}

    def create_execution_context(self, strategy):
        assert strategy == "USER_MANAGED"
        return FakeContext(self)


fake_tensorrt = types.SimpleNamespace(ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="USER_MANAGED"))


def install_fake_gpu(monkeypatch) -> FakeCuda:
    """Patch cudart and tensorrt for the TensorRT backend; plans are the fp32 graphs with profiles for
    256x256 and 384x384. Returns the fake device (its counters: captures, launches, copies)."""
    from diffusion_engine.engine import plans
    from diffusion_engine.runtime import cuda as runtime_cuda
    from diffusion_engine.runtime import trt_loader
    from diffusion_engine.runtime.session import OrtCpuSession

    cuda = FakeCuda()

    def load_plan(engine_dir, manifest, name, tc):
        entry = manifest.components[name]
        config = plans.BuildConfig(
            buckets=plans.size_buckets(manifest.build, manifest.dims.size_multiple, sizes=((256, 256), (384, 384))),
            max_batch=manifest.build.max_batch,
        )
        profiles = plans.derive_profiles(name, entry, manifest.dims, manifest.build, config)
        # The graph ort-cpu runs (attention-fused where the export wrote one): the fake's numerics equal
        # ort-cpu's exactly, so any difference the wiring tests see is the TensorRT loop's own.
        session = OrtCpuSession(engine_dir / entry.cpu_file(), entry.spec(name), entry.ranges())._session
        plan = {"file": f"{name}.plan", "profiles": [p.as_dict() for p in profiles]}
        engine = FakeEngine(cuda, session, entry.spec(name), manifest.dims.vae_scale_factor)
        return types.SimpleNamespace(runtime=None, engine=engine, plan=plan)

    monkeypatch.setattr(runtime_cuda, "cudart", lambda: cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    monkeypatch.setattr(trt_loader, "find_toolchain", lambda: None)
    monkeypatch.setattr(trt_loader, "load_plan", load_plan)
    return cuda
