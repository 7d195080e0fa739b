"""``zimage-lora dataset check``: what a dataset folder holds and what will go wrong with it, before training.

Every problem names its file and comes as data (``DatasetReport.problems``: kind, file, message, fatal), which the
printed report shows line by line and the web UI by kind (``DatasetReport.groups``). Captions are checked for the
trigger only when a trigger word is given. The report ends with the guide's advice on dataset size (and, for a small
set, on steps and learning rate). Only a folder with no trainable image is a failure (exit code 2): everything else
is a warning that training would also print. ``untrainable`` is the same trainability rule for a job's datasets,
run when a job is validated (image sizes from the file headers, remembered per file).
"""

from __future__ import annotations

import shlex
from collections import Counter
from dataclasses import asdict, dataclass, field
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


@dataclass(frozen=True)
class Problem:
    """One thing ``dataset check`` reports; ``fatal`` only when nothing can train."""

    kind: str  # unreadable, missing_caption, empty_caption, not_utf8, without_trigger, near_duplicate, too_small,
    # cannot_train
    message: str  # one line, as the report prints it
    file: str | None = None  # relative to the dataset folder
    resolution: int | None = None  # for too_small
    fatal: bool = False
    other: str | None = None  # for near_duplicate: the second file of the pair

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ProblemGroup:
    """The problems of one kind, each file once: what the web UI lists (a heading, a count, the files)."""

    key: str  # unique in a report: the kind, or for too_small the resolutions too ("too_small-768-1024")
    kind: str
    title: str  # "Too small for 768 and 1024 px"
    hint: str  # what it means for training, or what to do
    items: list[dict]  # {"label": "a.png" (a near-duplicate pair: "a.png and b.png"), "detail": the report's line}
    fatal: bool = False

    def as_dict(self) -> dict:
        return {**asdict(self), "count": len(self.items)}


