"""Images and captions from dataset folders, aspect buckets and the order of batches.

A dataset folder holds images (png, jpg/jpeg, webp, bmp, in any case) with optional sidecar captions
(``image.txt``). Each image trains at every listed resolution it can fill, cropped to the aspect bucket nearest to
its own shape. Problems that need not stop training (a corrupt image, a caption that is not UTF-8, an image too
small for a resolution) are reported through ``warn`` by file name; a dataset left with nothing to train on is an
error.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from zimage_lora.errors import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_ASPECT = 4.0
MAX_UPSCALE = 1.05  # a resolution that needs more than 5% upscaling is dropped for that image

Warn = Callable[[str], None]


def _ignore(message: str) -> None:
    pass


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


def list_images(folder: Path, recursive: bool = False, skip: Path | None = None) -> list[Path]:
    """Image files of a folder (and its sub-folders when ``recursive``), sorted; ``skip`` is left out (the cache)."""
    folder = Path(folder)
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    skip = Path(skip).resolve() if skip is not None else None
    found = []
    for p in candidates:
        if p.suffix.lower() not in IMAGE_EXTS or not p.is_file():
            continue
        if any(part.startswith(".") for part in p.relative_to(folder).parts[:-1]):
            continue  # hidden folders, our own .zimage_cache among them
        if skip is not None and skip in p.resolve().parents:
            continue
        found.append(p)
    return sorted(found)


def read_caption_text(sidecar: Path, warn: Warn = _ignore) -> str:
    """A caption file's text, whitespace collapsed. Not UTF-8: reported by name, read as Latin-1."""
    raw = sidecar.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
        warn(f"caption {sidecar} is not valid UTF-8; read it as Latin-1 (save it as UTF-8 to be sure)")
    return " ".join(text.split())


def read_caption(
    image: Path, caption_ext: str, default_caption: str, trigger_word: str | None, warn: Warn = _ignore
) -> str:
    """The sidecar caption (or the default when it is missing or empty), ``[trigger]`` replaced."""
    sidecar = image.with_suffix("." + caption_ext.lstrip("."))
    caption = read_caption_text(sidecar, warn) if sidecar.is_file() else ""
    source = sidecar if caption else image
    if not caption:
        caption = default_caption
    if "[trigger]" in caption:
        if not trigger_word:
            raise UserError(f"{source.name} uses [trigger] but job.trigger_word is not set; set job.trigger_word")
        caption = caption.replace("[trigger]", trigger_word)
    return caption


def discover(datasets, trigger_word: str | None, warn: Warn = _ignore) -> list[ImageItem]:
    """Every image of every dataset with its caption, ``repeats`` times."""
    items: list[ImageItem] = []
    for index, ds in enumerate(datasets):
        folder = Path(ds.path)
        if not folder.is_dir():
            raise UserError(f"datasets[{index}].path: folder not found: {folder}")
        images = list_images(folder, getattr(ds, "recursive", False), getattr(ds, "cache_dir", None))
        if not images:
            raise UserError(f"datasets[{index}].path: no images (png, jpg, webp, bmp) in {folder}")
        for image in images:
            caption = read_caption(image, ds.caption_ext, ds.default_caption, trigger_word, warn)
            if getattr(ds, "is_reg", False) and trigger_word:
                caption = without_word(caption, trigger_word)
            elif getattr(ds, "add_trigger", False) and trigger_word and not has_word(caption, trigger_word):
                caption = f"{trigger_word}, {caption}" if caption else trigger_word
            items.extend(ImageItem(image, caption, index) for _ in range(ds.repeats))
    return items


def _word(word: str) -> str:
    return rf"(?<![\w]){re.escape(word)}(?![\w])"


def has_word(caption: str, word: str) -> bool:
    """Whether ``word`` stands in the caption as a whole word."""
    return re.search(_word(word), caption) is not None


