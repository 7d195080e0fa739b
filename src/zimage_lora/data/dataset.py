"""Images and captions from dataset folders, aspect buckets and the order of batches.

A dataset folder holds images (png, jpg/jpeg, webp, bmp) with optional sidecar captions (``image.txt``).
Each image trains at every listed resolution, cropped to the aspect bucket nearest to its own shape.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from zimage_lora.errors import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_ASPECT = 4.0


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str
    dataset: int  # index in the job's ``datasets`` list


@dataclass(frozen=True)
class Sample:
    """One training example: an image at one resolution, cropped to one bucket (width, height)."""

    item: int
    resolution: int
    bucket: tuple[int, int]


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def read_caption(image: Path, caption_ext: str, default_caption: str, trigger_word: str | None) -> str:
    """The sidecar caption (or the default), with ``[trigger]`` replaced by the trigger word."""
    sidecar = image.with_suffix("." + caption_ext.lstrip("."))
    caption = ""
    if sidecar.is_file():
        raw = sidecar.read_bytes()
        try:
            caption = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            caption = raw.decode("latin-1")
        caption = " ".join(caption.split())
    if not caption:
        caption = default_caption
    if "[trigger]" in caption:
        if not trigger_word:
            raise UserError(
                f"{sidecar.name if sidecar.is_file() else image.name} uses [trigger] but job.trigger_word "
                "is not set; set job.trigger_word"
            )
        caption = caption.replace("[trigger]", trigger_word)
    return caption


def discover(datasets, trigger_word: str | None) -> list[ImageItem]:
    """Every image of every dataset with its caption, ``repeats`` times."""
    items: list[ImageItem] = []
    for index, ds in enumerate(datasets):
        images = list_images(Path(ds.path))
        if not images:
            raise UserError(f"datasets[{index}].path: no images (png, jpg, webp, bmp) in {ds.path}")
        for image in images:
            caption = read_caption(image, ds.caption_ext, ds.default_caption, trigger_word)
            items.extend(ImageItem(image, caption, index) for _ in range(ds.repeats))
    return items


def load_rgb(path: Path) -> Image.Image:
    """An 8-bit RGB image: EXIF rotation applied, transparency composited on white."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = im.point(lambda v: v / 256).convert("L")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"cannot read image {path} ({e}); fix or remove the file") from None


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """(width, height) pairs of about ``resolution**2`` pixels, sides multiples of 16, aspect 1:4 .. 4:1."""
    area = resolution * resolution
    sizes = set()
    for long_side in range(resolution, 4 * resolution + 1, 16):
        short = max(16, round(area / long_side / 16) * 16)
        if short <= long_side and long_side / short <= MAX_ASPECT:
            sizes.update({(long_side, short), (short, long_side)})  # a portrait image gets the mirrored bucket
    return sorted(sizes)


def nearest_bucket(width: int, height: int, resolution: int) -> tuple[int, int]:
    aspect = math.log(width / height)
    return min(bucket_sizes(resolution), key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), b))


def crop_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize to cover the bucket (Lanczos), then centre-crop to it."""
    bw, bh = bucket
    scale = max(bw / image.width, bh / image.height)
    w, h = max(bw, round(image.width * scale)), max(bh, round(image.height * scale))
    resized = image.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - bw) // 2, (h - bh) // 2
    return resized.crop((left, top, left + bw, top + bh))


def build_samples(items: list[ImageItem], resolutions_of: list[list[int]]) -> list[Sample]:
    """Each image at each resolution of its dataset, in its nearest bucket."""
    sizes: dict[Path, tuple[int, int]] = {}
    samples = []
    for i, item in enumerate(items):
        if item.path not in sizes:
            with Image.open(item.path) as im:
                sizes[item.path] = ImageOps.exif_transpose(im).size
        w, h = sizes[item.path]
        for res in resolutions_of[item.dataset]:
            samples.append(Sample(i, res, nearest_bucket(w, h, res)))
    return samples


def epoch_batches(samples: list[Sample], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of sample indices for one epoch: one bucket per batch, order reproducible from (seed, epoch).

    One shuffle of all samples per epoch; each sample joins the open batch of its bucket, and a batch is emitted
    when it fills (the unfilled rest at the end). So the sample order does not depend on the batch size: within a
    bucket, batch size 2 sees the same samples as batch size 1 with two accumulation steps.
    """
    order = list(range(len(samples)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    open_batches: dict[tuple[int, int], list[int]] = {}
    batches = []
    for index in order:
        batch = open_batches.setdefault(samples[index].bucket, [])
        batch.append(index)
        if len(batch) == batch_size:
            batches.append(batch)
            del open_batches[samples[index].bucket]
    batches.extend(open_batches.values())
    return batches
