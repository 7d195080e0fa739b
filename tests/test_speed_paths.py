"""Speed paths must not change results: the adapters' input-cast shortcut under autocast."""

from __future__ import annotations

import torch
from diffusers import ZImageTransformer2DModel
from peft.tuners.lora import LoraLayer

from zimage_lora.config import DEFAULT_TARGET_REGEX
from zimage_lora.lora import network
from zimage_lora.training import flow


def _loss_and_grads(model_dir, keep: bool):
    model = ZImageTransformer2DModel.from_pretrained(model_dir, subfolder="transformer").to(torch.bfloat16)
    model.requires_grad_(False)
    network.add_user_lora(model, network.target_module_names(model, DEFAULT_TARGET_REGEX), 4, 4.0, seed=0)
    with torch.no_grad():
        for p in network.user_parameters(model):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    if keep:
        network.keep_input_dtype(model)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 8, 8, generator=g)
    caps = [torch.randn(7, model.config.cap_feat_dim, generator=g).to(torch.bfloat16) for _ in range(2)]
    sigma = torch.tensor([0.3, 0.8])
    x_t = flow.noisy_latents(x0, torch.randn(x0.shape, generator=g), sigma)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(list(x_t.to(torch.bfloat16).unsqueeze(2).unbind(0)), flow.model_time(sigma), caps)[0]
        loss = sum((o.float() ** 2).mean() for o in out)
    loss.backward()
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    switched = sum(1 for m in layers if not m.cast_input_dtype_enabled)
    return loss.detach(), torch.cat([p.grad.flatten() for p in network.user_parameters(model)]), (switched, len(layers))


def test_keep_input_dtype_gives_the_same_loss_and_gradients(tiny_model_dir):
    loss, grads, (switched, layers) = _loss_and_grads(tiny_model_dir, keep=False)
    assert switched == 0 and layers > 0
    fast_loss, fast_grads, (switched, layers) = _loss_and_grads(tiny_model_dir, keep=True)
    assert switched == layers
    assert grads.abs().max() > 0
    assert torch.equal(loss, fast_loss)
    assert torch.equal(grads, fast_grads)
