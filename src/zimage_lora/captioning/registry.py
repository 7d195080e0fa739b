"""The captioning models zimage-lora knows, and what the default costs to download and to hold (computed, no download).

Each entry names a hub repo, its licence, its family (the transformers class and the way it is prompted) and the
revision read from the hub. No machine of this project reaches the hub, so every revision is ``main`` until one can
be pinned to a commit (docs/captioning.md says so). ``--model`` also takes any local folder or hub id of a known
family: the entries are the ones documented and offered, not a whitelist.

The Qwen3-VL configurations below are the published ``config.json`` files of those repos (their ``text_config`` and
``vision_config``). ``parameter_counts`` builds the real class from one on the meta device (no weights) and counts
by part; ``weight_bytes`` turns that into bytes in bf16 or as ``--quantize`` stores it (models/quant.py's formats);
``kv_cache_bytes_per_token`` is what generation keeps per token of context. ``python -m
zimage_lora.captioning.registry`` prints the table of docs/captioning.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class CaptionerModel:
    name: str  # the short name --model accepts
    hub_id: str
    revision: str
    licence: str
    family: str  # a key of captioning.captioner.FAMILIES
    prompt_style: str  # "instruction": follows a plain-text instruction; "task": Florence-2's fixed task tokens
    about: str
    config: dict | None = None  # the published config.json, where the memory estimate needs it

    @property
    def ref(self) -> str:
        return f"{self.hub_id}@{self.revision}"


# Qwen/Qwen3-VL-8B-Instruct, config.json
QWEN3_VL_8B = {
    "model_type": "qwen3_vl",
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
    "text_config": {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 12288,
        "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text",
        "num_attention_heads": 32,
        "num_hidden_layers": 36,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000,
        "vocab_size": 151936,
    },
    "vision_config": {
        "deepstack_visual_indexes": [8, 16, 24],
        "depth": 27,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": 4304,
        "model_type": "qwen3_vl",
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": 4096,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}

# Qwen/Qwen3-VL-4B-Instruct and Qwen/Qwen3-VL-2B-Instruct, config.json: the same layout, smaller; both tie the
# output layer to the token embedding.
_SMALL_VISION = {
    **QWEN3_VL_8B["vision_config"],
    "deepstack_visual_indexes": [5, 11, 17],
    "depth": 24,
    "hidden_size": 1024,
    "intermediate_size": 4096,
}
QWEN3_VL_4B = {
    **QWEN3_VL_8B,
    "tie_word_embeddings": True,
    "text_config": {**QWEN3_VL_8B["text_config"], "hidden_size": 2560, "intermediate_size": 9728,
                    "tie_word_embeddings": True},
    "vision_config": {**_SMALL_VISION, "out_hidden_size": 2560},
}  # fmt: skip
QWEN3_VL_2B = {
    **QWEN3_VL_8B,
    "tie_word_embeddings": True,
    "text_config": {**QWEN3_VL_8B["text_config"], "hidden_size": 2048, "intermediate_size": 6144,
                    "num_hidden_layers": 28, "num_attention_heads": 16, "tie_word_embeddings": True},
    "vision_config": {**_SMALL_VISION, "out_hidden_size": 2048},
}  # fmt: skip

MODELS = {
    m.name: m
    for m in (
        CaptionerModel(
            "qwen3-vl-8b", "Qwen/Qwen3-VL-8B-Instruct", "main", "Apache-2.0", "qwen3_vl", "instruction",
            "the default: follows the modes' instructions closely; 16 GiB in bf16, fits 8-12 GB cards with "
            "--quantize nf4 or int8", QWEN3_VL_8B,
        ),
        CaptionerModel(
            "qwen3-vl-4b", "Qwen/Qwen3-VL-4B-Instruct", "main", "Apache-2.0", "qwen3_vl", "instruction",
            "the same family at half the size", QWEN3_VL_4B,
        ),
        CaptionerModel(
            "qwen3-vl-2b", "Qwen/Qwen3-VL-2B-Instruct", "main", "Apache-2.0", "qwen3_vl", "instruction",
            "the same family, small: for CPUs and small cards; plainer captions", QWEN3_VL_2B,
        ),
        CaptionerModel(
            "florence-2-large", "florence-community/Florence-2-large", "main", "MIT", "florence2", "task",
            "Microsoft's Florence-2 (0.8B) in transformers' native format: fast, literal prose captions; no tags, "
            "no custom instructions",
        ),
        CaptionerModel(
            "florence-2-base", "florence-community/Florence-2-base", "main", "MIT", "florence2", "task",
            "Florence-2 at 0.2B",
        ),
    )
}  # fmt: skip
DEFAULT = MODELS["qwen3-vl-8b"]
DEFAULT_MODEL = DEFAULT.hub_id


def known(ref: str) -> CaptionerModel | None:
    """The entry a ``--model`` value names: its short name, or its hub id without a revision."""
    text = ref.strip().lower()
    return next((m for m in MODELS.values() if text in (m.name, m.hub_id.lower())), None)


# --- size and memory of a Qwen3-VL configuration --------------------------------------------------------------------
# The Linear layers --quantize replaces: those of the language model's decoder layers (as for Z-Image's text
# encoder in models/quant.py). The vision tower, the embeddings and the output layer stay in bf16.
QWEN3_VL_QUANTIZED = r"^model\.language_model\.layers\.\d+\."


def _meta_model(config: dict):
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    with torch.device("meta"):
        return Qwen3VLForConditionalGeneration(Qwen3VLConfig(**kwargs))


def parameter_counts(config: dict) -> dict[str, int]:
    """Parameters of a Qwen3-VL configuration by part: ``vision`` (the tower and its mergers), ``blocks`` (the
    language model's decoder layers), ``embeddings`` (token embedding, and the output layer when it is not tied),
    ``other`` (the final norm)."""
    counts = {"vision": 0, "blocks": 0, "embeddings": 0, "other": 0}
    for name, param in _meta_model(config).named_parameters():  # tied weights are listed once
        if name.startswith("model.visual."):
            part = "vision"
        elif name.startswith("model.language_model.layers."):
            part = "blocks"
        elif "embed_tokens" in name or name.startswith("lm_head."):
            part = "embeddings"
        else:
            part = "other"
        counts[part] += param.numel()
    return counts


def quantized_linear_bytes(out_features: int, in_features: int, mode: str) -> int:
    """Bytes one Linear weight takes as models/quant.py stores it: int8 (and float8) one byte per weight plus an fp32
    scale per output row; nf4 two codes per byte plus an fp32 scale per block of 64 weights."""
    weights = out_features * in_features
    if mode in ("int8", "float8"):
        return weights + 4 * out_features
    if mode == "nf4":
        return math.ceil(weights / 2) + 4 * math.ceil(weights / 64)
    raise ValueError(f"unknown quantization {mode!r}")


def weight_bytes(config: dict, quantize: str | None = None) -> int:
    """Bytes of the model's weights in bf16, or with the decoder layers' Linear weights quantized."""
    from torch import nn

    model = _meta_model(config)
    total = 2 * sum(p.numel() for p in model.parameters())
    if quantize:
        pattern = re.compile(QWEN3_VL_QUANTIZED)
        for name, module in model.named_modules():
            if type(module) is nn.Linear and pattern.match(name):
                out_features, in_features = module.weight.shape
                total += quantized_linear_bytes(out_features, in_features, quantize) - 2 * module.weight.numel()
    return total


def kv_cache_bytes_per_token(config: dict) -> int:
    """Keys and values kept in bf16 for each token of context (picture and text), over all decoder layers."""
    text = config["text_config"]
    return 2 * 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * text["head_dim"]


def memory_table(entry: CaptionerModel = DEFAULT, image_tokens: int = 1024, text_tokens: int = 400) -> str:
    """The download and the weights (GiB) in bf16, int8 and nf4, and the KV cache of one picture's caption."""
    counts = parameter_counts(entry.config)
    kv = kv_cache_bytes_per_token(entry.config) * (image_tokens + text_tokens)
    lines = [
        f"{entry.hub_id} ({entry.licence}): {sum(counts.values()) / 1e9:.2f} B parameters "
        + ", ".join(f"{part} {n / 1e9:.2f} B" for part, n in counts.items()),
        f"download (safetensors, bf16): {weight_bytes(entry.config) / GIB:.1f} GiB",
    ]
    for mode in (None, "int8", "nf4"):
        lines.append(f"weights {mode or 'bf16'}: {weight_bytes(entry.config, mode) / GIB:.1f} GiB")
    lines.append(
        f"KV cache per picture in the batch ({image_tokens} picture + {text_tokens} text tokens): {kv / GIB:.2f} GiB"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    for model in MODELS.values():
        if model.config is not None:
            print(memory_table(model), end="\n\n")
