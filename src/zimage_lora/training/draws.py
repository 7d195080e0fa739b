"""The random draws of training, keyed by (seed, step, sample index) instead of taken from a running generator.

Each draw (an example's caption dropout, its noise, its noise level) comes from a generator seeded with a hash of
the job's seed, the optimizer step, the example's position in that step's batch and what the draw is for. So a
draw does not depend on what was drawn before it: a resumed run needs no generator state, a process that trains
only part of a batch (several GPUs) draws what a single process would, and one example's noise does not change
with what else shares its batch.
"""

from __future__ import annotations

import hashlib

import torch

from zimage_lora.training import flow


def keyed_generator(seed: int, step: int, index: int, purpose: str) -> torch.Generator:
    """A CPU generator for one draw: the same key always gives the same numbers, on any machine."""
    key = hashlib.blake2b(f"{seed}/{step}/{index}/{purpose}".encode(), digest_size=8).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(key, "little") & (2**63 - 1))


class KeyedDraws:
    def __init__(self, seed: int):
        self.seed = seed

    def caption_dropped(self, step: int, index: int, rate: float) -> bool:
        if rate <= 0:
            return False
        return float(torch.rand(1, generator=keyed_generator(self.seed, step, index, "caption_dropout"))) < rate

    def flip(self, step: int, index: int, x: bool, y: bool) -> str:
        """Which flips the example gets at this step: "", "x", "y" or "xy", each axis on with chance 1/2."""
        out = ""
        for axis, on in (("x", x), ("y", y)):
            if on and float(torch.rand(1, generator=keyed_generator(self.seed, step, index, f"flip_{axis}"))) < 0.5:
                out += axis
        return out

    def tags(self, step: int, index: int) -> torch.Generator:
        """The generator of the example's caption edit at this step (tag shuffle and tag dropout)."""
        return keyed_generator(self.seed, step, index, "tags")

    def noise_and_sigma(
        self, step: int, index: int, shape, timestep_type: str, bias: str, shift: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The example's noise (float32, on the CPU) and noise level, each from its own key."""
        noise = torch.randn(shape, generator=keyed_generator(self.seed, step, index, "noise"))
        sigma = flow.sample_sigmas(1, timestep_type, bias, keyed_generator(self.seed, step, index, "sigma"), shift)
        return noise, sigma
