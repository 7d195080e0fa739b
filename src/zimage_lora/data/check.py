"""``zimage-lora dataset check``: what a dataset folder holds and what will go wrong with it, before training.

Every problem names its file. The report ends with the guide's advice on dataset size. Only a folder with no
trainable image is a failure (exit code 2): everything else is a warning that training would also print.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from zimage_lora.data.dataset import (
    MAX_UPSCALE,
    list_images,
    load_rgb,
    nearest_bucket,
    read_caption_text,
    upscale_needed,
)
from zimage_lora.errors import UserError

NEAR_DUPLICATE_BITS = 6  # of 64: difference hashes this close are the same picture, resized or re-encoded


@dataclass
class DatasetReport:
    folder: Path
    images: list[Path] = field(default_factory=list)
    sizes: dict[Path, tuple[int, int]] = field(default_factory=dict)
    formats: Counter = field(default_factory=Counter)
    unreadable: dict[Path, str] = field(default_factory=dict)
    missing_captions: list[Path] = field(default_factory=list)
    empty_captions: list[Path] = field(default_factory=list)
    not_utf8: list[Path] = field(default_factory=list)
    without_trigger: list[Path] = field(default_factory=list)
    near_duplicates: list[tuple[Path, Path, int]] = field(default_factory=list)
    buckets: dict[int, Counter] = field(default_factory=dict)
    too_small: dict[int, list[Path]] = field(default_factory=dict)

    @property
    def trainable(self) -> int:
        return sum(1 for p in self.sizes if any(p not in small for small in self.too_small.values()))


def check_dataset(
    folder: Path,
    resolutions: list[int],
    trigger_word: str | None = None,
    caption_ext: str = "txt",
    recursive: bool = False,
) -> DatasetReport:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"dataset folder not found: {folder}")
    report = DatasetReport(folder)
    report.images = list_images(folder, recursive)
    hashes: dict[Path, int] = {}
    for path in report.images:
        try:
            image = load_rgb(path)
            with Image.open(path) as raw:
                report.formats[f"{raw.format} {raw.mode}"] += 1
        except UserError as e:
            report.unreadable[path] = str(e)
            continue
        report.sizes[path] = image.size
        hashes[path] = difference_hash(image)
        _check_caption(path, caption_ext, trigger_word, report)
    for res in resolutions:
        report.buckets[res] = Counter()
        report.too_small[res] = []
        for path, (w, h) in report.sizes.items():
            if upscale_needed(w, h, res) > MAX_UPSCALE:
                report.too_small[res].append(path)
            else:
                report.buckets[res][nearest_bucket(w, h, res)] += 1
    paths = sorted(hashes)
    for i, a in enumerate(paths):
        for b in paths[i + 1 :]:
            distance = (hashes[a] ^ hashes[b]).bit_count()
            if distance <= NEAR_DUPLICATE_BITS:
                report.near_duplicates.append((a, b, distance))
    return report


def _check_caption(path: Path, caption_ext: str, trigger_word: str | None, report: DatasetReport) -> None:
    sidecar = path.with_suffix("." + caption_ext)
    if not sidecar.is_file():
        report.missing_captions.append(path)
        return
    problems: list[str] = []
    text = read_caption_text(sidecar, problems.append)
    if problems:
        report.not_utf8.append(sidecar)
    if not text:
        report.empty_captions.append(sidecar)
    elif "[trigger]" not in text and not (trigger_word and trigger_word.lower() in text.lower()):
        report.without_trigger.append(sidecar)


def difference_hash(image: Image.Image) -> int:
    """64-bit perceptual hash: is each pixel of a 9x8 grey thumbnail brighter than its right neighbour?"""
    small = image.convert("L").resize((9, 8), Image.Resampling.LANCZOS)
    px = list(small.getdata())
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = (bits << 1) | int(px[row * 9 + col] > px[row * 9 + col + 1])
    return bits


def format_report(r: DatasetReport, trigger_word: str | None = None) -> str:
    name = lambda p: str(p.relative_to(r.folder))  # noqa: E731
    lines = [f"dataset {r.folder}: {len(r.images)} image files, {len(r.sizes)} readable"]
    if r.formats:
        lines.append("formats: " + ", ".join(f"{k} x{v}" for k, v in sorted(r.formats.items())))
    if r.sizes:
        by_area = sorted(r.sizes.items(), key=lambda kv: kv[1][0] * kv[1][1])
        widths, heights = [s[0] for s in r.sizes.values()], [s[1] for s in r.sizes.values()]
        lines.append(f"sizes: width {min(widths)}-{max(widths)}, height {min(heights)}-{max(heights)}")
        lines.append("smallest: " + ", ".join(f"{name(p)} ({w}x{h})" for p, (w, h) in by_area[:3]))
    for path, why in r.unreadable.items():
        lines.append(f"unreadable: {name(path)}: {why} (training skips it)")
    lines += [f"missing caption: {name(p)} (the default caption is used)" for p in r.missing_captions]
    lines += [f"empty caption: {name(p)} (the default caption is used)" for p in r.empty_captions]
    lines += [f"caption not UTF-8: {name(p)} (read as Latin-1; save it as UTF-8)" for p in r.not_utf8]
    what = f"'{trigger_word}' or [trigger]" if trigger_word else "[trigger]"
    lines += [f"caption without the trigger ({what}): {name(p)}" for p in r.without_trigger]
    lines += [f"near-duplicates: {name(a)} and {name(b)} (hash distance {d} of 64)" for a, b, d in r.near_duplicates]
    for res, counts in r.buckets.items():
        spread = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items()))
        lines.append(f"resolution {res}: {sum(counts.values())} images in buckets {spread or '(none)'}")
        lines += [
            f"too small for {res}: {name(p)} {r.sizes[p][0]}x{r.sizes[p][1]} (skipped at {res})"
            for p in r.too_small[res]
        ]
    lines.append(advice(r.trainable))
    if not r.trainable:
        lines.append("cannot train: no readable image fills any of the resolutions")
    return "\n".join(lines)


def advice(count: int) -> str:
    if count == 0:
        return "advice: add images; a character LoRA wants 10-30, a style 15-40"
    if count < 10:
        return f"advice: {count} images is few; a character LoRA wants 10-30 varied images, a style 15-40"
    if count <= 40:
        return f"advice: {count} images is in the usual range (10-30 for a character, 15-40 for a style)"
    if count <= 50:
        return f"advice: {count} images is on the large side; returns diminish past about 50"
    return f"advice: {count} images: returns diminish past about 50; curate the best, or raise the steps"