def without_word(caption: str, word: str) -> str:
    """The caption with every whole occurrence of ``word`` removed (a regularisation image never carries the
    trigger), the commas and spaces left around it tidied."""
    text = re.sub(_word(word), "", caption)
    tags = [" ".join(t.split()) for t in text.split(",")]
    return ", ".join(t for t in tags if t)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF rotation; the whole image is decoded, so a truncated file fails here."""
    return load_rgb(path).size


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


def build_samples(items: list[ImageItem], resolutions_of: list[list[int]], warn: Warn = _ignore) -> list[Sample]:
    """Each readable image at each resolution of its dataset that it can fill, in its nearest bucket.

    A corrupt image is skipped with a warning naming it; a resolution needing more than 5% upscaling is dropped for
    that image (warned); a dataset with no trainable image left is an error.
    """
    sizes: dict[Path, tuple[int, int] | None] = {}
    samples = []
    for i, item in enumerate(items):
        if item.path not in sizes:
            try:
                sizes[item.path] = image_size(item.path)
            except UserError as e:
                sizes[item.path] = None
                warn(f"skipped: {e}")
                continue
            w, h = sizes[item.path]
            too_big = [r for r in resolutions_of[item.dataset] if upscale_needed(w, h, r) > MAX_UPSCALE]
            if too_big:
                kept = [r for r in resolutions_of[item.dataset] if r not in too_big]
                what = f"trains at {', '.join(map(str, kept))} only" if kept else "is skipped"
                warn(
                    f"{item.path.name} ({w}x{h}) is too small for resolution {', '.join(map(str, too_big))} "
                    f"(more than 5% upscaling); it {what}"
                )
        size = sizes[item.path]
        if size is None:
            continue
        for res in resolutions_of[item.dataset]:
            if upscale_needed(*size, res) <= MAX_UPSCALE:
                samples.append(Sample(i, res, nearest_bucket(*size, res)))
    for index in sorted({it.dataset for it in items}):
        if not any(items[s.item].dataset == index for s in samples):
            raise UserError(
                f"datasets[{index}]: no image can train (all unreadable or smaller than every resolution); "
                "add larger images or lower datasets[{index}].resolutions".replace("{index}", str(index))
            )
    return samples


def upscale_needed(width: int, height: int, resolution: int) -> float:
    """How much an image must be enlarged to cover its bucket at ``resolution`` (1.0 = no enlargement)."""
    bw, bh = nearest_bucket(width, height, resolution)
    return max(bw / width, bh / height)


def edit_tags(caption: str, keep: int, shuffle: bool, dropout: float, generator) -> str:
    """The caption's comma-separated tags: the first ``keep`` as they are, the others each left out with chance
    ``dropout`` and, with ``shuffle``, in a random order (from ``generator``)."""
    import torch

    tags = [t.strip() for t in caption.split(",") if t.strip()]
    kept, rest = tags[:keep], tags[keep:]
    if shuffle:
        rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
    if dropout > 0:
        drawn = torch.rand(len(rest), generator=generator).tolist()
        rest = [t for t, r in zip(rest, drawn, strict=True) if r >= dropout]
    return ", ".join(kept + rest)


def flip_image(image: Image.Image, flip: str) -> Image.Image:
    """``flip``: "" (as is), "x" (mirrored left-right), "y" (upside down) or "xy"."""
    if "x" in flip:
        image = ImageOps.mirror(image)
    if "y" in flip:
        image = ImageOps.flip(image)
    return image


def epoch_batches(
    samples: list[Sample], batch_size: int, seed: int, epoch: int, groups: list | None = None
) -> list[list[int]]:
    """Batches of sample indices for one epoch: one bucket per batch, order reproducible from (seed, epoch).

    One shuffle of all samples per epoch; each sample joins the open batch of its bucket, and a batch is emitted
    when it fills (the unfilled rest at the end). So the sample order does not depend on the batch size: within a
    bucket, batch size 2 sees the same samples as batch size 1 with two accumulation steps. ``groups`` (one key per
    sample, e.g. (bucket, LoRA weight)) replaces the bucket as what a batch shares.
    """
    order = list(range(len(samples)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    open_batches: dict[tuple[int, int], list[int]] = {}
    batches = []
    for index in order:
        key = samples[index].bucket if groups is None else groups[index]
        batch = open_batches.setdefault(key, [])
        batch.append(index)
        if len(batch) == batch_size:
            batches.append(batch)
            del open_batches[key]
    batches.extend(open_batches.values())
    return batches
