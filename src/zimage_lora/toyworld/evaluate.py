"""Scoring the toy models: each loaded through the normal loader, sampled on fixed seeds at its arch's setting.

``evaluate_release`` gives, for the base (30 steps, CFG 4, shift 6), the Turbo (8 steps, no CFG, shift 3), the
Turbo with the training adapter at +1 sampled as the base is (the adapter's job: the undistilled behaviour back),
the De-Turbo (25 steps, CFG 3), and the base at Turbo's setting (what distillation buys), the share of samples with
background, colour, shape and all three right. ``generate_images`` is the same sampling for any component set
(the demo and the tests use it too).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from zimage_lora.models.arch import ARCHS, BASE, DETURBO, TURBO
from zimage_lora.models.loading import load_components
from zimage_lora.models.text import encode_prompts
from zimage_lora.models.vae import decode_latents
from zimage_lora.toyworld import score, world

EVAL_SEED = 5_000_000
CHECK_COUNT = 48  # the tests sample the first this many scenes again and hold each model to its score on them


def evaluation_scenes(count: int, seed: int = EVAL_SEED) -> list[world.Scene]:
    """The fixed scenes (their captions) models are scored on; image i uses the seed ``seed + i``."""
    return world.scenes(count, seed=seed)


@torch.no_grad()
def generate_images(comps, prompts: list[str], seeds: list[int], steps: int, guidance: float, shift: float,
                    negative: str = "", batch: int = 64) -> np.ndarray:  # fmt: skip
    """uint8 pictures (N, 128, 128, 3) of ``prompts`` with the given seeds: the batched form of the previews'
    sampler (same noise, schedule and CFG)."""
    from zimage_lora.toyworld.build import sample_latents

    tokenizer, encoder = comps.tokenizer, comps.text_encoder
    unique = sorted(set(prompts) | {negative})
    embeddings = dict(zip(unique, encode_prompts(tokenizer, encoder, unique, batch_size=64), strict=True))
    dtype = comps.transformer.dtype
    caps = [embeddings[p].to(dtype) for p in prompts]
    _, latents = sample_latents(
        comps.transformer, caps, embeddings[negative].to(dtype), seeds, steps, guidance, shift, batch=batch
    )
    images = []
    for i in range(0, len(latents), 32):
        pixels = decode_latents(comps.vae, latents[i : i + 32].to(comps.vae.dtype))
        images.append((((pixels.float() * 0.5 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1) * 255).round().byte().numpy())
    return np.concatenate(images)


def _load(folder: Path, arch: str):
    a = ARCHS[arch]
    return load_components(
        str(folder), fallback_ref=a.parts_from, scheduler_shift=a.shift if a.override_shift else None
    )


def evaluate_release(release: Path, count: int, log: Callable[[str], None] = print) -> dict:
    from zimage_lora.lora import network
    from zimage_lora.lora.io import read_lora

    scenes = evaluation_scenes(count)
    prompts = [s.caption() for s in scenes]
    seeds = [EVAL_SEED + i for i in range(count)]
    results: dict = {}
    check: dict = {}

    def run(name: str, comps, arch: str, steps=None, guidance=None) -> None:
        a = ARCHS[arch]
        steps = steps or a.sample_steps
        guidance = a.sample_guidance if guidance is None else guidance
        shift = comps.scheduler.config.shift
        images = generate_images(comps, prompts, seeds, steps, guidance, shift)
        results[name] = {"steps": steps, "guidance": guidance, "shift": shift, **score.accuracy(images, scenes)}
        check[name] = score.accuracy(images[:CHECK_COUNT], scenes[:CHECK_COUNT])
        log(f"  {name}: {results[name]}")

    base = _load(release / "base", BASE)
    run("base", base, BASE)
    turbo_arch = TURBO
    run("base_at_turbo_setting", base, BASE, steps=ARCHS[turbo_arch].sample_steps, guidance=1.0)
    turbo = _load(release / "turbo", turbo_arch)
    run("turbo", turbo, turbo_arch)
    adapter = read_lora(release / "training_adapter.safetensors", network.linear_module_names(turbo.transformer))
    network.add_training_adapter(turbo.transformer, adapter.modules, "toy training adapter")
    turbo.scheduler = base.scheduler  # the adapter makes the Turbo undistilled: sample it as the base is sampled
    run("turbo_with_adapter", turbo, BASE)
    deturbo = _load(release / "deturbo", DETURBO)
    run("deturbo", deturbo, DETURBO)
    results["count"] = count
    results["check"] = check  # on the first CHECK_COUNT scenes only, which the tests sample again
    return results
