"""What differential guidance changes, per optimizer, on the tiny model (CPU, a few seconds a run).

    python benchmarks/differential_guidance.py --steps 30 --scale 3

For each optimizer the same job trains with the option off and on; the table gives the relative difference of the
final LoRA weights (||W_on - W_off|| / ||W_off||) with and without gradient clipping. Differential guidance multiplies
the gradient by ``scale``: plain SGD would move ``scale`` times as far, Adam-family optimizers divide by the
gradient's own magnitude, so only their eps (and clipping, which sees the larger norm) notice.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from zimage_lora.config import load_job
from zimage_lora.lora.io import read_lora
from zimage_lora.models.tiny import build_tiny_model
from zimage_lora.quiet import quiet_libraries
from zimage_lora.training.recipe import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import demo_dataset  # noqa: E402


def run(root: Path, model: Path, optimizer: str, scale: float | None, clip: float, steps: int) -> tuple[dict, float]:
    folder = root / f"{optimizer}_{scale}_{clip}"
    demo_dataset(folder / "dataset", 4)
    job = {
        "version": 1,
        "job": {"name": "dg", "trigger_word": "zfox", "output_dir": "./out", "device": "cpu", "seed": 1},
        "model": {"arch": "zimage_deturbo", "name_or_path": str(model)},
        "target": {"rank": 8},
        "save": {"dtype": "fp32", "every": 100000, "keep": 1},
        "train": {
            "steps": steps,
            "optimizer": optimizer,
            "lr": 1e-3 if optimizer != "prodigy" else 1.0,
            "max_grad_norm": clip,
            "gradient_checkpointing": False,
            "cache_text_embeddings": True,
        },
        "advanced": {"differential_guidance": {"enabled": scale is not None, "scale": scale or 3.0}},
        "datasets": [{"path": "./dataset", "resolutions": [64], "caption_dropout": 0.0}],
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    result = train(load_job(folder / "job.yaml"), progress=False)
    return read_lora(result.final_lora).modules, result.last_loss


def relative_difference(a: dict, b: dict) -> float:
    num = sum(float((a[m].up - b[m].up).norm() ** 2 + (a[m].down - b[m].down).norm() ** 2) for m in a)
    den = sum(float(b[m].up.norm() ** 2 + (b[m].down).norm() ** 2) for m in b)
    return (num / den) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--scale", type=float, default=3.0)
    args = parser.parse_args()
    quiet_libraries()
    import logging

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model", seed=0)
        print(f"torch {torch.__version__}, {args.steps} steps, scale {args.scale}")
        print("| optimizer | clipping | relative weight change, DG on vs off | final loss off / on |")
        print("|---|---|---|---|")
        for optimizer in ("adamw", "adamw8bit", "adafactor", "prodigy"):
            for clip in (0.0, 1.0):
                off, loss_off = run(root, model, optimizer, None, clip, args.steps)
                on, loss_on = run(root, model, optimizer, args.scale, clip, args.steps)
                print(
                    f"| {optimizer} | {'max_grad_norm ' + str(clip) if clip else 'off'} | "
                    f"{relative_difference(on, off):.4f} | {loss_off:.4f} / {loss_on:.4f} |"
                )


if __name__ == "__main__":
    main()
