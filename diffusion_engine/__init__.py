"""diffusion-engine: export a Stable Diffusion-class checkpoint once, then generate from a lean runtime.

The Python API: `from diffusion_engine import Pipeline` (runtime/pipeline.py), with
`GenerationRequest` and `GenerationResult`. The folders of the repository are the subpackages
(diffusion_engine.runtime, .engine, .export, .benchmarks, .train). These names load on first use, so
importing a subpackage (the exporter, say) does not load the runtime.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "Pipeline": "diffusion_engine.runtime.pipeline",
    "GenerationResult": "diffusion_engine.runtime.pipeline",
    "GenerationRequest": "diffusion_engine.runtime.request",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'diffusion_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
