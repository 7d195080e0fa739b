"""Where a training step's time goes: the top kernels of a few profiled steps (torch.profiler).

    python benchmarks/profile_step.py --config full --size 1024 --device cuda   # an H100

Takes the same options as train_step.py and prints a table sorted by device time (CPU time on a CPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402
from common import synchronize  # noqa: E402


def main() -> None:
    parser = train_step.build_parser()
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    bench = train_step.prepare(args)
    device = bench.device
    step = train_step.our_step_fn(bench)
    for _ in range(args.warmup):
        step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        synchronize(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
