"""LoKr, LoHa and DoRA besides plain LoRA (``target.type``): peft trains them; here are their files.

File layouts (keys under ``diffusion_model.<module>.``):
- ``lokr``: ``lokr_w1`` / ``lokr_w2`` (or their ``_a`` / ``_b`` halves when a factor is rank-decomposed) and, for a
  decomposed factor, ``alpha`` equal to that rank: the LyCORIS layout diffusers' ``load_lora_weights`` and ComfyUI
  read. The training scale is baked into the first factor, so every reader computes the same delta.
- ``loha``: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` and ``alpha`` equal to the rank, scale baked
  in (the LyCORIS layout; diffusers 0.42 cannot load LoHa, ComfyUI reads this layout).
- ``dora``: ``lora_A.weight``, ``lora_B.weight``, ``alpha`` and ``dora_magnitude`` (peft's magnitude vector, one per
  output feature: ``W' = m * (W + s B A) / ||W + s B A||`` row-wise). This is zimage-lora's own layout (diffusers
  drops DoRA magnitudes with only a warning); ``zimage-lora export-lora`` turns any of these into a plain LoRA.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig
from torch import nn

from zimage_lora.errors import UserError
from zimage_lora.lora.io import (
    SAVE_DTYPES,
    LoraWeights,
    atomic_write_bytes,
    read_safetensors,
    serialize_safetensors,
)

KINDS = ("lora", "dora", "lokr", "loha")
_PARTS = {
    "lora": ("lora_A.weight", "lora_B.weight"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "dora": ("lora_A.weight", "lora_B.weight", "dora_magnitude"),
}


def peft_config(
    kind: str, names: list[str], rank: int, alpha: float, patterns: Mapping | None = None, lokr_factor: int = -1
):
    """The peft config of a network on the modules ``names``; ``patterns`` (module -> weights with ``rank`` and
    ``alpha``) gives each module its own rank and alpha, for a LoRA read from a file. ``lokr_factor`` f (LoKr): each
    dimension d of a layer is split as (f, d / f) when f divides it (the smaller part in ``lokr_w1``), else as
    evenly as possible with the smaller part at most f; -1 the most even split (LyCORIS's factorisation, which peft
    follows)."""
    if kind in ("lora", "dora"):
        kwargs = {}
        if patterns:
            kwargs["rank_pattern"] = {re.escape(n): w.rank for n, w in patterns.items()}
            kwargs["alpha_pattern"] = {re.escape(n): w.alpha for n, w in patterns.items()}
        return LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=0.0,
            init_lora_weights=True,
            target_modules=list(names),
            use_dora=kind == "dora",
            **kwargs,
        )
    if kind == "lokr":
        return LoKrConfig(
            r=rank, alpha=alpha, target_modules=list(names), init_weights=True, decompose_factor=lokr_factor
        )
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=list(names), init_weights=True)
    raise ValueError(f"unknown network type {kind!r}")


@dataclass
class NetworkFile:
    kind: str
    modules: dict[str, dict[str, torch.Tensor]]  # module path -> part name -> tensor (alpha included)
    metadata: dict[str, str]


def network_file(model: nn.Module, kind: str, adapter: str) -> NetworkFile:
    """The adapter's weights as a network of ``kind`` in our part names (fp32, on the CPU; the writer casts)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, layer in model.named_modules():
        scaling = getattr(layer, "scaling", None)
        if not isinstance(scaling, dict) or adapter not in scaling:
            continue
        scale = float(scaling[adapter])
        if kind == "dora":
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            parts = {"lora_A.weight": a, "lora_B.weight": b, "alpha": torch.tensor(scale * a.shape[0])}
            parts["dora_magnitude"] = layer.lora_magnitude_vector[adapter].weight
        elif kind == "lokr":
            parts = {p: getattr(layer, p)[adapter] for p in _PARTS["lokr"] if adapter in getattr(layer, p, {})}
            first = "lokr_w1" if "lokr_w1" in parts else "lokr_w1_a"
            parts[first] = parts[first] * scale  # baked: readers apply no further scale (alpha = rank below)
            rank = (
                parts["lokr_w2_b"].shape[0]
                if "lokr_w2_b" in parts
                else (parts["lokr_w1_b"].shape[0] if "lokr_w1_b" in parts else None)
            )
            if rank is not None:
                parts["alpha"] = torch.tensor(float(rank))
        elif kind == "loha":
            parts = {p: getattr(layer, p)[adapter] for p in _PARTS["loha"]}
            parts["hada_w1_a"] = parts["hada_w1_a"] * scale
            parts["alpha"] = torch.tensor(float(parts["hada_w1_b"].shape[0]))
        else:
            raise ValueError(f"no file of kind {kind!r} from peft's layers")
        modules[name] = {part: value.detach().to("cpu", torch.float32) for part, value in parts.items()}
    return NetworkFile(kind, modules, {})


def save_network(
    path: Path,
    network: NetworkFile,
    dtype: str,
    metadata: Mapping[str, str],
    fault: str | None = None,
    index: int | None = None,
) -> None:
    """Write a LoKr/LoHa/DoRA file atomically in our layout, through the format registry (alpha and magnitudes in
    the file dtype too)."""
    from zimage_lora.lora.formats import format_tensors

    torch_dtype = SAVE_DTYPES[dtype]
    data = {k: v.to(torch_dtype).contiguous() for k, v in format_tensors(network, "zimage-lora").items()}
    meta = {str(k): str(v) for k, v in sorted(metadata.items())}
    atomic_write_bytes(Path(path), serialize_safetensors(data, meta), fault, index)


