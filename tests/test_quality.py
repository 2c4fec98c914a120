"""The shapes analyser against dataset images, whose ground truth is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffusion_engine.train import data
from tests.quality import agreement, analyse, evaluation_pairs, parse_caption, shape_iou, shape_iou_pairs


@pytest.fixture(scope="module")
def scenes() -> list[data.Scene]:
    return data.balanced_scenes(270, seed=3)  # every (colour, shape, background) three times


def test_reads_every_dataset_image_right(scenes):
    images = np.stack([data.render(s) for s in scenes])
    rate, misses = agreement(images, [s.caption for s in scenes])
    assert rate == 1.0, misses[:5]


def test_fill_fractions_match_the_shapes(scenes):
    for scene in scenes:
        fill = analyse(data.render(scene)).fill
        assert abs(fill - data.FILL[scene.shape]) < 0.06, (scene, fill)


def test_survives_noise_and_blur(scenes):
    """Generated images are never clean: noise, soft edges, off-palette shades."""
    rng = np.random.default_rng(0)
    for scene in scenes[:90]:
        image = data.render(scene).astype(np.float32)
        blurred = (image + np.roll(image, 1, 0) + np.roll(image, 1, 1) + np.roll(image, (1, 1), (0, 1))) / 4
        noisy = np.clip(0.8 * blurred + 25 + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)
        assert analyse(noisy).agrees(scene.color, scene.shape, scene.background), scene


def _drawn(shape: str, side: int = 36, size: int = 64) -> np.ndarray:
    """A white shape on black drawn off the dataset's path: rounded square, squashed ellipse, soft triangle."""
    from PIL import Image, ImageDraw, ImageFilter

    k, x0 = 4, (size - side) // 2
    image = Image.new("RGB", (size * k, size * k), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    box = (x0 * k, x0 * k, (x0 + side) * k - 1, (x0 + side) * k - 1)
    if shape == "square":  # corners rounded at 15% of the side
        draw.rounded_rectangle(box, radius=round(0.15 * side * k), fill=(255, 255, 255))
    elif shape == "circle":  # 85% as tall as wide
        draw.ellipse((box[0], box[1] + round(0.075 * side * k), box[2], box[3] - round(0.075 * side * k)), fill=(255, 255, 255))
    else:
        draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=(255, 255, 255))
    image = image.resize((size, size), Image.Resampling.BOX).filter(ImageFilter.GaussianBlur(1.2))
    return np.asarray(image)


@pytest.mark.parametrize("shape", data.SHAPES)
def test_soft_and_rounded_shapes_keep_their_kind(shape):
    """Soft edges lower every shape's fill; corners and the overall fill together still tell them apart."""
    reading = analyse(_drawn(shape))
    assert (reading.color, reading.shape, reading.background) == ("white", shape, "black"), reading


def test_wrong_prompts_disagree(scenes):
    images = np.stack([data.render(s) for s in scenes[:30]])
    swapped = [data.caption(s.background, s.shape, s.color) for s in scenes[:30]]
    assert agreement(images, swapped)[0] == 0.0


def test_blank_image_has_no_shape():
    reading = analyse(np.zeros((64, 64, 3), np.uint8))
    assert (reading.background, reading.color, reading.shape) == ("black", None, None)
    assert not reading.agrees("red", "circle", "black")


def test_parse_caption():
    assert parse_caption("a red circle on a blue background") == ("red", "circle", "blue")
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_caption("a photo of a cat")


def test_evaluation_pairs_span_every_colour_and_shape():
    parsed = [parse_caption(p) for p, _ in evaluation_pairs(30)]
    assert {c for c, _, _ in parsed} == {b for _, _, b in parsed} == set(data.COLORS)
    assert {s for _, s, _ in parsed} == set(data.SHAPES)
    assert len({seed for _, seed in evaluation_pairs(30)}) == 30


def test_shape_iou_of_dataset_shapes(scenes):
    """Dataset circles and squares are their ideal shapes (IoU 1); a disc read as a square scores its fill, pi/4."""
    ious = {shape: [shape_iou(data.render(s), shape) for s in scenes if s.shape == shape] for shape in ("circle", "square")}
    print({shape: (min(v), float(np.mean(v))) for shape, v in ious.items()})
    assert min(ious["circle"]) == min(ious["square"]) == 1.0
    discs = [shape_iou(data.render(s), "square") for s in scenes if s.shape == "circle" and s.side >= 40]
    assert max(abs(v - data.FILL["circle"]) for v in discs) < 0.02, discs


def _superellipse(p: float, side: int = 48, size: int = 64) -> np.ndarray:
    """|x|^p + |y|^p <= 1 in a centred box, white on black, anti-aliased as the dataset is (4x, box filter)."""
    k = data.SUPERSAMPLE
    c, r = size * k / 2, side * k / 2
    yy, xx = np.mgrid[0:size * k, 0:size * k] + 0.5
    inside = np.abs((xx - c) / r) ** p + np.abs((yy - c) / r) ** p <= 1
    level = 255 * inside.reshape(size, k, size, k).mean((1, 3))
    return np.repeat(np.round(level).astype(np.uint8)[..., None], 3, axis=-1)


@pytest.mark.parametrize("p, shape", [(1.5, "circle"), (1.8, "circle"), (3.0, "circle"), (4.0, "square"), (8.0, "square")])
def test_shape_iou_of_superellipses_is_their_area_ratio(p, shape):
    """Rounded diamonds (p < 2), squircles (p > 2) against the disc and the square they share a box with: the
    IoU is the ratio of the smaller area to the larger, 4 G(1 + 1/p)^2 / G(1 + 2/p) against pi and 4."""
    area = 4 * math.gamma(1 + 1 / p) ** 2 / math.gamma(1 + 2 / p)
    expected = min(area, math.pi) / max(area, math.pi) if shape == "circle" else area / 4
    iou = shape_iou(_superellipse(p), shape)
    print(f"superellipse p={p} as a {shape}: IoU {iou:.3f}, area ratio {expected:.3f}")
    assert abs(iou - expected) < 0.015


@pytest.mark.parametrize("shape", ["circle", "square"])
def test_shape_iou_pairs_are_of_one_shape(shape):
    parsed = [parse_caption(p) for p, _ in shape_iou_pairs(shape)]
    assert len(parsed) == 18 and {s for _, s, _ in parsed} == {shape}
    assert {c for c, _, _ in parsed} == {b for _, _, b in parsed} == set(data.COLORS)
    assert len(set(parsed)) == 18 and len({seed for _, seed in shape_iou_pairs(shape)}) == 18
