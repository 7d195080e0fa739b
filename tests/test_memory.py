"""The per-GPU memory estimate (training/memory.py): its counts against the model by other routes, its scaling."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import ZImageTransformer2DModel

from zimage_lora.config import DEFAULT_TARGET_REGEX
from zimage_lora.models.quant import TRANSFORMER_BLOCKS, quantize_model
from zimage_lora.training.memory import (
    GIB,
    ZIMAGE_TRANSFORMER,
    block_activation_bytes,
    frozen_bytes,
    lora_parameters,
    parameter_counts,
    per_gpu_memory,
)

SMALL = dict(
    dim=384, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=4, cap_feat_dim=256,
    axes_dims=[32, 32, 32], axes_lens=[1536, 512, 512], all_patch_size=[2],
)  # fmt: skip
BLOCK_PREFIXES = {"layers": "main", "noise_refiner": "refiner", "context_refiner": "refiner"}


def state_dict_counts(config: dict) -> dict[str, int]:
    with torch.device("meta"):
        model = ZImageTransformer2DModel(**config)
    counts = {"main": 0, "refiner": 0, "other": 0}
    for key, tensor in model.state_dict().items():
        counts[BLOCK_PREFIXES.get(key.split(".")[0], "other")] += math.prod(tensor.shape)
    return counts


def test_parameter_counts_match_the_models_state_dict_and_the_published_size():
    counts = parameter_counts()
    assert counts == state_dict_counts(ZIMAGE_TRANSFORMER)
    assert sum(counts.values()) / 1e9 == pytest.approx(6.15, abs=0.01)  # "6.15 B-param S3-DiT"
    assert counts["main"] / 30 / 1e6 == pytest.approx(180.9, abs=0.05)  # "180.9 M params each"


def test_lora_and_frozen_bytes_match_the_real_injection_and_quantization():
    from zimage_lora.lora import network

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(**SMALL).requires_grad_(False)
    network.add_user_lora(model, network.target_module_names(model, DEFAULT_TARGET_REGEX), 8, 8.0, seed=0)
    assert lora_parameters(8, SMALL) == sum(p.numel() for p in network.user_parameters(model))

    for mode in ("float8", "nf4"):
        model = ZImageTransformer2DModel(**SMALL).to(torch.bfloat16)
        quantize_model(model, mode, TRANSFORMER_BLOCKS)
        stored = {"main": 0, "refiner": 0, "other": 0}
        for key, tensor in model.state_dict().items():  # codes, scales, biases, norms: what the model now holds
            stored[BLOCK_PREFIXES.get(key.split(".")[0], "other")] += tensor.numel() * tensor.element_size()
        assert frozen_bytes(mode, SMALL) == stored, mode


def test_sharding_divides_the_frozen_block_weights_and_the_lora_state_by_the_processes():
    counts = state_dict_counts(ZIMAGE_TRANSFORMER)
    other = 2 * counts["other"] / GIB  # held whole; the blocks are split
    one = per_gpu_memory(1, shard=True)
    for n in (2, 3, 8):
        many = per_gpu_memory(n, shard=True)
        assert many["weights"] - other == pytest.approx((one["weights"] - other) / n, rel=1e-12)
        assert many["lora_optimizer"] == pytest.approx(one["lora_optimizer"] / n, rel=1e-12)
        assert many["activations"] == one["activations"]  # batch_size is per process
    assert one["weights"] == per_gpu_memory(1, shard=False)["weights"]


def test_activations_scale_with_the_tokens_and_the_batch():
    tokens = {1024: (1024 // 16) ** 2 + 128, 512: (512 // 16) ** 2 + 128}  # image patches + a 128-token caption
    big, small = (per_gpu_memory(1, False, resolution=r)["activations"] for r in (1024, 512))
    assert big / small == pytest.approx(tokens[1024] / tokens[512], rel=1e-12)
    assert per_gpu_memory(1, False, batch_size=3)["activations"] == pytest.approx(3 * big, rel=1e-12)
    # captions are padded to a multiple of 32, as the model pads them
    assert per_gpu_memory(1, False, caption_tokens=100)["activations"] == big
    padded = per_gpu_memory(1, False, caption_tokens=129)["activations"]
    assert padded / big == pytest.approx((tokens[1024] + 32) / tokens[1024], rel=1e-12)
    # without checkpointing every main block keeps what one keeps while it recomputes
    unsaved = per_gpu_memory(1, False, checkpointing=False)["activations"] - big
    per_block = block_activation_bytes(tokens[1024], 16, ZIMAGE_TRANSFORMER) / GIB
    inputs = 30 * 2 * tokens[1024] * 3840 / GIB
    assert unsaved == pytest.approx(29 * per_block - inputs, rel=1e-9)


def test_the_block_activation_count_matches_what_autograd_saves():
    """Saved-tensor hooks on the last main block of a real model with our LoRA, under bf16 autocast as trained."""
    from zimage_lora.lora import network

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(**SMALL).to(torch.bfloat16).requires_grad_(False)
    network.add_user_lora(model, network.target_module_names(model, DEFAULT_TARGET_REGEX), 16, 16.0, seed=0)
    network.keep_input_dtype(model)
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    block, inside, saved = model.layers[-1], [False], {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if inside[0] and storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    block.register_forward_pre_hook(lambda module, args: inside.__setitem__(0, True))
    block.register_forward_hook(lambda module, args, out: inside.__setitem__(0, False))
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(16, 1, 32, 32, generator=g)]  # 256x256 pixels: 256 image tokens
    caps = [torch.randn(128, SMALL["cap_feat_dim"], generator=g, dtype=torch.bfloat16)]
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, torch.tensor([0.5]), caps, return_dict=False)
    # autocast also keeps a bf16 copy of each fp32 LoRA weight (2 bytes a parameter, not per token): left out
    casts = 2 * sum(p.numel() for n, p in network.named_user_parameters(model).items() if n.startswith("layers.1."))
    counted = block_activation_bytes(256 + 128, 16, SMALL)
    assert counted == pytest.approx(sum(saved.values()) - casts, rel=0.005), (counted, sum(saved.values()), casts)


@pytest.mark.parametrize(
    "quantization, resolution, measured",
    [("none", 1024, 14.40), ("none", 512, 12.73), ("float8", 1024, 8.63), ("nf4", 1024, 6.23)],
)
def test_the_single_gpu_estimate_is_near_the_h100_peaks(quantization, resolution, measured):
    """Peaks measured on an H100 (benchmarks/RESULTS.md, batch 1, rank 16, checkpointing), GiB."""
    estimate = per_gpu_memory(1, False, quantization, resolution)["total"]
    assert estimate == pytest.approx(measured, rel=0.03)


def test_more_processes_never_need_more_memory_with_shard():
    totals = [per_gpu_memory(n, shard=True)["total"] for n in range(1, 17)]
    assert all(later <= earlier for earlier, later in zip(totals[:-1], totals[1:], strict=True))
    assert totals[7] < per_gpu_memory(8, shard=False)["total"] / 2
    with pytest.raises(ValueError, match="shard"):
        per_gpu_memory(2, shard=True, quantization="float8")
