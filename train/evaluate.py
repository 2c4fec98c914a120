"""Check a trained shapes checkpoint the way the test suite checks the demo model.

`python -m diffusion_engine.train.evaluate CHECKPOINT [--pairs 30]`: export the checkpoint (the
demo's build ranges), generate one image per (prompt, seed) pair with the ONNX Runtime CPU engine at
the engine's default settings, once with the fp32 graphs and once with the fp16 graphs, read every
image back with the analyser of tests/quality.py and print the agreement rates; then, with the fp32
graphs, the shape IoU of circles and of squares (tests/quality.py `shape_iou`, 18 prompt/seed pairs
each). Needs a source checkout (for tests/quality.py) and the [export] and [test] extras.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

QUALITY = Path(__file__).resolve().parents[1] / "tests" / "quality.py"
PASS = 0.8


def load_quality() -> ModuleType:
    """tests/quality.py of this source checkout (the analyser is a test oracle, not shipped code)."""
    if not QUALITY.is_file():
        raise SystemExit(f"evaluate: needs a source checkout with {QUALITY} (run it from an editable install)")
    spec = importlib.util.spec_from_file_location("shapes_quality", QUALITY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def export(checkpoint: Path, out: Path) -> Path:
    """Export with the same ranges and default guidance as the built-in demo model."""
    from diffusion_engine.engine.specs import BuildRanges
    from diffusion_engine.export.exporter import ExportOptions, export_engine
    from diffusion_engine.runtime.demo import GUIDANCE, MAX_BATCH, MAX_SIZE, MIN_SIZE

    export_engine(str(checkpoint), out, ExportOptions(BuildRanges(MIN_SIZE, MAX_SIZE, MAX_BATCH), default_guidance=GUIDANCE))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffusion_engine.train.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--pairs", type=int, default=30, help="prompt/seed pairs (default 30, as the tests)")
    p.add_argument("--iou-pairs", type=int, default=18, help="prompt/seed pairs per shape for the IoU (default 18)")
    p.add_argument("--engine", type=Path, help="an engine directory already exported from CHECKPOINT")
    args = p.parse_args(argv)
    quality = load_quality()
    from diffusion_engine.runtime.pipeline import Pipeline

    pairs = quality.evaluation_pairs(args.pairs)
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        engine = args.engine or export(args.checkpoint, Path(tmp) / "engine")
        print(f"engine {engine} ready in {time.perf_counter() - start:.0f} s")
        for precision in ("fp32", "fp16"):
            with Pipeline.load(engine, backend="ort-cpu") as pipe:
                if precision == "fp16":
                    quality.use_fp16_graphs(pipe)
                rates[precision], misses, _ = quality.engine_agreement(pipe, pairs)
            print(f"{precision} graphs: {rates[precision]:.1%} of {len(pairs)} images agree with their prompt "
                  "(background colour, shape colour and shape)")
            for prompt, r in misses:
                print(f"  miss: {prompt!r} -> {r.color} {r.shape} on {r.background} (fill {r.fill})")
        with Pipeline.load(engine, backend="ort-cpu") as pipe:
            means = [report_shape_iou(quality, pipe, shape, args.iou_pairs) for shape in ("circle", "square")]
    return 0 if min(rates.values()) >= PASS and min(means) >= quality.MIN_SHAPE_IOU else 1


def report_shape_iou(quality: ModuleType, pipe, shape: str, n: int) -> float:
    """Print the shape IoU of each of n generated images of `shape` and their summary; return the mean."""
    pairs = quality.shape_iou_pairs(shape, n)
    ious = quality.engine_shape_iou(pipe, pairs)
    print(f"{shape} IoU with the ideal shape of its bounding box, {n} pairs: {quality.summary(ious)}")
    for (prompt, seed), iou in zip(pairs, ious):
        print(f"  {iou:.3f}  {prompt!r} seed {seed}")
    return sum(ious) / len(ious)


if __name__ == "__main__":
    sys.exit(main())
