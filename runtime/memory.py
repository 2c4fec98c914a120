"""Working memory a request needs on ONNX Runtime's CPU, estimated and checked before any model runs.

Attention written as MatMul -> Softmax -> MatMul holds its [rows, heads, Sq, Skv] scores and their
softmax at once; at 1024x1024 that is 17 GB per guided UNet call of SD1.5 (and of the tiny test
models, whose first level has as many tokens). The export records, per component, the score
tensors that the graph ort-cpu opens still holds (none where its attention is fused:
export/attention.py), as a law in the image area; this module turns them into bytes for a request
and compares them with the memory this process can still get.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

from diffusion_engine.engine.manifest import ComponentEntry

FLOAT_BYTES = 4
LIVE_COPIES = 2  # the scores and their softmax are alive together


def score_bytes(entry: ComponentEntry, sizes: Mapping[str, int], rows: int) -> int | None:
    """Bytes of the largest score buffers of one call of the graph ort-cpu opens, or None where the
    export recorded none (engines exported before these records)."""
    records = entry.score_buffers.get(entry.cpu_key())
    if records is None:
        return None
    largest = 0.0
    for r in records:
        area = math.prod(sizes[a] for a in r["axes"]) if r["axes"] else 1
        largest = max(largest, r["elements"] * (area / r["at_area"]) ** r["power"])
    return int(largest * rows * FLOAT_BYTES * LIVE_COPIES)


def available_bytes(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int | None:
    """Memory this process can still get: MemAvailable, capped by a cgroup v2 limit; None where unknown."""
    found = []
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path(cgroup, "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path(cgroup, "memory.current").read_text().strip()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB"
