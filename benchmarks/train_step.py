"""LoRA training-step speed: s/it, images/s, peak memory and model FLOPs utilisation.

    python benchmarks/train_step.py --config cpu --size 256 --steps 5                  # this CPU machine
    python benchmarks/train_step.py --config full --size 1024 --device cuda --dtype bf16  # an H100

It builds the transformer from a config with random weights (no download), injects our LoRA (default targets, rank
16) and times our training step (zimage_lora.training.recipe's loss with its noise and timestep sampling, backward,
clipping, AdamW step) on precomputed latents and caption embeddings. Model FLOPs are defined in
zimage_lora/training/flops.py; utilisation is reported against the device's measured large-matmul rate.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONFIGS, build_transformer, describe, inputs, matmul_peak_tflops, peak_memory_gb, timed  # noqa: E402

from zimage_lora.config import DEFAULT_TARGET_REGEX  # noqa: E402
from zimage_lora.data.dataset import ImageItem, Sample  # noqa: E402
from zimage_lora.lora import network  # noqa: E402
from zimage_lora.training.flops import train_step_flops  # noqa: E402
from zimage_lora.training.recipe import _batch_loss  # noqa: E402


def our_step_fn(model, x0, caps, args, device, dtype):
    """One optimizer step exactly as the recipe takes it (its loss function, clipping and AdamW)."""
    batch = len(caps)
    cfg = SimpleNamespace(
        datasets=[SimpleNamespace(caption_dropout=0.0)],
        train=SimpleNamespace(timestep_type="weighted", timestep_bias="balanced", dop=SimpleNamespace(enabled=False)),
        advanced=SimpleNamespace(differential_guidance=SimpleNamespace(enabled=False)),
    )
    arch = SimpleNamespace(shift=3.0, uses_adapter=False)
    items = [ImageItem(Path(f"{i}.png"), f"c{i}", 0) for i in range(batch)]
    samples = [Sample(i, args.size, (args.size, args.size)) for i in range(batch)]
    latents = SimpleNamespace(get=lambda path, bucket: x0[int(path.stem)])
    text = lambda prompts: [caps[int(p[1:])] for p in prompts]  # noqa: E731
    params = network.user_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    noise_gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            loss, _, _ = _batch_loss(
                samples, cfg, arch, model, model, latents, text, items, noise_gen, rng, device, dtype
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def prepare(args):
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = build_transformer(args.config, device, dtype)
    names = network.target_module_names(model, DEFAULT_TARGET_REGEX)
    network.add_user_lora(model, names, args.rank, float(args.rank), seed=0)
    if dtype != torch.float32:  # the step runs under autocast, as the recipe's does in bf16
        network.keep_input_dtype(model)
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    x0, caps = inputs(CONFIGS[args.config], args.size, args.size, args.batch, args.caption, device, dtype)
    return device, dtype, model, x0, caps


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
    return parser


def main() -> None:
    args = build_parser().parse_args()
    device, dtype, model, x0, caps = prepare(args)
    seconds = timed(our_step_fn(model, x0, caps, args, device, dtype), args.steps, args.warmup, device)
    flops = train_step_flops(CONFIGS[args.config], args.size, args.size, args.caption, args.batch)
    peak = matmul_peak_tflops(device, dtype)
    achieved = flops / seconds / 1e12
    print(
        f"device: {describe(device)}; config {args.config}, {args.size}x{args.size}, batch {args.batch}, "
        f"rank {args.rank}, {args.dtype}, checkpointing {args.checkpointing}"
    )
    print(f"{seconds:.3f} s/it, {args.batch / seconds:.2f} images/s, peak memory {peak_memory_gb(device):.2f} GB")
    print(
        f"model FLOPs {flops / 1e12:.3f} TFLOP/step -> {achieved:.3f} TFLOP/s = {100 * achieved / peak:.1f}% of the "
        f"measured {peak:.2f} TFLOP/s matmul peak"
    )


if __name__ == "__main__":
    main()
