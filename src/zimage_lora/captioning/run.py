"""``zimage-lora caption DIR``: a caption file beside each image of a dataset folder, written as it is finished.

The plan comes first and needs no model: every image (as training lists them) with the caption it has. A caption
file that exists and is not empty is kept unless ``overwrite`` (an empty one counts as missing), so a run that had
nothing to do never loads the model. Then the images to caption go through the model in batches, each loaded as
training loads it (``load_rgb``: EXIF rotation applied, transparency on white, CMYK, 16-bit and palette images as
8-bit RGB); a corrupt one is skipped and reported by name. Each caption is written atomically as soon as its batch is
done (``caption.file`` fires after each file, for fault injection), so an interrupted run keeps what it finished and
a rerun continues with the rest. ``dry_run`` writes nothing: the proposals come back, and with ``json_out`` go to
that file (written atomically, last) as ``[{"file", "caption", "existing", "problem"}, ...]``, which the web UI
reads.

Problems are reported by file name and never stop the run: an unreadable image, a refusal or an empty answer (no
caption written), and a caption longer than Z-Image's prompt limit (written; training cuts its end off). That limit is
the prompt encoder's ``max_length`` (models/text.py, 512 tokens of the chat-formatted prompt); with the Z-Image
tokenizer (``--zimage-model``) the tokens are counted exactly, else estimated from the length and said to be.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zimage_lora import faults
from zimage_lora.captioning import prompts
from zimage_lora.data.dataset import list_images, load_rgb, read_caption_text
from zimage_lora.errors import UserError
from zimage_lora.files import atomic_write_bytes

CAPTION_EXT = "txt"
FAULT_POINT = "caption.file"  # fired after each caption file is written, with its 1-based count in this run
CHARS_PER_TOKEN = 3.5  # a cautious estimate for English through Qwen's tokenizer (it averages about 4)
TEMPLATE_TOKENS = 12  # the chat template around the caption: "<|im_start|>user\n" ... "<|im_start|>assistant\n"


def zimage_prompt_limit() -> int:
    """Tokens of a chat-formatted prompt that Z-Image's text encoder reads (encode_prompts' max_length)."""
    from zimage_lora.models.text import encode_prompts

    return inspect.signature(encode_prompts).parameters["max_length"].default


@dataclass
class CaptionOptions:
    mode: str = "character"
    trigger: str | None = None
    trigger_style: str = "placeholder"
    prompt: str | None = None
    max_words: int | None = None
    overwrite: bool = False
    dry_run: bool = False
    batch: int = 1
    recursive: bool = False

    def __post_init__(self):
        if self.mode not in prompts.MODES:
            raise UserError(f"--mode: {self.mode!r} is not one of {', '.join(prompts.MODES)}")
        if self.trigger_style not in prompts.TRIGGER_STYLES:
            styles = ", ".join(prompts.TRIGGER_STYLES)
            raise UserError(f"--trigger-style: {self.trigger_style!r} is not one of {styles}")
        if self.trigger is not None and (not self.trigger.strip() or any(c.isspace() for c in self.trigger.strip())):
            raise UserError(f"--trigger: {self.trigger!r} is not one word; give the trigger word alone")
        if self.max_words is not None and self.max_words < 1:
            raise UserError(f"--max-words: {self.max_words} must be 1 or more")
        if self.batch < 1:
            raise UserError(f"--batch: {self.batch} must be 1 or more")


@dataclass
class Proposal:
    """One image of the folder: the caption proposed (None when skipped or failed), the one it has, what went wrong."""

    file: str  # relative to the folder, with '/'
    caption: str | None = None
    existing: str | None = None
    problem: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class CaptionReport:
    folder: Path
    proposals: list[Proposal] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # kept: a caption was there
    seconds: float = 0.0
    tokens_exact: bool = False

    @property
    def problems(self) -> list[Proposal]:
        return [p for p in self.proposals if p.problem]


def plan(folder: Path, overwrite: bool, recursive: bool = False) -> CaptionReport:
    """Every image of ``folder`` (and of its sub-folders when ``recursive``) with the caption it has; those it
    keeps are listed in ``skipped``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"caption: folder not found: {folder}")
    images = list_images(folder, recursive)
    if not images:
        raise UserError(f"caption: no images (png, jpg, webp, bmp) in {folder}")
    report = CaptionReport(folder)
    for image in images:
        sidecar = image.with_suffix("." + CAPTION_EXT)
        existing = read_caption_text(sidecar) if sidecar.is_file() else ""
        proposal = Proposal(image.relative_to(folder).as_posix(), existing=existing or None)
        report.proposals.append(proposal)
        if existing and not overwrite:
            report.skipped.append(proposal.file)
    return report


