"""`engine-info DIR [--check-trt]`: print an engine directory's manifest; `engine-build DIR`: TensorRT plans."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from diffusion_engine.engine.atomic import run_cli
from diffusion_engine.engine.manifest import Manifest, ManifestError, check_files, read_manifest
from diffusion_engine.engine.plans import BuildConfig, parse_sizes, size_buckets
from diffusion_engine.engine.toolchain import Toolchain, TrtUnavailable
from diffusion_engine.engine.trt_build import PlanResult, TrtBuildError, build_engine, find_toolchain


def describe(engine_dir: str, m: Manifest) -> str:
    """A readable summary of the manifest."""
    d, b, s = m.dims, m.build, m.scheduler_config
    lines = [
        f"engine        {engine_dir}",
        f"format        {m.format_version}",
        f"family        {m.family} ({m.prediction_type} prediction)",
        f"latents       {d.latent_channels} channels, VAE factor {d.vae_scale_factor}",
        f"built for     {b.min_size}-{b.max_size} px in multiples of {d.size_multiple}, 1-{b.max_batch} images",
        f"scheduler     {s.get('_class_name', '?')}: {s.get('beta_schedule')} betas "
        f"{s.get('beta_start')}-{s.get('beta_end')}, {s.get('timestep_spacing', 'leading')} spacing, "
        f"steps_offset {s.get('steps_offset', 0)}",
        f"tokenizer     {m.tokenizer['file']} (max {m.tokenizer['max_length']} tokens)",
        f"source        {m.source['checkpoint']} ({m.source['kind']}) {m.source['digest'][:19]}...",
        "tools         " + ", ".join(f"{k} {v}" for k, v in m.tool_versions.items()),
        "",
    ]
    header = ("component", "parameters", "graphs", "gpu", "fp32 error", "fp16 error", "axes")
    rows = [header]
    for name, c in m.components.items():
        worst = {p: max(r["rel_error"] for r in rs) for p, rs in c.parity.items()}
        axes = ", ".join(f"{a} {r['min']}-{r['max']}" for a, r in c.axis_ranges.items())
        rows.append((
            name, f"{c.parameters:,}", "+".join(c.files), c.gpu_precision,
            f"{worst['fp32']:.2e}", f"{worst['fp16']:.2e}" if "fp16" in worst else "-", axes,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for name, c in m.components.items():
        lines += [f"note          {name}: {n}" for n in c.notes]
        lines += [f"plan          {name}: {p.get('file')} ({p.get('key', '')[:12]})" for p in c.plans]
    return "\n".join(lines)


def info_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="engine-info", description="Print an engine directory's manifest.")
    p.add_argument("engine_dir")
    p.add_argument("--verify", action="store_true",
                   help="check every file's size and sha256 against what the export recorded; exit 1 on any difference")
    p.add_argument("--check-trt", action="store_true",
                   help="check every ONNX graph op by op against the TensorRT ONNX parser's supported-operator "
                        "table; exit 1 if anything is unsupported")
    args = p.parse_args(argv)
    try:
        manifest = read_manifest(args.engine_dir, check_sizes=False)  # a description; --verify checks the files
    except ManifestError as exc:
        print(f"engine-info: error: {exc}", file=sys.stderr)
        return 2
    print(describe(args.engine_dir, manifest))
    status = verify(args.engine_dir, manifest) if args.verify else 0
    return max(status, check_trt(args.engine_dir, manifest)) if args.check_trt else status


def verify(engine_dir: str, manifest: Manifest) -> int:
    """Print the result of checking every recorded file's size and digest; 1 if any differs."""
    print()
    if not manifest.checksums:
        print("verify        this engine records no checksums (exported before they were added); export it again to get them")
        return 0
    problems = check_files(engine_dir, manifest)
    for problem in problems:
        print(f"verify        DAMAGED: {problem}")
    if problems:
        print(f"verify        {len(problems)} of {len(manifest.checksums)} files differ from the export: export the engine again")
        return 1
    print(f"verify        all {len(manifest.checksums)} files have the size and sha256 the export recorded")
    return 0


