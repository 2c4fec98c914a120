"""Content digests of files: what the manifest, plan cache keys and the demo cache are keyed by."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable


def file_digest(files: Iterable[Path], root: Path | None = None) -> str:
    """'sha256:...' over each file's name (relative to root, else its base name), a NUL, then its bytes, in the given order."""
    h = hashlib.sha256()
    for f in files:
        h.update((f.relative_to(root).as_posix() if root else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()
