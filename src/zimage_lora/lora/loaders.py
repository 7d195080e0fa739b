"""What each tool's LoRA loader does with a Z-Image LoRA file: how many keys it applies and how many it drops.

- **diffusers** (``ZImagePipeline.load_lora_weights``): computed by running diffusers' own conversion
  (``ZImageLoraLoaderMixin.lora_state_dict``) on the file's tensors and matching the result against the Linear layers
  of the transformer built on the meta device, with the two gates its loader applies first: every key must hold
  ``lora`` or ``lokr`` (else it refuses the file), and only ``transformer.`` keys reach the model (the others load
  nothing, with a warning). Modules the model lacks are left out by peft with a warning.
- **ComfyUI**: its key rules at Comfy-Org/ComfyUI ``comfy/lora.py`` @17358c8f and ``comfy/utils.py`` @09708eae
  (``model_lora_keys_unet``'s Lumina2 branch and ``z_image_to_diffusers``), restated here: each diffusers module
  name D of the main blocks, both refiners and the embedders is accepted as ``diffusion_model.D``,
  ``transformer.D``, ``lycoris_<D with _>`` and bare ``D``; ComfyUI's own names P as ``diffusion_model.P`` and
  ``lora_unet_<P with _>``. q, k and v patch row slices of the fused ``attention.qkv`` weight. A key nothing
  consumes is dropped with "lora key not loaded"; ``context_refiner.N.adaLN_modulation.0`` is mapped to a weight
  the model does not have, so its keys are taken and the patch is "NOT LOADED". Older ComfyUI builds dropped the
  refiner blocks; the report says so whenever a file holds refiner keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from zimage_lora.lora.formats import TransformerNames

COMFYUI_COMMIT = "Comfy-Org/ComfyUI comfy/lora.py @17358c8f, comfy/utils.py @09708eae"
# The adapter suffix pairs ComfyUI's LoRA adapter recognises (comfy/weight_adapter/lora.py @6f98b150), up then down
_COMFY_PAIRS = [
    ("lora_up.weight", "lora_down.weight"),
    ("lora_B.weight", "lora_A.weight"),
    ("lora.up.weight", "lora.down.weight"),
    ("lora_B.default.weight", "lora_A.default.weight"),
]
_COMFY_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
_COMFY_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_COMFY_EXTRA = ("alpha", "dora_scale")


@dataclass
class LoaderCount:
    loader: str
    modules: int = 0  # weight patches applied
    applied: int = 0  # file keys used
    dropped: list[str] = field(default_factory=list)  # file keys left out
    warnings: list[str] = field(default_factory=list)
    refused: str | None = None  # the loader refuses the whole file: why

    def as_dict(self) -> dict:
        return {
            "loader": self.loader,
            "modules": self.modules,
            "applied": self.applied,
            "dropped": len(self.dropped),
            "dropped_keys": self.dropped[:20],
            "warnings": self.warnings,
            "refused": self.refused,
        }


# --- diffusers ------------------------------------------------------------------------------------------------------


def diffusers_count(tensors: Mapping[str, torch.Tensor], names: TransformerNames) -> LoaderCount:
    from diffusers.loaders.lora_pipeline import ZImageLoraLoaderMixin

    from zimage_lora.quiet import quiet_libraries

    quiet_libraries()
    count = LoaderCount("diffusers")
    try:
        converted = ZImageLoraLoaderMixin.lora_state_dict({k: v for k, v in tensors.items()})
    except (ValueError, KeyError, RuntimeError) as e:
        count.refused = f"its conversion fails: {str(e).splitlines()[0][:200]}"
        count.dropped = sorted(tensors)
        return count
    if not all("lora" in k or "lokr" in k for k in converted):
        count.refused = "it holds keys that are neither LoRA nor LoKr (diffusers reads those two only)"
        count.dropped = sorted(tensors)
        return count
    modules: set[str] = set()
    for key in converted:
        module = _MODULE_PART.sub("", key.removeprefix("transformer."))
        if key.startswith("transformer.") and module in names.linears:
            modules.add(module)
            count.applied += 1
        else:
            count.dropped.append(key)
    count.modules = len(modules)
    if not any(k.startswith("transformer.") for k in converted):
        count.warnings.append("no key has the transformer. prefix after conversion: diffusers loads nothing")
    elif count.dropped:
        count.warnings.append(f"{len(count.dropped)} keys name no module of the transformer: peft leaves them out")
    return count


_MODULE_PART = re.compile(r"\.(lora_[AB](\.[A-Za-z0-9_]+)?\.weight|lokr_w[12](_[ab])?|alpha|lora_magnitude_vector)$")


# --- ComfyUI --------------------------------------------------------------------------------------------------------


def _comfy_map(names: TransformerNames) -> dict[str, tuple[str, bool]]:
    """ComfyUI's alias -> (target native weight, whether the model has it), for this transformer's config."""
    n_layers, n_refiner = names.config.get("n_layers", 30), names.config.get("n_refiner_layers", 2)
    blocks = [f"layers.{i}" for i in range(n_layers)]
    blocks += [f"context_refiner.{i}" for i in range(n_refiner)] + [f"noise_refiner.{i}" for i in range(n_refiner)]
    diffusers_to_native: dict[str, str] = {}
    for b in blocks:
        for x in "qkv":
            diffusers_to_native[f"{b}.attention.to_{x}"] = f"{b}.attention.qkv"
        diffusers_to_native[f"{b}.attention.to_out.0"] = f"{b}.attention.out"
        for w in ("w1", "w2", "w3"):
            diffusers_to_native[f"{b}.feed_forward.{w}"] = f"{b}.feed_forward.{w}"
        # mapped for the context refiner too, which has no such weight (ComfyUI's "NOT LOADED")
        diffusers_to_native[f"{b}.adaLN_modulation.0"] = f"{b}.adaLN_modulation.0"
    diffusers_to_native |= {
        "all_x_embedder.2-1": "x_embedder",
        "all_final_layer.2-1.linear": "final_layer.linear",
        "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1",
        "cap_embedder.1": "cap_embedder.1",
        "t_embedder.mlp.0": "t_embedder.mlp.0",
        "t_embedder.mlp.2": "t_embedder.mlp.2",
    }
    exists: dict[str, bool] = {}  # a native weight exists when any diffusers layer it stands for does
    for d, native in diffusers_to_native.items():
        exists[native] = exists.get(native, False) or d in names.linears
    aliases: dict[str, tuple[str, bool]] = {}
    for native in exists:  # the generic forms, native names
        aliases[f"diffusion_model.{native}"] = (native, exists[native])
        aliases["lora_unet_" + native.replace(".", "_")] = (native, exists[native])
    for d, native in diffusers_to_native.items():  # the Lumina2 branch, diffusers names
        for alias in (f"diffusion_model.{d}", f"transformer.{d}", "lycoris_" + d.replace(".", "_"), d):
            aliases[alias] = (native + ("#" + d[-1] if _is_qkv(d) else ""), exists[native])
    return aliases


def _is_qkv(name: str) -> bool:
    return re.search(r"\.attention\.to_[qkv]$", name) is not None


def comfyui_count(keys: list[str], names: TransformerNames) -> LoaderCount:
    count = LoaderCount("comfyui")
    aliases = _comfy_map(names)
    keyset = set(keys)
    consumed: set[str] = set()
    slices = 0
    refiner = 0
    for alias, (target, exists) in aliases.items():
        found: list[str] = []
        for up, down in _COMFY_PAIRS:
            if f"{alias}.{up}" in keyset and f"{alias}.{down}" in keyset:
                found = [f"{alias}.{up}", f"{alias}.{down}"]
                break
        if not found:
            found = [f"{alias}.{p}" for p in (*_COMFY_LOKR, *_COMFY_LOHA) if f"{alias}.{p}" in keyset]
        if not found:
            continue
        found += [f"{alias}.{p}" for p in _COMFY_EXTRA if f"{alias}.{p}" in keyset]
        consumed.update(found)
        if exists:
            count.modules += 1
            count.applied += len(found)
            slices += "#" in target
            refiner += "refiner." in target
        else:
            count.warnings.append(
                f"NOT LOADED diffusion_model.{target.split('#')[0]}.weight (the model has no such weight)"
            )
    count.dropped = sorted(k for k in keys if k not in consumed)
    if slices:
        count.warnings.append(
            f"{slices} q/k/v patches land on row slices of a fused attention.qkv weight (ComfyUI pull request #12717 "
            "reported such patches being lost; fused qkv keys avoid the question)"
        )
    if refiner:
        count.warnings.append(
            f"{refiner} patches are on refiner blocks: ComfyUI builds before the refiners were mapped drop them "
            "(look for context_refiner in your ComfyUI's comfy/utils.py)"
        )
    if count.dropped:
        count.warnings.append(f"{len(count.dropped)} keys would be dropped with 'lora key not loaded'")
    return count
