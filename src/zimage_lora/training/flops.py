"""Model FLOPs of Z-Image training and inference, defined once (benchmarks report utilisation against it).

Counted: the forward pass's matmuls (every Linear of the blocks, embedders and final layer; 2 FLOPs per
multiply-add) and attention (QK^T and AV), for the noise refiner on the image tokens, the context refiner on the
caption tokens and the main layers on both. A LoRA training step is counted as that forward plus the input-gradient
backward, which costs the same again: ``2 x forward``. Base-weight gradients are not computed in LoRA training and
gradient-checkpointing recompute is not counted (it is work the hardware does, not work the model needs). LoRA's own
matmuls are left out (under 1% at rank 16). Sequences are padded to multiples of 32 as the model pads them.
"""

from __future__ import annotations

import math


def _pad32(n: int) -> int:
    return int(math.ceil(n / 32) * 32)


def _tokens(config: dict, width: int, height: int, caption_tokens: int) -> tuple[int, int]:
    patch = config.get("all_patch_size", [2])[0]
    return _pad32((width // 8 // patch) * (height // 8 // patch)), _pad32(caption_tokens)


def block_forward_flops(
    config: dict, width: int, height: int, caption_tokens: int = 128, attention: bool = True
) -> list[float]:
    """Forward FLOPs of each transformer block in the order they run: noise refiners (image tokens), context
    refiners (caption tokens), main layers (both)."""
    dim = config["dim"]
    hidden = int(dim / 3 * 8)
    image, caption = _tokens(config, width, height, caption_tokens)

    def block(tokens: int) -> float:
        linear = 2 * tokens * (4 * dim * dim + 3 * dim * hidden)  # q, k, v, out; w1, w3, w2
        scores = 4 * tokens * tokens * dim if attention else 0  # QK^T and AV
        return linear + scores

    refiners = config["n_refiner_layers"]
    return [block(image)] * refiners + [block(caption)] * refiners + [block(image + caption)] * config["n_layers"]


def forward_flops(config: dict, width: int, height: int, caption_tokens: int = 128, attention: bool = True) -> float:
    dim = config["dim"]
    image, caption = _tokens(config, width, height, caption_tokens)
    in_features = config.get("all_patch_size", [2])[0] ** 2 * config.get("in_channels", 16)
    embed = 2 * image * in_features * dim + 2 * caption * config["cap_feat_dim"] * dim
    final = 2 * image * dim * in_features
    return sum(block_forward_flops(config, width, height, caption_tokens, attention)) + embed + final


def train_step_flops(config: dict, width: int, height: int, caption_tokens: int = 128, batch: int = 1) -> float:
    return 2 * batch * forward_flops(config, width, height, caption_tokens)


def recompute_flops(
    config: dict, width: int, height: int, recomputed: list[int], caption_tokens: int = 128, batch: int = 1
) -> float:
    """What gradient checkpointing adds on top of the model FLOPs: the forward of each recomputed main block
    (indices into ``transformer.layers``). The hardware does ``train_step_flops + recompute_flops``. The refiners
    recompute nothing with the default targets (no gradient flows through them)."""
    main = block_forward_flops(config, width, height, caption_tokens)[2 * config["n_refiner_layers"] :]
    return batch * sum(main[i] for i in recomputed)
