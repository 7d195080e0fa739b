"""Our training step against a minimal hand-written diffusers + peft loop, same model, inputs and settings.

    python benchmarks/overhead.py --config cpu --size 256 --steps 8

Ours is what a job runs per step: the recipe's public ``train_step`` (keyed draws, weighted loss, clipping, AdamW,
the one host read) followed by the after-step control point (fault points, the requests folder, signals,
schedules). The minimal loop is what anyone would write in a page: uniform sigma, noise, forward, MSE against
``noise - x0``, backward, clip, AdamW. Both loops alternate within one run (so machine noise hits both alike); the
ratio of their median step times is our overhead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from peft import LoraConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONFIGS, build_transformer, describe, inputs, synchronize  # noqa: E402
from train_step import build_parser, prepare  # noqa: E402

from zimage_lora.config import DEFAULT_TARGET_REGEX  # noqa: E402
from zimage_lora.lora import network  # noqa: E402


def minimal_step_fn(model, x0, caps):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def step():
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        sigma = torch.rand(x0.shape[0], generator=g).to(x0.device)
        x_t = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        out = model(list(x_t.unsqueeze(2).unbind(0)), 1 - sigma, caps, return_dict=False)[0]
        pred = -torch.stack(out).squeeze(2)
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    device, dtype = torch.device("cpu"), torch.float32
    # ours: the recipe on a random transformer, every block recomputing (train.gradient_checkpointing) ...
    setup = build_parser().parse_args(
        ["--config", args.config, "--size", str(args.size), "--rank", str(args.rank), "--device", "cpu"]
        + ["--dtype", "fp32", "--caption", "128", "--batch", "1"]
    )
    bench = prepare(setup)
    recipe = bench.recipe

    def ours():
        batch = bench.next_batch()
        recipe.train_step(batch)
        recipe.control.after_step(batch.step)

    # ... against diffusers' own checkpointing and a peft adapter on the same targets
    plain_model = build_transformer(args.config, device, dtype)
    names = network.target_module_names(plain_model, DEFAULT_TARGET_REGEX)
    plain_model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=names))
    plain_model.enable_gradient_checkpointing()
    plain_model.train()
    x0, caps = inputs(CONFIGS[args.config], args.size, args.size, 1, 128, device, dtype)
    minimal = minimal_step_fn(plain_model, x0, caps)
    import time

    times = {"ours": [], "minimal": []}
    for _ in range(2):  # warm-up
        ours()
        minimal()
    for _ in range(args.steps):
        for name, fn in (("ours", ours), ("minimal", minimal)):
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(
        f"device: {describe(device)}; config {args.config}, {args.size}x{args.size}, rank {args.rank}, "
        f"{args.steps} alternating steps each"
    )
    print(
        f"ours (train_step + after-step control) {med['ours']:.4f} s/it, minimal diffusers+peft loop "
        f"{med['minimal']:.4f} s/it, overhead ratio {med['ours'] / med['minimal']:.3f}"
    )


if __name__ == "__main__":
    main()