_GROUP_TEXT = {  # kind: (title, hint); too_small, without_trigger and cannot_train say more (DatasetReport.groups)
    "unreadable": ("Unreadable images", "Training skips them; replace or remove them."),
    "missing_caption": (
        "Images without a caption",
        "The default caption is used; write a .txt for each, or let a captioning model write them.",
    ),
    "empty_caption": ("Empty captions", "The default caption is used; write a caption in each."),
    "not_utf8": ("Captions not in UTF-8", "They are read as Latin-1; save them as UTF-8."),
    "near_duplicate": ("Near-duplicates", "Pairs that look alike; keep one of each, or the LoRA sees it twice."),
}


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
    caption_ext: str = "txt"
    recursive: bool = False

    @property
    def trainable(self) -> int:
        return sum(1 for p in self.sizes if any(p not in small for small in self.too_small.values()))

    def problems(self, trigger_word: str | None = None) -> list[Problem]:
        """Everything worth a look, in the report's order, each naming its file."""
        name = lambda p: str(p.relative_to(self.folder))  # noqa: E731
        out = [
            Problem("unreadable", f"unreadable: {name(p)}: {why} (training skips it)", name(p))
            for p, why in self.unreadable.items()
        ]
        out += [
            Problem("missing_caption", f"missing caption: {name(p)} (the default caption is used)", name(p))
            for p in self.missing_captions
        ]
        out += [
            Problem("empty_caption", f"empty caption: {name(p)} (the default caption is used)", name(p))
            for p in self.empty_captions
        ]
        out += [
            Problem("not_utf8", f"caption not UTF-8: {name(p)} (read as Latin-1; save it as UTF-8)", name(p))
            for p in self.not_utf8
        ]
        what = f"'{trigger_word}' or [trigger]" if trigger_word else "[trigger]"
        out += [
            Problem("without_trigger", f"caption without the trigger ({what}): {name(p)}", name(p))
            for p in self.without_trigger
        ]
        out += [
            Problem(
                "near_duplicate",
                f"near-duplicates: {name(a)} and {name(b)} (hash distance {d} of 64)",
                name(a),
                other=name(b),
            )
            for a, b, d in self.near_duplicates
        ]
        for res, small in self.too_small.items():
            out += [
                Problem(
                    "too_small",
                    f"too small for {res}: {name(p)} {self.sizes[p][0]}x{self.sizes[p][1]} (skipped at {res})",
                    name(p),
                    res,
                )
                for p in small
            ]
        if not self.trainable:
            message = "cannot train: no readable image fills any of the resolutions"
            out.append(Problem("cannot_train", message, fatal=True))
        return out

    def groups(self, trigger_word: str | None = None) -> list[ProblemGroup]:
        """``problems`` by kind, the fatal ones first, then the warnings in the report's order. A too-small image
        is listed once, in the group of all the resolutions it misses."""
        by_key: dict[str, list[Problem]] = {}
        misses: dict[str, list[int]] = {}  # too-small file: the resolutions it misses
        for problem in self.problems(trigger_word):
            if problem.kind == "too_small":
                misses.setdefault(problem.file, []).append(problem.resolution)
            else:
                by_key.setdefault(problem.kind, []).append(problem)
        small: dict[tuple[int, ...], list[str]] = {}
        for file, resolutions in misses.items():
            small.setdefault(tuple(resolutions), []).append(file)
        out = []
        for kind, problems in by_key.items():
            items = [
                {"label": f"{p.file} and {p.other}" if p.other else p.file, "detail": p.message}
                for p in problems
                if p.file
            ]
            if kind == "cannot_train":
                why = untrainable(self.folder, list(self.buckets), self.recursive) or "no image fills a resolution"
                if why == "no readable image":
                    why = "there is no readable image; add images"
                hint = why[0].upper() + why[1:] + "."
                out.append(ProblemGroup(kind, kind, "Cannot train", hint, items, fatal=True))
            elif kind == "without_trigger":
                what = f"'{trigger_word}' or [trigger]" if trigger_word else "[trigger]"
                hint = "The LoRA learns the trigger word from the captions; put it (or [trigger]) in each."
                out.append(ProblemGroup(kind, kind, f"Captions without the trigger ({what})", hint, items))
            else:
                out.append(ProblemGroup(kind, kind, *_GROUP_TEXT[kind], items))
        for resolutions, files in small.items():
            shown = " and ".join([", ".join(map(str, resolutions[:-1])), str(resolutions[-1])]).removeprefix(" and ")
            title = f"Too small for {shown} px"
            those = "that resolution" if len(resolutions) == 1 else "those resolutions"
            hint = f"Skipped at {those}: they would need more than {MAX_UPSCALE - 1:.0%} upscaling."
            items = [{"label": f, "detail": "{}x{}".format(*self.sizes[self.folder / f])} for f in files]
            key = "-".join(["too_small", *map(str, resolutions)])
            out.append(ProblemGroup(key, "too_small", title, hint, items))
        return sorted(out, key=lambda group: not group.fatal)  # stable: the report's order otherwise


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
    report = DatasetReport(folder, caption_ext=caption_ext, recursive=recursive)
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
    elif trigger_word and "[trigger]" not in text and trigger_word.lower() not in text.lower():
        report.without_trigger.append(sidecar)  # only with a trigger word: without one there is nothing to miss


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
    problems = r.problems(trigger_word)
    lines = [f"dataset {r.folder}: {len(r.images)} image files, {len(r.sizes)} readable"]
    if r.formats:
        lines.append("formats: " + ", ".join(f"{k} x{v}" for k, v in sorted(r.formats.items())))
    if r.sizes:
        by_area = sorted(r.sizes.items(), key=lambda kv: kv[1][0] * kv[1][1])
        widths, heights = [s[0] for s in r.sizes.values()], [s[1] for s in r.sizes.values()]
        lines.append(f"sizes: width {min(widths)}-{max(widths)}, height {min(heights)}-{max(heights)}")
        lines.append("smallest: " + ", ".join(f"{name(p)} ({w}x{h})" for p, (w, h) in by_area[:3]))
    lines += [p.message for p in problems if p.kind not in ("too_small", "cannot_train")]
    hint = caption_hint(r, trigger_word)
    if hint:
        lines.append(hint)
    for res, counts in r.buckets.items():
        spread = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items()))
        lines.append(f"resolution {res}: {sum(counts.values())} images in buckets {spread or '(none)'}")
        lines += [p.message for p in problems if p.kind == "too_small" and p.resolution == res]
    lines += advice(r.trainable)
    lines += [p.message for p in problems if p.kind == "cannot_train"]
    return "\n".join(lines)


