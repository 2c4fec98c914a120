"""Whether the GPU suite can run here: an NVIDIA GPU, and the libraries that drive it."""

from __future__ import annotations

import shutil
import subprocess
from functools import lru_cache


@lru_cache(maxsize=1)
def gpu_skip_reason() -> str | None:
    """None where an NVIDIA GPU is visible to nvidia-smi; else why GPU tests are skipped."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no NVIDIA GPU: nvidia-smi not found"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no NVIDIA GPU: nvidia-smi failed ({exc})"
    if out.returncode != 0 or "GPU" not in out.stdout:
        return "no NVIDIA GPU: nvidia-smi lists none"
    return None
