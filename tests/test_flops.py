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
