"""Optimizers and learning-rate schedules named by ``train.optimizer`` and ``train.lr_scheduler``.

``OPTIMIZERS`` is the registry: the config's choices and the UI's help come from it, so a new optimizer is one entry
here. Nothing is imported until an optimizer is built (the job config must validate without torch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    note: str  # what it is for, in the UI's help
    build: Callable  # (params, lr, weight_decay) -> torch optimizer
    lr_is_multiplier: bool = False  # True: train.lr scales the optimizer's own step size estimate (no LR advice)


def _adamw(params, lr, weight_decay):
    import torch

    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)


def _adamw8bit(params, lr, weight_decay):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)


def _adafactor(params, lr, weight_decay):
    from transformers.optimization import Adafactor

    return Adafactor(
        params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False, warmup_init=False
    )


def _prodigy(params, lr, weight_decay):
    from prodigyopt import Prodigy

    # Prodigy estimates the step size itself; ``lr`` is a multiplier on that estimate (1.0 is its default).
    return Prodigy(params, lr=lr, weight_decay=weight_decay, safeguard_warmup=True, use_bias_correction=True)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("adamw8bit", "AdamW with its state in 8 bits: far less memory, the guide's choice", _adamw8bit),
        OptimizerSpec("adamw", "AdamW in full precision", _adamw),
        OptimizerSpec("adafactor", "Adafactor with a fixed learning rate: factored state, least memory", _adafactor),
        OptimizerSpec("prodigy", "Prodigy: finds its own step size; lr is a multiplier (start at 1.0)", _prodigy, True),
    )
}


def build_optimizer(name: str, params, lr: float, weight_decay: float):
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}")
    return OPTIMIZERS[name].build(params, lr, weight_decay)


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
    """Multiplier of the base LR at optimizer step ``i`` (0-based): linear warmup, then the schedule."""

    def factor(i: int) -> float:
        if warmup_steps and i < warmup_steps:
            return (i + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (i - warmup_steps) / span)
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown lr scheduler {kind!r}")

    return factor


def build_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lr_lambda(kind, warmup_steps, total_steps))
