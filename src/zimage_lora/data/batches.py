"""A step's batch: the examples of one optimizer step, cut into micro-batches of one bucket each.

``StepBatch`` is what ``LoraRecipe.train_step`` takes. ``DatasetBatches`` makes them from the job's datasets: the
epoch order of ``epoch_batches`` (one bucket per batch), ``grad_accum`` batches per step, each example's caption
after caption dropout, its latent from the latent store. The data position (epoch, batch) lives in the recipe's
``TrainState``, so a resumed run continues with the batch it would have drawn next.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from zimage_lora.data.dataset import ImageItem, Sample, epoch_batches


@dataclass(frozen=True)
class Example:
    """One image of a step: its latent and caption, and its place in the step's batch."""

    index: int  # position in the step's effective batch (0 .. batch_size x grad_accum - 1): keys its random draws
    latent: object  # (16, H/8, W/8) float32 tensor
    caption: str  # as trained: the empty prompt when caption dropout chose it
    full_caption: str  # before caption dropout (DOP's class caption is made from it)


@dataclass(frozen=True)
class StepBatch:
    step: int  # the optimizer step these examples train (1-based)
    micro: list[list[Example]]  # ``grad_accum`` micro-batches, each of one bucket (one size)

    @property
    def size(self) -> int:
        return sum(len(m) for m in self.micro)


class Position(Protocol):
    epoch: int
    batch: int


class DatasetBatches:
    """The job's step batches, drawn from ``samples`` in a reproducible order."""

    def __init__(
        self,
        items: list[ImageItem],
        samples: list[Sample],
        latent: Callable[[Path, tuple[int, int]], object],
        caption_dropout: list[float],
        batch_size: int,
        grad_accum: int,
        seed: int,
        draws,
    ):
        self.items, self.samples, self.latent = items, samples, latent
        self.caption_dropout, self.batch_size, self.grad_accum = caption_dropout, batch_size, grad_accum
        self.seed, self.draws = seed, draws
        self._order: tuple[int, list[list[int]]] | None = None  # (epoch, its batches)

    def captions(self) -> set[str]:
        return {it.caption for it in self.items}

    def next(self, position: Position, step: int) -> StepBatch:
        """The batch of ``step``; advances ``position`` past the batches it took."""
        micro, index = [], 0
        for _ in range(self.grad_accum):
            batches = self._batches(position.epoch)
            if position.batch >= len(batches):
                position.epoch += 1
                position.batch = 0
                batches = self._batches(position.epoch)
            examples = []
            for i in batches[position.batch]:
                sample = self.samples[i]
                item = self.items[sample.item]
                dropped = self.draws.caption_dropped(step, index, self.caption_dropout[item.dataset])
                caption = "" if dropped else item.caption
                examples.append(Example(index, self.latent(item.path, sample.bucket), caption, item.caption))
                index += 1
            position.batch += 1
            micro.append(examples)
        return StepBatch(step, micro)

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_batches(self.samples, self.batch_size, self.seed, epoch))
        return self._order[1]
