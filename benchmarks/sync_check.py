"""Host synchronisations in one training step on CUDA, as torch's sync debug mode sees them.

    python benchmarks/sync_check.py --quant float8 --offload 0.5     # on a CUDA machine

Takes train_step.py's options (default here: the scaled ``cpu`` config at 256x256, bf16, on CUDA). The recipe's
step reads its logged numbers (loss, grad norm) in one transfer after the step; the step itself should make none.
The debug mode is a prototype in torch and does not catch every synchronising operation.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402


def main() -> None:
    parser = train_step.build_parser()
    parser.set_defaults(device="cuda", dtype="bf16")
    args = parser.parse_args()
    bench = train_step.prepare(args)
    device = bench.device
    step = train_step.our_step_fn(bench)
    step()  # warm-up: first-use allocations and lazy initialisation
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower() and "prototype" not in str(w.message)]
    print(f"{len(syncs)} synchronizing calls in one step (quant {args.quant}, offload {args.offload:g})")
    for w in syncs:
        print(f"  {w.filename}:{w.lineno}: {str(w.message).splitlines()[0][:160]}")


if __name__ == "__main__":
    main()
