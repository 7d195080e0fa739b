"""Data-parallel scaling of ``zimage-lora train``: steps/s and images/s on 1..N processes, tiny model.

    python benchmarks/scaling.py                                       # CPU processes 1 and 2 (this machine)
    python benchmarks/scaling.py --processes 1,2,4 --batch 4           # more processes, a larger batch
    python benchmarks/scaling.py --device cuda --processes 1,2,4,8 --batch 8 --resolution 256   # one GPU each

Each row is a real run of the CLI as a user starts it (``zimage-lora train JOB.yaml --num-processes N``, through
accelerate) on the tiny random model of the real classes (``zimage-lora tiny-model``) and a folder of synthetic
square images (one aspect bucket, so every batch is full). Two series:

- same effective batch (strong scaling): ``train.batch_size = B / N`` per process, so every optimizer step sees the
  same ``B`` images whatever ``N``; ideal: steps/s grows ``N`` times;
- same batch per process (weak scaling): ``train.batch_size = B`` on each process, so a step sees ``B x N`` images;
  ideal: steps/s stays, images/s grows ``N`` times.

The time of a step is the ``sec`` of ``metrics.jsonl`` (the main process's optimizer step, the gradient exchange
included), the median over the steps after ``--warmup``; loading, caching and starting the processes are in the
wall time only. On CPUs accelerate gives each of several processes one thread (``OMP_NUM_THREADS`` 1) while a single
process uses every core, and the processes share the machine's cores: a CPU run proves the path, not the speed.
The results go to ``benchmarks/results/scaling-<device>.json``; nothing is added to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from zimage_lora.models.tiny import build_tiny_model


def make_dataset(folder: Path, count: int, size: int) -> Path:
    """Square synthetic pictures with captions: one aspect bucket at any resolution."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(folder / f"img_{i:03d}.png")
        (folder / f"img_{i:03d}.txt").write_text(f"a picture number {i}")
    return folder


def write_job(root: Path, name: str, model: Path, dataset: Path, args, batch_size: int) -> Path:
    """The job a user would write; only ``train.batch_size`` and the name differ between rows."""
    job = {
        "version": 1,
        "job": {"name": name, "output_dir": str(root / "output"), "device": args.device, "seed": 0},
        "model": {"arch": "zimage_deturbo", "name_or_path": str(model)},
        "target": {"rank": args.rank},
        "save": {"dtype": "fp32", "every": args.steps, "keep": 1},
        "train": {
            "batch_size": batch_size,
            "steps": args.steps,
            "optimizer": "adamw",
            "lr": 1e-4,
            "cache_text_embeddings": True,
        },
        "datasets": [{"path": str(dataset), "resolutions": [args.resolution], "caption_dropout": 0.0}],
        "sample": {"every": args.steps, "prompts": []},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def run(job: Path, processes: int, timeout: int) -> dict:
    """``zimage-lora train JOB --num-processes N`` in a fresh process, as a user runs it: its wall time, and the
    machine's 1-minute load average before and after (on a shared machine, other work skews a row)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "zimage_lora.cli", "train", str(job), "--no-progress"]
    command += ["--num-processes", str(processes)]
    start, load = time.perf_counter(), os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {"wall_s": wall, "load_before": load, "load_after": os.getloadavg()[0]}


def measure(run_root: Path, warmup: int) -> dict:
    """Step times from the run folder: the median ``sec`` after the warm-up steps, and what run.json recorded."""
    rows = [json.loads(line) for line in (run_root / "metrics.jsonl").read_text().splitlines() if line.strip()]
    secs = [r["sec"] for r in rows if r["step"] > warmup and r.get("sec")]
    if not secs:
        sys.exit(f"{run_root}: no step after the {warmup} warm-up steps; raise --steps")
    facts = json.loads((run_root / "run.json").read_text())
    return {"timed_steps": len(secs), "sec": statistics.median(secs), **{k: facts.get(k) for k in RUN_FACTS}}


RUN_FACTS = ("processes", "effective_batch")  # what the trainer records in run.json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--batch", type=int, default=2, help="effective batch (strong) / per-process batch (weak)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of the timing")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="job.device: cpu, or cuda for one GPU per process")
    parser.add_argument("--timeout", type=int, default=900, help="seconds one run may take")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/scaling-DEVICE)")
    args = parser.parse_args()
    counts = sorted({int(p) for p in args.processes.split(",")})
    if any(args.batch % n for n in counts):
        parser.error(f"--batch {args.batch} must divide among {counts} processes (same effective batch)")
    out = args.out or Path(__file__).resolve().parent / "results" / f"scaling-{args.device}.json"

    rows = []
    with tempfile.TemporaryDirectory(prefix="zimage-scaling-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model")
        dataset = make_dataset(root / "dataset", args.images, args.resolution + args.resolution // 4)
        plan = [("same effective batch", n, args.batch // n) for n in counts]
        plan += [("same batch per process", n, args.batch) for n in counts if n > 1]  # N=1: the row above
        for series, n, per_process in plan:
            name = f"p{n}-b{per_process}"
            times = run(write_job(root, name, model, dataset, args, per_process), n, args.timeout)
            effective = per_process * n
            row = {
                "name": name,
                "series": series,
                "processes_asked": n,
                "batch_per_process": per_process,
                "effective_batch_asked": effective,
                **times,
                **measure(root / "output" / name, args.warmup),
            }
            row["steps_per_s"], row["images_per_s"] = 1 / row["sec"], effective / row["sec"]
            rows.append(row)
            print(
                f"{series}: {n} process(es), batch {per_process} each: {row['sec']:.3f} s/step "
                f"(load average {row['load_before']:.1f} before, {row['load_after']:.1f} after)",
                flush=True,
            )

    for row in rows:
        for key in RUN_FACTS:  # the trainer's own record, when it keeps one
            if row[key] is not None and row[key] != row[f"{key}_asked"]:
                sys.exit(f"{row['name']}: run.json says {key} {row[key]}, asked {row[f'{key}_asked']}")

    print()
    size = f"{args.resolution}x{args.resolution}"
    print(f"{describe(args.device)}; tiny model, {size}, rank {args.rank}, {args.steps} steps, {args.warmup} warm-up")
    print("| series | processes | batch/process | effective batch | s/step (median) | steps/s | images/s | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['series']} | {r['processes_asked']} | {r['batch_per_process']} | {r['effective_batch_asked']} | "
            f"{r['sec']:.3f} | {r['steps_per_s']:.2f} | {r['images_per_s']:.2f} | {r['wall_s']:.0f} |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join(["python", "benchmarks/scaling.py", *sys.argv[1:]]),
        "date": date.today().isoformat(),
        "machine": describe(args.device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written: {out}")


def describe(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


if __name__ == "__main__":
    main()
