"""GPU memory per process for a LoRA on the real Z-Image transformer, with one or several processes (an estimate).

Computed, not measured: the parameter counts come from the real transformer class built from its config on the meta
device (no weights, no download), the activations from a count of the tensors a block keeps for its backward.
``python -m zimage_lora.training.memory`` prints the tables of docs/multigpu.md; tests/test_memory.py checks the
counts against the model by other routes.

What one process holds at its peak (GiB of 2^30 bytes, what ``torch.cuda.max_memory_allocated`` measures):

- weights: the frozen transformer. Its blocks' Linear layers as stored (``none``: bf16; ``float8``/``int8``: one
  byte per weight plus an fp32 scale per output channel; ``nf4``: two codes per byte plus an fp32 scale per 64
  weights, 4.5 bits: models/quant.py), everything else in bf16. With ``shard`` every block's weights are split
  between the processes (1/N each); the rest (embedders, final layer, pad tokens: 0.2%) is counted whole: FSDP2's
  root module, which holds it, keeps its parameters gathered from the forward to the end of the backward.
- lora_optimizer: the user's LoRA on the default targets (config.DEFAULT_TARGET_REGEX: attention, feed-forward and
  adaLN of the 30 main blocks), fp32 weights, fp32 gradients and AdamW's two fp32 states: 16 bytes per parameter;
  with ``shard`` 1/N of it (weights, gradients after the reduce-scatter, and states are sharded); with plain DDP
  and more than one process, 4 more bytes per parameter for DDP's gradient buckets (a copy of the gradients).
- activations: per process, so they grow with ``batch_size`` and not with the number of processes. With gradient
  checkpointing each main block keeps its input (bf16) and one block's whole forward lives again while it
  recomputes for its backward; without it, all 30 blocks keep theirs. Plus the gradients in flight while one block
  runs its backward (``BACKWARD_IN_FLIGHT``). The refiners keep nothing: with the default targets no gradient flows
  through them (benchmarks/activations.py measures 0 bytes for them).
- gathered: with ``shard``, the whole blocks that are all-gathered at once: the one running and the next one,
  prefetched (bf16 weights and fp32 LoRA weights), plus one block's unsharded LoRA gradients before the
  reduce-scatter.

Left out: the text encoder (train.cache_text_embeddings encodes every caption once and releases it) and the VAE
(latents cached, VAE off the GPU), the cached caption embeddings (kilobytes), the CUDA context, NCCL's communication
buffers and allocator fragmentation (not seen by ``max_memory_allocated``; leave a margin for them), the Turbo
path's frozen training adapter (a LoRA: its fp32 weights, 4 bytes per parameter), the loss and the latents.
Quantized layers rebuild each weight in bf16 for each matmul (models/quant.py): those temporaries of one Linear
(0.15 GiB with float8/int8, up to 0.44 GiB with nf4) come and go between the moments of the peak and are not added
(the measured peaks below agree without them).

Against the single-GPU peaks measured on an H100 (benchmarks/RESULTS.md: 1024x1024 unless said, batch 1, rank 16,
checkpointing): bf16 14.40 GiB measured / 14.40 estimated, 512x512 12.73 / 12.73, float8 8.63 / 8.69, nf4 6.23 /
6.18 (tests/test_memory.py holds the estimate to within 3% of them). Nothing with several GPUs is measured yet.
"""

from __future__ import annotations

import functools
import json
import math
import re

import torch
from diffusers import ZImageTransformer2DModel
from torch import nn

from zimage_lora.config import DEFAULT_TARGET_REGEX
from zimage_lora.models.quant import MODES, TRANSFORMER_BLOCKS

GIB = 2**30

# The real transformer (Tongyi-MAI/Z-Image-Turbo, transformer/config.json; /work ZIMAGE.md section 2). n_kv_heads
# is not used by diffusers' attention (every head has its own keys and values); it is given as the real config has it.
ZIMAGE_TRANSFORMER = dict(
    all_patch_size=[2],
    all_f_patch_size=[1],
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=2560,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512],
)

BLOCK_KINDS = {"layers.": "main", "noise_refiner.": "refiner", "context_refiner.": "refiner"}  # by name prefix

# Gradients alive at once while one block runs its backward, in bf16: the residual stream's gradient coming in and
# going out (2 x dim per token) and the feed-forward hidden's (the gradients of w1's and w3's outputs, 2 x hidden).
BACKWARD_IN_FLIGHT = {"dim": 2, "hidden": 2}


