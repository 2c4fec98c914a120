"""`make gpu-check`: on an NVIDIA GPU machine, build, test and benchmark, and write one JSON report.

Steps: a tiny checkpoint and an SD1.5-architecture checkpoint (random weights: latency only) are
built in code, exported, given TensorRT plans with engine-build; then the GPU test suite
(`pytest -m gpu`) and engine-bench run. Every step's command, exit code, time and output tail
go into the report, which is written even when a step fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from diffusion_engine.engine.atomic import write_atomic

PY = sys.executable


def tool(name: str) -> str:
    """A console script of this install (beside the running interpreter)."""
    return str(Path(sys.executable).with_name(name))


def steps(work: Path) -> list[tuple[str, list[str]]]:
    """(name, command) of every step, in order."""
    tiny, sd15 = work / "tiny-sd1", work / "sd15"
    tiny_engine, sd15_engine = work / "tiny-engine", work / "sd15-engine"
    return [
        ("tiny checkpoint", [tool("engine-tiny"), str(tiny), "--overwrite"]),
        ("tiny export", [tool("engine-export"), str(tiny), "--out", str(tiny_engine),
                         "--min-size", "256", "--max-size", "512", "--max-batch", "2", "--overwrite"]),
        ("tiny engine-build", [tool("engine-build"), str(tiny_engine),
                               "--sizes", "256x256,512x512", "--max-batch", "2"]),
        ("sd15 checkpoint", [PY, "-m", "diffusion_engine.benchmarks.models", "sd15", "--out", str(sd15)]),
        ("sd15 export", [tool("engine-export"), str(sd15), "--out", str(sd15_engine),
                         "--min-size", "512", "--max-size", "768", "--max-batch", "1", "--overwrite"]),
        ("sd15 engine-build", [tool("engine-build"), str(sd15_engine),
                               "--sizes", "512x512,768x768", "--max-batch", "1"]),
        ("gpu tests", [PY, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                       f"--junitxml={work / 'gpu-tests.xml'}"]),
        ("tiny bench", [tool("engine-bench"), "--engine", str(tiny_engine), "--backend", "trt",
                        "--sizes", "256x256,512x512", "--steps", "30", "--runs", "10", "--json", str(work / "tiny-bench.json")]),
        ("sd15 bench", [tool("engine-bench"), "--engine", str(sd15_engine), "--backend", "trt",
                        "--sizes", "512x512", "--steps", "30", "--runs", "5", "--baseline", "diffusers",
                        "--json", str(work / "sd15-bench.json")]),
    ]


def run_step(name: str, cmd: list[str]) -> dict[str, Any]:
    """Run one command; record its exit code, time and the tail of its output."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    record = {"name": name, "command": cmd, "returncode": proc.returncode,
              "seconds": round(time.perf_counter() - start, 2), "output_tail": (proc.stdout + proc.stderr)[-4000:]}
    print(f"{'ok  ' if proc.returncode == 0 else 'FAIL'} {name} ({record['seconds']} s)", flush=True)
    return record


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("--work", default="out/gpu-check", help="folder for checkpoints, engines and results")
    p.add_argument("--report", default="out/gpu-check.json")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "gpu": gpu_name(),
        "python": platform.python_version(), "steps": [],
    }
    for name, cmd in steps(work):
        report["steps"].append(run_step(name, cmd))
        if report["steps"][-1]["returncode"] != 0 and name.endswith(("checkpoint", "export", "engine-build")):
            break  # later steps need this one's output
    for key in ("tiny-bench", "sd15-bench"):
        path = work / f"{key}.json"
        report[key] = json.loads(path.read_text()) if path.is_file() else None
    report["ok"] = all(s["returncode"] == 0 for s in report["steps"]) and len(report["steps"]) == len(steps(work))
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.report, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.report}: {'all steps passed' if report['ok'] else 'some steps failed'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
