"""`engine-info DIR`: print an engine directory's manifest readably."""

from __future__ import annotations

import argparse
import sys

from diffusion_engine.engine.manifest import Manifest, ManifestError, read_manifest


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
    args = p.parse_args(argv)
    try:
        manifest = read_manifest(args.engine_dir)
    except ManifestError as exc:
        print(f"engine-info: error: {exc}", file=sys.stderr)
        return 1
    print(describe(args.engine_dir, manifest))
    return 0


if __name__ == "__main__":
    sys.exit(info_main())
