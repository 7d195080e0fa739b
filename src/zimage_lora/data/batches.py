"""A step's batch: the examples of one optimizer step, cut into micro-batches of one bucket each.

``StepBatch`` is what ``LoraRecipe.train_step`` takes. ``DatasetBatches`` makes them from the job's datasets: the
epoch order of ``epoch_batches`` (one bucket and one LoRA weight per batch), ``grad_accum`` batches per step, each
example's caption after caption dropout and its dataset's tag edits, its latent (flipped when drawn so) from the
latent store. The data position (epoch, batch) lives in the recipe's
``TrainState``, so a resumed run continues with the batch it would have drawn next.

With several processes (``share=(rank, world)``) a micro-batch of the whole job has ``batch_size x world`` examples
(one bucket): each process takes its part (``training/distributed.split_sizes``) and weights its loss by its share,
so the step is the single-process step of the whole batch. Examples keep their index in the whole batch, so their
random draws are those a single process would make. The data position counts whole batches: a run resumed on
another number of processes continues at the same place when ``batch_size x world`` is the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from zimage_lora.data.dataset import ImageItem, Sample, edit_tags, epoch_batches
from zimage_lora.training.distributed import split_sizes


@dataclass(frozen=True)
class Example:
    """One image of a step: its latent and caption, and its place in the step's batch."""

    index: int  # position in the step's effective batch (0 .. batch_size x grad_accum - 1): keys its random draws
    latent: object  # (16, H/8, W/8) float32 tensor
    caption: str  # as trained: the empty prompt when caption dropout chose it, else after the tag edits
    full_caption: str  # before caption dropout and tag edits (DOP's class caption is made from it)
    dataset: int = 0  # its dataset's index in the job
    flip: str = ""  # "", "x", "y" or "xy": how its image was flipped at this step
    mask: object = None  # (H/8, W/8) loss weight per latent cell, or None (data/masks.py)


@dataclass(frozen=True)
class StepBatch:
    step: int  # the optimizer step these examples train (1-based)
    micro: list[list[Example]]  # ``grad_accum`` micro-batches, each of one bucket (one size): this process's part
    # per micro-batch, this process's weight: (its examples x processes) / the whole micro-batch's examples, so that
    # the mean of the processes' gradients is the whole batch's; 0 for a stand-in example (a process left without
    # one); None: 1 each (one process)
    weights: list[float] | None = None

    @property
    def size(self) -> int:
        return sum(len(m) for m in self.micro)

    def weight(self, i: int) -> float:
        return 1.0 if self.weights is None else self.weights[i]

    def indices(self) -> list[int]:
        """The examples this process trained (their index in the whole step batch; none for a stand-in)."""
        return [e.index for i, m in enumerate(self.micro) if self.weight(i) > 0 for e in m]


class Position(Protocol):
    epoch: int
    batch: int


