"""What recompute costs in time: training steps with every, half and no main block recomputing, in one run.

    python benchmarks/recompute.py --config cpu --size 512 --steps 6
    python benchmarks/recompute.py --config full --size 1024 --device cuda --dtype bf16 --compile

One model; the settings take turns step by step (``train.checkpoint_fraction`` 1 and 0.5, then gradient
checkpointing off), so a machine whose speed drifts affects them alike. Prints the median s/it of each, its ratio to
full recompute and what the FLOP definition predicts for that ratio (model plus recompute FLOPs).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONFIGS, describe, synchronize  # noqa: E402
from train_step import build_parser, our_step_fn, prepare  # noqa: E402

from zimage_lora.models.checkpointing import enable_checkpointing  # noqa: E402
from zimage_lora.training.flops import recompute_flops, train_step_flops  # noqa: E402

SETTINGS = (1.0, 0.5, 0.0)  # 0: checkpointing off


def main() -> None:
    parser = build_parser()
    parser.description = __doc__
    args = parser.parse_args()
    bench = prepare(args)
    device, model = bench.device, bench.model
    step = our_step_fn(bench)
    recomputed = {}

    def use(fraction: float) -> None:
        if fraction:
            recomputed[fraction] = enable_checkpointing(model, fraction)
        else:
            model.disable_gradient_checkpointing()
            recomputed[fraction] = []

    times = {f: [] for f in SETTINGS}
    for round_ in range(args.warmup + args.steps):
        for fraction in SETTINGS:
            use(fraction)
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            if round_ >= args.warmup:
                times[fraction].append(time.perf_counter() - start)
    config = CONFIGS[args.config]
    model_flops = train_step_flops(config, args.size, args.size, args.caption, args.batch)
    print(f"device: {describe(device)}; config {args.config}, {args.size}x{args.size}, {args.dtype}, "
          f"compile {args.compile}, {args.steps} timed rounds after {args.warmup}")  # fmt: skip
    median = {f: sorted(t)[len(t) // 2] for f, t in times.items()}
    full = recompute_flops(config, args.size, args.size, recomputed[1.0], args.caption, args.batch)
    for fraction in SETTINGS:
        extra = recompute_flops(config, args.size, args.size, recomputed[fraction], args.caption, args.batch)
        predicted = (model_flops + extra) / (model_flops + full)
        label = f"checkpoint_fraction {fraction:g}" if fraction else "checkpointing off"
        print(
            f"{label}: {median[fraction]:.3f} s/it, {median[fraction] / median[1.0]:.3f} of full recompute "
            f"(FLOPs predict {predicted:.3f})"
        )


if __name__ == "__main__":
    main()
