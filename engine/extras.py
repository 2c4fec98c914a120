"""Which optional extras of diffusion-engine are installed, asked without importing them."""

from __future__ import annotations

import importlib.util

# extra -> the modules whose absence means it is not installed
EXTRAS = {"export": ("torch", "diffusers", "transformers", "onnx", "onnxscript")}


def missing_modules(extra: str) -> list[str]:
    """The modules of an extra that cannot be found."""
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def require(extra: str, purpose: str) -> None:
    """ModuleNotFoundError in one line, saying what to install, unless the extra is installed."""
    missing = missing_modules(extra)
    if missing:
        raise ModuleNotFoundError(
            f"{purpose} needs the [{extra}] extra (missing: {', '.join(missing)}): "
            f"pip install 'diffusion-engine[{extra}]'"
        )
