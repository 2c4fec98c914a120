"""Markdown tables and a latency-vs-resolution plot (matplotlib, Agg), generated from a result JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusion_engine.benchmarks.systems import STAGES
from diffusion_engine.engine.atomic import write_atomic

ROW_LABELS = {
    "tokenize": "tokenize", "text_encoder": "text encoder", "unet": "UNet (per call)",
    "step_graph": "step graph / scheduler step (per call)", "vae_decoder": "VAE decoder", "end_to_end": "end to end",
}


def seconds(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 1e-3:
        return f"{v * 1e6:.0f} µs"
    if v < 1:
        return f"{v * 1e3:.1f} ms"
    return f"{v:.2f} s"


def gib(v: int | None) -> str:
    return "-" if v is None else f"{v / 2**30:.2f} GiB"


def headline(case: dict[str, Any]) -> str:
    """The stage a case is about: end to end, or the UNet call in UNet-only mode."""
    return "unet" if case["mode"] == "unet" else "end_to_end"


def case_title(case: dict[str, Any]) -> str:
    what = f"{case['steps']} steps, end to end" if case["mode"] == "e2e" else "one guided UNet evaluation"
    decoder = f", {case['decoder']} decoder" if case.get("decoder") == "tiny" else ""
    return f"{case['width']}x{case['height']}, batch {case['batch']}, {what}{decoder}"


def case_table(case: dict[str, Any]) -> str:
    """One case: stages as rows; per system p50 (min / p90); ratios theirs / ours."""
    systems = list(case["systems"])
    others = [s for s in systems if s != "ours"]
    head = ["stage"] + [f"{s} p50 (min / p90)" for s in systems] + [f"{s} / ours" for s in others]
    rows = [head, ["---"] * len(head)]
    for stage in STAGES:
        if not any(stage in case["systems"][s]["stages"] for s in systems):
            continue
        row = [ROW_LABELS[stage]]
        for s in systems:
            st = case["systems"][s]["stages"].get(stage)
            row.append(f"**{seconds(st['p50'])}** ({seconds(st['min'])} / {seconds(st['p90'])})" if st else "-")
        for s in others:
            r = case["ratios"].get(s, {}).get(stage)
            row.append("-" if r is None else f"{r:.2f}x")
        rows.append(row)
    rows += _extra_rows(case, systems, len(others))
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def _extra_rows(case: dict[str, Any], systems: list[str], n_ratio: int) -> list[list[str]]:
    sy = case["systems"]

    def row(label: str, fn) -> list[str]:
        return [label] + [fn(sy[s]) for s in systems] + [""] * n_ratio

    rows = []
    if case["mode"] == "e2e":
        rows.append(row("images / s", lambda x: f"{x['images_per_second']:.3f}" if x["images_per_second"] else "-"))
        rows.append(row("time outside model calls", lambda x: f"{100 * x['overhead']['p50_fraction']:.1f}%"
                        if x["overhead"] else "-"))
    rows.append(row("UNet GFLOP/s achieved", lambda x: f"{1e3 * x['achieved_tflops']['unet']:,.0f}"
                    if "unet" in x["achieved_tflops"] else "-"))
    rows.append(row("UNet fraction of fp16 peak", lambda x: f"{100 * x['fraction_of_fp16_peak']['unet']:.1f}%"
                    if x["fraction_of_fp16_peak"].get("unet") is not None else "- (CPU)"))
    rows.append(row("peak RSS (process)", lambda x: gib(x["peak_rss_bytes"])))
    rows.append(row("RSS added by loading", lambda x: gib(x["load_rss_bytes"])))
    rows.append(row("RSS added by compile + warm-up", lambda x: gib(x["warm_rss_bytes"])))
    rows.append(row("RSS increase during a run", lambda x: gib(x["run_rss_increase_bytes"])))
    rows.append(row("device memory", lambda x: gib(x["device_memory_bytes"])))
    rows.append(row("agreement with ours", _agreement))
    return rows


def _agreement(x: dict[str, Any]) -> str:
    a = x.get("agreement")
    if not a:
        return "(reference)"
    if "psnr_db" in a:
        return f"PSNR {a['psnr_db']:.1f} dB"
    return f"max rel. error {a['rel_error']:.1e}"


def markdown(doc: dict[str, Any]) -> str:
    """The whole report: provenance, notes, one table per case, FLOPs."""
    m, e, s, v = doc["machine"], doc["engine"], doc["settings"], doc["versions"]
    gpus = ", ".join(g["name"] for g in m["gpus"]) or "none"
    mem = f"{m['memory_bytes'] / 2**30:.0f} GiB" if m["memory_bytes"] else "?"
    tools = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    lines = [
        f"Command: `{doc['command']}`",
        "",
        f"- date: {doc['created']} (took {doc['duration_s']:.0f} s)",
        f"- machine: {m['cpu_model']}, {m['cpu_affinity']} CPUs used of {m['cpu_cores']}, {mem} RAM, GPU: {gpus}; "
        f"load average {m['load_average_start'][0]:.1f} at start" + (
            f", {m['load_average_end'][0]:.1f} at end" if "load_average_end" in m else ""),
        f"- versions: {tools}",
        f"- engine: `{e['dir']}` ({e['family']}), manifest sha256 `{e['manifest_sha256'][:16]}…`"
        + (", **random weights**" if e["random_weights"] else ""),
        f"- settings: backend {s['backend']}, scheduler {s['scheduler']}, guidance {s['guidance_scale']}, "
        f"{s['warmup']} warm-up + {s['runs']} measured runs per system, {s['threads']} threads",
    ]
    if doc["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in doc["notes"]]
    for case in doc["cases"]:
        lines += ["", f"#### {case_title(case)}", "", case_table(case), ""]
        flops = ", ".join(f"{k} {f['flops'] / 1e9:,.1f} GFLOP" for k, f in case["flops"].items())
        lines.append(f"FLOPs per call (2 x MACs of Conv/MatMul/Gemm/attention): {flops}")
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: str | Path) -> Path:
    """Headline-stage p50 latency against image side, one line per system (and batch/steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float, str]]] = {}
    for case in doc["cases"]:
        stage = headline(case)
        tail = f", b{case['batch']}" + (f", {case['steps']} steps" if case["steps"] else "")
        tail += ", tiny decoder" if case.get("decoder") == "tiny" else ""
        for name, sy in case["systems"].items():
            if stage in sy["stages"]:
                side = (case["height"] * case["width"]) ** 0.5
                series.setdefault(f"{name}{tail}", []).append(
                    (side, sy["stages"][stage]["p50"], f"{case['width']}x{case['height']}"))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ticks: dict[float, str] = {}
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ticks.update({p[0]: p[2] for p in points})
    ax.set_xticks(list(ticks), list(ticks.values()))
    ax.set_yscale("log")
    ax.set_xlabel("image size")
    ax.set_ylabel("p50 latency (s)")
    modes = {c["mode"] for c in doc["cases"]}
    what = "end to end" if modes == {"e2e"} else "one guided UNet call" if modes == {"unet"} else "headline stage"
    ax.set_title(f"{what}, {doc['engine']['family']}" + (" (random weights)" if doc["engine"]["random_weights"] else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fmt = path.suffix[1:] or matplotlib.rcParams["savefig.format"]  # as savefig(path) picks it, not from the temp name
    write_atomic(path, writer=lambda tmp: fig.savefig(tmp, format=fmt))
    plt.close(fig)
    return path
