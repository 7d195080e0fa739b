"""The demo on the toy world: teach the toy Turbo (with the toy training adapter) a texture it has never drawn.

The concept is white stripes across the shape, called up by the trigger word ``zst``. The dataset holds striped
shapes captioned with the trigger ("a zst red circle on a blue background") and as many plain ones with their
ordinary captions, so the LoRA learns what the trigger adds and leaves the rest of the world alone. Before and
after training, the toy Turbo draws the same prompts with and without the trigger (8 steps, no CFG, as Turbo runs)
and the scorer counts the striped pictures: the concept score on trigger prompts, the leak on the others, and the
attribute accuracy of the pictures without the trigger (is the rest of the model intact?).
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from zimage_lora.toyworld import score, world

TRIGGER = "zst"
SHIPPED = "weights"  # the package folder that holds the released toy models


def shipped_models() -> Path:
    """Where the package keeps the toy models: ``turbo/``, ``base/``, ``deturbo/``, ``training_adapter.safetensors``."""
    from zimage_lora.errors import UserError

    folder = Path(str(resources.files("zimage_lora.toyworld") / SHIPPED))
    if not (folder / "turbo" / "model_index.json").is_file():
        raise UserError(
            f"the toy models are missing from {folder}; reinstall zimage-lora, or build them with "
            "`zimage-lora toy-world build OUT`"
        )
    return folder


def copy_models(target: Path, source: Path | None = None) -> Path:
    """The toy models in ``target`` (a copy, so a job folder is complete on its own)."""
    source = source or shipped_models()
    if not (target / "turbo" / "model_index.json").is_file():
        shutil.copytree(source, target, dirs_exist_ok=True)
    return target


def write_dataset(folder: Path, striped: int = 24, plain: int = 24, seed: int = 0) -> Path:
    """PNGs with .txt captions: ``striped`` shapes with the trigger, ``plain`` ones without."""
    folder.mkdir(parents=True, exist_ok=True)
    scenes = world.scenes(striped, seed=seed, stripes=1.0) + world.scenes(plain, seed=seed + 1)
    for index, scene in enumerate(scenes):
        name = f"{'striped' if scene.stripes else 'plain'}_{index:03d}"
        Image.fromarray(world.render(scene)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(scene.caption(TRIGGER if scene.stripes else None) + "\n")
    return folder


def probe_scenes(count: int, seed: int = 4_000_000) -> list[world.Scene]:
    """The prompts the demo scores, the same with and without the trigger."""
    return world.scenes(count, seed=seed)


def concept_report(comps, count: int = 16, seed: int = 4_000_000, steps: int = 8, guidance: float = 1.0) -> dict:
    """Concept score on trigger prompts, leak on the same prompts without it, attribute accuracy without it."""
    from zimage_lora.toyworld.evaluate import generate_images

    scenes = probe_scenes(count, seed)
    seeds = [seed + i for i in range(count)]
    shift = comps.scheduler.config.shift
    with_trigger = generate_images(comps, [s.caption(TRIGGER) for s in scenes], seeds, steps, guidance, shift)
    without = generate_images(comps, [s.caption() for s in scenes], seeds, steps, guidance, shift)
    return {
        "concept_with_trigger": score.concept_score(with_trigger, scenes),
        "concept_without_trigger": score.concept_score(without, scenes),
        "accuracy_without_trigger": score.accuracy(without, scenes)["all"],
        "images": (with_trigger, without),
    }


def load_turbo(cfg, lora: Path | None = None):
    """The job's toy Turbo as inference runs it (no adapter), with ``lora`` at weight 1 when given."""
    from zimage_lora.lora import network
    from zimage_lora.lora.io import read_lora
    from zimage_lora.models.loading import load_components

    comps = load_components(cfg.model.name_or_path)
    if lora is not None:
        modules = read_lora(lora, network.linear_module_names(comps.transformer)).modules
        network.add_frozen_lora(comps.transformer, modules, "demo")
        comps.transformer.set_adapters(["demo"], [1.0])
    return comps


def sheet(rows: list[np.ndarray], path: Path) -> Path:
    """A grid of pictures: one row per array of (N, 128, 128, 3)."""
    grid = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    Image.fromarray(grid).save(path)
    return path


def summary_line(before: dict, after: dict) -> str:
    keys = ("concept_with_trigger", "concept_without_trigger", "accuracy_without_trigger")
    return json.dumps({k: [round(before[k], 3), round(after[k], 3)] for k in keys})
