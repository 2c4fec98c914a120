"""TensorRT backend: one execution context per plan, shared activation memory, CUDA-graph loop.

Written against the TensorRT 10/11 Python API and cuda-python; it has not run on a GPU yet (see
README). Numerics live in the ONNX graphs that the CPU suite covers; this file only moves bytes
and launches work on one stream, and the host waits only when the image is copied back.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from diffusion_engine.engine.manifest import ComponentEntry, Manifest
from diffusion_engine.engine.plans import PlanMismatch, Profile, select_profile
from diffusion_engine.engine.specs import (
    EVALUATIONS,
    NOISE,
    NOISE_PRED,
    NOISE_ROWS,
    SAMPLE,
    SAMPLE_OUT,
    STATE,
    STATE_OUT,
    STEP,
    STEP_OUT,
    TIMESTEP,
    TIMESTEP_OUT,
)
from diffusion_engine.engine.toolchain import TrtUnavailable
from diffusion_engine.runtime import trt_loader
from diffusion_engine.runtime.cuda import CudaGraph, DeviceArray, DeviceBuffer, Stream, copy_async
from diffusion_engine.runtime.denoise import LoopInputs, Progress
from diffusion_engine.runtime.session import BackendUnavailable, Session

logger = logging.getLogger(__name__)

# Tensors sized per request (plan length, noise rows), not at the profile maximum (1000 rows of noise).
GROWABLE_AXES = (EVALUATIONS, NOISE_ROWS)


class TrtSession(Session):
    """One plan: its execution context on the shared activation memory and its I/O buffers."""

    def __init__(self, name: str, loaded: Any, entry: ComponentEntry, activations: DeviceBuffer, stream: Stream):
        super().__init__(entry.spec(name), entry.ranges())
        import tensorrt as trt

        self.plan, self.engine, self.stream = loaded.plan, loaded.engine, stream
        self._keep = loaded.runtime  # the runtime must outlive its engine
        # USER_MANAGED: no per-context activation memory; all contexts share one allocation since
        # components run one after another on one stream (IExecutionContext.set_device_memory).
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self.context.set_device_memory(activations.ptr, activations.nbytes)
        self.profile: int | None = None
        self.generation = 0  # bumped when a buffer moves: graphs captured before are stale
        self.buffers: dict[str, DeviceBuffer] = {}
        self.addresses: dict[str, int] = {}
        for t in self.spec.tensors:
            if not any(a in GROWABLE_AXES for a in t.axes):  # I/O buffers at the profile maximum, once
                self._allocate(t.name, self._max_bytes(t.name))

    def _max_bytes(self, name: str, dims: Mapping[str, int] | None = None) -> int:
        t = self.spec.tensor(name)
        dims = dims or {a: r.max for a, r in self.ranges.items()}
        return int(np.prod(t.shape(dims), dtype=np.int64)) * np.dtype(t.dtype).itemsize

    def _allocate(self, name: str, nbytes: int) -> None:
        if name in self.buffers:
            self.buffers.pop(name).close()
        self.buffers[name] = DeviceBuffer(nbytes)
        self.alias(name, self.buffers[name].ptr)
        self.generation += 1

    def alias(self, name: str, ptr: int) -> None:
        """Bind a tensor to an address (IExecutionContext.set_tensor_address), e.g. another plan's buffer."""
        if not self.context.set_tensor_address(name, ptr):
            raise RuntimeError(f"{self.spec.name}: TensorRT refused the address of {name}")
        self.addresses[name] = ptr

    def prepare(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Pick the profile that holds the request, set every input shape, grow per-request buffers."""
        profile = select_profile(self.plan, shapes)
        if profile is None:
            raise ValueError(f"{self.spec.name}: no optimisation profile of {self.plan['file']} holds {dict(shapes)}")
        if profile != self.profile:
            # Asynchronous on our stream; shapes must be set again after a switch.
            self.context.set_optimization_profile_async(profile, self.stream.ptr)
            self.profile = profile
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, tuple(shape)):
                raise ValueError(f"{self.spec.name}: TensorRT rejected shape {tuple(shape)} for {name}")
        dims = {a: s for t in self.spec.inputs if t.name in shapes for a, s in zip(t.axes, shapes[t.name])}
        for t in self.spec.tensors:
            need = self._max_bytes(t.name, {**{a: r.max for a, r in self.ranges.items()}, **dims})
            if any(a in GROWABLE_AXES for a in t.axes) and (t.name not in self.buffers or self.buffers[t.name].nbytes < need):
                self._allocate(t.name, need)

    def upload(self, feeds: Mapping[str, Any]) -> None:
        """Queue copies of host or device arrays into this plan's input buffers (none into aliases of themselves)."""
        for name, value in feeds.items():
            if not (isinstance(value, DeviceArray) and value.ptr == self.addresses[name]):
                copy_async(self.addresses[name], value, self.stream)

    def enqueue(self) -> None:
        """Queue one execution on the stream (IExecutionContext.execute_async_v3); no host sync."""
        if not self.context.execute_async_v3(self.stream.ptr):
            raise RuntimeError(f"{self.spec.name}: TensorRT execute_async_v3 failed (see the TensorRT log)")

    def output(self, name: str) -> DeviceArray:
        shape = tuple(self.context.get_tensor_shape(name))
        return DeviceArray(self.addresses[name], shape, np.dtype(self.spec.tensor(name).dtype), self.stream)

    def _run(self, feeds: Mapping[str, Any]) -> dict[str, DeviceArray]:
        self.prepare({k: tuple(v.shape) for k, v in feeds.items()})
        self.upload(feeds)
        self.enqueue()
        return {t.name: self.output(t.name) for t in self.spec.outputs}

    def is_bucket(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether a profile's opt point has this shape's spatial size (graphs are kept for buckets only)."""
        profiles = [Profile.from_dict(p) for p in self.plan["profiles"]]
        return any(name in p.shapes and p.shapes[name].opt[2:] == tuple(shape[2:]) for p in profiles)

    def close(self) -> None:
        for b in self.buffers.values():
            b.close()
        self.buffers.clear()
        self.context = self.engine = self._keep = None
        super().close()


class TrtLoop:
    """UNet + step graph per evaluation on one stream; per shape bucket, one step is a CUDA graph.

    The step graph reads the UNet's output buffer and writes the UNet's next input and timestep in
    place, so a step needs no host input: it is captured once (after an eager warm-up step, as
    TensorRT requires an enqueue after a shape change before capture) and replayed.
    """

    def __init__(self, unet: TrtSession, step: TrtSession, cuda_graphs: bool = True):
        self.unet, self.step, self.stream = unet, step, unet.stream
        self.cuda_graphs = cuda_graphs
        self.graphs: dict[tuple, CudaGraph] = {}
        self._generations = (unet.generation, step.generation)
        step.alias(NOISE_PRED, unet.addresses[NOISE_PRED])
        step.alias(SAMPLE_OUT, unet.addresses[SAMPLE])
        step.alias(TIMESTEP_OUT, unet.addresses[TIMESTEP])

    def _one_step(self) -> None:
        self.unet.enqueue()
        self.step.enqueue()
        for src, dst in ((STATE_OUT, STATE), (STEP_OUT, STEP)):  # next step reads what this one wrote
            out = self.step.output(src)
            copy_async(self.step.addresses[dst], out, self.stream)

    def run(self, x: LoopInputs, progress: Progress | None = None) -> tuple[DeviceArray, dict[str, float]]:
        """Upload the loop's inputs, run every evaluation, return state[0] (still on the device)."""
        unet_feeds = {SAMPLE: x.sample, TIMESTEP: x.timestep, **x.unet_static}
        step_feeds = {STATE: x.state, NOISE: x.noise, STEP: np.zeros(1, np.int32), **x.tables}
        self.unet.prepare({k: tuple(v.shape) for k, v in unet_feeds.items()})
        self.step.prepare({NOISE_PRED: x.sample.shape, **{k: tuple(v.shape) for k, v in step_feeds.items()}})
        if (self.unet.generation, self.step.generation) != self._generations:
            self.drop_graphs()  # a buffer moved: every captured graph points at freed memory
            self._generations = (self.unet.generation, self.step.generation)
        self.unet.upload(unet_feeds)
        self.step.upload(step_feeds)
        key = (tuple((k, tuple(v.shape)) for k, v in sorted({**unet_feeds, **step_feeds}.items())),
               self.unet.profile, self.step.profile)
        capture = self.cuda_graphs and self.unet.is_bucket(SAMPLE, x.sample.shape)
        graph = self.graphs.get(key) if capture else None
        for e in range(x.evaluations):
            if graph is not None:
                graph.launch()
            else:
                self._one_step()  # eager: outside the buckets, or the warm-up before capture
                if capture:
                    graph = self.graphs[key] = CudaGraph(self.stream, self._one_step)
            if progress is not None:
                progress(e + 1, x.evaluations)  # steps queued, not finished: the host never waits here
        return DeviceArray(self.step.addresses[STATE], tuple(x.state.shape[1:]), np.dtype(np.float32), self.stream), {}

    def drop_graphs(self) -> None:
        for g in self.graphs.values():
            g.close()
        self.graphs.clear()


class TrtBackend:
    """Loads every component's plan for this GPU, one stream, one shared activation allocation."""

    def __init__(self, engine_dir: Path, manifest: Manifest, names: tuple[str, ...], cuda_graphs: bool = True):
        try:
            tc = trt_loader.find_toolchain()
            loaded = {n: trt_loader.load_plan(engine_dir, manifest, n, tc) for n in names}  # PlanMismatch: never a blind load
        except (TrtUnavailable, PlanMismatch) as exc:
            raise BackendUnavailable(f"--backend trt: {exc}", getattr(exc, "brief", None)) from exc
        self.stream = Stream()
        # Contexts run one after another: the largest need serves all (ICudaEngine.device_memory_size_v2).
        self.activations = DeviceBuffer(max(p.engine.device_memory_size_v2 for p in loaded.values()))
        self.sessions = {n: TrtSession(n, loaded[n], manifest.components[n], self.activations, self.stream) for n in names}
        self.cuda_graphs = cuda_graphs
        self._loops: dict[str, TrtLoop] = {}

    def loop(self, unet: str, step: str) -> TrtLoop:
        if step not in self._loops:
            self._loops[step] = TrtLoop(self.sessions[unet], self.sessions[step], self.cuda_graphs)
        return self._loops[step]

    def close(self) -> None:
        self.stream.synchronize()
        for loop in self._loops.values():
            loop.drop_graphs()
        for s in self.sessions.values():
            s.close()
        self.activations.close()
        self.stream.close()


