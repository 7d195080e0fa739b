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


def forward_flops(config: dict, width: int, height: int, caption_tokens: int = 128, attention: bool = True) -> float:
    dim = config["dim"]
    hidden = int(dim / 3 * 8)
    patch = config.get("all_patch_size", [2])[0]
    image = _pad32((width // 8 // patch) * (height // 8 // patch))
    caption = _pad32(caption_tokens)
    in_features = patch * patch * config.get("in_channels", 16)

    def block(tokens: int) -> float:
        linear = 2 * tokens * (4 * dim * dim + 3 * dim * hidden)  # q, k, v, out; w1, w3, w2
        scores = 4 * tokens * tokens * dim if attention else 0  # QK^T and AV
        return linear + scores

    refiners = config["n_refiner_layers"] * (block(image) + block(caption))
    main = config["n_layers"] * block(image + caption)
    embed = 2 * image * in_features * dim + 2 * caption * config["cap_feat_dim"] * dim
    final = 2 * image * dim * in_features
    return refiners + main + embed + final


def train_step_flops(config: dict, width: int, height: int, caption_tokens: int = 128, batch: int = 1) -> float:
    return 2 * batch * forward_flops(config, width, height, caption_tokens)