def caption_hint(r: DatasetReport, trigger_word: str | None = None) -> str | None:
    """How many readable images have no caption (missing or empty), and the ``zimage-lora caption`` command that
    writes theirs (it keeps the captions there are); None when every image has one."""
    without = len(r.missing_captions) + len(r.empty_captions)
    if not without:
        return None
    line = f"captions: {without} of {len(r.sizes)} readable images have none (missing or empty)"
    if r.caption_ext != "txt":  # the captioner writes .txt files
        return line
    command = ["zimage-lora", "caption", str(r.folder)]
    command += ["--trigger", trigger_word] if trigger_word else []
    command += ["--recursive"] if r.recursive else []
    return f"{line}; a captioning model can write them: {shlex.join(command)} (docs/captioning.md)"


# the guide's numbers: 10-30 images for a character, 15-40 for a style, diminishing returns past ~50; under 10
# images, 1500-2200 steps instead of 2500-3000; learning rates from 2e-4 up make Turbo-style models unstable
FEW_IMAGES = 10
FEW_IMAGES_STEPS = (1500, 2200)
HIGH_LR = 2e-4


def advice(count: int) -> list[str]:
    """The guide's advice for a dataset of ``count`` trainable images, one line each."""
    if count == 0:
        return ["advice: add images; a character LoRA wants 10-30, a style 15-40"]
    if count < FEW_IMAGES:
        low, high = FEW_IMAGES_STEPS
        return [
            f"advice: {count} images is few; a character LoRA wants 10-30 varied images, a style 15-40",
            f"advice: with fewer than {FEW_IMAGES} images the guide suggests train.steps {low}-{high} (not 3000) "
            f"and train.lr at 1e-4 or below (not {HIGH_LR:g} or more), so the LoRA does not overfit",
        ]
    if count <= 40:
        return [f"advice: {count} images is in the usual range (10-30 for a character, 15-40 for a style)"]
    if count <= 50:
        return [f"advice: {count} images is on the large side; returns diminish past about 50"]
    return [f"advice: {count} images: returns diminish past about 50; curate the best, or raise the steps"]


def can_train(size: tuple[int, int], resolutions: list[int]) -> bool:
    """Whether an image of ``size`` trains at one of ``resolutions`` at least (no more than 5% upscaling)."""
    return any(upscale_needed(*size, res) <= MAX_UPSCALE for res in resolutions)


_HEADER_SIZES: dict[tuple[str, int, int], tuple[int, int] | None] = {}


def header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image file's header (None when it is no image), remembered per file version."""
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _HEADER_SIZES:
        try:
            with Image.open(path) as image:
                _HEADER_SIZES[key] = image.size
        except (OSError, ValueError):
            _HEADER_SIZES[key] = None
    return _HEADER_SIZES[key]


def untrainable(folder: Path, resolutions: list[int], recursive: bool = False) -> str | None:
    """Why no image of ``folder`` can train at ``resolutions`` (as ``dataset check`` judges it), or None when one
    can. Sizes come from the file headers, so a job validates in moments even with large images."""
    sizes = [size for path in list_images(folder, recursive) if (size := header_size(path)) is not None]
    if not sizes:
        return "no readable image"
    if any(can_train(size, resolutions) for size in sizes):
        return None
    largest = max(sizes, key=lambda s: s[0] * s[1])
    top = int(max(largest) * MAX_UPSCALE) // 16 * 16  # no bucket side beyond this can take the image
    fits = [r for r in range(top, 63, -16) if can_train(largest, [r])]
    hint = f"lower them to {fits[0]} or less, or add larger images" if fits else "add larger images"
    shown = ", ".join(map(str, resolutions))
    return f"no image is large enough for {shown} (the largest is {largest[0]}x{largest[1]}); {hint}"
