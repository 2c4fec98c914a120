"""One session interface for every backend, and the ONNX Runtime CPU backend."""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnxruntime as ort

from diffusion_engine.engine.manifest import damaged_file
from diffusion_engine.engine.specs import AxisRange, ComponentSpec

logger = logging.getLogger(__name__)


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run here (no TensorRT, no GPU, no onnxruntime-gpu, no plans); says what to do."""

    def __init__(self, message: str, brief: str | None = None):
        super().__init__(message)
        self.brief = brief or message  # a few words, for the -v line of the automatic choice


class Session(ABC):
    """A runnable component: declared I/O (its spec), `run(feeds) -> outputs`, `close()`."""

    def __init__(self, spec: ComponentSpec, ranges: Mapping[str, AxisRange]):
        self.spec = spec
        self.ranges = dict(ranges)
        self.closed = False

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Check the feeds against the spec and the built ranges, then run the component."""
        if self.closed:
            raise RuntimeError(f"{self.spec.name} session is closed")
        self.spec.check_feeds(feeds, self.ranges)
        return self._run(feeds)

    @abstractmethod
    def _run(self, feeds: Mapping[str, Any]) -> dict[str, Any]: ...

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cpu_threads() -> int:
    """Threads for ONNX Runtime: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class OrtCpuSession(Session):
    """ONNX Runtime on the CPU: fp32 graphs, all graph optimisations, intra-op threads = CPUs."""

    def __init__(self, path: Path, spec: ComponentSpec, ranges: Mapping[str, AxisRange], threads: int | None = None):
        super().__init__(spec, ranges)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or cpu_threads()
        opts.inter_op_num_threads = 1  # components run one after another
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises bare Exception subclasses (InvalidProtobuf, Fail)
            raise damaged_file(path, exc) from exc
        self._outputs = [o.name for o in self._session.get_outputs()]
        declared = sorted(i.name for i in self._session.get_inputs())
        if declared != sorted(t.name for t in spec.inputs):
            raise ValueError(f"{path}: graph inputs {declared} do not match the {spec.name} spec")
        logger.debug("ort-cpu session for %s from %s", spec.name, path)

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # InferenceSession.run is thread-safe: one session serves concurrent generate() calls.
        return dict(zip(self._outputs, self._session.run(self._outputs, dict(feeds))))

    def close(self) -> None:
        self._session = None
        super().close()
