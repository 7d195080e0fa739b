"""Reading a toy-world picture back: its background, whether the captioned colour and shape are there, stripes.

Plain functions on uint8 RGB arrays, so they score rendered pictures, VAE reconstructions and generated samples
alike:

- background: the median colour of the border pixels, named by the nearest colour of the palette;
- colour: the largest connected blob of pixels near the captioned colour must cover at least ``MIN_BLOB`` pixels;
- shape: that blob's fill of its bounding box (a square fills it, a circle pi/4 of it, a triangle half) and the
  box's squareness;
- stripes (the demo's concept): inside the box of the shape, white bands alternate with the shape's colour.

The thresholds were calibrated on rendered pictures and on the toy VAE's reconstructions of them; the tests hold
them to >= 99% and >= 97% right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zimage_lora.toyworld.world import COLORS, STRIPE_COLOR, Scene

MIN_BLOB = 240  # px: a quarter of the smallest triangle at 128x128
COLOR_DISTANCE = 80.0  # RGB distance within which a pixel counts as a palette colour
FILL_SQUARE, FILL_CIRCLE = 0.9, 0.64  # fill ratio above which a blob is a square; above which (and below) a circle
MIN_SQUARENESS = 0.7  # a blob's bounding box must be this close to square (short side / long side)
STRIPE_SHARE = 0.15  # share of the shape's box that must be white ...
MIN_BANDS = 1  # ... in at least this many horizontal bands (white is in no plain picture)

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
_NAMES = list(COLORS)


@dataclass(frozen=True)
class Reading:
    background: str
    color_ok: bool
    shape: str | None  # of the largest blob of the captioned colour, None when there is none
    stripes: bool


def nearest_color(rgb) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - np.asarray(rgb, dtype=np.float32)) ** 2).sum(-1)))]


def background_color(image: np.ndarray) -> str:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    return nearest_color(np.median(border, axis=0))


def color_mask(image: np.ndarray, rgb) -> np.ndarray:
    return np.sqrt(((image.astype(np.float32) - np.asarray(rgb, dtype=np.float32)) ** 2).sum(-1)) < COLOR_DISTANCE


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of ``mask`` (all False when the mask is empty)."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:  # every pixel takes the largest label among itself and its neighbours, inside the mask
        grown = labels.copy()
        grown[1:] = np.maximum(grown[1:], labels[:-1])
        grown[:-1] = np.maximum(grown[:-1], labels[1:])
        grown[:, 1:] = np.maximum(grown[:, 1:], labels[:, :-1])
        grown[:, :-1] = np.maximum(grown[:, :-1], labels[:, 1:])
        grown = np.where(mask, grown, 0)
        if np.array_equal(grown, labels):
            break
        labels = grown
    if not labels.any():
        return np.zeros_like(mask)
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    return labels == values[np.argmax(counts)]


def blob_shape(blob: np.ndarray) -> str | None:
    if blob.sum() < MIN_BLOB:
        return None
    ys, xs = np.nonzero(blob)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    if min(height, width) / max(height, width) < MIN_SQUARENESS:
        return None
    fill = blob.sum() / (height * width)
    return "square" if fill >= FILL_SQUARE else "circle" if fill >= FILL_CIRCLE else "triangle"


def has_stripes(image: np.ndarray, color: str) -> bool:
    """White bands across the shape: the concept of the demo (``world.STRIPE_COLOR``)."""
    white = color_mask(image, STRIPE_COLOR)
    shape = largest_blob(color_mask(image, COLORS[color]) | white)
    if shape.sum() < MIN_BLOB:
        return False
    ys, xs = np.nonzero(shape)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    white_in_box = white[box] & shape[box]
    if white_in_box.sum() < STRIPE_SHARE * shape[box].sum():
        return False
    rows = white_in_box.mean(axis=1) > 0.3
    bands = int(rows[0]) + int(np.sum(rows[1:] & ~rows[:-1]))
    return bands >= MIN_BANDS


def read(image: np.ndarray, color: str) -> Reading:
    """What ``image`` shows, judged against the captioned ``color``."""
    blob = largest_blob(color_mask(image, COLORS[color]))
    ok = bool(blob.sum() >= MIN_BLOB)
    return Reading(background_color(image), ok, blob_shape(blob) if ok else None, has_stripes(image, color))


def attributes_right(image: np.ndarray, scene: Scene) -> dict[str, bool]:
    """Background, colour and shape, each right or not, and ``all`` of them."""
    reading = read(image, scene.color)
    out = {
        "background": reading.background == scene.background,
        "color": reading.color_ok,
        "shape": reading.shape == scene.shape,
    }
    out["all"] = all(out.values())
    return out


def accuracy(images, scene_list: list[Scene]) -> dict[str, float]:
    """Share of pictures with each attribute right (and all three)."""
    rights = [attributes_right(np.asarray(image), scene) for image, scene in zip(images, scene_list, strict=True)]
    return {key: sum(r[key] for r in rights) / len(rights) for key in ("background", "color", "shape", "all")}


def concept_score(images, scene_list: list[Scene]) -> float:
    """Share of pictures that show the stripes."""
    hits = [has_stripes(np.asarray(image), scene.color) for image, scene in zip(images, scene_list, strict=True)]
    return sum(hits) / len(hits)
