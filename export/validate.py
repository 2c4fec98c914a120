"""Export-time checks: ONNX Runtime (fp32, fp16) against PyTorch on the CPU; failures raise."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort
import torch

from diffusion_engine.engine.specs import BATCH, AxisRange, ComponentSpec
from diffusion_engine.export.components import export_dims

logger = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """An exported graph whose outputs are not finite or not within the spec's tolerance."""


@dataclass(frozen=True)
class Parity:
    """The measured error of one graph at one shape."""

    dims: dict[str, int]
    max_abs: float
    rel_error: float

    def as_dict(self) -> dict:
        return {"dims": self.dims, "max_abs": self.max_abs, "rel_error": self.rel_error}


def parity_dims(ranges: Mapping[str, AxisRange]) -> list[dict[str, int]]:
    """Two shapes inside the built ranges: batch 1 non-square, and batch 2 (if built) square."""
    first = export_dims(ranges, batch=1)
    second = {a: (first[a] if a in ("sequence",) else r.min) for a, r in ranges.items()}
    second[BATCH] = min(2, ranges[BATCH].max)
    return [first, second]


def cpu_session(path: Path, optimize: bool = True) -> ort.InferenceSession:
    """A plain CPU session for checking: with all graph optimisations, or with none.

    fp16 graphs are checked without: the CPU provider computes most fp16 ops in fp32 behind inserted
    Casts, and its optimiser folds each fp16 weight's Cast into an fp32 copy when the session is made
    (SD1.5's UNet: 5.7 GB peak and 18 s to make the session, against 3.2 GB and 0.4 s unoptimised).
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def torch_outputs(module: torch.nn.Module, spec: ComponentSpec, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the PyTorch reference on the same feeds."""
    with torch.no_grad():
        out = module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return {t.name: o.numpy() for t, o in zip(spec.outputs, outs)}


def measure(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |ours - ref|, that divided by max |ref|, or by 255 for uint8 images)."""
    if ours.shape != ref.shape:
        raise ParityError(f"shape {ours.shape} differs from the reference {ref.shape}")
    a, b = ours.astype(np.float64), ref.astype(np.float64)
    max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = 255.0 if ref.dtype == np.uint8 else max(float(np.max(np.abs(b))), 1e-12)
    return max_abs, max_abs / scale


def check(
    spec: ComponentSpec, precision: str, session: ort.InferenceSession, feeds: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray], dims: dict[str, int],
) -> Parity:
    """Run the graph; raise ParityError on NaN/Inf or error above the spec tolerance."""
    outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, dict(feeds))))
    limit = spec.tolerance.of(precision)
    worst = Parity(dims, 0.0, 0.0)
    for t in spec.outputs:
        ours = outs[t.name]
        if ours.dtype != np.dtype(t.dtype):
            raise ParityError(f"{spec.name} {precision}: {t.name} is {ours.dtype}, the spec says {t.dtype}")
        if np.issubdtype(ours.dtype, np.floating) and not np.all(np.isfinite(ours)):
            bad = int(np.size(ours) - np.count_nonzero(np.isfinite(ours)))
            raise ParityError(f"{spec.name} {precision}: {t.name} has {bad} NaN/Inf values at {dims}")
        max_abs, rel = measure(ours, reference[t.name])
        if rel > limit:
            raise ParityError(
                f"{spec.name} {precision}: {t.name} differs from PyTorch by {rel:.3g} (max abs {max_abs:.3g}) "
                f"at {dims}; the tolerance is {limit:.3g}"
            )
        if rel >= worst.rel_error:
            worst = Parity(dims, max_abs, rel)
    return worst
