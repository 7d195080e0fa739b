"""LoRA training-step speed: s/it, images/s, peak memory and model FLOPs utilisation.

    python benchmarks/train_step.py --config cpu --size 256 --steps 5                  # this CPU machine
    python benchmarks/train_step.py --config full --size 1024 --device cuda --dtype bf16  # an H100
    python benchmarks/train_step.py --config full --size 1024 --quant float8 --offload 0.5  # 12-16 GB cards

It builds the transformer from a config with random weights (no download), injects our LoRA (default targets, rank
16) and times our training step (zimage_lora.training.recipe's loss with its noise and timestep sampling, backward,
clipping, AdamW step) on precomputed latents and caption embeddings. Model FLOPs are defined in
zimage_lora/training/flops.py; utilisation is reported against the device's measured large-matmul rate.
``--quant``, ``--offload`` and ``--compile`` use the library's own quantization (models/quant.py), block offloading
(models/offload.py) and regional compile (models/compile.py), set up as the recipe sets them up.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

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

from zimage_lora.config import DEFAULT_TARGET_REGEX  # noqa: E402
from zimage_lora.data.dataset import ImageItem, Sample  # noqa: E402
from zimage_lora.lora import network  # noqa: E402
from zimage_lora.models.checkpointing import enable_checkpointing  # noqa: E402
from zimage_lora.models.compile import compile_blocks  # noqa: E402
from zimage_lora.models.offload import BlockOffloader  # noqa: E402
from zimage_lora.training.flops import recompute_flops, train_step_flops  # noqa: E402
from zimage_lora.training.recipe import _batch_loss  # noqa: E402


def our_step_fn(model, x0, caps, args, device, dtype, forward_only: bool = False):
    """One optimizer step exactly as the recipe takes it (its loss function, clipping and AdamW); with
    ``forward_only``, a function that returns that step's loss with its graph and takes no step."""
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

    def forward():
        with autocast:
            loss, _, _ = _batch_loss(
                samples, cfg, arch, model, model, latents, text, items, noise_gen, rng, device, dtype
            )
        return loss

    def step():
        forward().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return forward if forward_only else step


def prepare(args):
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = build_transformer(args.config, device, dtype)
    args.quant_report = quantize(model, args.quant, device)
    names = network.target_module_names(model, DEFAULT_TARGET_REGEX)
    network.add_user_lora(model, names, args.rank, float(args.rank), seed=0)
    if dtype != torch.float32:  # the step runs under autocast, as the recipe's does in bf16
        network.keep_input_dtype(model)
    if args.checkpointing:
        args.recomputed = enable_checkpointing(model, args.checkpoint_fraction)
    else:
        args.recomputed = []
    model.train()
    args.offloader = BlockOffloader(model, args.offload, device) if args.offload > 0 else None
    if args.compile:
        compile_blocks(model, device)
    x0, caps = inputs(CONFIGS[args.config], args.size, args.size, args.batch, args.caption, device, dtype)
    reset_peak(device)
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
    parser.add_argument(
        "--checkpoint-fraction", type=float, default=1.0, help="share of main blocks that recompute (as in the job)"
    )
    parser.add_argument("--quant", choices=["none", "float8", "int8", "nf4"], default="none", help="frozen weights")
    parser.add_argument("--offload", type=float, default=0.0, help="fraction of main blocks kept in CPU memory")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    device, dtype, model, x0, caps = prepare(args)
    seconds = timed(our_step_fn(model, x0, caps, args, device, dtype), args.steps, args.warmup, device)
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
    print(args.quant_report)
    if args.offloader is not None:
        o = args.offloader
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
    extra = recompute_flops(CONFIGS[args.config], args.size, args.size, args.recomputed, args.caption, args.batch)
    hardware = (flops + extra) / seconds / 1e12
    print(
        f"recompute: {len(args.recomputed)} blocks, {extra / 1e12:.3f} TFLOP/step more -> hardware FLOPs "
        f"{hardware:.3f} TFLOP/s = {100 * hardware / peak:.1f}% of the matmul peak"
    )


if __name__ == "__main__":
    main()
