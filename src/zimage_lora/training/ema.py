"""Exponential moving average of the LoRA weights (``train.ema``): used for saved files and previews.

The decay warms up as ``min(decay, (1 + t) / (10 + t))`` after ``t`` updates, so a short run is not stuck near the
LoRA's initial (zero) update; past a few hundred steps it is the configured decay.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def ema_decay(decay: float, updates: int) -> float:
    return min(decay, (1 + updates) / (10 + updates))


class LoraEMA:
    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.params, self.decay, self.updates = params, decay, 0
        self.shadow = {name: p.detach().clone().float() for name, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        d = ema_decay(self.decay, self.updates)
        for name, p in self.params.items():
            self.shadow[name].mul_(d).add_(p.detach().float(), alpha=1 - d)
        self.updates += 1

    @contextmanager
    def swapped_in(self):
        """The model carries the EMA weights inside the block, its own weights again after it."""
        raw = {name: p.detach().clone() for name, p in self.params.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(raw[name])

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
