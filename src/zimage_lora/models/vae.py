"""Pixels <-> Z-Image latents, with the VAE's shift and scale, and images <-> tensors.

The FLUX VAE's latents are normalised as ``(z - shift_factor) * scaling_factor`` (0.1159 and 0.3611 for Z-Image);
both factors are read from ``vae.config`` so the tiny test VAE and the real one go through the same code. The image
helpers round exactly like ``VaeImageProcessor.postprocess(output_type="pil")``, so an image decoded here is
byte-identical to the pipeline's.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image


def _factors(vae: AutoencoderKL) -> tuple[float, float]:
    shift = vae.config.shift_factor
    return float(vae.config.scaling_factor), float(shift) if shift is not None else 0.0


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` pixels in [-1, 1] -> ``(B, 16, H/8, W/8)`` normalised latents (the distribution's mode)."""
    scaling, shift = _factors(vae)
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    mode = vae.encode(pixels).latent_dist.mode()
    return (mode - shift) * scaling


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> ``(B, 3, H, W)`` pixels clamped to [-1, 1], in the VAE's dtype."""
    scaling, shift = _factors(vae)
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    return vae.decode(latents / scaling + shift, return_dict=False)[0].clamp(-1, 1)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An image -> ``(3, H, W)`` float32 in [-1, 1] (RGB; alpha and palettes are converted away)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() * 2.0 - 1.0


def tensor_to_pil(pixels: torch.Tensor) -> Image.Image | list[Image.Image]:
    """``(3, H, W)`` in [-1, 1] -> an RGB image; ``(B, 3, H, W)`` -> a list of them; rounded as diffusers rounds."""
    if pixels.ndim == 4:
        return [tensor_to_pil(image) for image in pixels]
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) or (B, 3, H, W) tensor, got shape {tuple(pixels.shape)}")
    unit = (pixels * 0.5 + 0.5).clamp(0, 1)  # in the input dtype, as VaeImageProcessor.denormalize
    array = (unit.detach().cpu().permute(1, 2, 0).float() * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array)
