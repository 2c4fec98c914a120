"""Prototype: ONNX Runtime CPU variants of the UNet call (graph fusions, session options), measured
alternately against the runtime's own settings. Findings go to the lead; runtime/ is not changed here.

    python -m diffusion_engine.benchmarks.ort_tuning --engine DIR --size 512 --runs 3 \
        --variants base,mha,base-no-spin --work /tmp/ort-variants
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from diffusion_engine.benchmarks.attention_fusion import fuse_file
from diffusion_engine.benchmarks.measure import summarize
from diffusion_engine.benchmarks.systems import Case, unet_feeds
from diffusion_engine.engine.atomic import write_atomic
from diffusion_engine.engine.manifest import read_manifest
from diffusion_engine.engine.specs import NOISE_PRED, UNET
from diffusion_engine.runtime.session import cpu_threads

logger = logging.getLogger(__name__)

# CUDA-only contrib ops the Stable Diffusion fusions would emit; a CPU graph must not contain them.
CUDA_ONLY_FUSIONS = ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                     "enable_packed_qkv", "enable_packed_kv", "enable_bias_add")


def fuse_unet(src: Path, dst: Path) -> dict[str, int]:
    """onnxruntime.transformers' UNet optimizer with only CPU-runnable fusions (attention -> MultiHeadAttention)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("unet")
    for flag in CUDA_ONLY_FUSIONS:
        setattr(options, flag, False)
    model = optimize_model(str(src), model_type="unet", num_heads=0, hidden_size=0, opt_level=0,
                           optimization_options=options, use_gpu=False)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model.save_model_to_file(str(dst), use_external_data_format=True, all_tensors_to_one_file=True)
    return {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}


def session_options(variant: str, threads: int) -> ort.SessionOptions:
    """The runtime's OrtCpuSession options, changed as the variant says."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if "no-spin" in variant:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if "ftz" in variant:
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    if "no-layout" in variant:  # stop at extended: no NCHWc layout transformation
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return opts


def profile_op_types(path: Path, opts: ort.SessionOptions, feeds: dict[str, np.ndarray], work: Path,
                     top: int = 12) -> dict[str, float]:
    """Seconds per op type over one run, from ONNX Runtime's profiler (after one warm-up run)."""
    opts.enable_profiling = True
    opts.profile_file_prefix = str(work / f"ort_profile_{path.stem}")  # never into the engine directory
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    session.run([NOISE_PRED], feeds)
    session.run([NOISE_PRED], feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    last_run = runs[len(runs) // 2:]  # the second of the two runs
    totals: dict[str, float] = {}
    for e in last_run:
        op = e.get("args", {}).get("op_name", "?")
        totals[op] = totals.get(op, 0.0) + e["dur"] / 1e6
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])[:top])


def run_variants(engine: Path, size: int, variants: list[str], runs: int, work: Path, threads: int,
                 profile: bool = False) -> dict[str, Any]:
    manifest = read_manifest(engine)
    original = engine / manifest.components[UNET].files["fp32"]
    work.mkdir(parents=True, exist_ok=True)
    fused, mha = work / "unet.fused.onnx", work / "mha" / original.name
    stats: dict[str, Any] = {}
    if any(v.startswith("fused") for v in variants):
        stats["ort_transformers_optimizer"] = fuse_unet(original, fused)
    if any(v.startswith("mha") for v in variants):
        lat = {"latent_height": size // manifest.dims.vae_scale_factor, "latent_width": size // manifest.dims.vae_scale_factor}
        stats["multi_head_attention"] = fuse_file(original, mha, {"batch": 2, "sequence": manifest.dims.max_text_length, **lat})
    logger.info("graph rewrites: %s", stats)
    feeds = unet_feeds(manifest, Case("unet", size, size, 1, None), np.random.default_rng(0))
    sessions = {}
    for v in variants:
        path = fused if v.startswith("fused") else mha if v.startswith("mha") else original
        sessions[v] = ort.InferenceSession(str(path), session_options(v, threads), providers=["CPUExecutionProvider"])
    times: dict[str, list[float]] = {v: [] for v in variants}
    outputs: dict[str, np.ndarray] = {}
    for r in range(runs + 1):  # the first round warms up
        for v in variants if r % 2 == 0 else variants[::-1]:
            start = time.perf_counter()
            outputs[v] = sessions[v].run([NOISE_PRED], feeds)[0]
            if r:
                times[v].append(time.perf_counter() - start)
            logger.info("round %d %s: %.2f s", r, v, time.perf_counter() - start)
    ref = outputs[variants[0]]
    profiles = {v: profile_op_types(fused if v.startswith("fused") else mha if v.startswith("mha") else original,
                                    session_options(v, threads), feeds, work) for v in variants} if profile else None
    return {
        "profile_seconds_by_op": profiles,
        "size": size, "threads": threads, "fusions": stats,
        "variants": {v: {**summarize(times[v]),
                         "rel_error_vs_first": float(np.abs(outputs[v] - ref).max() / np.abs(ref).max())}
                     for v in variants},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffusion_engine.benchmarks.ort_tuning", description=__doc__.split("\n")[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--variants", default="base,mha",
                   help="base (the runtime's graph and options), mha (attention fused into MultiHeadAttention), "
                        "fused (onnxruntime.transformers optimizer), each with optional -no-spin, -ftz, -no-layout")
    p.add_argument("--work", default="/tmp/ort-variants", help="where the fused graph is written (GBs)")
    p.add_argument("--threads", type=int, default=cpu_threads())
    p.add_argument("--profile", action="store_true", help="also profile one run per variant: seconds by op type")
    p.add_argument("--json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = run_variants(Path(args.engine), args.size, args.variants.split(","), args.runs, Path(args.work), args.threads, args.profile)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        write_atomic(args.json, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
