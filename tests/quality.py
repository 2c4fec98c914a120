"""Read back what a generated shapes image shows: background colour, shape colour and shape.

Every pixel is snapped to the nearest of the dataset's six palette colours; the background is the
commonest colour on the border; the shape is the largest connected blob of any other colour. Its
kind is the nearest ideal shape (as the dataset renders it) in a small feature space read off the
blob's bounding box: the filled fraction of the whole box (circle pi/4, square 1, triangle 1/2) and
of each of its four corner patches (a circle leaves all four nearly empty, a square fills them, an
upright triangle fills only the bottom two). The corners matter because soft edges, as generated
images have, lower the fill of every shape alike, while a corner stays full or empty.

How well a shape is drawn (`shape_iou`): the blob's IoU with the ideal shape of its own bounding
box, drawn as the dataset draws it in the blob's colour on the background's, then read back by the
same rule as the blob (palette-snapped, not background). Both masks are cut at the same level of
anti-aliasing, edge pixels whose blend snaps to a third colour included, so a dataset image scores
1 exactly; only the outline is judged, never the size or position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from diffusion_engine.train.data import COLORS, PALETTE, SHAPES, SIZE, Scene, all_captions, render, render_box

_PALETTE = np.array([PALETTE[c] for c in COLORS], np.float32)
CORNER = 0.2  # side of a corner patch, as a fraction of the bounding box's side
_CAPTION = re.compile(rf"^a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) on a ({'|'.join(COLORS)}) background$")
MIN_PIXELS = 12  # a blob smaller than this is noise, not a shape


@dataclass(frozen=True)
class Reading:
    """What the analyser sees; color/shape are None when no shape stands out from the background."""

    background: str
    color: str | None
    shape: str | None
    fill: float | None = None

    def agrees(self, color: str, shape: str, background: str) -> bool:
        return (self.color, self.shape, self.background) == (color, shape, background)


def parse_caption(text: str) -> tuple[str, str, str]:
    """(colour, shape, background) from 'a {colour} {shape} on a {colour} background'."""
    m = _CAPTION.match(text.strip())
    if not m:
        raise ValueError(f"not a shapes caption: {text!r}")
    return m.group(1), m.group(2), m.group(3)


def palette_labels(image: np.ndarray) -> np.ndarray:
    """Per pixel, the index (into COLORS) of the nearest palette colour in RGB."""
    pixels = np.asarray(image, np.float32)[..., :3]
    return np.argmin(((pixels[..., None, :] - _PALETTE) ** 2).sum(-1), axis=-1)


def shape_features(blob: np.ndarray) -> np.ndarray:
    """[fill of the bounding box, fill of its top-left, top-right, bottom-left, bottom-right corner patch]."""
    ys, xs = np.nonzero(blob)
    box = blob[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    kh, kw = max(1, round(CORNER * box.shape[0])), max(1, round(CORNER * box.shape[1]))
    corners = [box[:kh, :kw], box[:kh, -kw:], box[-kh:, :kw], box[-kh:, -kw:]]
    return np.array([box.mean()] + [c.mean() for c in corners])


def _ideal_features() -> dict[str, np.ndarray]:
    """Each shape's features as the dataset draws it (centred, 60% of the image side, after palette snapping)."""
    side = round(0.6 * SIZE)
    out = {}
    for shape in SHAPES:
        labels = palette_labels(render(Scene("white", shape, "black", (SIZE - side) // 2, (SIZE - side) // 2, side)))
        out[shape] = shape_features(labels == COLORS.index("white"))
    return out


_IDEAL = _ideal_features()


def classify_shape(blob: np.ndarray) -> str:
    """The shape whose ideal features are nearest (Euclidean) to the blob's."""
    f = shape_features(blob)
    return min(SHAPES, key=lambda s: float(np.sum((f - _IDEAL[s]) ** 2)))


def largest_blob(labels: np.ndarray) -> tuple[int, np.ndarray | None]:
    """The background (commonest palette label on the 2-pixel border) and the largest 8-connected blob of
    any other label, or None where no blob reaches MIN_PIXELS."""
    border = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    background = int(np.bincount(border, minlength=len(COLORS)).argmax())
    blobs, count = ndimage.label(labels != background, structure=np.ones((3, 3)))
    if count == 0:
        return background, None
    sizes = np.bincount(blobs.ravel())[1:]
    if sizes.max() < MIN_PIXELS:
        return background, None
    return background, blobs == int(sizes.argmax()) + 1


def analyse(image: np.ndarray) -> Reading:
    """Background colour, shape colour, shape kind and bounding-box fill of one HWC uint8 image."""
    labels = palette_labels(image)
    background, blob = largest_blob(labels)
    if blob is None:
        return Reading(COLORS[background], None, None)
    color = int(np.bincount(labels[blob], minlength=len(COLORS)).argmax())
    return Reading(COLORS[background], COLORS[color], classify_shape(blob), float(shape_features(blob)[0]))


def ideal_mask(shape: str, box: tuple[int, int, int, int], color: str, background: str,
               size: tuple[int, int]) -> np.ndarray:
    """The ideal shape filling box (x0, y0, width, height) (a circle: the inscribed ellipse; a square: the box),
    in the given colours, drawn as the dataset draws it (data.render_box) and read as a blob is: not background."""
    drawn = render_box(shape, box, color, background, size=max(size))[:size[0], :size[1]]
    return palette_labels(drawn) != COLORS.index(background)


def shape_iou(image: np.ndarray, shape: str) -> float:
    """Intersection over union of the image's shape (the analyser's largest blob) with the ideal `shape` of the
    blob's own bounding box, in the image's colours: how round a circle is, how square a square; 0 where no
    shape stands out."""
    labels = palette_labels(image)
    background, blob = largest_blob(labels)
    if blob is None:
        return 0.0
    ys, xs = np.nonzero(blob)
    box = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
    color = int(np.bincount(labels[blob], minlength=len(COLORS)).argmax())
    ideal = ideal_mask(shape, box, COLORS[color], COLORS[background], blob.shape)
    return float((blob & ideal).sum() / (blob | ideal).sum())


def agreement(images: np.ndarray, prompts: list[str]) -> tuple[float, list[tuple[str, Reading]]]:
    """Fraction of images whose reading matches their prompt on all three attributes, and the misses."""
    misses = []
    for image, prompt in zip(images, prompts):
        reading = analyse(image)
        if not reading.agrees(*parse_caption(prompt)):
            misses.append((prompt, reading))
    return 1 - len(misses) / len(prompts), misses


# --- generating with an engine and reading the images back --------------------------------------

def evaluation_pairs(n: int, seed: int = 0, shape: str | None = None) -> list[tuple[str, int]]:
    """n (prompt, seed) pairs that cycle through every (colour, shape, background), or every (colour,
    background) of one shape, in a shuffled order."""
    captions = [c for c in all_captions() if shape is None or parse_caption(c)[1] == shape]
    order = np.random.default_rng(seed).permutation(len(captions))
    return [(captions[order[i % len(captions)]], 1000 + i) for i in range(n)]


IOU_PAIRS = 18  # prompt/seed pairs per shape for the shape IoU figures (issue 16)
MIN_SHAPE_IOU = 0.93  # the demo model's target: mean IoU of its circles, and of its squares, over those pairs


def shape_iou_pairs(shape: str, n: int = IOU_PAIRS) -> list[tuple[str, int]]:
    """The (prompt, seed) pairs the shape IoU of a model is measured on: n prompts of one shape."""
    return evaluation_pairs(n, seed=1, shape=shape)


def engine_shape_iou(pipe, pairs: list[tuple[str, int]], **generate) -> list[float]:
    """Generate one image per (prompt, seed) with the engine; each one's shape IoU with the shape its prompt names."""
    return [shape_iou(pipe.generate(prompt, seed=seed, **generate).array[0], parse_caption(prompt)[1])
            for prompt, seed in pairs]


def summary(values: list[float]) -> str:
    """'min / median / mean' of a list of figures."""
    return f"min {min(values):.3f}, median {float(np.median(values)):.3f}, mean {float(np.mean(values)):.3f}"


def use_fp16_graphs(pipe) -> None:
    """Swap a CPU Pipeline's text encoder, UNet and VAE decoder sessions for their fp16 graphs (still ORT CPU)."""
    from diffusion_engine.engine.specs import COMPONENTS
    from diffusion_engine.runtime.session import OrtCpuSession

    for name in COMPONENTS:
        entry = pipe.manifest.components[name]
        fp16 = OrtCpuSession(pipe.engine_dir / entry.files["fp16"], entry.spec(name), entry.ranges())
        pipe.sessions[name], old = fp16, pipe.sessions[name]
        old.close()


def engine_agreement(pipe, pairs: list[tuple[str, int]], **generate) -> tuple[float, list[tuple[str, Reading]], np.ndarray]:
    """Generate one image per (prompt, seed) with the engine; agreement rate, misses and the images."""
    images = np.concatenate([pipe.generate(prompt, seed=seed, **generate).array for prompt, seed in pairs])
    rate, misses = agreement(images, [p for p, _ in pairs])
    return rate, misses, images