class DatasetBatches:
    """The job's step batches, drawn from ``samples`` in a reproducible order."""

    def __init__(
        self,
        items: list[ImageItem],
        samples: list[Sample],
        latent: Callable[[Path, tuple[int, int], str], object],
        datasets: list,
        batch_size: int,
        grad_accum: int,
        seed: int,
        draws,
        share: tuple[int, int] = (0, 1),
        masks=None,
        reg_ratio: float = 0.0,
        reg_weight: float = 1.0,
    ):
        self.items, self.samples, self.latent = items, samples, latent
        # each dataset's options (caption_dropout, the tag edits, flips, network_weight: config.DatasetSection)
        self.datasets, self.batch_size, self.grad_accum = datasets, batch_size, grad_accum
        self.seed, self.draws = seed, draws
        self.rank, self.world = share
        self.masks = masks  # data/masks.MaskStore, for the datasets with a mask_path
        self._order: dict[bool, tuple[int, list[list[int]]]] = {}  # per stream (regularisation or not): its epoch
        # regularisation datasets (is_reg) fill reg_ratio of the micro-batches from an order of their own
        self.reg_ratio, self.reg_weight = reg_ratio, reg_weight
        self.streams = {
            reg: [
                i
                for i, s in enumerate(samples)
                if bool(getattr(datasets[items[s.item].dataset], "is_reg", False)) == reg
            ]
            for reg in (False, True)
        }

    def captions(self) -> set[str]:
        return {it.caption for it in self.items}

    def next(self, position: Position, step: int) -> StepBatch:
        """This process's part of the batch of ``step``; advances ``position`` past the (whole) batches it took."""
        micro, weights, index = [], [], 0
        for j in range(self.grad_accum):
            reg = self.is_reg_batch((step - 1) * self.grad_accum + j)
            at_epoch, at_batch = ("reg_epoch", "reg_batch") if reg else ("epoch", "batch")
            epoch, batch = getattr(position, at_epoch, 0), getattr(position, at_batch, 0)
            batches = self._batches(reg, epoch)
            if batch >= len(batches):
                epoch, batch = epoch + 1, 0
                batches = self._batches(reg, epoch)
            whole = batches[batch]
            setattr(position, at_epoch, epoch)
            setattr(position, at_batch, batch + 1)
            sizes = split_sizes(len(whole), self.world)
            start = sum(sizes[: self.rank])
            mine = list(range(start, start + sizes[self.rank]))
            weight = sizes[self.rank] * self.world / len(whole)
            if not mine:  # fewer examples than processes: a stand-in at weight 0 keeps this process in the exchange
                mine = [0]
            micro.append([self._example(step, index + j, whole[j]) for j in mine])
            weights.append(weight)
            index += len(whole)
        return StepBatch(step, micro, weights if self.world > 1 else None)

    def _example(self, step: int, index: int, sample_index: int) -> Example:
        sample = self.samples[sample_index]
        item = self.items[sample.item]
        ds = self.datasets[item.dataset]
        dropped = self.draws.caption_dropped(step, index, ds.caption_dropout)
        caption = "" if dropped else item.caption
        if caption and (ds.shuffle_tokens or ds.token_dropout > 0):
            caption = edit_tags(caption, ds.keep_tokens, ds.shuffle_tokens, ds.token_dropout,
                                self.draws.tags(step, index))  # fmt: skip
        flip = self.draws.flip(step, index, ds.flip_x, ds.flip_y)
        mask = None
        if ds.mask_path is not None and self.masks is not None:
            mask = self.masks.weights(item.path, ds.mask_path, sample.bucket, flip, ds.mask_min_value)
        latent = self.latent(item.path, sample.bucket, flip)
        return Example(index, latent, caption, item.caption, item.dataset, flip, mask)

    def network_weight(self, micro: list[Example]) -> float:
        """The LoRA multiplier of a micro-batch (its examples share one: batches form within a weight)."""
        return self.datasets[micro[0].dataset].network_weight

    def is_reg_batch(self, n: int) -> bool:
        """Whether the job's micro-batch number ``n`` (0-based, counted over the whole run) is a regularisation one:
        spread evenly, ``reg_ratio`` of them (exactly, up to one, over any stretch of the run)."""
        if not self.streams[True] or self.reg_ratio <= 0:
            return False
        return math.floor((n + 1) * self.reg_ratio + 1e-9) > math.floor(n * self.reg_ratio + 1e-9)

    def loss_weight(self, micro: list[Example]) -> float:
        """``reg_weight`` for a regularisation micro-batch, else 1."""
        return self.reg_weight if getattr(self.datasets[micro[0].dataset], "is_reg", False) else 1.0

    def _batches(self, reg: bool, epoch: int) -> list[list[int]]:
        """One epoch's batches of a stream (the regularisation samples or the others), as sample indices."""
        if reg not in self._order or self._order[reg][0] != epoch:
            subset = self.streams[reg]
            samples = [self.samples[i] for i in subset]
            groups = [(s.bucket, self.datasets[self.items[s.item].dataset].network_weight) for s in samples]
            seed = f"{self.seed}:reg" if reg else self.seed
            order = epoch_batches(samples, self.batch_size * self.world, seed, epoch, groups)
            self._order[reg] = (epoch, [[subset[k] for k in batch] for batch in order])
        return self._order[reg][1]
