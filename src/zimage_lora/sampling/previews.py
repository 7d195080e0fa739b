"""Preview images while training: PNGs with their settings in text metadata, and a contact sheet.

A preview is exactly what inference produces: on the Turbo path the training adapter is switched off, the user's
LoRA stays on. Previews draw their noise from their own seeded CPU generator, so sampling never changes training.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from zimage_lora.files import atomic_write_bytes
from zimage_lora.sampling.sampler import SampleSettings
from zimage_lora.training.run_folder import preview_files


@dataclass(frozen=True)
class PreviewPrompt:
    prompt: str
    negative_prompt: str
    settings: SampleSettings
    lora_scale: float


def preview_prompts(sample_cfg, arch: str, trigger_word: str | None) -> list[PreviewPrompt]:
    """The job's sample prompts with ``[trigger]`` replaced and the section's settings filled in."""
    out = []
    for p in sample_cfg.resolved_prompts(arch):
        settings = SampleSettings(**{f.name: getattr(p, f.name) for f in fields(SampleSettings)})
        text = p.prompt.replace("[trigger]", trigger_word or "")
        out.append(PreviewPrompt(text, sample_cfg.negative_prompt, settings, p.lora_scale))
    return out


def save_png(path: Path, image: Image.Image, info: dict) -> None:
    """A PNG carrying its prompt and settings as text chunks (``parameters`` holds them all as JSON)."""
    meta = PngInfo()
    for key, value in info.items():
        meta.add_text(key, str(value))
    meta.add_text("parameters", json.dumps(info, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=meta)
    atomic_write_bytes(path, buffer.getvalue())


def image_info(prompt: str, negative: str, settings: SampleSettings, arch: str, shift: float, **extra) -> dict:
    """The PNG text metadata of an image we make, a preview or ``generate``'s: what made it, so it can be made
    again; ``extra`` adds what only one of them knows (the training step, the LoRAs), ``None`` values left out."""
    info = {"prompt": prompt, "negative_prompt": negative, **asdict(settings), "arch": arch, "shift": shift}
    info.update({k: v for k, v in extra.items() if v is not None})
    info["software"] = "zimage-lora"
    return info


def png_info(prompt: PreviewPrompt, step: int, arch: str, shift: float) -> dict:
    """A preview's metadata: its prompt and settings, its LoRA scale and the training step."""
    return image_info(
        prompt.prompt, prompt.negative_prompt, prompt.settings, arch, shift, lora_scale=prompt.lora_scale,
        training_step=step,
    )  # fmt: skip


def build_contact_sheet(samples_dir: Path, prompts: list[str], thumb: int = 256) -> Path | None:
    """Grid of every preview: one row per prompt, one column per step. Rebuilt from the files on disk."""
    found = preview_files(samples_dir)
    if not found:
        return None
    steps = sorted({s for s, _ in found})
    rows = sorted({i for _, i in found})
    cells = [[found.get((step, index)) for step in steps] for index in rows]
    labels = [prompts[i] if i < len(prompts) else f"prompt {i}" for i in rows]
    path = Path(samples_dir) / "contact_sheet.png"
    save_grid(path, cells, labels, [f"step {step}" for step in steps], thumb)
    return path


def save_grid(
    path: Path, cells: list[list[Path | None]], row_labels: list[str], col_labels: list[str], thumb: int = 256
) -> None:
    """A labelled grid of images (missing cells left white), written atomically."""
    label_w, head_h = 220, 24
    n_cols = max((len(r) for r in cells), default=0)
    sheet = Image.new("RGB", (label_w + thumb * n_cols, head_h + thumb * len(cells)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for c, label in enumerate(col_labels):
        draw.text((label_w + c * thumb + 4, 4), _wrap(label, 40, 1), fill="black", font=font)
    for r, row in enumerate(cells):
        draw.multiline_text((4, head_h + r * thumb + 4), _wrap(row_labels[r], 34), fill="black", font=font)
        for c, cell in enumerate(row):
            if cell is not None:
                with Image.open(cell) as im:
                    sheet.paste(_fit(im.convert("RGB"), thumb), (label_w + c * thumb, head_h + r * thumb))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())


def _fit(image: Image.Image, box: int) -> Image.Image:
    """Scale to fit a square cell: smooth when shrinking, nearest-neighbour when enlarging small previews."""
    scale = box / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST
    return image.resize(size, resample)


def _wrap(text: str, width: int, max_lines: int = 12) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width and line:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    return "\n".join(lines[:max_lines])
