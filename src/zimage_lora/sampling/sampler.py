"""Generation that equals ``diffusers.ZImagePipeline``: previews while training and ``generate`` share it.

The sigma schedule, the scheduler step, the initial noise (a CPU generator, float32, the pipeline's shape) and the
decode are the pipeline's. Guidance here is classic CFG as in ComfyUI and the official code:
``pred = neg + w * (pos - neg)``, with the negative pass skipped when ``w <= 1``. diffusers' pipeline takes
``w - 1`` for the same result (``pos + g * (pos - neg)``).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from zimage_lora.training.flow import velocity_from_output


@dataclass(frozen=True)
class SampleSettings:
    width: int
    height: int
    steps: int  # transformer forwards (without CFG)
    guidance: float  # classic CFG; <= 1 means none
    seed: int


def default_sigmas(steps: int) -> list[float]:
    """diffusers >= 0.39's Z-Image schedule before the shift: ``linspace(1, 1/N, N)``; N forwards exactly."""
    return torch.linspace(1.0, 1.0 / steps, steps).tolist()


def initial_noise(settings: SampleSettings, channels: int = 16) -> torch.Tensor:
    """The pipeline's starting latents for a seed: drawn on the CPU in float32, whatever the device."""
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    shape = (1, channels, 2 * (settings.height // 16), 2 * (settings.width // 16))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


@torch.no_grad()
def denoise(
    transformer,
    scheduler_config,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    settings: SampleSettings,
    device: torch.device,
    autocast=None,
) -> torch.Tensor:
    """Latents of one image (1, 16, H/8, W/8), float32."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    latents = initial_noise(settings, transformer.config.in_channels).to(device)
    scheduler.set_timesteps(sigmas=default_sigmas(settings.steps), device=device, mu=_mu(latents, scheduler))
    scheduler.set_begin_index(0)
    cfg = settings.guidance > 1.0 and negative_embeds is not None
    dtype = transformer.dtype
    caps = [prompt_embeds.to(device, dtype)] + ([negative_embeds.to(device, dtype)] if cfg else [])
    for t in scheduler.timesteps:
        time = ((1000 - t.expand(1)) / 1000).repeat(len(caps))
        x = [latents.to(dtype)[0].unsqueeze(1)] * len(caps)
        with autocast() if autocast is not None else nullcontext():
            out = transformer(x, time, caps, return_dict=False)[0]
        if cfg:
            pos, neg = out[0].float(), out[1].float()
            pred = pos + (settings.guidance - 1.0) * (pos - neg)
        else:
            pred = out[0].float()
        velocity = velocity_from_output(pred.squeeze(1).unsqueeze(0))
        latents = scheduler.step(velocity.to(torch.float32), t, latents, return_dict=False)[0]
    return latents


def _mu(latents: torch.Tensor, scheduler) -> float:
    # The pipeline passes the resolution-dependent shift ``mu``; it only matters with dynamic shifting, which
    # Z-Image's scheduler turns off. Computed the same way so a scheduler that turns it on behaves the same: this is
    # diffusers' ``calculate_shift`` (diffusers/pipelines/z_image/pipeline_z_image.py, 0.42.1), restated.
    cfg = scheduler.config
    seq = (latents.shape[2] // 2) * (latents.shape[3] // 2)
    base, top = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    lo, hi = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (hi - lo) / (top - base)
    return seq * m + (lo - m * base)
