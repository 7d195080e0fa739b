"""Validation loss (``train.validation``): the flow loss on fixed images, at fixed noise levels, with fixed noise.

The images are the listed held-out files (captioned like dataset images: sidecar or the first dataset's default
caption) or, with none listed, up to four training images. Each is used at the first dataset's first resolution, in
its nearest bucket. Noise is drawn once per (image, sigma) from a seeded generator, so two evaluations of the same
weights give the same number, and a change between checkpoints is the LoRA's doing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from zimage_lora.data.dataset import image_size, nearest_bucket, read_caption
from zimage_lora.training import flow

MAX_TRAINING_IMAGES = 4


@dataclass(frozen=True)
class ValidationImage:
    path: Path
    caption: str
    bucket: tuple[int, int]


def validation_images(cfg, items) -> list[ValidationImage]:
    ds = cfg.datasets[0]
    resolution = ds.resolutions[0]
    if cfg.train.validation.images:
        chosen = [
            (Path(p), read_caption(Path(p), ds.caption_ext, ds.default_caption, cfg.job.trigger_word))
            for p in cfg.train.validation.images
        ]
    else:
        seen, chosen = set(), []
        for it in items:
            if it.path not in seen and len(chosen) < MAX_TRAINING_IMAGES:
                seen.add(it.path)
                chosen.append((it.path, it.caption))
    return [ValidationImage(path, caption, nearest_bucket(*image_size(path), resolution)) for path, caption in chosen]


class Validator:
    def __init__(self, images: list[ValidationImage], sigmas: list[float], seed: int, latents, text, device, dtype):
        self.images, self.sigmas, self.latents, self.text = images, sigmas, latents, text
        self.device, self.dtype = device, dtype
        self.noise = {}
        for i, image in enumerate(images):
            generator = torch.Generator("cpu").manual_seed(seed * 1_000_003 + i)
            shape = (16, image.bucket[1] // 8, image.bucket[0] // 8)
            self.noise[i] = [torch.randn(shape, generator=generator) for _ in sigmas]

    @torch.no_grad()
    def __call__(self, model, autocast) -> float:
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        try:
            for i, image in enumerate(self.images):
                x0 = self.latents.get(image.path, image.bucket).to(self.device)[None]
                cap = self.text([image.caption])[0].to(self.device, self.dtype)
                for sigma, noise in zip(self.sigmas, self.noise[i], strict=True):
                    s = torch.tensor([sigma], device=self.device)
                    noise = noise.to(self.device)[None]
                    x_t = flow.noisy_latents(x0, noise, s)
                    with autocast():
                        out = model([x_t.to(self.dtype)[0].unsqueeze(1)], flow.model_time(s), [cap], return_dict=False)
                    loss = flow.flow_loss([o.squeeze(1) for o in out[0]], x0, noise, torch.ones(1, device=self.device))
                    total += float(loss)
                    count += 1
        finally:
            model.train(was_training)
        return total / count
