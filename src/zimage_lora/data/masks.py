"""Loss masks: a greyscale image per training image that weights the loss per latent cell.

A dataset's ``mask_path`` folder holds one mask per image, with the image's file name (any image extension). A mask
is brought to its image's size, cropped to the bucket exactly as the image is (``crop_to_bucket``), flipped with it,
then area-averaged over each 8x8 pixel block: one weight per latent cell (the VAE's grid). White (1) trains fully;
black trains at ``mask_min_value`` (AI Toolkit's default 0.1), so the background still counts a little. An image
without a mask trains fully (reported once, by name).

Masks are prepared once per (mask file's bytes, bucket, flip) and kept in memory: a changed mask file is a new key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from zimage_lora.data.cache import file_digest
from zimage_lora.data.dataset import IMAGE_EXTS, crop_to_bucket, flip_image, load_rgb

LATENT_CELL = 8  # pixels per latent cell side (the VAE's downsampling)


def find_mask(image: Path, mask_dir: Path) -> Path | None:
    """The mask of ``image`` in ``mask_dir``: the same file name, any image extension (png first)."""
    for ext in sorted(IMAGE_EXTS, key=lambda e: e != ".png"):
        for candidate in (mask_dir / (image.stem + ext), mask_dir / (image.stem + ext.upper())):
            if candidate.is_file():
                return candidate
    return None


def mask_grid(mask_file: Path, image_size: tuple[int, int], bucket: tuple[int, int], flip: str) -> torch.Tensor:
    """The mask's mean over each latent cell (H/8, W/8), in [0, 1], cropped and flipped as its image is."""
    mask = load_rgb(mask_file).convert("L")
    if mask.size != image_size:
        mask = mask.resize(image_size)
    pixels = flip_image(crop_to_bucket(mask, bucket), flip)
    values = torch.frombuffer(bytearray(pixels.tobytes()), dtype=torch.uint8).float().div(255)
    values = values.reshape(1, 1, pixels.height, pixels.width)
    return F.avg_pool2d(values, LATENT_CELL)[0, 0]


def cell_weights(grid: torch.Tensor, minimum: float) -> torch.Tensor:
    """The loss weight of each latent cell: the mask's value, at least ``minimum``."""
    return grid.clamp(min=minimum)


class MaskStore:
    """Loss weights by (image, bucket, flip), for the datasets that have masks."""

    def __init__(self, warn: Callable[[str], None] = print):
        self.warn = warn
        self.memory: dict[tuple, torch.Tensor] = {}  # (mask digest, image size, bucket, flip) -> cell means
        self._file: dict[Path, Path | None] = {}
        self._key: dict[Path, tuple[str, tuple[int, int]]] = {}  # the mask's bytes and its image's size

    def weights(self, image: Path, mask_dir: Path, bucket: tuple[int, int], flip: str, minimum: float):
        """The image's cell weights (H/8, W/8), or None when it has no mask (it trains fully)."""
        if image not in self._file:
            self._file[image] = find_mask(image, Path(mask_dir))
            if self._file[image] is None:
                self.warn(f"no mask for {image.name} in {mask_dir}; it trains without one")
            else:
                self._key[image] = (file_digest(self._file[image]), load_rgb(image).size)
        mask = self._file[image]
        if mask is None:
            return None
        digest, size = self._key[image]
        key = (digest, size, bucket, flip)
        if key not in self.memory:
            self.memory[key] = mask_grid(mask, size, bucket, flip)
        return cell_weights(self.memory[key], minimum)