def detect_kind(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(".lokr_" in k for k in keys):
        return "lokr"
    if any(".hada_" in k for k in keys):
        return "loha"
    if any(k.endswith(".dora_magnitude") for k in keys):
        return "dora"
    return "lora"


def read_network(path: Path, module_names: Iterable[str] | None = None) -> NetworkFile:
    """A LoRA, LoKr, LoHa or DoRA file in any layout of the format registry (``lora/formats.py``); kohya and
    ``lycoris_`` names need ``module_names``."""
    from zimage_lora.lora.formats import read_network_file

    tensors, meta = read_safetensors(path)
    names = list(module_names) if module_names is not None else None
    network, _ = read_network_file(tensors, meta, names, source=str(path))
    modules = {module: {k: v.float() for k, v in parts.items()} for module, parts in network.modules.items()}
    return NetworkFile(network.kind, modules, meta)


def _factor(parts: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    return parts[name] if name in parts else parts[f"{name}_a"] @ parts[f"{name}_b"]


def delta_weight(kind: str, parts: Mapping[str, torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """The change a module's weight gets (out x in), computed as the LyCORIS/peft formulas define it."""
    if kind == "lokr":
        w1, w2 = _factor(parts, "lokr_w1"), _factor(parts, "lokr_w2")
        rank = (
            parts["lokr_w2_b"].shape[0]
            if "lokr_w2_b" in parts
            else (parts["lokr_w1_b"].shape[0] if "lokr_w1_b" in parts else None)
        )
        scale = float(parts["alpha"]) / rank if rank is not None and "alpha" in parts else 1.0
        return torch.kron(w1, w2) * scale
    if kind == "loha":
        rank = parts["hada_w1_b"].shape[0]
        scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
        return (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"]) * scale
    if kind == "dora":
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        scale = float(parts["alpha"]) / a.shape[0]
        directed = base.float() + scale * (b @ a)
        magnitude = parts["dora_magnitude"]
        return magnitude[:, None] / torch.linalg.norm(directed, dim=1, keepdim=True) * directed - base.float()
    raise ValueError(f"no dense delta for {kind!r}")


def merge_into(model: nn.Module, network: NetworkFile, weight: float, source: str) -> None:
    """Add ``weight`` x the network's delta to the model's Linear weights (generation: nothing to undo)."""
    layers = dict(model.named_modules())
    with torch.no_grad():
        for name, parts in network.modules.items():
            layer = layers.get(name)
            if not isinstance(layer, nn.Linear):
                raise UserError(f"{source} names {name!r}, which is not a Linear layer of this transformer")
            delta = delta_weight(network.kind, parts, layer.weight)
            if delta.shape != layer.weight.shape:
                raise UserError(
                    f"{source} does not fit this transformer: {name} is {tuple(layer.weight.shape)} but "
                    f"the file makes {tuple(delta.shape)}"
                )
            _add_to_weight(layer, weight * delta)


def fuse_lora(model: nn.Module, modules: Mapping[str, LoraWeights], weight: float) -> None:
    """Add ``weight`` x each plain LoRA update (alpha/rank x B @ A) into the model's Linear weights.

    A fused LoRA costs nothing per step (the adapter branch and its dtype casts are gone); the price is one
    rounding of each changed weight to its dtype, and the weight cannot change without reloading. The caller checks
    the modules fit (``network.check_adapter_fits``)."""
    layers = dict(model.named_modules())
    with torch.no_grad():
        for name, lora in modules.items():
            _add_to_weight(layers[name], weight * lora.delta().to(layers[name].weight.device))


def _add_to_weight(layer: nn.Linear, delta: torch.Tensor) -> None:
    """``W + delta`` in float32, rounded once to the weight's dtype."""
    layer.weight.copy_((layer.weight.float() + delta.float()).to(layer.weight.dtype))


def export_plain_lora(network: NetworkFile, model: nn.Module, rank: int | None) -> tuple[dict[str, LoraWeights], float]:
    """A plain LoRA with the same effect: exact when the delta's rank fits, else its best rank-``rank`` SVD
    approximation. Returns the modules and the worst relative error (Frobenius) over modules."""
    layers = dict(model.named_modules())
    out, worst = {}, 0.0
    for name, parts in network.modules.items():
        if network.kind == "lora":
            down, up = parts["lora_A.weight"], parts["lora_B.weight"]
            delta = float(parts.get("alpha", torch.tensor(float(down.shape[0])))) / down.shape[0] * (up @ down)
        else:
            delta = delta_weight(network.kind, parts, layers[name].weight.detach())
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        keep = int((s > s[0] * 1e-7).sum()) if rank is None else min(rank, s.numel())
        keep = max(keep, 1)
        root = s[:keep].sqrt()
        up_f, down_f = (u[:, :keep] * root).float(), (root[:, None] * vh[:keep]).float()
        error = float((delta - up_f @ down_f).norm() / delta.norm().clamp_min(1e-30))
        worst = max(worst, error)
        out[name] = LoraWeights(down=down_f, up=up_f, alpha=float(keep))
    return out, worst