def per_gpu_memory(
    processes: int,
    shard: bool,
    quantization: str = "none",
    resolution: int = 1024,
    batch_size: int = 1,
    rank: int = 16,
    checkpointing: bool = True,
    caption_tokens: int = 128,
    config: dict | None = None,
) -> dict[str, float]:
    """GiB one process holds at its peak, by term (see the module docstring): ``weights``, ``lora_optimizer``,
    ``activations``, ``gathered`` and their ``total``. ``batch_size`` is per process, images are
    ``resolution`` x ``resolution``, captions ``caption_tokens`` long (128 is a typical prompt), bf16 mixed precision.
    """
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    if shard and quantization != "none":
        raise ValueError("quantization is refused with shard (sharding is what saves the memory then)")
    if quantization not in MODES:
        raise ValueError(f"unknown quantization {quantization!r}; use one of {', '.join(MODES)}")
    config = config or ZIMAGE_TRANSFORMER
    stored = frozen_bytes(quantization, config)
    blocks = stored["main"] + stored["refiner"]
    lora = lora_parameters(rank, config)

    if shard:
        weights = blocks / processes + stored["other"]
        lora_optimizer = 16 * lora / processes
        largest = max(block_sizes(rank, config))  # (frozen bf16 bytes, LoRA parameters) of the largest block
        gathered = 2 * (largest[0] + 4 * largest[1]) + 4 * largest[1]
    else:
        weights = blocks + stored["other"]
        lora_optimizer = (16 + (4 if processes > 1 else 0)) * lora
        gathered = 0

    tokens = sequence_tokens(resolution, caption_tokens, config)
    block = block_activation_bytes(tokens, rank, config)
    if checkpointing:  # every main block keeps its bf16 input; one lives again whole while it recomputes
        kept, recompute = config["n_layers"] * 2 * tokens * config["dim"], block
    else:
        kept, recompute = config["n_layers"] * block, 0
    hidden = _ffn_hidden(config)
    backward = 2 * tokens * (BACKWARD_IN_FLIGHT["dim"] * config["dim"] + BACKWARD_IN_FLIGHT["hidden"] * hidden)
    activations = batch_size * (kept + recompute + backward)

    out = dict(weights=weights, lora_optimizer=lora_optimizer, activations=activations, gathered=gathered)
    out = {key: value / GIB for key, value in out.items()}
    out["total"] = sum(out.values())
    return out


