"""The trainable LoRA and the frozen training adapter, injected into the transformer through peft.

Two peft adapters live side by side on the same Linear layers:
- ``zimage_lora``: the user's LoRA, the only trainable parameters, kept in fp32 whatever the base dtype;
- ``training_adapter`` (Turbo path only): the de-distilling adapter, frozen, applied at strength +1.

Keeping the adapter a separate branch (never merged into the base weights) means that switching it off gives
exactly the Turbo weights again, bit for bit: previews and inference run without it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from zimage_lora.errors import UserError
from zimage_lora.lora.io import LoraWeights
from zimage_lora.lora.variants import peft_config

USER = "zimage_lora"
ADAPTER = "training_adapter"


def target_module_names(model: nn.Module, regex: str) -> list[str]:
    """Linear layers whose full path matches ``regex`` (``target.modules``)."""
    pattern = re.compile(regex)
    names = [name for name in linear_module_names(model) if pattern.fullmatch(name)]
    if not names:
        raise UserError(f"target.modules: the pattern {regex!r} matches no Linear layer of the transformer")
    return names


def linear_module_names(model: nn.Module) -> list[str]:
    """Paths of the model's own Linear layers, whether or not peft has wrapped them with adapters."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            names.append(name)
        elif isinstance(m, nn.Linear) and not _inside_lora(name):
            names.append(name)
    return names


def _inside_lora(name: str) -> bool:
    return ".lora_" in name or name.endswith(".base_layer") or ".base_layer." in name


def add_user_lora(
    model: nn.Module, names: list[str], rank: int, alpha: float, seed: int, kind: str = "lora", lokr_factor: int = -1
) -> None:
    """Inject the trainable network (``target.type``; its update starts at zero, so the model is unchanged at step
    0), fp32, seeded; ``lokr_factor`` splits each LoKr dimension (see ``variants.peft_config``)."""
    devices = {p.device for p in model.parameters()}
    with torch.random.fork_rng(devices=[d for d in devices if d.type == "cuda"]):
        torch.manual_seed(seed)
        model.add_adapter(peft_config(kind, names, rank, alpha, lokr_factor=lokr_factor), adapter_name=USER)
    for p in user_parameters(model):
        p.data = p.data.float()
    activate(model, adapter_on=has_training_adapter(model))


def check_adapter_fits(model: nn.Module, modules: Mapping[str, LoraWeights], source: str) -> None:
    """A wrong file or a wrong model must fail loudly (never train on raw Turbo by accident)."""
    layers = dict(model.named_modules())
    if not modules:
        raise UserError(f"{source} holds no LoRA weights")
    for name, w in modules.items():
        layer = layers.get(name)
        if isinstance(layer, LoraLayer):
            layer = layer.get_base_layer()
        if not isinstance(layer, nn.Linear):
            raise UserError(
                f"{source} names {name!r}, which is not a Linear layer of this transformer "
                "(wrong file, or an adapter for another model)"
            )
        if w.down.shape[1] != layer.in_features or w.up.shape[0] != layer.out_features:
            raise UserError(
                f"{source} does not fit this transformer: {name} is {layer.out_features}x"
                f"{layer.in_features} but the adapter is {w.up.shape[0]}x{w.down.shape[1]} (wrong model size?)"
            )


def add_training_adapter(model: nn.Module, modules: Mapping[str, LoraWeights], source: str) -> None:
    """Attach the frozen training adapter as its own fp32 branch, at strength +1."""
    check_adapter_fits(model, modules, f"training adapter {source}")
    add_frozen_lora(model, modules, ADAPTER)
    activate(model, adapter_on=True)


def add_frozen_lora(model: nn.Module, modules: Mapping[str, LoraWeights], adapter_name: str) -> None:
    """Attach LoRA weights read from a file as a frozen fp32 peft adapter named ``adapter_name``."""
    names = sorted(modules)
    first = modules[names[0]]
    model.add_adapter(peft_config("lora", names, first.rank, first.alpha, patterns=modules), adapter_name=adapter_name)
    layers = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            layer = layers[name]
            a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            a.data = modules[name].down.to(a.device, torch.float32).clone()
            b.data = modules[name].up.to(b.device, torch.float32).clone()
            if abs(layer.scaling[adapter_name] - modules[name].scale) > 1e-9 * max(1.0, modules[name].scale):
                raise RuntimeError(f"peft scaling mismatch for {name}")
            a.requires_grad_(False)
            b.requires_grad_(False)


def has_training_adapter(model: nn.Module) -> bool:
    return ADAPTER in getattr(model, "peft_config", {})


def activate(model: nn.Module, adapter_on: bool, lora_scale: float = 1.0) -> None:
    """Choose the active branches: user LoRA (at ``lora_scale``) with or without the training adapter.

    Only the user's LoRA is ever trainable, whatever peft's own ``set_adapter`` decides.
    """
    names, weights = [], []
    if USER in model.peft_config:
        names.append(USER)
        weights.append(lora_scale)
    if adapter_on:
        if not has_training_adapter(model):
            raise RuntimeError("no training adapter loaded")
        names.append(ADAPTER)
        weights.append(1.0)
    model.set_adapters(names, weights)
    for name, p in model.named_parameters():
        p.requires_grad_(is_user_parameter(name))


def user_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if is_user_parameter(name)]


def user_lora_weights(model: nn.Module) -> dict[str, LoraWeights]:
    """The user's LoRA as file-ready weights (module path -> A, B, alpha), sorted by path."""
    out: dict[str, LoraWeights] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and USER in layer.lora_A:
            out[name] = LoraWeights(
                down=layer.lora_A[USER].weight,
                up=layer.lora_B[USER].weight,
                alpha=float(layer.lora_alpha[USER]),
            )
    return dict(sorted(out.items()))


def named_user_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable tensors by stable name, for optimizer state and resume."""
    return {name: p for name, p in model.named_parameters() if is_user_parameter(name)}


def is_user_parameter(name: str) -> bool:
    """peft names LoRA weights ``...lora_A.<adapter>.weight`` and LoKr/LoHa ones ``...lokr_w1.<adapter>``."""
    return f".{USER}." in name or name.endswith(f".{USER}")


def keep_input_dtype(model: nn.Module) -> None:
    """Under autocast, let the adapters take their input as it comes.

    peft casts each adapter's input to the adapter's own dtype (fp32 here) before the down-projection. Under bf16
    autocast that cast is undone at once (the matmul runs in bf16 either way), so it only adds two copies of the full
    activation per adapted layer, forward and backward: measured on an H100 at 1024x1024, dtype copies and their
    backward were a fifth of the step. The result is the same without them; call this only when the step runs under
    autocast (``train.mixed_precision`` bf16/fp16).
    """
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False
