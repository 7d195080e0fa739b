"""The LoRA file formats for Z-Image: one registry that detects a file's layout, reads it into per-module weight
updates and writes them in any layout a tool needs.

A file read is a ``NetworkFile``: its kind (lora, lokr, loha, dora) and, per diffusers module path of the
transformer (``layers.0.attention.to_q``), the parts in our naming (``lora_A.weight`` (rank x in), ``lora_B.weight``
(out x rank), ``alpha``; ``lokr_w1``...; ``hada_w1_a``...; ``dora_magnitude``). Every format below is an entry with
the layout it follows and where that layout comes from (the tool's file and commit; the layouts are described from
reading those sources, no code of theirs is used):

- ``zimage-lora``: ours, ``diffusion_model.<path>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha`` (every kind).
- ``ai-toolkit``: ``diffusion_model.<path>.lora_A/B.weight`` without alpha (alpha = rank there; ostris/ai-toolkit
  toolkit/lora_special.py @a6c70a75 and extensions_built_in/diffusion_models/z_image/z_image.py @ad5a7e97); its LoKr
  files ``lycoris_<path with _>.lokr_w1/.lokr_w2/.alpha`` are read too.
- ``diffusers``: peft's names under ``transformer.``, no alpha (what ``save_lora_weights`` writes and
  ``load_lora_weights`` reads without conversion; diffusers 0.42.1 loaders/lora_pipeline.py).
- ``kohya``: ``lora_unet_<path with _>.lora_down.weight / .lora_up.weight / .alpha``, as musubi-tuner writes for
  Z-Image (kohya-ss/musubi-tuner src/musubi_tuner/networks/lora_zimage.py @d6a1fbca).
- ``comfyui``: ComfyUI's native Z-Image names (comfy/ldm/lumina/model.py @617048a5): q, k and v fused into one
  ``attention.qkv`` LoRA of rank r_q + r_k + r_v (down stacked, up block-diagonal, exact), ``attention.out``,
  ``x_embedder``, ``final_layer.*``; ComfyUI maps these onto its weights by their own names.
- ``diffsynth``: peft's names without a prefix, ``<path>.lora_A.default.weight``, no alpha (modelscope/
  DiffSynth-Studio diffsynth/diffusion/training_module.py @e23578b8).

Formats without alpha keys carry the scale alpha / rank folded into ``lora_B``; a reader then takes alpha = rank.
Reading a ``kohya`` or ``lycoris_`` file needs the transformer's module names (underscores are ambiguous):
``transformer_names`` builds the Z-Image transformer on the meta device from its configuration (or a given model's).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from zimage_lora.errors import UserError
from zimage_lora.lora.variants import KINDS, NetworkFile, detect_kind

PREFIX = "diffusion_model."
LORA_PARTS = ("lora_A.weight", "lora_B.weight")
# A file key's ending -> our part name (the first that matches wins; peft's adapter-named forms first)
_SUFFIXES = [
    (re.compile(r"\.lora_A\.[A-Za-z0-9_]+\.weight$"), "lora_A.weight"),
    (re.compile(r"\.lora_B\.[A-Za-z0-9_]+\.weight$"), "lora_B.weight"),
    (re.compile(r"\.lora_A\.weight$"), "lora_A.weight"),
    (re.compile(r"\.lora_B\.weight$"), "lora_B.weight"),
    (re.compile(r"\.lora_down\.weight$"), "lora_A.weight"),
    (re.compile(r"\.lora_up\.weight$"), "lora_B.weight"),
    (re.compile(r"\.(lokr_w[12](?:_[ab])?)$"), None),
    (re.compile(r"\.(hada_w[12]_[ab])$"), None),
    (re.compile(r"\.(dora_magnitude)$"), None),
    (re.compile(r"\.(alpha)$"), None),
]
# diffusers module path <-> ComfyUI's native name, for the names that differ (q/k/v are fused separately)
_COMFY_RENAMES = [
    (
        re.compile(r"^(?P<b>.+)\.attention\.to_out\.0$"),
        r"\g<b>.attention.out",
        re.compile(r"^(?P<b>.+)\.attention\.out$"),
        r"\g<b>.attention.to_out.0",
    ),
    (re.compile(r"^all_x_embedder\.2-1$"), "x_embedder", re.compile(r"^x_embedder$"), "all_x_embedder.2-1"),
    (
        re.compile(r"^all_final_layer\.2-1\.(?P<r>.+)$"),
        r"final_layer.\g<r>",
        re.compile(r"^final_layer\.(?P<r>.+)$"),
        r"all_final_layer.2-1.\g<r>",
    ),
]
_QKV = re.compile(r"^(?P<b>.+)\.attention\.to_(?P<x>[qkv])$")
_COMFY_NATIVE = re.compile(r"\.attention\.(qkv|out)\.|^(diffusion_model\.)?(x_embedder|final_layer)\.")


@dataclass(frozen=True)
class Format:
    name: str
    label: str
    follows: str  # whose layout, from which source
    kinds: tuple[str, ...]  # the network kinds it writes
    alpha: bool  # whether its files hold alpha keys (else the scale is folded into lora_B)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("zimage-lora", "zimage-lora (ComfyUI and diffusers read it)", "this project", KINDS, True),
        Format("ai-toolkit", "AI Toolkit", "ostris/ai-toolkit toolkit/lora_special.py @a6c70a75", ("lora",), False),
        Format("diffusers", "diffusers / peft", "diffusers 0.42.1 loaders/lora_pipeline.py", ("lora",), False),
        Format(
            "kohya", "kohya / musubi-tuner", "kohya-ss/musubi-tuner networks/lora_zimage.py @d6a1fbca", ("lora",), True
        ),
        Format(
            "comfyui",
            "ComfyUI native (fused qkv)",
            "Comfy-Org/ComfyUI comfy/ldm/lumina/model.py @617048a5",
            ("lora",),
            True,
        ),
        Format(
            "diffsynth",
            "DiffSynth-Studio",
            "modelscope/DiffSynth-Studio training_module.py @e23578b8",
            ("lora",),
            False,
        ),
    )
}


# --- detecting and reading ------------------------------------------------------------------------------------------


def detect_format(keys: Sequence[str]) -> str:
    """The registry name of the layout these keys follow; UserError when none."""
    keys = list(keys)
    if not keys:
        raise UserError("the file holds no tensors; it is not a LoRA")
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith("lycoris_") for k in keys):
        return "ai-toolkit"
    if any(_COMFY_NATIVE.search(k) for k in keys):
        return "comfyui"
    if any(k.startswith(("transformer.", "base_model.model.", "model.diffusion_model.")) for k in keys):
        return "diffusers"
    if all(k.startswith(PREFIX) for k in keys):  # ours always stores alpha; AI Toolkit's LoRAs never do
        has_alpha = any(k.endswith(".alpha") for k in keys)
        return "zimage-lora" if has_alpha or detect_kind(keys) != "lora" else "ai-toolkit"
    if any(re.search(r"\.lora_[AB]\.default\.weight$", k) for k in keys):
        return "diffsynth"
    if all(re.search(r"\.(lora_[AB]\.weight|alpha)$", k) for k in keys):
        return "diffsynth"  # peft's names with no prefix (DiffSynth's loader and ComfyUI read them the same)
    raise UserError(f"its keys (e.g. {keys[0]!r}) follow no LoRA layout for Z-Image this tool knows")


def _part(key: str) -> tuple[str, str] | None:
    """(file key's module name, our part name) or None for a key of no LoRA layout."""
    for pattern, part in _SUFFIXES:
        m = pattern.search(key)
        if m is not None:
            return key[: m.start()], part or m.group(1)
    return None


def _module_path(name: str, fmt: str, flat: Mapping[str, str] | None, source: str) -> str:
    for prefix in ("model.diffusion_model.", PREFIX, "transformer.", "base_model.model.", "lora_unet_", "lycoris_"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            if prefix in ("lora_unet_", "lycoris_"):
                if flat is None:
                    raise UserError(f"{source} ({fmt}) names modules with underscores; read it with the model's names")
                if name not in flat:
                    raise UserError(
                        f"{source}: {prefix}{name} names no layer of this transformer; a LoRA for another model "
                        "family (SDXL, Flux...)?"
                    )
                name = flat[name]
            break
    if fmt == "comfyui":
        for _, _, native, diffusers_name in _COMFY_RENAMES:
            if native.match(name):
                return native.sub(diffusers_name, name)
    return name


def read_network_file(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    names: Sequence[str] | None = None,
    source: str = "LoRA file",
) -> tuple[NetworkFile, str]:
    """Any known layout as a ``NetworkFile`` in diffusers module paths, and the format's name."""
    try:
        fmt = detect_format(list(tensors))
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    flat = {n.replace(".", "_"): n for n in names} if names is not None else None
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        found = _part(key)
        if found is None:
            raise UserError(f"{source}: unexpected key {key!r}, not one of a LoRA, LoKr, LoHa or DoRA file")
        name, part = found
        modules.setdefault(_module_path(name, fmt, flat, source), {})[part] = value
    kind = detect_kind(f".{p}" for parts in modules.values() for p in parts)
    for path, parts in modules.items():
        if kind in ("lora", "dora") and not all(p in parts for p in LORA_PARTS):
            missing = "lora_A (down)" if "lora_A.weight" not in parts else "lora_B (up)"
            raise UserError(f"{source}: module {path} has no {missing} weight; the file is incomplete")
        if kind in ("lora", "dora"):
            down, up = parts["lora_A.weight"], parts["lora_B.weight"]
            if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
                raise UserError(f"{source}: {path} has mismatched shapes A{tuple(down.shape)} B{tuple(up.shape)}")
            parts.setdefault("alpha", torch.tensor(float(down.shape[0])))
    if fmt == "comfyui":
        modules = _split_qkv(modules)
    return NetworkFile(kind, dict(sorted(modules.items())), dict(metadata)), fmt


def _split_qkv(modules: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """A fused ``attention.qkv`` LoRA as three: each takes its rows of up and the columns of the rank that reach
    them (all of down), so each update is exactly its slice of the fused one."""
    out = {}
    for path, parts in modules.items():
        if not path.endswith(".attention.qkv"):
            out[path] = parts
            continue
        block = path.removesuffix(".attention.qkv")
        down, up = parts["lora_A.weight"].float(), parts["lora_B.weight"].float()
        scale = float(parts["alpha"]) / down.shape[0]
        dim = up.shape[0] // 3
        for i, x in enumerate("qkv"):
            rows = up[i * dim : (i + 1) * dim]
            used = rows.abs().sum(0) > 0  # a block-diagonal file: only this projection's own rank
            if not bool(used.any()):
                continue
            rank = int(used.sum())
            out[f"{block}.attention.to_{x}"] = {
                "lora_A.weight": down[used],
                "lora_B.weight": rows[:, used],
                "alpha": torch.tensor(scale * rank),
            }
    return out


# --- writing --------------------------------------------------------------------------------------------------------


def _scale(parts: Mapping[str, torch.Tensor]) -> float:
    return float(parts["alpha"]) / parts["lora_A.weight"].shape[0]


def format_tensors(network: NetworkFile, fmt: str) -> dict[str, torch.Tensor]:
    """The file tensors (float32) of ``network`` in format ``fmt``; UserError for what the format cannot hold."""
    spec = FORMATS[fmt]
    if network.kind not in spec.kinds:
        raise UserError(
            f"the {spec.label} format holds plain LoRAs only and this is a {network.kind} file; turn it into a plain "
            "LoRA with zimage-lora export-lora (exact when its rank allows) and convert that"
        )
    out: dict[str, torch.Tensor] = {}
    modules = network.modules
    if fmt == "comfyui":
        modules = _fuse_qkv(modules)
    for path, parts in modules.items():
        if fmt == "zimage-lora":
            for part, value in parts.items():
                out[f"{PREFIX}{path}.{part}"] = value.float()
            continue
        down, up = parts["lora_A.weight"].float(), parts["lora_B.weight"].float()
        if not spec.alpha:
            up = up * _scale(parts)
        if fmt == "ai-toolkit":
            out[f"{PREFIX}{path}.lora_A.weight"], out[f"{PREFIX}{path}.lora_B.weight"] = down, up
        elif fmt == "diffusers":
            out[f"transformer.{path}.lora_A.weight"], out[f"transformer.{path}.lora_B.weight"] = down, up
        elif fmt == "diffsynth":
            out[f"{path}.lora_A.default.weight"], out[f"{path}.lora_B.default.weight"] = down, up
        elif fmt == "kohya":
            key = "lora_unet_" + path.replace(".", "_")
            out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down, up
            out[f"{key}.alpha"] = parts["alpha"].float().reshape(())
        elif fmt == "comfyui":
            native = path
            for diffusers_name, native_name, _, _ in _COMFY_RENAMES:
                if diffusers_name.match(path):
                    native = diffusers_name.sub(native_name, path)
            out[f"{PREFIX}{native}.lora_A.weight"], out[f"{PREFIX}{native}.lora_B.weight"] = down, up
            out[f"{PREFIX}{native}.alpha"] = parts["alpha"].float().reshape(())
    return out


def _fuse_qkv(modules: Mapping[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """q, k and v of a block as one LoRA on the fused weight: down stacked, up block-diagonal with each scale
    folded in (alpha = the fused rank, scale 1); a projection without a LoRA gets rows of zeros."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    blocks: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for path, parts in modules.items():
        m = _QKV.match(path)
        if m is None:
            out[path] = parts
        else:
            blocks.setdefault(m.group("b"), {})[m.group("x")] = parts
    for block, found in blocks.items():
        dim = next(iter(found.values()))["lora_B.weight"].shape[0]
        ins = next(iter(found.values()))["lora_A.weight"].shape[1]
        downs, ups = [], []
        for x in "qkv":
            parts = found.get(x)
            if parts is None:
                continue
            downs.append(parts["lora_A.weight"].float())
            ups.append((x, parts["lora_B.weight"].float() * _scale(parts)))
        rank = sum(d.shape[0] for d in downs)
        up = torch.zeros(3 * dim, rank)
        col = 0
        for x, u in ups:
            row = "qkv".index(x) * dim
            up[row : row + dim, col : col + u.shape[1]] = u
            col += u.shape[1]
        down = torch.cat(downs) if downs else torch.zeros(0, ins)
        out[f"{block}.attention.qkv"] = {"lora_A.weight": down, "lora_B.weight": up, "alpha": torch.tensor(float(rank))}
    return dict(sorted(out.items()))


# --- the weight updates ---------------------------------------------------------------------------------------------


def module_updates(network: NetworkFile, base: Callable[[str], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Each module's dense weight update (out x in), float64; DoRA needs the base weights (``base(path)``)."""
    from zimage_lora.lora.variants import delta_weight

    out = {}
    for path, parts in network.modules.items():
        if network.kind == "lora":
            out[path] = _scale(parts) * (parts["lora_B.weight"].double() @ parts["lora_A.weight"].double())
        else:
            if network.kind == "dora" and base is None:
                raise UserError("a DoRA file's update depends on the base weights; give --model")
            weight = base(path) if base is not None else None
            out[path] = delta_weight(network.kind, {k: v.double() for k, v in parts.items()}, weight).double()
    return out


def largest_difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> tuple[float, str]:
    """The largest per-module difference of two sets of updates, relative to that module's largest entry."""
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))[0]
        return float("inf"), missing
    worst, where = 0.0, ""
    for path in a:
        scale = float(a[path].abs().max()) or 1.0
        diff = float((a[path] - b[path]).abs().max()) / scale
        if diff > worst:
            worst, where = diff, path
    return worst, where


# --- the model's names ----------------------------------------------------------------------------------------------


@dataclass
class TransformerNames:
    """What reading and checking files needs of a transformer: its Linear layers' paths and shapes."""

    linears: dict[str, tuple[int, int]]  # path -> (out, in)
    config: dict
    source: str


def transformer_names(model: str | Path | None = None) -> TransformerNames:
    """The Z-Image transformer's Linear layers, built on the meta device (no weights read): from the real model's
    configuration, or from ``model`` (a folder holding ``transformer/config.json``, or that folder itself)."""
    import json

    from diffusers import ZImageTransformer2DModel
    from torch import nn

    from zimage_lora.training.memory import ZIMAGE_TRANSFORMER

    if model is None:
        config, source = dict(ZIMAGE_TRANSFORMER), "Z-Image (6B)"
    else:
        folder = Path(model)
        path = folder / "transformer" / "config.json"
        path = path if path.is_file() else folder / "config.json"
        if not path.is_file():
            raise UserError(f"--model {model}: no transformer/config.json there; give a diffusers model folder")
        config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
        source = str(folder)
    with torch.device("meta"):
        transformer = ZImageTransformer2DModel(**config)
    linears = {n: (m.out_features, m.in_features) for n, m in transformer.named_modules() if isinstance(m, nn.Linear)}
    return TransformerNames(linears, config, source)