# --- the counts ------------------------------------------------------------------------------------------------
def sequence_tokens(resolution: int, caption_tokens: int, config: dict) -> int:
    """Tokens the main blocks run on for one image: image patches plus caption, each padded to a multiple of 32 as
    the model pads them (the same count as training/flops.py)."""
    patch = config["all_patch_size"][0]
    image = (resolution // 8 // patch) ** 2
    return _pad32(image) + _pad32(caption_tokens)


def block_activation_bytes(tokens: int, rank: int, config: dict) -> int:
    """Bytes one main block keeps for its backward at ``tokens`` tokens, under bf16 autocast, with the LoRA on the
    default targets (so the inputs of the adapted Linears and of the adaLN-scaled products need keeping).

    Per token, in bytes (dim D, feed-forward hidden H, head size h): each RMSNorm keeps its input upcast to fp32 and
    its bf16 output, 6 D, for the four block norms and the two query/key norms; the four adaLN multiplies (scale and
    gate of the attention and of the feed-forward) keep their bf16 operand, 8 D; the LoRA inputs of the attention
    (shared by q, k, v) and of the feed-forward, 4 D; attention keeps q, k, v and its output, 8 D, and its log-sum-exp,
    4 bytes per head; RoPE keeps its complex64 frequencies, 4 h; SwiGLU keeps w1's and w3's outputs, the SiLU and
    the product (w2's input), 8 H; each adapted Linear's LoRA down-projection keeps its rank-r output, 2 r. Left
    out: the bf16 copies autocast keeps of the block's fp32 LoRA weights (2 bytes a LoRA parameter, 2.8 MB a block).
    Counted with saved-tensor hooks on a real block (tests/test_memory.py) and by benchmarks/activations.py at full
    width (1201.4 MiB at 1024x1024; this count gives 1199 MiB there).
    """
    dim, heads = config["dim"], config["n_heads"]
    hidden, head = _ffn_hidden(config), dim // heads
    norms = 6 * dim * (4 + (2 if config.get("qk_norm", True) else 0))
    modulation = 2 * dim * 4
    lora_inputs = 2 * dim * 2
    attention = 2 * dim * 4 + 4 * heads
    rope = 4 * head
    swiglu = 2 * hidden * 4
    adapted = 7  # to_q, to_k, to_v, to_out.0, w1, w3, w2 (adaLN's input is one vector per image, not per token)
    return tokens * (norms + modulation + lora_inputs + attention + rope + swiglu + 2 * rank * adapted)


def parameter_counts(config: dict | None = None) -> dict[str, int]:
    """Parameters of the transformer by kind: ``main`` (all main blocks), ``refiner`` (noise and context refiners),
    ``other`` (embedders, final layer, pad tokens)."""
    counts = {"main": 0, "refiner": 0, "other": 0}
    for name, param in _meta_model(_key(config or ZIMAGE_TRANSFORMER)).named_parameters():
        counts[_kind(name)] += param.numel()
    return counts


def frozen_bytes(quantization: str, config: dict | None = None) -> dict[str, int]:
    """Bytes of the frozen weights by kind (as ``parameter_counts``), stored as ``quantization`` stores them: the
    blocks' Linear weights quantized (models/quant.py), their biases, the norms and everything outside in bf16."""
    model = _meta_model(_key(config or ZIMAGE_TRANSFORMER))
    out = {"main": 0, "refiner": 0, "other": 0}
    linear_weights = {f"{name}.weight": module for name, module in _block_linears(model)}
    for name, param in model.named_parameters():
        module = linear_weights.get(name)
        if module is None:
            out[_kind(name)] += 2 * param.numel()
        else:
            out[_kind(name)] += _linear_bytes(module.out_features, module.in_features, quantization)
    return out


def lora_parameters(rank: int, config: dict | None = None) -> int:
    """Parameters of a rank-``rank`` LoRA on the default targets: ``rank x (in + out)`` per adapted Linear."""
    model = _meta_model(_key(config or ZIMAGE_TRANSFORMER))
    pattern = re.compile(DEFAULT_TARGET_REGEX)
    return sum(rank * (m.in_features + m.out_features) for n, m in _linears(model) if pattern.fullmatch(n))


def block_sizes(rank: int, config: dict | None = None) -> list[tuple[int, int]]:
    """(frozen bf16 bytes, LoRA parameters) of each block, refiners first: what FSDP2 gathers at once."""
    model = _meta_model(_key(config or ZIMAGE_TRANSFORMER))
    pattern = re.compile(DEFAULT_TARGET_REGEX)
    sizes = []
    for kind in ("noise_refiner", "context_refiner", "layers"):
        for index, block in enumerate(getattr(model, kind)):
            frozen = 2 * sum(p.numel() for p in block.parameters())
            lora = sum(
                rank * (m.in_features + m.out_features)
                for n, m in _linears(block)
                if pattern.fullmatch(f"{kind}.{index}.{n}")
            )
            sizes.append((frozen, lora))
    return sizes


# --- helpers ---------------------------------------------------------------------------------------------------
def _linear_bytes(out_features: int, in_features: int, quantization: str) -> int:
    weights = out_features * in_features
    if quantization == "none":
        return 2 * weights
    if quantization in ("float8", "int8"):
        return weights + 4 * out_features
    if quantization == "nf4":
        return math.ceil(weights / 2) + 4 * math.ceil(weights / 64)
    raise ValueError(f"unknown quantization {quantization!r}")


def _pad32(n: int) -> int:
    return int(math.ceil(n / 32) * 32)


def _ffn_hidden(config: dict) -> int:
    return int(config["dim"] / 3 * 8)  # as diffusers' ZImageTransformerBlock sizes its FeedForward


def _kind(name: str) -> str:
    return next((kind for prefix, kind in BLOCK_KINDS.items() if name.startswith(prefix)), "other")


def _key(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


@functools.lru_cache(maxsize=4)
def _meta_model(key: str) -> ZImageTransformer2DModel:
    """The transformer class built from the config on the meta device: shapes only, no memory, no weights."""
    with torch.device("meta"):
        return ZImageTransformer2DModel(**json.loads(key))


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    pattern = re.compile(TRANSFORMER_BLOCKS)
    return [(name, m) for name, m in _linears(model) if pattern.match(name)]


# --- the tables of docs/multigpu.md ------------------------------------------------------------------------------
def markdown_tables(resolution: int = 1024, gpus: tuple[int, ...] = (1, 2, 4, 8)) -> str:
    """Totals per GPU for DDP (bf16, float8, nf4) and shard (bf16), then the terms of the bf16 rows."""
    setups = [("DDP bf16", False, "none"), ("DDP float8", False, "float8"), ("DDP nf4", False, "nf4")]
    setups.append(("shard bf16", True, "none"))
    lines = [f"| GPUs | {' | '.join(name for name, _, _ in setups)} |", "|---" * (len(setups) + 1) + "|"]
    for n in gpus:
        totals = [per_gpu_memory(n, shard, quant, resolution)["total"] for _, shard, quant in setups]
        lines.append(f"| {n} | {' | '.join(f'{t:.1f} GiB' for t in totals)} |")
    lines += ["", "| setup | GPUs | weights | LoRA + AdamW | activations | gathered blocks | total |", "|---" * 7 + "|"]
    for name, shard, quant in (setups[0], setups[3]):
        for n in gpus:
            m = per_gpu_memory(n, shard, quant, resolution)
            terms = " | ".join(f"{m[k]:.2f}" for k in ("weights", "lora_optimizer", "activations", "gathered", "total"))
            lines.append(f"| {name} | {n} | {terms} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_tables())
