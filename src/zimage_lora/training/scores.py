"""Scores of each preview round: what the LoRA did to the pictures, as numbers on the sample step's metrics line.

- ``leak`` (every model, real ones included): for each preview prompt without the trigger word, how far this
  round's picture moved from step 0's picture of the same prompt and seed: the mean absolute difference of 64x64
  greyscale thumbnails, in [0, 1] (0 = unchanged). ``leak_prompts`` holds it per prompt index. The web UI calls it
  "change on prompts without the trigger": a character LoRA should keep it low, a style LoRA is meant to raise it.
  It is ``None`` with a ``leak_note`` when no preview prompt lacks the trigger.
- On the toy world (a model folder with ``toy_world.json``; ``docs/toyworld.md``): ``concept``, the share of the
  trigger prompts' previews that show the stripes; ``accuracy``, the share of the other previews with background,
  colour and shape right; and on the Turbo paths (8 steps, no CFG) ``turbo_drift``: step 0's accuracy (the untouched
  Turbo, since the LoRA starts at zero) minus this round's, on the same prompts and seeds.

Step 0's previews are the reference; a resumed run reads them back from the run folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

THUMB = 64


def thumbnail(image: Image.Image | Path) -> np.ndarray:
    """A 64x64 greyscale thumbnail in [0, 1]."""
    if not isinstance(image, Image.Image):
        with Image.open(image) as opened:
            return thumbnail(opened.convert("RGB"))
    small = image.convert("L").resize((THUMB, THUMB), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def change(a: np.ndarray, b: np.ndarray) -> float:
    """How far two thumbnails are apart: the mean absolute difference, in [0, 1]."""
    return float(np.abs(a - b).mean())


def has_trigger(prompt: str, trigger: str | None) -> bool:
    return bool(trigger) and re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", prompt) is not None


@dataclass
class RoundScores:
    leak: float | None = None
    leak_prompts: dict[str, float] | None = None
    leak_note: str | None = None
    concept: float | None = None
    accuracy: float | None = None
    turbo_drift: float | None = None

    def record(self) -> dict:
        """The keys the sample step's line of metrics.jsonl gets (absent scores left out)."""
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def line(self) -> str:
        """For the log: the scores in words."""
        parts = []
        if self.leak is not None:
            parts.append(f"change on prompts without the trigger {self.leak:.3f}")
        elif self.leak_note:
            parts.append(f"change on prompts without the trigger n/a ({self.leak_note})")
        for name, value in (("concept", self.concept), ("accuracy", self.accuracy), ("Turbo drift", self.turbo_drift)):
            if value is not None:
                parts.append(f"{name} {value:.2f}")
        return "; ".join(parts)


class PreviewScorer:
    """Scores the rounds of one run's previews against its step-0 round."""

    def __init__(self, prompts: list[str], trigger: str | None, toy_world: bool, distilled: bool):
        self.prompts, self.trigger = prompts, trigger
        self.plain = [i for i, p in enumerate(prompts) if not has_trigger(p, trigger)]
        self.triggered = [i for i in range(len(prompts)) if i not in self.plain]
        self.toy_world, self.distilled = toy_world, distilled
        self.reference: dict[int, np.ndarray] | None = None
        self.reference_accuracy: float | None = None

    def set_reference(self, paths: list[Path]) -> None:
        """Step 0's previews (the model before the LoRA changed anything)."""
        self.reference = {i: thumbnail(paths[i]) for i in self.plain}
        if self.toy_world:
            self.reference_accuracy = self._accuracy(paths)

    def score(self, paths: list[Path]) -> RoundScores:
        out = RoundScores()
        if not self.plain:
            out.leak_note = "every preview prompt has the trigger word; add one without it"
        elif self.reference is not None:
            out.leak_prompts = {str(i): round(change(thumbnail(paths[i]), self.reference[i]), 6) for i in self.plain}
            out.leak = round(sum(out.leak_prompts.values()) / len(out.leak_prompts), 6)
        if self.toy_world:
            out.concept = self._concept(paths)
            out.accuracy = self._accuracy(paths)
            if self.distilled and out.accuracy is not None and self.reference_accuracy is not None:
                out.turbo_drift = round(self.reference_accuracy - out.accuracy, 6)
        return out

    def _scenes(self, indices: list[int]):
        from zimage_lora.toyworld.world import parse_caption

        found = [(i, parse_caption(self.prompts[i], self.trigger)) for i in indices]
        return [(i, scene) for i, scene in found if scene is not None]

    def _images(self, paths: list[Path], scenes):
        images = []
        for i, _ in scenes:
            with Image.open(paths[i]) as opened:
                images.append(np.asarray(opened.convert("RGB")))
        return images

    def _concept(self, paths: list[Path]) -> float | None:
        from zimage_lora.toyworld.score import concept_score

        scenes = self._scenes(self.triggered)
        return round(concept_score(self._images(paths, scenes), [s for _, s in scenes]), 6) if scenes else None

    def _accuracy(self, paths: list[Path]) -> float | None:
        from zimage_lora.toyworld.score import accuracy

        scenes = self._scenes(self.plain)
        return round(accuracy(self._images(paths, scenes), [s for _, s in scenes])["all"], 6) if scenes else None
