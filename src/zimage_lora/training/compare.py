"""``zimage-lora compare``: the guide's A/B test (adapter v1 against v2, rank 16 against 32, ...).

The job runs once per variant with the same data, seeds and every other setting; then, for each step that
previews were rendered at, a grid puts the variants side by side (columns = variants, rows = prompts, each column
labelled with that round's preview scores), and one summary image sets each variant's final previews in a row,
labelled with its final loss and scores.

A variant is one ``--vary``: ``KEY=VALUE``, or several overrides joined by ``;`` (``"target.rank=32;train.lr=5e-5"``).

The comparison folder (``<output_dir>/<name>_compare`` unless ``--folder`` says) holds one run folder per variant
(``<name>_v0``, ``<name>_v1``, ...), the grids, and ``compare.json``: the variants, which one is training, the
process and the status (``running``, ``stopped``, ``done``), written atomically. A stop (Ctrl-C, SIGTERM, the web UI's
Stop) saves the variant in training after its step and ends the comparison; ``--resume`` goes on from there: the
finished variants are not trained again (their runs are complete), the stopped one resumes from its checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from zimage_lora.errors import UserError
from zimage_lora.files import atomic_write_bytes
from zimage_lora.training.card import SCORES
from zimage_lora.training.run_folder import preview_files, read_metrics

if TYPE_CHECKING:
    from zimage_lora.training.recipe import TrainResult

MANIFEST = "compare.json"
LOSS_WINDOW = 10  # the final loss of a variant: the mean of its last this many steps


@dataclass
class CompareResult:
    folder: Path
    variants: list[str]
    runs: list[TrainResult]  # the variants trained (or found complete) so far
    grids: list[Path]
    summary: Path | None  # None while the comparison is unfinished
    scores: list[dict]  # each variant's final preview scores (its last sample step's metrics line)
    losses: list[float | None]  # each variant's final loss (mean of its last LOSS_WINDOW steps)
    stopped: tuple[int, int] | None = None  # (variant, step) when a stop ended it early; continue with --resume


def compare(
    job: Path,
    varies: list[str],
    progress: bool = True,
    *,
    resume: bool = False,
    overwrite: bool = False,
    folder: Path | None = None,
) -> CompareResult:
    from zimage_lora.config import load_job
    from zimage_lora.training.recipe import train  # torch: only where training happens (the web UI reads only)

    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other; pick one")
    if len(varies) < 2:
        raise UserError("--vary: give at least two variants, e.g. --vary target.rank=16 --vary target.rank=32")
    variants = [[part.strip() for part in v.split(";") if part.strip()] for v in varies]
    for text, overrides in zip(varies, variants, strict=True):
        if not overrides or any("=" not in o for o in overrides):
            raise UserError(f"--vary {text!r}: expected KEY=VALUE (several joined by ';')")
    base = load_job(job, warnings=[])  # the job itself must be valid before anything runs (its trainer warns)
    if not base.sample.prompts:
        raise UserError("sample.prompts: compare needs preview prompts to put side by side")
    folder = Path(folder).absolute() if folder is not None else Path(base.job.output_dir) / f"{base.job.name}_compare"
    names = [f"{base.job.name}_v{i}" for i in range(len(variants))]
    configs = [
        load_job(job, [*overrides, f"job.name={name}", f"job.output_dir={folder}"], warnings=[])
        for name, overrides in zip(names, variants, strict=True)
    ]  # all variants are validated before the first one trains
    labels = ["; ".join(map(_short, v)) for v in variants]
    _check_start(folder, varies, resume, overwrite)
    manifest = {"job": str(Path(job).resolve()), "variants": list(varies), "labels": labels, "names": names}
    manifest["prompts"] = [p.prompt for p in base.sample.prompts]
    manifest["steps"] = [cfg.train.steps for cfg in configs]
    if overwrite:
        for old in [*folder.glob("grid_*.png"), folder / "summary.png"]:
            old.unlink(missing_ok=True)

    runs: list[TrainResult] = []
    for index, cfg in enumerate(configs):
        _write_manifest(folder, {**manifest, "status": "running", "variant": index})
        run = train(cfg, resume=resume, overwrite=overwrite, progress=progress)
        runs.append(run)
        if run.stopped_at is not None:
            _write_manifest(folder, {**manifest, "status": "stopped", "variant": index, "step": run.stopped_at})
            grids, _ = _draw(folder, labels, runs, manifest["prompts"], final=False)
            return CompareResult(
                folder, labels, runs, grids, None, [], [_final_loss(r.run_dir) for r in runs], (index, run.stopped_at)
            )
    grids, summary = _draw(folder, labels, runs, manifest["prompts"], final=True)
    _write_manifest(folder, {**manifest, "status": "done", "variant": None})
    last = _last_scores(runs)
    return CompareResult(folder, labels, runs, grids, summary, last, [_final_loss(r.run_dir) for r in runs])


def _short(override: str) -> str:
    """``KEY=VALUE`` with a path shown by its file name, for the grids' labels."""
    key, _, value = override.partition("=")
    return f"{key}={Path(value).name}" if "/" in value or os.sep in value else override


