"""The random draws of training: caption dropout, noise and noise level per sample."""

from __future__ import annotations

import random

import torch

from zimage_lora.training import flow


class SequentialDraws:
    """Draws from two seeded generators, in the order the samples are met (the state is saved for resume)."""

    def __init__(self, seed: int):
        self.noise_gen = torch.Generator("cpu").manual_seed(seed)
        self.choice_rng = random.Random(seed)

    def caption_dropped(self, step: int, index: int, rate: float) -> bool:
        return self.choice_rng.random() < rate

    def noise_and_sigma(
        self, step: int, index: int, shape, timestep_type: str, bias: str, shift: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(shape, generator=self.noise_gen)
        return noise, flow.sample_sigmas(1, timestep_type, bias, self.noise_gen, shift)

    def state_dict(self) -> dict:
        return {"noise_generator": self.noise_gen.get_state(), "choice_rng": self.choice_rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.noise_gen.set_state(state["noise_generator"])
        self.choice_rng.setstate(state["choice_rng"])
