"""`engine-bench --engine DIR ...`: per-stage latency, throughput and memory, with baselines;
`engine-bench report OUT.json`: the markdown table and plot from a saved result."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

from diffusion_engine.benchmarks.runner import BASELINES, Settings
from diffusion_engine.engine.atomic import write_atomic

logger = logging.getLogger(__name__)

USAGE_REPORT = "engine-bench report OUT.json [--markdown FILE] [--plot FILE]"


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need integers >= 1")
    return values


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    """WIDTHxHEIGHT list, as engine-build reads it, as (height, width) pairs."""
    from diffusion_engine.engine.plans import parse_sizes

    try:
        return parse_sizes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _baselines(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if names == ("none",):
        return ()
    bad = [n for n in names if n not in BASELINES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown baseline {bad[0]!r}; valid: {', '.join(BASELINES)}, none")
    return names


def _decoders(text: str) -> tuple[str, ...]:
    from diffusion_engine.engine.specs import DECODERS

    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [n for n in names if n not in DECODERS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown decoder {(bad or [text])[0]!r}; valid: {', '.join(DECODERS)}")
    return names


def bench_parser() -> argparse.ArgumentParser:
    from diffusion_engine.runtime.backends import BACKENDS
    from diffusion_engine.runtime.samplers import SAMPLERS

    p = argparse.ArgumentParser(prog="engine-bench", description=__doc__.split(";")[0].split(": ", 1)[1],
                                epilog=f"also: {USAGE_REPORT}")
    p.add_argument("--engine", required=True, help="engine directory made by engine-export")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--mode", choices=("e2e", "unet"), default="e2e",
                   help="e2e: whole generations, per stage (default); unet: one guided UNet evaluation per run")
    p.add_argument("--sizes", type=_sizes, default=((512, 512),), help="WIDTHxHEIGHT list, e.g. 256x256,768x512")
    p.add_argument("--batch", type=_ints, default=(1,), help="images per call, e.g. 1,4")
    p.add_argument("--steps", type=_ints, default=(30,), help="denoising steps, e.g. 4,30 (e2e mode)")
    p.add_argument("--scheduler", choices=SAMPLERS, help="default: the checkpoint's own")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per system and case (default 1)")
    p.add_argument("--runs", type=int, default=5, help="measured runs per system and case (default 5)")
    p.add_argument("--baseline", type=_baselines, default=(),
                   help=f"comma-separated: {', '.join(BASELINES)}, or none (default)")
    p.add_argument("--checkpoint", help="diffusers folder for the diffusers baseline (default: the manifest's source)")
    p.add_argument("--decoders", type=_decoders, default=("full",),
                   help="e2e: decode each case with these, in the same run: full (the checkpoint's VAE), tiny (the "
                        "engine's tiny VAE, engine-export --tiny-vae), e.g. full,tiny (default full)")
    p.add_argument("--tiny-vae", help="AutoencoderTiny folder for the diffusers baseline's tiny cases "
                                      "(default: the manifest's source tiny_vae)")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="load, measure and close each system in turn (models that do not fit in memory twice, e.g. "
                        "SDXL in fp32 on CPU); without it all systems are loaded and alternate run by run")
    p.add_argument("--prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result here (and, unless given, OUT.md and OUT.png beside it)")
    p.add_argument("--markdown", help="write the markdown report here")
    p.add_argument("--plot", help="write the PNG plot here")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine-bench report", description="Markdown and plot from a result JSON.")
    p.add_argument("result", help="JSON written by engine-bench --json")
    p.add_argument("--markdown", help="default: RESULT with .md")
    p.add_argument("--plot", help="default: RESULT with .png")
    return p


def write_outputs(doc: dict[str, Any], json_path: str | None, md_path: str | None, png_path: str | None) -> list[Path]:
    """Write whichever of JSON / markdown / plot were asked for (markdown and plot default beside the JSON;
    the default plot only where matplotlib, the [bench] extra, is installed)."""
    from diffusion_engine.benchmarks import report

    written = []
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(doc, indent=2) + "\n")
        written.append(path)
        md_path = md_path or str(path.with_suffix(".md"))
        png_path = png_path or default_plot(path)
    if md_path:
        write_atomic(md_path, report.markdown(doc))
        written.append(Path(md_path))
    if png_path:
        written.append(report.plot(doc, png_path))
    return written


def default_plot(result: Path) -> str | None:
    """RESULT.png beside a result, where matplotlib (the [bench] extra) can draw it; else no plot, said once."""
    if importlib.util.find_spec("matplotlib") is None:
        logger.info("no plot: matplotlib is not installed (pip install 'diffusion-engine[bench]')")
        return None
    return str(result.with_suffix(".png"))


def check_plot(path: str | None) -> None:
    """A plot asked for by name needs matplotlib: say so before any work."""
    if path and importlib.util.find_spec("matplotlib") is None:
        raise ValueError(f"--plot {path} needs matplotlib: pip install 'diffusion-engine[bench]'")


def report_main(argv: list[str]) -> int:
    from diffusion_engine.benchmarks.schema import SchemaError, validate

    args = report_parser().parse_args(argv)
    try:
        check_plot(args.plot)
        doc = json.loads(Path(args.result).read_text())
        validate(doc)
    except (OSError, json.JSONDecodeError, SchemaError, ValueError) as exc:
        print(f"engine-bench report: error: {exc}", file=sys.stderr)
        return 2
    result = Path(args.result)
    for path in write_outputs(doc, None, args.markdown or str(result.with_suffix(".md")),
                              args.plot or default_plot(result)):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    args = bench_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusion_engine").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from diffusion_engine.benchmarks.report import markdown
    from diffusion_engine.benchmarks.runner import PROMPT, run_bench
    from diffusion_engine.engine.manifest import ManifestError

    try:
        check_plot(args.plot)
        settings = Settings(
            engine=Path(args.engine), backend=args.backend, sizes=args.sizes, batches=args.batch, steps=args.steps,
            scheduler=args.scheduler, guidance_scale=args.guidance, warmup=args.warmup, runs=args.runs,
            baselines=args.baseline, checkpoint=args.checkpoint, mode=args.mode, prompt=args.prompt or PROMPT,
            seed=args.seed, decoders=args.decoders, tiny_vae=args.tiny_vae, one_at_a_time=args.one_at_a_time,
        )
        doc = run_bench(settings, say=lambda line: print(line, file=sys.stderr, flush=True))
    except (ValueError, ManifestError) as exc:
        print(f"engine-bench: error: {exc}", file=sys.stderr)
        return 2
    print(markdown(doc))
    for path in write_outputs(doc, args.json, args.markdown, args.plot):
        print(f"wrote {path}", file=sys.stderr)
    return 0