def _check_start(folder: Path, varies: list[str], resume: bool, overwrite: bool) -> None:
    """A folder that holds a comparison needs a decision; --resume continues only the very same variants."""
    path = folder / MANIFEST
    if not path.is_file():
        return
    held = json.loads(path.read_text())
    if not (resume or overwrite):
        raise UserError(
            f"{folder} already holds a comparison; pass --resume to continue it or --overwrite to start afresh"
        )
    if resume and held.get("variants") != list(varies):
        raise UserError(
            f"--resume: {folder} compares {' | '.join(held.get('variants', []))}; give the same --vary options to "
            "continue it, or --overwrite to start a new comparison there"
        )


def _write_manifest(folder: Path, manifest: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    facts = {**manifest, "pid": os.getpid(), "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_bytes(folder / MANIFEST, (json.dumps(facts, indent=2) + "\n").encode())


def _scores(run_dir: Path) -> dict[int, dict]:
    return {row["step"]: row for row in read_metrics(run_dir) if any(k in row for k in SCORES)}


def _last_scores(runs: list[TrainResult]) -> list[dict]:
    found = [preview_files(r.run_dir / "samples") for r in runs]
    last = max((step for f in found for step, _ in f), default=0)
    return [_scores(r.run_dir).get(last, {}) for r in runs]


def _final_loss(run_dir: Path) -> float | None:
    losses = [row["loss"] for row in read_metrics(run_dir) if "loss" in row]
    return sum(losses[-LOSS_WINDOW:]) / len(losses[-LOSS_WINDOW:]) if losses else None


def _draw(
    folder: Path, labels: list[str], runs: list[TrainResult], prompts: list[str], final: bool
) -> tuple[list[Path], Path | None]:
    """One grid per preview step (the variants trained so far; the others' columns stay white) and, when the
    comparison is complete, the summary."""
    from zimage_lora.sampling.previews import save_grid

    found = [preview_files(r.run_dir / "samples") for r in runs]
    found += [{}] * (len(labels) - len(runs))
    scores = [_scores(r.run_dir) for r in runs] + [{}] * (len(labels) - len(runs))
    steps = sorted({step for f in found for step, _ in f})
    grids = []
    for step in steps:
        cells = [[f.get((step, i)) for f in found] for i in range(len(prompts))]
        path = folder / f"grid_{step:09d}.png"
        columns = [f"{label} {score_text(s.get(step, {}))}".strip() for label, s in zip(labels, scores, strict=True)]
        save_grid(path, cells, prompts, columns)
        grids.append(path)
    if not final:
        return grids, None
    last = steps[-1] if steps else 0
    summary = folder / "summary.png"
    rows = [[f.get((last, i)) for i in range(len(prompts))] for f in found]
    row_labels = []
    for label, run, s in zip(labels, runs, scores, strict=True):
        loss = _final_loss(run.run_dir)
        loss_text = f"(final loss {loss:.4f})" if loss is not None else ""
        row_labels.append(f"{label} {loss_text} {score_text(s.get(last, {}))}".strip())
    save_grid(summary, rows, row_labels, [f"{p} (step {last})" for p in prompts])
    return grids, summary


def score_text(row: dict) -> str:
    """A metrics line's preview scores, short: ``leak 0.031, concept 0.75``."""
    short = {"turbo_drift": "drift"}
    return ", ".join(f"{short.get(k, k)} {row[k]:.3f}" for k in SCORES if row.get(k) is not None)


def read_comparison(folder: Path) -> dict:
    """A comparison as the web UI shows it: its status, and per variant its run's status, step, previews by step
    (paths relative to ``folder``, one per prompt, None where missing), scores by step and loss curve."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    prompts = manifest.get("prompts", [])
    variants = []
    for index, (label, name) in enumerate(zip(manifest["labels"], manifest["names"], strict=True)):
        run_dir = folder / name
        facts = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
        rows = read_metrics(run_dir)
        found, scores = preview_files(run_dir / "samples"), _scores(run_dir)
        samples = {
            str(step): [
                str(found[(step, i)].relative_to(folder)) if (step, i) in found else None for i in range(len(prompts))
            ]
            for step in sorted({step for step, _ in found})
        }
        variants.append(
            {
                "label": label,
                "name": name,
                "status": facts.get("status", "waiting"),
                "step": rows[-1]["step"] if rows else 0,
                "steps": manifest["steps"][index],
                "samples": samples,
                "scores": {str(step): {k: v for k, v in row.items() if k in SCORES} for step, row in scores.items()},
                "losses": [[row["step"], row["loss"]] for row in rows if "loss" in row],
            }
        )
    return {
        "status": manifest.get("status"),
        "pid": manifest.get("pid"),
        "variant": manifest.get("variant"),
        "labels": manifest["labels"],
        "names": manifest["names"],
        "prompts": prompts,
        "variants": variants,
        "grids": sorted(p.name for p in folder.glob("grid_*.png")),
        "summary": "summary.png" if (folder / "summary.png").is_file() else None,
    }
