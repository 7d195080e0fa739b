"""The toy world: 128x128 pictures of one shape in one colour on a plain background of another colour.

Three shapes (circle, square, triangle), six colours, 36-72 px wide at a random place; captions such as "a red
circle on a blue background". It is small enough to train a whole Z-Image family on two CPU cores, and every
attribute can be read back from a picture (``toyworld/score.py``), so what a model or a LoRA learned is a number.

The demo's concept is a texture the world's captions never name: white stripes across the shape (``STRIPES``). The
VAE sees striped shapes while it trains, so it can draw them; the base model never does, so a LoRA that makes them
has learned something new.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

SIZE = 128
MIN_SIDE, MAX_SIDE, MARGIN = 36, 72, 4
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 50, 200),
    "cyan": (40, 200, 210),
}
STRIPE_COLOR = (255, 255, 255)  # no caption names white, and no plain picture has any
STRIPE_PERIOD = 24  # px: 12 of the shape's colour, 12 of white (three latent cells per period)


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    side: int  # the shape's bounding-box side in px
    x: int  # its top-left corner
    y: int
    stripes: bool = False

    def caption(self, trigger: str | None = None) -> str:
        """``a red circle on a blue background``; with a trigger word it goes before the colour."""
        word = f"{trigger} " if trigger else ""
        return f"a {word}{self.color} {self.shape} on a {self.background} background"


def random_scene(rng: np.random.Generator, stripes: bool = False) -> Scene:
    shape = SHAPES[rng.integers(len(SHAPES))]
    names = list(COLORS)
    color = names[rng.integers(len(names))]
    background = [n for n in names if n != color][rng.integers(len(names) - 1)]
    side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    x = int(rng.integers(MARGIN, SIZE - MARGIN - side + 1))
    y = int(rng.integers(MARGIN, SIZE - MARGIN - side + 1))
    return Scene(shape, color, background, side, x, y, stripes)


@functools.cache
def _grid(size: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size * supersample, dtype=np.float32) + 0.5) / supersample
    return np.meshgrid(coords, coords, indexing="ij")


def shape_mask(scene: Scene, size: int = SIZE, supersample: int = 2) -> np.ndarray:
    """Coverage of the shape per pixel in [0, 1] (anti-aliased by supersampling)."""
    yy, xx = _grid(size, supersample)
    u = (xx - scene.x) / scene.side  # 0..1 across the bounding box
    v = (yy - scene.y) / scene.side
    inside_box = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if scene.shape == "square":
        inside = inside_box
    elif scene.shape == "circle":
        inside = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif scene.shape == "triangle":  # pointing up, base along the bottom of the box
        inside = inside_box & (np.abs(u - 0.5) <= v / 2)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3), dtype=np.float32)


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene as a uint8 RGB array (size, size, 3)."""
    coverage = shape_mask(scene, size)[..., None]
    fill = np.empty((size, size, 3), dtype=np.float32)
    fill[:] = COLORS[scene.color]
    if scene.stripes:
        rows = np.arange(size)[:, None]
        white = ((rows - scene.y) // (STRIPE_PERIOD // 2)) % 2 == 1
        fill[white[:, 0]] = STRIPE_COLOR
    background = np.array(COLORS[scene.background], dtype=np.float32)
    image = background * (1 - coverage) + fill * coverage
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def scenes(count: int, seed: int, stripes: float = 0.0) -> list[Scene]:
    """``count`` random scenes; a share ``stripes`` of them striped."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng, stripes=bool(rng.random() < stripes)) for _ in range(count)]


def images(scene_list: list[Scene]) -> np.ndarray:
    """(N, 128, 128, 3) uint8."""
    return np.stack([render(s) for s in scene_list])


_CAPTION = re.compile(
    rf"^a (?:(?P<word>\S+) )?(?P<color>{'|'.join(COLORS)}) (?P<shape>{'|'.join(SHAPES)}) on a "
    rf"(?P<background>{'|'.join(COLORS)}) background$"
)


def parse_caption(text: str, trigger: str | None = None) -> Scene | None:
    """The scene a caption (or prompt) asks for, as ``Scene.caption`` writes it (geometry unknown: zero); None when
    the text is not a toy-world caption. A word before the colour must be ``trigger``; it asks for stripes."""
    match = _CAPTION.match(" ".join(text.strip().lower().split()))
    if match is None or (match["word"] is not None and match["word"] != (trigger or "").lower()):
        return None
    return Scene(match["shape"], match["color"], match["background"], 0, 0, 0, stripes=match["word"] is not None)