def check_trt(engine_dir: str, manifest: Manifest) -> int:
    """Print the TensorRT ONNX parser check of every graph; 1 if anything is unsupported."""
    from diffusion_engine.engine.trt_ops import check_engine, format_report

    try:
        checks = check_engine(engine_dir, manifest)
    except ValueError as exc:  # a graph onnx cannot read
        print(f"engine-info: error: {exc}", file=sys.stderr)
        return 1
    print()
    print(format_report(checks))
    return 0 if all(c.ok for c in checks) else 1


def build_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="engine-build",
        description="Build one TensorRT plan per component of an engine directory (needs tensorrt and a CUDA GPU).",
    )
    p.add_argument("engine_dir")
    p.add_argument("--sizes", help="WIDTHxHEIGHT,...: one optimisation profile per size, e.g. 512x512,768x768,1024x1024")
    p.add_argument("--min-size", type=int, help="smallest image side; [min, max] is split into 3 square profiles "
                                                "(default: the engine's built range)")
    p.add_argument("--max-size", type=int, help="largest image side (default: the engine's built maximum)")
    p.add_argument("--max-batch", type=int, help="images per batch (default: the engine's built maximum)")
    p.add_argument("--static", action="store_true", help="static shapes: min = opt = max in every profile")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimisation level, 0-5 (default 3)")
    p.add_argument("--timing-cache", help="timing cache file to read and update (default DIR/timing.cache)")
    p.add_argument("--refittable", action="store_true", help="build refittable plans (weights can be swapped)")
    p.add_argument("--workspace-gib", type=float, help="limit TensorRT's workspace memory pool (default: no limit)")
    args = p.parse_args(argv)
    return run_cli("engine-build", lambda: build(args))


def build(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        toolchain = find_toolchain()  # first, so a machine without TensorRT or a GPU is told at once
    except TrtUnavailable as exc:
        print(f"engine-build: error: {exc}", file=sys.stderr)
        return 1
    try:
        manifest = read_manifest(args.engine_dir)
        config = build_config(args, manifest)
        results = build_engine(args.engine_dir, manifest, config, toolchain)
    except (ValueError, OSError, TrtBuildError) as exc:  # ManifestError is a ValueError
        print(f"engine-build: error: {exc}", file=sys.stderr)
        return 1
    print(describe_plans(args.engine_dir, results, toolchain))
    return 0


def build_config(args: argparse.Namespace, manifest: Manifest) -> BuildConfig:
    """The BuildConfig the command line asks for, checked against the engine's built ranges."""
    buckets = size_buckets(
        manifest.build, manifest.dims.size_multiple, sizes=parse_sizes(args.sizes) if args.sizes else None,
        min_size=args.min_size, max_size=args.max_size, static=args.static,
    )
    return BuildConfig(
        buckets=buckets, max_batch=args.max_batch or manifest.build.max_batch, static=args.static,
        opt_level=args.opt_level, refittable=args.refittable,
        workspace_bytes=int(args.workspace_gib * 2**30) if args.workspace_gib else None,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
    )


def describe_plans(engine_dir: str, results: list[PlanResult], tc: Toolchain) -> str:
    """One line per plan: component, file, profiles, built or reused, seconds."""
    rows = [("component", "plan", "profiles", "", "time")]
    for r in results:
        buckets = ", ".join(p["bucket"] for p in r.plan["profiles"])
        rows.append((r.component, r.plan["file"], buckets, "cache hit" if r.cache_hit else "built", f"{r.seconds:.1f} s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"TensorRT {tc.tensorrt_version} on {tc.device} (compute capability {tc.compute_capability})", ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines + ["", f"wrote {engine_dir}/manifest.json"])


if __name__ == "__main__":
    sys.exit(info_main())
