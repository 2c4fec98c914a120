"""`engine-export MODEL --out DIR`: export a checkpoint into an engine directory."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import warnings

from tqdm import tqdm

from diffusion_engine.engine.atomic import run_cli
from diffusion_engine.engine.extras import require
from diffusion_engine.engine.manifest import check_engine_out
from diffusion_engine.engine.specs import COMPONENTS, FAMILIES, TINY_VAE_DECODER, BuildRanges, validate_build_ranges
from diffusion_engine.export.checkpoint import source_kind
from diffusion_engine.export.tiny_vae import check_against_folder, read_tiny_vae_config


def stages(tiny_vae: bool) -> tuple[str, ...]:
    """The export's progress stages, in order."""
    return ("load checkpoint", "tokenizer", *COMPONENTS, *(TINY_VAE_DECODER,) * tiny_vae, "step graphs")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="engine-export", description=__doc__.split(":")[1].strip())
    p.add_argument("model", help="diffusers folder, hub id (org/name), or single-file .safetensors/.ckpt")
    p.add_argument("--out", required=True, help="engine directory to create")
    p.add_argument("--config", help="for a single-file checkpoint offline: a local diffusers folder giving the architecture")
    p.add_argument("--min-size", type=int, default=256, help="smallest image side in pixels (default 256)")
    p.add_argument("--max-size", type=int, default=1024, help="largest image side in pixels (default 1024)")
    p.add_argument("--max-batch", type=int, default=4, help="most images per call (default 4)")
    p.add_argument("--no-fp16", action="store_true", help="skip the fp16 graphs (CPU-only engines)")
    p.add_argument("--family", choices=FAMILIES,
                   help="override the detected model family (within the checkpoint's architecture), e.g. sd-turbo")
    p.add_argument("--fp16-vae", action="store_true",
                   help="the VAE is fp16-safe (an fp16-fix VAE): its GPU graph is fp16 even where the config says force_upcast")
    p.add_argument("--tiny-vae", metavar="PATH",
                   help="a diffusers AutoencoderTiny folder (TAESD for SD1.x/2.x, TAESDXL for SDXL): exported as a "
                        "second decoder, generate(decoder='tiny') / engine-run --tiny-vae")
    p.add_argument("--default-guidance", type=float, metavar="G",
                   help="the guidance scale requests get where they give none, recorded in the manifest "
                        "(default: the model family's, e.g. 7.5 for SD1.x)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def check_default_guidance(value: float | None) -> None:
    """--default-guidance: a finite number >= 0 (<= 1 turns guidance off by default)."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"--default-guidance must be a finite number >= 0, got {value}")


def _quiet_libraries() -> None:
    """Library progress bars and chatter would drown the stage bar."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for name in ("torch.onnx", "onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


def format_table(reports) -> str:
    """The closing table: component, parameters, ONNX size, fp32 and fp16 error, time."""
    rows = [("component", "parameters", "onnx fp32", "fp32 error", "fp16 error", "time")]
    for r in reports:
        fp16 = "-" if r.fp16_error is None else f"{r.fp16_error:.2e}"
        rows.append((r.name, f"{r.parameters:,}", f"{r.onnx_bytes / 2**20:.1f} MiB", f"{r.fp32_error:.2e}", fp16, f"{r.seconds:.1f} s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("engine-export", lambda: export(args))


def export(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusion_engine").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:  # bad arguments fail here, before the heavy imports and any loading
        validate_build_ranges(args.min_size, args.max_size, args.max_batch)
        check_default_guidance(args.default_guidance)
        kind = source_kind(args.model)
        check_engine_out(args.out, args.overwrite, args.model)
        if args.tiny_vae:
            tiny = read_tiny_vae_config(args.tiny_vae)
            if kind == "diffusers-folder":  # other sources: checked once loaded, before any export work
                check_against_folder(tiny, args.tiny_vae, args.model)
        require("export", "engine-export")
    except (ValueError, OSError, ImportError) as exc:
        print(f"engine-export: error: {exc}", file=sys.stderr)
        return 2
    # Library warnings (deprecations inside torch, exporter notes) are nothing a user can act on: -v shows them.
    with warnings.catch_warnings():
        if args.verbose:
            logging.captureWarnings(True)
        else:
            warnings.simplefilter("ignore")
        return _export(args)


def _export(args: argparse.Namespace) -> int:
    from diffusion_engine.export.exporter import ExportOptions, export_engine

    _quiet_libraries()
    options = ExportOptions(
        BuildRanges(args.min_size, args.max_size, args.max_batch), fp16=not args.no_fp16, overwrite=args.overwrite,
        family=args.family, fp16_vae=args.fp16_vae, tiny_vae=args.tiny_vae,
        default_guidance=args.default_guidance,
    )
    start = time.perf_counter()
    names = stages(bool(args.tiny_vae))
    with tqdm(total=len(names), unit="stage", file=sys.stderr) as bar:
        def progress(stage: str) -> None:
            if bar.n or stage != names[0]:
                bar.update(1)
            bar.set_description(stage)

        try:
            manifest, reports = export_engine(args.model, args.out, options, config=args.config, progress=progress)
        except (ValueError, OSError, RuntimeError) as exc:
            bar.close()
            print(f"engine-export: error: {exc}", file=sys.stderr)
            return 1
        bar.update(1)
    print(format_table(reports))
    print(f"wrote {args.out} ({manifest.family}, {manifest.prediction_type}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
