"""Save the checkpoint's tokenizer as a `tokenizers` tokenizer.json and prove it tokenizes alike."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from diffusion_engine.export.errors import CheckpointError
from diffusion_engine.runtime.tokenizer import PromptTokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_2_FILE = "tokenizer_2.json"  # SDXL's second tokenizer
_PROBES = ("a photo of an astronaut riding a horse", "", "A RED circle, on a blue background!!  ", "x " * 100)


def save_tokenizer(tokenizer: Any, out_dir: Path, file: str = TOKENIZER_FILE) -> dict[str, Any]:
    """Write the tokenizer as `file`; return the manifest entry (file, max length, special ids)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise CheckpointError(f"the checkpoint's tokenizer {type(tokenizer).__name__} has no `tokenizers` backend")
    path = Path(out_dir) / file
    backend.save(str(path))
    info = {
        "file": file,
        "max_length": int(tokenizer.model_max_length),
        "pad_token_id": int(tokenizer.pad_token_id),
        "bos_token_id": int(tokenizer.bos_token_id),
        "eos_token_id": int(tokenizer.eos_token_id),
    }
    _check_same(tokenizer, path, info)
    return info


def _check_same(tokenizer: Any, path: Path, info: dict[str, Any]) -> None:
    expected = tokenizer(list(_PROBES), padding="max_length", max_length=info["max_length"], truncation=True).input_ids
    quiet = logging.getLogger("diffusion_engine.runtime.tokenizer")
    level, quiet.level = quiet.level, logging.ERROR  # the long probe's truncation warning is expected
    try:
        got = PromptTokenizer(path, **{k: v for k, v in info.items() if k != "file"}).encode(_PROBES).tolist()
    finally:
        quiet.setLevel(level)
    for prompt, e, g in zip(_PROBES, expected, got):
        if list(e) != g:
            raise CheckpointError(
                f"saved tokenizer {path.name} disagrees with the checkpoint's on {prompt!r}: {g[:12]} vs {list(e)[:12]}"
            )
