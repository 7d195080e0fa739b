"""``zimage-lora compare``: the guide's A/B test (adapter v1 against v2, rank 16 against 32, ...).

The job runs once per variant with the same data, seeds and every other setting; then, for each step that
previews were rendered at, a grid puts the variants side by side (columns = variants, rows = prompts, each column
labelled with that round's preview scores), and one summary image sets each variant's final previews in a row,
labelled with its final loss and scores.

A variant is one ``--vary``: ``KEY=VALUE``, or several overrides joined by ``;`` (``"target.rank=32;train.lr=5e-5"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zimage_lora.config import load_job
from zimage_lora.errors import UserError
from zimage_lora.sampling.previews import preview_files, save_grid
from zimage_lora.training.card import SCORES
from zimage_lora.training.recipe import TrainResult, train
from zimage_lora.training.run_folder import read_metrics


@dataclass
class CompareResult:
    folder: Path
    variants: list[str]
    runs: list[TrainResult]
    grids: list[Path]
    summary: Path
    scores: list[dict]  # each variant's final preview scores (its last sample step's metrics line)


def compare(job: Path, varies: list[str], progress: bool = True) -> CompareResult:
    if len(varies) < 2:
        raise UserError("--vary: give at least two variants, e.g. --vary target.rank=16 --vary target.rank=32")
    variants = [[part.strip() for part in v.split(";") if part.strip()] for v in varies]
    for text, overrides in zip(varies, variants, strict=True):
        if not overrides or any("=" not in o for o in overrides):
            raise UserError(f"--vary {text!r}: expected KEY=VALUE (several joined by ';')")
    base = load_job(job, warnings=[])  # the job itself must be valid before anything runs (its trainer warns)
    if not base.sample.prompts:
        raise UserError("sample.prompts: compare needs preview prompts to put side by side")
    folder = Path(base.job.output_dir) / f"{base.job.name}_compare"
    configs = [
        load_job(job, [*overrides, f"job.name={base.job.name}_v{i}", f"job.output_dir={folder}"], warnings=[])
        for i, overrides in enumerate(variants)
    ]  # all variants are validated before the first one trains
    runs = [train(cfg, overwrite=True, progress=progress) for cfg in configs]

    labels = ["; ".join(v) for v in variants]
    found = [preview_files(r.run_dir / "samples") for r in runs]
    scores = [{row["step"]: row for row in read_metrics(r.run_dir) if any(k in row for k in SCORES)} for r in runs]
    steps = sorted({step for f in found for step, _ in f})
    prompts = [p.prompt for p in base.sample.prompts]
    grids = []
    for step in steps:
        cells = [[f.get((step, i)) for f in found] for i in range(len(prompts))]
        path = folder / f"grid_{step:09d}.png"
        columns = [f"{label} {score_text(s.get(step, {}))}".strip() for label, s in zip(labels, scores, strict=True)]
        save_grid(path, cells, prompts, columns)
        grids.append(path)
    last = steps[-1] if steps else 0
    summary = folder / "summary.png"
    rows = [[f.get((last, i)) for i in range(len(prompts))] for f in found]
    row_labels = [
        f"{label} (final loss {r.last_loss:.4f}) {score_text(s.get(last, {}))}".strip()
        for label, r, s in zip(labels, runs, scores, strict=True)
    ]
    save_grid(summary, rows, row_labels, [f"{p} (step {last})" for p in prompts])
    return CompareResult(folder, labels, runs, grids, summary, [s.get(last, {}) for s in scores])


def score_text(row: dict) -> str:
    """A metrics line's preview scores, short: ``leak 0.031, concept 0.75``."""
    short = {"turbo_drift": "drift"}
    return ", ".join(f"{short.get(k, k)} {row[k]:.3f}" for k in SCORES if row.get(k) is not None)
