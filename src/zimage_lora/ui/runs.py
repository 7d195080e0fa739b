"""Reading a run folder for the UI: metrics, samples, checkpoints, logs, run.json (see training/run_folder.py), and a
progress bar's last state in a log (a captioning run's).

Read-only and torch-free (the layout itself is ``RunFolder``'s), so the server answers these without loading the
training stack. Files that a trainer is writing at the same moment are read defensively: a half-written last line
of metrics.jsonl is skipped until it is complete.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from zimage_lora.training.run_folder import RunFolder, metric_rows, read_metrics

SPEED_WINDOW = 20  # s/it is the mean of the last this many steps


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def metrics(folder: Path, after: int | None = None) -> list[dict[str, Any]]:
    return read_metrics(folder, after)


def metrics_tail(folder: Path, count: int = SPEED_WINDOW) -> list[dict[str, Any]]:
    return metric_rows(_tail_text(folder / "metrics.jsonl", 64 * 1024))[-count:]


def progress(folder: Path, steps: int, running: bool) -> dict[str, Any]:
    """step, sec_per_it (mean of the last 20 steps) and eta_s (only while running)."""
    tail = metrics_tail(folder)
    step = tail[-1]["step"] if tail else 0
    secs = [row["sec"] for row in tail if isinstance(row.get("sec"), int | float)]
    sec_per_it = sum(secs) / len(secs) if secs else None
    eta = max(0, steps - step) * sec_per_it if running and sec_per_it is not None else None
    return {"step": step, "steps": steps, "sec_per_it": sec_per_it, "eta_s": eta}


def samples(folder: Path, url: str) -> dict[str, Any]:
    """Preview images by step and index, each with the settings its PNG holds (``meta``, see ``sample_meta``);
    ``url`` is the run folder's /files URL."""
    run = RunFolder(folder, folder.name)
    found = [
        {"step": step, "index": index, "url": f"{url}/samples/{p.name}", "meta": sample_meta(p)}
        for step, index, p in run.samples()
    ]
    sheet = run.samples_dir / "contact_sheet.png"
    try:  # rebuilt in place: the version defeats the browser's cache
        version = sheet.stat().st_mtime_ns
    except OSError:
        return {"samples": found, "contact_sheet": None}
    return {"samples": found, "contact_sheet": f"{url}/samples/{sheet.name}?v={version}"}


# What the sample viewer shows of a preview's PNG text (sampling/previews.py png_info), with each value's type.
SAMPLE_META: dict[str, type] = {
    "prompt": str,
    "negative_prompt": str,
    "seed": int,
    "steps": int,
    "guidance": float,
    "lora_scale": float,
    "width": int,
    "height": int,
    "shift": float,
    "arch": str,
    "training_step": int,
}
_META_CACHE: dict[Path, tuple[tuple[int, int], dict[str, Any] | None]] = {}
_META_CACHE_MAX = 4096


def sample_meta(path: Path) -> dict[str, Any] | None:
    """The settings a preview PNG carries in its text chunks (the JSON ``parameters`` chunk first, the single keys
    for what it lacks), typed as ``SAMPLE_META`` says; None for a file that is not a readable PNG (yet).

    Only the chunks before the pixels are read, never the pixels, and the result is kept per (path, mtime, size):
    the job page and its event stream ask for the list every few hundred milliseconds."""
    try:
        stat = path.stat()
    except OSError:
        return None
    key = (stat.st_mtime_ns, stat.st_size)
    cached = _META_CACHE.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    meta = _read_sample_meta(path)
    if len(_META_CACHE) >= _META_CACHE_MAX:
        _META_CACHE.clear()  # a crude bound: refilling costs one header read per file
    _META_CACHE[path] = (key, meta)
    return meta


