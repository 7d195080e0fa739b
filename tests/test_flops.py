"""The model-FLOPs definition behind every utilisation figure."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from zimage_lora.training.flops import forward_flops, train_step_flops

FULL = dict(dim=3840, n_layers=30, n_refiner_layers=2, cap_feat_dim=2560, in_channels=16, all_patch_size=[2])


def test_full_size_figures():
    assert train_step_flops(FULL, 1024, 1024, 128) / 1e12 == pytest.approx(113, rel=0.01)
    assert train_step_flops(FULL, 512, 512, 128) / 1e12 == pytest.approx(27, rel=0.02)
    assert train_step_flops(FULL, 1024, 1024, 128, batch=2) == 2 * train_step_flops(FULL, 1024, 1024, 128)


def test_matches_torchs_own_count_of_a_real_forward():
    from diffusers import ZImageTransformer2DModel

    config = dict(
        dim=128,
        n_layers=3,
        n_refiner_layers=1,
        n_heads=4,
        n_kv_heads=4,
        cap_feat_dim=64,
        axes_dims=[8, 12, 12],
        axes_lens=[1536, 512, 512],
    )
    model = ZImageTransformer2DModel(**config).eval()
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(16, 1, 32, 32, generator=g)]  # 256x256 pixels: 256 image tokens
    caps = [torch.randn(64, 64, generator=g)]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.tensor([0.5]), caps, return_dict=False)
    counted = counter.get_total_flops()
    # torch's counter does not see the CPU attention kernel, so compare the matmul part; torch also counts the
    # small time-embedding and adaLN matmuls, which the definition leaves out
    matmuls = forward_flops({**config, "in_channels": 16}, 256, 256, 64, attention=False)
    assert matmuls == pytest.approx(counted, rel=0.03), (matmuls, counted)
    attention = forward_flops({**config, "in_channels": 16}, 256, 256, 64) - matmuls
    assert attention == 4 * 128 * (3 * 320**2 + 256**2 + 64**2)  # 4 N^2 dim per block: main, noise, caption


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_recompute_flops_are_what_checkpointing_adds_to_a_real_step(fraction):
    """torch's counter over a whole LoRA step (forward and backward, recompute included) against the definition."""
    from diffusers import ZImageTransformer2DModel

    from zimage_lora.config import DEFAULT_TARGET_REGEX
    from zimage_lora.lora import network
    from zimage_lora.models.checkpointing import enable_checkpointing
    from zimage_lora.training.flops import block_forward_flops, recompute_flops

    config = dict(
        dim=128, n_layers=4, n_refiner_layers=1, n_heads=4, n_kv_heads=4, cap_feat_dim=64,
        axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512],
    )  # fmt: skip

    def step_flops(checkpointing: bool) -> float:
        torch.manual_seed(0)
        model = ZImageTransformer2DModel(**config).requires_grad_(False)
        network.add_user_lora(model, network.target_module_names(model, DEFAULT_TARGET_REGEX), 4, 4.0, seed=0)
        recomputed = enable_checkpointing(model, fraction) if checkpointing else []
        g = torch.Generator().manual_seed(0)
        x, caps = [torch.randn(16, 1, 32, 32, generator=g)], [torch.randn(64, 64, generator=g)]
        with FlopCounterMode(display=False) as counter:
            model.train()(x, torch.tensor([0.5]), caps, return_dict=False)[0][0].square().mean().backward()
        return counter.get_total_flops(), recomputed

    plain, _ = step_flops(False)
    checkpointed, recomputed = step_flops(True)
    assert recomputed == ([0, 1, 2, 3] if fraction == 1 else [0, 2])
    sizes = {**config, "in_channels": 16}
    # the counter misses the CPU attention kernel: compare the matmul part of the recomputed blocks' forwards
    main = block_forward_flops(sizes, 256, 256, 64, attention=False)[2:]
    hidden = int(128 / 3 * 8)
    lora = 2 * 320 * 4 * (4 * (128 + 128) + 3 * (128 + hidden))  # rank 4 on q, k, v, out, w1, w2, w3; 320 tokens
    expected = sum(main[i] + lora for i in recomputed)  # the definition leaves LoRA out: 6% at this width
    assert checkpointed - plain == pytest.approx(expected, rel=0.03), (checkpointed - plain, expected)
    attention = recompute_flops(sizes, 256, 256, recomputed, 64) - sum(main[i] for i in recomputed)
    assert attention == len(recomputed) * 4 * 128 * 320**2
