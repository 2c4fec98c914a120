"""Prompt tokenization from the engine directory's tokenizer.json, as diffusers' pipelines do it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tokenizers import Tokenizer

from diffusion_engine.engine.manifest import damaged_file

logger = logging.getLogger(__name__)


class PromptTokenizer:
    """CLIP tokenization: truncate to max_length (with a warning), pad with the pad id."""

    def __init__(self, path: str | Path, max_length: int, pad_token_id: int, **_: Any):
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable JSON
            raise damaged_file(path, exc) from exc
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_length = max_length
        self.pad_token_id = pad_token_id

    @classmethod
    def from_manifest(cls, engine_dir: str | Path, info: dict[str, Any]) -> "PromptTokenizer":
        return cls(Path(engine_dir) / info["file"], **{k: v for k, v in info.items() if k != "file"})

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """int32 [len(prompts), max_length] token ids."""
        out = np.full((len(prompts), self.max_length), self.pad_token_id, dtype=np.int32)
        for i, enc in enumerate(self.tokenizer.encode_batch(list(prompts))):
            ids = enc.ids
            if len(ids) > self.max_length:
                # Keep the end-of-text token, as the CLIP tokenizer's truncation does.
                logger.warning("the prompt is longer than the %d tokens the text encoder reads; dropped: %r",
                               self.max_length, self.text(ids[self.max_length - 1 : -1]))
                ids = ids[: self.max_length - 1] + ids[-1:]
            out[i, : len(ids)] = ids
        return out

    def text(self, ids: Sequence[int]) -> str:
        """The words of token ids: CLIP's BPE marks word ends with </w>, which decoding leaves in."""
        pieces = self.tokenizer.decode(list(ids), skip_special_tokens=True).replace("</w>", " ")
        return " ".join(pieces.split())