def _read_sample_meta(path: Path) -> dict[str, Any] | None:
    try:
        with Image.open(path) as image:  # parses the chunks up to the first IDAT; decodes nothing
            text = {k: v for k, v in image.info.items() if isinstance(v, str)}
            size = image.size
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    try:
        parameters = json.loads(text.get("parameters", "{}"))
    except ValueError:
        parameters = {}
    if not isinstance(parameters, dict):
        parameters = {}
    meta: dict[str, Any] = {}
    for key, kind in SAMPLE_META.items():
        value = parameters.get(key, text.get(key))
        if value is None:
            continue
        try:
            meta[key] = kind(value)
        except (TypeError, ValueError):
            continue  # a value of another shape (written by something else): left out, not guessed
    meta.setdefault("width", size[0])
    meta.setdefault("height", size[1])
    return meta


def checkpoints(folder: Path, name: str, url: str) -> list[dict[str, Any]]:
    """The LoRA files of a run: ``<name>_<step>.safetensors`` checkpoints, then the final ``<name>.safetensors``."""
    run = RunFolder(folder, name)
    found = [(step, path) for step, path in run.checkpoints()]
    if run.final_path.is_file():
        found.append((None, run.final_path))
    return [
        {
            "file": path.name,
            "step": step,
            "final": step is None,
            "bytes": path.stat().st_size,
            "url": f"{url}/{path.name}?download=1",
        }
        for step, path in found
    ]


BAR = re.compile(r"(\d+)/(\d+) \[([^\]]*)\]")  # tqdm's "| 3/12 [00:04<00:09,  1.62img/s]"


def bar_progress(path: Path, unit: str) -> dict[str, Any] | None:
    """``{"done", "total", "per_s"}`` of the last update of the progress bar counting ``unit`` in the log (tqdm
    writes each on a ``\\r`` line; other bars, e.g. a model's loading, count other units; ``per_s`` is its rate in
    ``unit`` per second, null before it has one); None before its first update."""
    rate = re.compile(rf"([0-9.]+){re.escape(unit)}/s|([0-9.]+)s/{re.escape(unit)}|\?{re.escape(unit)}/s")
    for line in reversed(log_tail(path, 200)):
        for found in reversed(list(BAR.finditer(line))):
            done, total, inside = found.groups()
            speed = rate.search(inside)
            if speed is None:
                continue
            per_s = None
            if speed.group(1):
                per_s = float(speed.group(1))
            elif speed.group(2) and float(speed.group(2)) > 0:
                per_s = 1 / float(speed.group(2))
            return {"done": int(done), "total": int(total), "per_s": per_s}
    return None


def log_path(folder: Path) -> Path:
    """The trainer's whole output (ui-process.log) when the UI ran it, else its train.log."""
    process_log = folder / "ui-process.log"
    return process_log if process_log.exists() else folder / "train.log"


def log_tail(path: Path, lines: int) -> list[str]:
    if lines <= 0:
        return []
    return _tail_text(path, 256 * lines + 4096).splitlines()[-lines:]


def _tail_text(path: Path, size: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            end = f.tell()
            f.seek(max(0, end - size))
            data = f.read()
    except OSError:
        return ""
    if end > size:
        data = data.split(b"\n", 1)[-1]  # drop the partial first line
    return data.decode("utf-8", errors="replace")


class LogFollower:
    """New complete lines of a growing log; ``reset`` says the file was started afresh (a new run)."""

    def __init__(self, path: Path, initial_lines: int):
        self.path = path
        self.initial = initial_lines
        self.offset: int | None = None

    def new_lines(self) -> tuple[list[str], bool]:
        try:
            size = self.path.stat().st_size
        except OSError:
            size = 0
        first = self.offset is None
        if first:  # start near the end: the last ``initial_lines`` lines
            self.offset = max(0, size - (256 * self.initial + 4096))
        reset = size < self.offset
        if reset:
            self.offset = 0
        if size == self.offset:
            return [], reset
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        complete = data.rfind(b"\n") + 1
        lines = data[:complete].decode("utf-8", errors="replace").splitlines()
        if first:
            lines = lines[1 if self.offset else 0 :]  # the first line may be partial
            lines = lines[-self.initial :] if self.initial > 0 else []
        self.offset += complete
        return lines, reset
