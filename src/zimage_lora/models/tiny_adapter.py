"""A random training-adapter file for a (tiny) model: the real adapter's format, for tests and the demo."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import ZImageTransformer2DModel
from torch import nn

from zimage_lora.errors import UserError
from zimage_lora.lora.io import LoraWeights, save_lora

ADAPTER_TARGETS = (
    r"^(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.(w1|w2|w3))$"
)


def write_random_adapter(model_dir: Path, out: Path, rank: int = 4, seed: int = 0, std: float = 0.05) -> Path:
    """Write a LoRA with non-zero A and B (alpha = rank) on the attention and feed-forward layers."""
    config_dir = Path(model_dir) / "transformer"
    if not (config_dir / "config.json").is_file():
        raise UserError(f"{model_dir} has no transformer/config.json; pass a diffusers-layout model folder")
    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(ZImageTransformer2DModel.load_config(config_dir))
    generator = torch.Generator("cpu").manual_seed(seed)
    modules = {}
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear) and re.fullmatch(ADAPTER_TARGETS, name):
            down = torch.randn(rank, layer.in_features, generator=generator) / layer.in_features**0.5
            up = torch.randn(layer.out_features, rank, generator=generator) * std
            modules[name] = LoraWeights(down=down, up=up, alpha=float(rank))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_lora(out, modules, "fp32", {"zimage_lora.kind": "random training adapter (tests)", "rank": str(rank)})
    return out
