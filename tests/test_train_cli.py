"""The training script's flags: every Recipe field, tuples included, is a flag (no training runs here)."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("torch")

from diffusion_engine.train.model import Recipe  # noqa: E402
from diffusion_engine.train.train import parse_args  # noqa: E402


def test_tuple_fields_take_several_values():
    args = parse_args(["--out", "/tmp/x", "--unet-channels", "48", "64", "64", "--unet-steps", "10"])
    assert args.unet_channels == [48, 64, 64] and args.unet_steps == 10


def test_every_recipe_field_of_a_flag_type_is_a_flag_with_the_recipe_default():
    args = parse_args(["--out", "/tmp/x"])
    for f in dataclasses.fields(Recipe):
        if f.type in ("int", "float", "tuple[int, ...]", "tuple[str, ...]"):
            value = getattr(args, f.name)
            assert (tuple(value) if isinstance(value, list) else value) == f.default, f.name
