"""Procedurally generated captioned shapes: one flat shape on a plain background, made from a seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# The corners of the RGB cube: as far apart as six colours can be, so a palette lookup is unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
# Filled fraction of the shape's bounding box: pi/4, 1, 1/2 (an upright isosceles triangle).
FILL = {"circle": float(np.pi / 4), "square": 1.0, "triangle": 0.5}
SIZE = 64  # trained resolution
# Bounding-box side as a fraction of the image side, and the margin kept free at the border.
MIN_SIDE, MAX_SIDE, MARGIN = 0.4, 0.75, 2
SUPERSAMPLE = 4  # drawn 4x larger and box-filtered down: anti-aliased edges


@dataclass(frozen=True)
class Scene:
    """What one image shows: shape colour, shape, background colour, bounding box (x0, y0, side)."""

    color: str
    shape: str
    background: str
    x0: int
    y0: int
    side: int

    @property
    def caption(self) -> str:
        return caption(self.color, self.shape, self.background)


def caption(color: str, shape: str, background: str) -> str:
    """The one caption form the model is trained on."""
    return f"a {color} {shape} on a {background} background"


def all_captions() -> list[str]:
    """Every caption of the dataset (6 colours x 5 other colours x 3 shapes = 90)."""
    return [caption(c, s, b) for c in COLORS for b in COLORS if b != c for s in SHAPES]


def random_scene(rng: np.random.Generator, size: int = SIZE, color: str | None = None,
                 shape: str | None = None, background: str | None = None) -> Scene:
    """Draw a scene: uniform colours (shape != background), shape, size and position."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    color = color or COLORS[rng.integers(len(COLORS))]
    if background is None:
        others = [c for c in COLORS if c != color]
        background = others[rng.integers(len(others))]
    if background == color:
        raise ValueError(f"shape and background colour are both {color}")
    side = int(rng.integers(round(MIN_SIDE * size), round(MAX_SIDE * size) + 1))
    x0, y0 = (int(v) for v in rng.integers(MARGIN, size - MARGIN - side + 1, size=2))
    return Scene(color, shape, background, x0, y0, side)


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene as uint8 HWC RGB, anti-aliased by supersampling."""
    return render_box(scene.shape, (scene.x0, scene.y0, scene.side, scene.side), scene.color, scene.background, size)


def render_box(shape: str, box: tuple[int, int, int, int], color: str, background: str, size: int = SIZE) -> np.ndarray:
    """One shape filling the pixel box (x0, y0, width, height) as uint8 HWC RGB, anti-aliased by supersampling."""
    k = SUPERSAMPLE
    image = Image.new("RGB", (size * k, size * k), PALETTE[background])
    draw = ImageDraw.Draw(image)
    x, y, w, h = box
    x0, y0, x1, y1 = x * k, y * k, (x + w) * k - 1, (y + h) * k - 1
    fill = PALETTE[color]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


def batch(rng: np.random.Generator, n: int, size: int = SIZE) -> tuple[np.ndarray, list[Scene]]:
    """n random scenes and their images (uint8 NHWC)."""
    scenes = [random_scene(rng, size) for _ in range(n)]
    return np.stack([render(s, size) for s in scenes]), scenes


def balanced_scenes(n: int, seed: int, size: int = SIZE) -> list[Scene]:
    """n scenes cycling through every (colour, background, shape) with random geometry: for evaluation."""
    rng = np.random.default_rng(seed)
    combos = [(c, s, b) for c in COLORS for b in COLORS if b != c for s in SHAPES]
    order = rng.permutation(len(combos))
    return [random_scene(rng, size, *combos[order[i % len(combos)]]) for i in range(n)]
