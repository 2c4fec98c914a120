"""Measurement helpers: per-call stage timers, percentile summaries, RSS sampling, machine facts."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import threading
import time
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

VERSIONED = ("diffusion-engine", "onnxruntime", "numpy", "onnx", "openvino", "torch", "diffusers", "transformers")


class StageTimes:
    """Seconds per call, by stage, for one run; `wrap` makes a callable that records into it."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.sync = sync  # e.g. torch.cuda.synchronize: asynchronous work must finish inside the timer

    def reset(self) -> None:
        self.calls = defaultdict(list)

    def add(self, stage: str, seconds: float) -> None:
        self.calls[stage].append(seconds)

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.sync is not None:
                self.sync()
            self.add(stage, time.perf_counter() - start)
            return out

        return timed


class TimedSession:
    """A session proxy that records each `run` call's seconds under a stage name; every other attribute is
    the inner session's (a GPU loop reads its stream, addresses and buffer generation, live)."""

    def __init__(self, inner: Any, stage: str, times: StageTimes):
        self.inner = inner
        self.run = times.wrap(stage, inner.run)

    def __getattr__(self, name: str) -> Any:  # only for names not set in __init__
        if name == "inner":  # not yet set (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def close(self) -> None:
        self.inner.close()


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """min / p50 / p90 (linear interpolation) / mean and the sample count."""
    a = np.asarray(values, dtype=np.float64)
    return {"min": float(a.min()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "mean": float(a.mean()), "n": int(a.size)}


def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil  # not Linux: psutil comes with the export extra

        return int(psutil.Process().memory_info().rss)


class RssMonitor:
    """Samples RSS on a thread while active; `peak` is the largest sample (and the end value)."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RssMonitor":
        self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions(names: Iterable[str] = VERSIONED) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gpus() -> list[dict[str, Any]]:
    """NVIDIA GPUs from nvidia-smi (name, memory), or [] where there is none."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [line.split(",") for line in out.strip().splitlines() if line.strip()]
    return [{"name": r[0].strip(), "memory_bytes": int(float(r[1])) * 2**20} for r in rows if len(r) == 2]


def machine(threads: int) -> dict[str, Any]:
    """The facts a reader needs to compare numbers: CPU, cores, memory, GPUs, OS, load."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 1
    return {
        "cpu_model": _cpu_model(), "cpu_cores": os.cpu_count() or 1, "cpu_affinity": affinity, "threads": threads,
        "memory_bytes": _memory_bytes(), "gpus": gpus(), "platform": platform.platform(),
        "python": platform.python_version(), "load_average_start": list(os.getloadavg()),
    }


def ratio(theirs: float | None, ours: float | None) -> float | None:
    if theirs is None or ours is None or ours <= 0:
        return None
    return theirs / ours


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 images in dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def aggregate(runs: Sequence[Mapping[str, list[float]]], per_call: Iterable[str]) -> dict[str, dict[str, float | int]]:
    """Stage summaries over runs: per-call stages pool every call, other stages sum their calls per run."""
    per_call = set(per_call)
    pooled: dict[str, list[float]] = defaultdict(list)
    for calls in runs:
        for stage, values in calls.items():
            pooled[stage] += list(values) if stage in per_call else [float(sum(values))]
    return {stage: summarize(values) for stage, values in pooled.items() if values}
