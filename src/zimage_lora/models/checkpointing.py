"""``train.gradient_checkpointing`` and ``train.checkpoint_fraction``: which transformer blocks recompute.

Gradient checkpointing keeps only each block's input from the forward and runs the block's forward again in the
backward. In LoRA training the base weights get no gradient, so the backward costs about one forward: recomputing
every block makes the step half as long again (three forwards' worth of matmuls instead of two). A card with memory
to spare can skip the recompute for some blocks: ``checkpoint_fraction = f`` recomputes ``ceil(f * 30)`` of the 30
main blocks (``transformer.layers``), spread evenly, and the others keep their activations for the backward. ``1`` is
the least memory, lower is faster; the results are the same. The refiners always recompute: with the default
targets nothing in them needs a gradient, so they hold nothing and the recompute never runs.
``benchmarks/train_step.py --checkpoint-fraction`` measures the time, ``benchmarks/activations.py`` the bytes.

The switch is diffusers' own: the transformer calls ``_gradient_checkpointing_func(block, *args)`` for each block
while checkpointing is on; ours recomputes the chosen blocks (non-reentrant ``torch.utils.checkpoint``) and calls the
others directly. The block's own ``__call__`` runs either way, so offload hooks and compiled blocks see the same calls.
"""

from __future__ import annotations

import math

from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

_RECOMPUTES = "_zimage_lora_recomputes"


def spread_indices(n: int, fraction: float) -> list[int]:
    """``ceil(fraction * n)`` of ``range(n)``, spread evenly (the first one included)."""
    count = min(n, math.ceil(fraction * n - 1e-9))
    return sorted({int(j * n / count) for j in range(count)}) if count > 0 else []


def main_blocks(model: nn.Module) -> list[nn.Module]:
    """The 30 repeated main blocks, in the order they run (the refiners excluded)."""
    return [m for m in model.layers if isinstance(m, ZImageTransformerBlock)]


def _run(block: nn.Module, *args):
    if getattr(block, _RECOMPUTES, True):
        return checkpoint(block.__call__, *args, use_reentrant=False)
    return block(*args)


def enable_checkpointing(model: nn.Module, fraction: float = 1.0) -> list[int]:
    """Turn gradient checkpointing on, with ``fraction`` of the main blocks recomputing; returns their indices."""
    if not 0 < fraction <= 1:
        raise ValueError(f"checkpoint fraction must be in (0, 1], got {fraction}")
    blocks = main_blocks(model)
    chosen = spread_indices(len(blocks), fraction)
    for index, block in enumerate(blocks):
        setattr(block, _RECOMPUTES, index in chosen)
    model.enable_gradient_checkpointing(_run)
    return chosen


def recomputes(model: nn.Module, block: nn.Module) -> bool:
    """Whether ``block`` runs its forward again in the backward (False whenever checkpointing is off)."""
    return bool(getattr(model, "gradient_checkpointing", False)) and getattr(block, _RECOMPUTES, True)