def caption_folder(
    report: CaptionReport,
    captioner,
    options: CaptionOptions,
    *,
    count_tokens: Callable[[str], int] | None = None,
    progress: bool = True,
) -> CaptionReport:
    """Caption the images ``report`` (from ``plan``) did not skip, writing each caption unless ``dry_run``.

    ``count_tokens`` gives the exact length of a chat-formatted Z-Image prompt; without it the length is estimated.
    """
    import time

    from tqdm import tqdm

    from zimage_lora.captioning.captioner import max_new_tokens

    todo = [p for p in report.proposals if p.file not in report.skipped]
    request = captioner.request(options.mode, options.prompt, options.max_words)
    trigger = prompts.trigger_text(options.trigger, options.trigger_style)
    limit = zimage_prompt_limit()
    report.tokens_exact = count_tokens is not None
    start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for first in range(0, len(todo), options.batch):
        batch = todo[first : first + options.batch]
        loaded = []
        for proposal in batch:
            try:
                loaded.append((proposal, load_rgb(report.folder / proposal.file)))
            except UserError as err:
                proposal.problem = f"unreadable image, skipped: {err}"
        images = [image for _, image in loaded]
        answers = captioner.answer(images, request, max_new_tokens(options.max_words)) if images else []
        for (proposal, _), answer in zip(loaded, answers, strict=True):
            cleaned = prompts.clean_caption(answer, options.mode, trigger, options.max_words)
            proposal.caption, proposal.problem = cleaned.caption, cleaned.problem
            if cleaned.caption is None:
                continue
            proposal.problem = _too_long(cleaned.caption, limit, count_tokens)
            if not options.dry_run:
                path = (report.folder / proposal.file).with_suffix("." + CAPTION_EXT)
                atomic_write_bytes(path, (cleaned.caption + "\n").encode("utf-8"))
                report.written.append(proposal.file)
                faults.fire(FAULT_POINT, len(report.written))
        bar.update(len(batch))
    bar.close()
    report.seconds = time.perf_counter() - start
    return report


def _too_long(caption: str, limit: int, count_tokens: Callable[[str], int] | None) -> str | None:
    if count_tokens is not None:
        tokens = count_tokens(caption)
        if tokens > limit:
            return f"{tokens} tokens with the chat template, over Z-Image's {limit}: training cuts the end off"
        return None
    tokens = math.ceil(len(caption) / CHARS_PER_TOKEN) + TEMPLATE_TOKENS
    if tokens > limit:
        return (
            f"about {tokens} tokens (estimated; --zimage-model counts them), over Z-Image's {limit}: training cuts "
            "the end off"
        )
    return None


def zimage_token_counter(ref: str) -> Callable[[str], int]:
    """Counts a caption's tokens as Z-Image reads it (its tokenizer, through its chat template)."""
    from transformers import AutoTokenizer

    from zimage_lora.models.hub import resolve_model_dir
    from zimage_lora.models.text import apply_template

    folder = resolve_model_dir(
        ref, allow_patterns=["model_index.json", "tokenizer/*"], subfolders=("tokenizer",), key="--zimage-model"
    )
    if not (folder / "tokenizer").is_dir():
        raise UserError(f"--zimage-model {ref} has no tokenizer/ subfolder: point it at a Z-Image model folder.")
    tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
    return lambda caption: len(tokenizer(apply_template(tokenizer, caption)).input_ids)


def write_json(report: CaptionReport, path: Path) -> None:
    """The proposals as the web UI reads them, written atomically."""
    data = json.dumps([p.as_dict() for p in report.proposals], ensure_ascii=False, indent=1)
    try:
        atomic_write_bytes(Path(path), (data + "\n").encode("utf-8"))
    except OSError as e:
        raise UserError(f"--json {path}: cannot write it ({e.strerror}); choose a writable place") from None


def caption(
    folder: Path,
    model: str,
    options: CaptionOptions,
    *,
    device: str = "auto",
    quantize: str | None = None,
    zimage_model: str | None = None,
    json_out: Path | None = None,
    progress: bool = True,
) -> CaptionReport:
    """The whole command: plan, load the model only when there is something to caption, caption, release it."""
    from zimage_lora.captioning.captioner import load_captioner

    report = plan(folder, options.overwrite, options.recursive)
    count_tokens = zimage_token_counter(zimage_model) if zimage_model else None
    if len(report.skipped) < len(report.proposals):
        with load_captioner(model, device=device, quantize=quantize) as captioner:
            caption_folder(report, captioner, options, count_tokens=count_tokens, progress=progress)
    if json_out is not None:
        write_json(report, json_out)
    return report


def format_report(report: CaptionReport, options: CaptionOptions) -> str:
    """What the command prints: the proposals on a dry run, then the counts and each problem by file name."""
    lines = []
    if options.dry_run:
        lines += [f"{p.file}: {p.caption}" for p in report.proposals if p.caption is not None]
    done = sum(1 for p in report.proposals if p.caption is not None)
    verb = "proposed" if options.dry_run else "wrote"
    rate = f" in {report.seconds:.1f} s ({done / report.seconds:.2f} images/s)" if report.seconds and done else ""
    kept, problems = len(report.skipped), len(report.problems)
    lines.append(f"{verb} {done} caption(s){rate}; kept {kept} existing; {problems} problem(s)")
    lines += [f"{p.file}: {p.problem}" for p in report.problems]
    if report.skipped and not options.overwrite:
        lines.append("existing captions were kept; pass --overwrite to replace them")
    return "\n".join(lines)
