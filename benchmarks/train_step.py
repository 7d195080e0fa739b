"""LoRA training-step speed: s/it, images/s, peak memory and model FLOPs utilisation.

    python benchmarks/train_step.py --config cpu --size 256 --steps 5                  # this CPU machine
    python benchmarks/train_step.py --config full --size 1024 --device cuda --dtype bf16  # an H100
    python benchmarks/train_step.py --config full --size 1024 --quant float8 --offload 0.5  # 12-16 GB cards

It builds the transformer from a config with random weights (no download) and hands it to the training recipe
(``LoraRecipe.setup`` with prebuilt components, fixed latents and caption embeddings instead of a dataset), which
sets it up as a job would: our LoRA (default targets, rank 16), gradient checkpointing, ``--offload`` (block
offloading, models/offload.py) and ``--compile`` (regional compile, models/compile.py). Each timed step is the
recipe's public ``train_step``: keyed noise and timestep draws, loss, backward, clipping, AdamW, its one host read.
``--quant`` stores the frozen weights with the library's own quantization (models/quant.py) before that. Model FLOPs
are defined in zimage_lora/training/flops.py; utilisation is reported against the device's measured matmul rate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CONFIGS,
    build_transformer,
    describe,
    inputs,
    matmul_peak_tflops,
    peak_memory_gb,
    quantize,
    reset_peak,
    timed,
)

from zimage_lora.config import parse_job  # noqa: E402
from zimage_lora.data.batches import Example, StepBatch  # noqa: E402
from zimage_lora.data.text_cache import PromptEmbeddings  # noqa: E402
from zimage_lora.models.checkpointing import main_blocks, spread_indices  # noqa: E402
from zimage_lora.models.loading import Components  # noqa: E402
from zimage_lora.training.flops import recompute_flops, train_step_flops  # noqa: E402
from zimage_lora.training.recipe import LoraRecipe  # noqa: E402


class FixedBatches:
    """The recipe's data without a dataset: the same latents and captions at every step."""

    def __init__(self, x0: torch.Tensor, captions: list[str]):
        self.x0, self.captions_ = x0, captions

    def captions(self) -> set[str]:
        return set(self.captions_)

    def next(self, position, step: int) -> StepBatch:
        examples = [Example(i, self.x0[i], c, c) for i, c in enumerate(self.captions_)]
        return StepBatch(step, [examples])


@dataclass
class Bench:
    device: torch.device
    dtype: torch.dtype
    recipe: LoraRecipe
    model: torch.nn.Module  # the recipe's transformer, LoRA in place
    data: FixedBatches
    recomputed: list[int]
    quant_report: str
    folder: tempfile.TemporaryDirectory
    step: int = 0

    @property
    def offloader(self):
        return self.recipe.offloader

    def next_batch(self) -> StepBatch:
        self.step += 1
        return self.data.next(None, self.step)


def job_config(args, folder: Path):
    """The job a user would write for this benchmark (the data folder is never read: the batches are given)."""
    train = {
        "optimizer": "adamw",
        "lr": 1e-4,
        "weight_decay": 0.01,
        "steps": 1_000_000,
        "timestep_type": "weighted",
        "mixed_precision": "no" if args.dtype == "fp32" else "bf16",
        "gradient_checkpointing": args.checkpointing,
        "checkpoint_fraction": args.checkpoint_fraction,
        "compile": args.compile,
    }
    data = {
        "job": {"name": "bench", "output_dir": str(folder), "device": args.device, "seed": 0},
        "model": {"arch": "zimage_deturbo", "name_or_path": str(folder), "layer_offload": args.offload},
        "target": {"rank": args.rank},
        "save": {"every": 1_000_000},
        "train": train,
        "datasets": [{"path": str(folder), "caption_dropout": 0.0}],
        "sample": {"every": 1_000_000, "prompts": []},
    }
    return parse_job(data, folder, check_paths=False)


def prepare(args, config: dict | None = None) -> Bench:
    """The recipe set up on a random transformer of ``config`` (default: ``--config``), ready to step."""
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    config = config or CONFIGS[args.config]
    model = build_transformer(config, device, dtype)
    quant_report = quantize(model, args.quant, device)
    x0, caps = inputs(config, args.size, args.size, args.batch, args.caption, device, dtype)
    captions = [f"caption {i}" for i in range(args.batch)]
    text = PromptEmbeddings(None, None, device)
    text.cached.update(zip(captions, caps, strict=True))
    folder = tempfile.TemporaryDirectory(prefix="zimage-bench-")
    recipe = LoraRecipe(job_config(args, Path(folder.name)), progress=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    data = FixedBatches(x0, captions)
    recipe.setup(components=Components(model, None, None, None, scheduler), data=data, text=text)
    recomputed = spread_indices(len(main_blocks(model)), args.checkpoint_fraction) if args.checkpointing else []
    reset_peak(device)
    return Bench(device, dtype, recipe, model, data, recomputed, quant_report, folder)


def our_step_fn(bench: Bench):
    """One call = one optimizer step exactly as a job takes it: the recipe's public ``train_step``."""

    def step():
        return bench.recipe.train_step(bench.next_batch())

    return step


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--caption", type=int, default=128, help="caption tokens")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--checkpoint-fraction", type=float, default=1.0, help="share of main blocks that recompute (as in the job)"
    )
    parser.add_argument("--quant", choices=["none", "float8", "int8", "nf4"], default="none", help="frozen weights")
    parser.add_argument("--offload", type=float, default=0.0, help="fraction of main blocks kept in CPU memory")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    bench = prepare(args)
    device, dtype = bench.device, bench.dtype
    seconds = timed(our_step_fn(bench), args.steps, args.warmup, device)
    memory = peak_memory_gb(device)  # before the matmul probe below allocates its own buffers
    flops = train_step_flops(CONFIGS[args.config], args.size, args.size, args.caption, args.batch)
    peak = matmul_peak_tflops(device, dtype)
    achieved = flops / seconds / 1e12
    print(
        f"device: {describe(device)}; config {args.config}, {args.size}x{args.size}, batch {args.batch}, "
        f"rank {args.rank}, {args.dtype}, checkpointing {args.checkpointing}"
        f"{f' (fraction {args.checkpoint_fraction:g})' if args.checkpointing else ''}, offload {args.offload:g}, "
        f"compile {args.compile}"
    )
    print(bench.quant_report)
    if bench.offloader is not None:
        o = bench.offloader
        print(
            f"offload: {len(o.offloaded)} of {o.n_blocks} blocks; loads {sum(o.loads)}, evictions {sum(o.evictions)}, "
            f"at most {o.max_resident} offloaded blocks resident at once"
        )
    what = "peak GPU memory (max_memory_allocated)" if device.type == "cuda" else "peak RSS"
    print(f"{seconds:.3f} s/it, {args.batch / seconds:.2f} images/s, {what} {memory:.2f} GB")
    print(
        f"model FLOPs {flops / 1e12:.3f} TFLOP/step -> {achieved:.3f} TFLOP/s = {100 * achieved / peak:.1f}% of the "
        f"measured {peak:.2f} TFLOP/s matmul peak"
    )
    extra = recompute_flops(CONFIGS[args.config], args.size, args.size, bench.recomputed, args.caption, args.batch)
    hardware = (flops + extra) / seconds / 1e12
    print(
        f"recompute: {len(bench.recomputed)} blocks, {extra / 1e12:.3f} TFLOP/step more -> hardware FLOPs "
        f"{hardware:.3f} TFLOP/s = {100 * hardware / peak:.1f}% of the matmul peak"
    )


if __name__ == "__main__":
    main()
