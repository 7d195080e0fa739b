"""Optimizers and learning-rate schedules named by ``train.optimizer`` and ``train.lr_scheduler``."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False, warmup_init=False
        )
    if name == "prodigy":
        from prodigyopt import Prodigy

        # Prodigy estimates the step size itself; ``lr`` is a multiplier on that estimate (1.0 is its default).
        return Prodigy(params, lr=lr, weight_decay=weight_decay, safeguard_warmup=True, use_bias_correction=True)
    raise ValueError(f"unknown optimizer {name!r}")


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


def build_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lr_lambda(kind, warmup_steps, total_steps))
