"""Activation memory per transformer block: what skipping the recompute (``train.checkpoint_fraction``) costs.

    python benchmarks/activations.py --config full --size 1024 --layers 2     # full width, two main blocks
    python benchmarks/activations.py --config cpu --size 256                  # the scaled config, every block

It runs one training forward (our LoRA, default targets, rank 16, under autocast as the recipe runs it) with
gradient checkpointing off and counts, per block, the bytes autograd keeps for the backward: every saved tensor's
storage once, attributed to the block that saved it first, leaving out the model's own weights. A block that
recomputes keeps only its input instead, so "beyond its input" is what turning its recompute off adds to the peak.
Every main block after the first holds the same, so ``--layers 2`` measures the full-width model with two main
blocks and one refiner of each kind and scales to the config's real depth.

What is counted is exact for the device it runs on. Across devices the kernels differ in what they save (attention
saves its output and log-sum-exp on both CPU and CUDA; autocast's float32 op lists differ a little), so a CPU
figure for a CUDA card is an estimate, checked against the card's own peak memory when one is at hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONFIGS, describe  # noqa: E402
from train_step import build_parser, our_step_fn, prepare  # noqa: E402

from zimage_lora.models.checkpointing import main_blocks, spread_indices  # noqa: E402


class SavedBytes:
    """Saved-tensor hooks plus block hooks: bytes each block leaves for the backward, and its input's bytes."""

    def __init__(self, model: torch.nn.Module):
        self.weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.blocks = [*model.noise_refiner, *model.context_refiner, *main_blocks(model)]
        self.held = [0] * len(self.blocks)
        self.input_ptr = [0] * len(self.blocks)
        self.input_bytes = [0] * len(self.blocks)
        self.outside = 0
        self.seen: dict[int, int] = {}
        self.current: int | None = None
        self.handles = []
        for index, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(self._enter(index)))
            self.handles.append(block.register_forward_hook(self._leave))

    def _enter(self, index: int):
        def hook(module, args):
            self.current = index
            storage = args[0].untyped_storage()
            self.input_ptr[index], self.input_bytes[index] = storage.data_ptr(), storage.nbytes()

        return hook

    def _leave(self, module, args, output):
        self.current = None

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.weights and ptr not in self.seen:
            self.seen[ptr] = self.current if self.current is not None else -1
            if self.current is None:
                self.outside += storage.nbytes()
            else:
                self.held[self.current] += storage.nbytes()
        return tensor

    def beyond_input(self, index: int) -> int:
        """What block ``index`` adds to the peak when it does not recompute (a recomputing block keeps its input)."""
        kept_input = self.seen.get(self.input_ptr[index]) == index
        return self.held[index] - (self.input_bytes[index] if kept_input else 0)


def main() -> None:
    parser = build_parser()
    parser.description = __doc__
    parser.add_argument("--layers", type=int, default=0, help="build this many main blocks (2 or more), 1 refiner each")
    parser.set_defaults(dtype="bf16", checkpointing=False, steps=1, warmup=0)
    args = parser.parse_args()
    if args.checkpointing or args.quant != "none" or args.offload:
        parser.error("activations are counted without checkpointing, quantization or offloading")
    config = dict(CONFIGS[args.config])
    if args.layers:
        config.update(n_layers=args.layers, n_refiner_layers=1)
    bench = prepare(args, config)  # the recipe's model: our LoRA, compiled blocks with --compile
    device, model = bench.device, bench.model
    counter = SavedBytes(model)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda tensor: tensor):
        our_step_fn(bench)()  # one real step: what its forward saved is what its backward used

    n_ref, n_main = config["n_refiner_layers"], config["n_layers"]
    print(
        f"device: {describe(device)}; config {args.config} (built with {n_main} main blocks, {n_ref} refiner each), "
        f"{args.size}x{args.size}, caption {args.caption} tokens, {args.dtype}, rank {args.rank}, "
        f"compile {args.compile}"
    )
    # the first main block's input needs no gradient (nothing trainable runs before it), so it keeps less than the
    # others; the last built main block stands for the rest
    kinds = {"noise refiner": 0, "context refiner": n_ref, "first main block": 2 * n_ref, "main block": -1}
    for kind, index in kinds.items():
        held, beyond, given = counter.held[index], counter.beyond_input(index), counter.input_bytes[index]
        print(
            f"{kind}: holds {held / 2**20:.1f} MiB for the backward, "
            f"{beyond / 2**20:.1f} MiB beyond its input ({given / 2**20:.1f} MiB)"
        )
    print(f"outside the blocks: {counter.outside / 2**20:.1f} MiB")
    depth = CONFIGS[args.config]["n_layers"]
    per_block = [counter.beyond_input(2 * n_ref)] + [counter.beyond_input(-1)] * (depth - 1)
    print(f"the config's {depth} main blocks, more than with every one recomputing (checkpoint_fraction 1):")
    for fraction in (0.75, 0.5, 0.25, 0.0):
        recomputed = set(spread_indices(depth, fraction)) if fraction else set()
        extra = sum(b for i, b in enumerate(per_block) if i not in recomputed)
        label = f"checkpoint_fraction {fraction:g}" if fraction else "gradient_checkpointing off"
        print(f"  {label}: {depth - len(recomputed)} blocks keep activations, +{extra / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
