"""``zimage-lora lora extract | bake``: a LoRA from the difference of two transformers, and LoRAs added into a
transformer's weights for tools that take no LoRA.

A model is a diffusers folder (``transformer/`` with ``config.json`` and safetensors weights, or that folder itself)
or one ``.safetensors`` file with ComfyUI's native Z-Image names (Comfy-Org/ComfyUI comfy/ldm/lumina/model.py
@617048a5; the names are described from reading that file, none of its code is used): an optional
``diffusion_model.`` prefix, ``attention.qkv`` = to_q, to_k and to_v stacked along the output rows, ``attention.out``
= ``to_out.0``, ``attention.q_norm`` / ``k_norm`` = ``norm_q`` / ``norm_k``, ``x_embedder`` = ``all_x_embedder.2-1``,
``final_layer.*`` = ``all_final_layer.2-1.*``, every other name as in diffusers; ``norm_final.weight`` (left over from
Lumina 2, used by neither) is dropped as diffusers' own single-file loader drops it. Such a file has no
configuration: the shapes give it (dim, layers, heads, caption width), and the rotary axes are Z-Image's scaled to
the head width. Either way the weights are checked against the transformer that configuration builds (on the meta
device), and read one tensor at a time from the mapped files, so a 6B model never sits twice in memory.

``extract`` takes, for every Linear layer whose weight differs (and only those), the float64 SVD of tuned - base and
keeps rank r (fewer when the difference has lower rank): up = U_r sqrt(S_r), down = sqrt(S_r) V_r^T, alpha = r, so
the file's update is the best rank-r approximation. The energy kept is the sum of kept S^2 over all S^2; the error
is ||D - up down||_F / ||D||_F with the factors rounded to the file's dtype. Other tensors that differ (norms,
biases, pad tokens) are counted and named: no LoRA can hold them.

``bake`` writes W + sum_i w_i delta_i, computed in float32 and rounded once to the output dtype (as ``generate``
fuses), every delta taken against the original weight (a DoRA's depends on it). The output is a diffusers
transformer folder (``save_pretrained`` into a temporary folder, then renamed) or, for a name ending in
``.safetensors``, one ComfyUI file written tensor by tensor and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zimage_lora.errors import UserError
from zimage_lora.files import fsync_dir
from zimage_lora.lora.formats import FORMATS, TransformerNames, module_updates
from zimage_lora.lora.io import SAVE_DTYPES
from zimage_lora.lora.tools import read_checked, write_network
from zimage_lora.lora.variants import NetworkFile

COMFY_PREFIX = "diffusion_model."
PATCH = "2-1"  # Z-Image's only patch size (2x2, 1 frame): diffusers names its embedder and final layer by it
RANK_CUTOFF = 1e-10  # singular values below this fraction of the largest are zero: the difference's rank is lower
# (diffusers, ComfyUI) names that differ: a fragment inside a key, or its start when it has no leading dot (q/k/v
# are fused separately)
_RENAMES = [
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
    (f"all_x_embedder.{PATCH}.", "x_embedder."),
    (f"all_final_layer.{PATCH}.", "final_layer."),
]
_QKV = re.compile(r"^(?P<b>.+)\.attention\.to_(?P<x>[qkv])\.(?P<p>weight|bias)$")
_FUSED = re.compile(r"^(?P<b>.+)\.attention\.qkv\.(?P<p>weight|bias)$")
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


# --- reading a transformer ------------------------------------------------------------------------------------------


@dataclass
class ModelWeights:
    """A transformer's tensors under diffusers names, read on demand, and the configuration they fit."""

    source: str
    layout: str  # "diffusers" | "comfyui"
    config: dict
    shapes: dict[str, tuple[int, ...]]  # diffusers state-dict key -> shape
    linears: dict[str, tuple[int, int]]  # Linear layer path -> (out, in)
    reads: dict[str, Callable[[], torch.Tensor]] = field(repr=False)

    def read(self, key: str) -> torch.Tensor:
        return self.reads[key]()

    def names(self) -> TransformerNames:
        return TransformerNames(self.linears, self.config, self.source)

    def is_linear_weight(self, key: str) -> bool:
        return key.endswith(".weight") and key.removesuffix(".weight") in self.linears


def open_model(path: str | Path) -> ModelWeights:
    """A diffusers folder or a ComfyUI single file, checked against the transformer of its configuration."""
    path = Path(path)
    if path.is_dir():
        return _open_diffusers(path)
    if path.is_file():
        return _open_comfyui(path)
    raise UserError(f"{path}: no such file or folder; give a diffusers model folder or a ComfyUI .safetensors file")


def _safe_open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable .safetensors file ({e}); re-download or re-export it") from None


def _open_diffusers(folder: Path) -> ModelWeights:
    root = folder / "transformer" if (folder / "transformer" / "config.json").is_file() else folder
    if not (root / "config.json").is_file():
        raise UserError(f"{folder}: no transformer/config.json there; give a diffusers model folder")
    config = {k: v for k, v in json.loads((root / "config.json").read_text()).items() if not k.startswith("_")}
    index = root / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        files = sorted({root / name for name in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise UserError(f"{root} holds no .safetensors weights; save the model with safe_serialization")
    shapes, reads = {}, {}
    for file in files:
        handle = _safe_open(file)
        for key in handle.keys():
            shapes[key] = tuple(handle.get_slice(key).get_shape())
            reads[key] = lambda handle=handle, key=key: handle.get_tensor(key)
    return _checked(str(folder), "diffusers", config, shapes, reads)


def _rename(key: str, pairs: Sequence[tuple[str, str]]) -> str:
    for old, new in pairs:
        if old.startswith(".") and old in key:
            return key.replace(old, new, 1)
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def diffusers_key(comfy_name: str) -> str:
    """The diffusers name of a (non-qkv) ComfyUI key without its prefix."""
    return _rename(comfy_name, [(new, old) for old, new in _RENAMES])


def comfy_key(key: str) -> str:
    """ComfyUI's name of a diffusers key (q/k/v give their fused ``qkv`` name), with the prefix."""
    m = _QKV.match(key)
    if m is not None:
        return f"{COMFY_PREFIX}{m.group('b')}.attention.qkv.{m.group('p')}"
    return COMFY_PREFIX + _rename(key, _RENAMES)


def _open_comfyui(file: Path) -> ModelWeights:
    handle = _safe_open(file)
    keys = list(handle.keys())
    prefix = next((p for p in ("model.diffusion_model.", COMFY_PREFIX) if any(k.startswith(p) for k in keys)), "")
    shapes, reads, dim = {}, {}, 0
    for key in keys:
        if not key.startswith(prefix) or key[len(prefix) :] == "norm_final.weight":
            continue
        name, shape = key[len(prefix) :], tuple(handle.get_slice(key).get_shape())
        fused = _FUSED.match(name)
        if fused is None:
            shapes[diffusers_key(name)] = shape
            reads[diffusers_key(name)] = lambda key=key: handle.get_tensor(key)
            continue
        dim = dim or _dim(handle, prefix, file)
        kv = (shape[0] - dim) // 2  # k and v rows (fewer than q's when there are fewer key/value heads)
        if kv <= 0 or dim + 2 * kv != shape[0]:
            raise UserError(f"{file}: {key} has {shape[0]} rows, which do not split into q, k and v of width {dim}")
        for x, start, rows in (("q", 0, dim), ("k", dim, kv), ("v", dim + kv, kv)):
            target = f"{fused.group('b')}.attention.to_{x}.{fused.group('p')}"
            shapes[target] = (rows, *shape[1:])
            reads[target] = lambda key=key, start=start, rows=rows: handle.get_slice(key)[start : start + rows]
    config = _comfy_config(handle, prefix, file)
    return _checked(str(file), "comfyui", config, shapes, reads)


def _dim(handle, prefix: str, file: Path) -> int:
    key = f"{prefix}x_embedder.weight"
    if key not in handle.keys():
        first = next(iter(handle.keys()), "nothing")
        raise UserError(
            f"{file} holds no Z-Image transformer (no {key}; its keys look like {first!r}); give a diffusers folder "
            "or a ComfyUI diffusion model file"
        )
    return int(handle.get_slice(key).get_shape()[0])


def _comfy_config(handle, prefix: str, file: Path) -> dict:
    """The configuration a ComfyUI file's shapes give (the file has none); the rest is Z-Image's."""
    from zimage_lora.training.memory import ZIMAGE_TRANSFORMER

    def shape(name: str) -> list[int]:
        return list(handle.get_slice(prefix + name).get_shape())

    keys = list(handle.keys())

    def count(block: str) -> int:
        found = {int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(prefix)}{block}\.(\d+)\.", k))}
        return max(found) + 1 if found else 0

    dim = _dim(handle, prefix, file)
    patch, frames = ZIMAGE_TRANSFORMER["all_patch_size"][0], ZIMAGE_TRANSFORMER["all_f_patch_size"][0]
    for name in ("layers.0.attention.q_norm.weight", "layers.0.attention.qkv.weight", "cap_embedder.1.weight"):
        if prefix + name not in keys:
            raise UserError(f"{file} is no Z-Image diffusion model (no {prefix}{name}); give a Z-Image transformer")
    head = shape("layers.0.attention.q_norm.weight")[0]
    real_head = sum(ZIMAGE_TRANSFORMER["axes_dims"])
    config = {
        **ZIMAGE_TRANSFORMER,
        "dim": dim,
        "in_channels": shape("x_embedder.weight")[1] // (patch * patch * frames),
        "n_layers": count("layers"),
        "n_refiner_layers": count("noise_refiner"),
        "n_heads": dim // head,
        "n_kv_heads": (shape("layers.0.attention.qkv.weight")[0] - dim) // (2 * head),
        "cap_feat_dim": shape("cap_embedder.1.weight")[1],
        "axes_dims": [d * head // real_head for d in ZIMAGE_TRANSFORMER["axes_dims"]],
    }
    if f"{prefix}siglip_embedder.1.weight" in keys:
        config["siglip_feat_dim"] = shape("siglip_embedder.1.weight")[1]
    return config


def _meta_transformer(config: dict, source: str):
    from diffusers import ZImageTransformer2DModel

    try:
        with torch.device("meta"):
            return ZImageTransformer2DModel(**config)
    except (TypeError, ValueError, AssertionError, ZeroDivisionError) as e:
        raise UserError(f"{source}: its configuration does not build a Z-Image transformer ({e})") from None


def _checked(source: str, layout: str, config: dict, shapes: dict, reads: dict) -> ModelWeights:
    from torch import nn

    model = _meta_transformer(config, source)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"holds {extra[0]}, which it has no place for"
        raise UserError(
            f"{source} is not the Z-Image transformer its configuration describes: it {what} "
            f"({len(missing)} missing, {len(extra)} unexpected tensors)"
        )
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise UserError(
                f"{source}: {key} is {_size(shapes[key])} but its configuration makes it {_size(shape)}; "
                "the weights and config.json are of different models"
            )
    linears = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return ModelWeights(source, layout, config, dict(sorted(shapes.items())), linears, reads)


def _size(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) or "a scalar"


# --- extract --------------------------------------------------------------------------------------------------------


@dataclass
class ModuleFit:
    path: str
    rank: int
    energy: float  # kept S^2 / all S^2
    total: float  # all S^2 = ||tuned - base||_F^2
    error: float  # ||D - up down||_F / ||D||_F, factors in the file's dtype

    def line(self) -> str:
        return f"  {self.path}: rank {self.rank}, energy kept {self.energy:.6f}, relative error {self.error:.2e}"


@dataclass
class Extraction:
    network: NetworkFile
    fits: list[ModuleFit]
    not_representable: list[str]  # tensors that differ outside Linear weights
    unchanged: int  # Linear layers equal in both

    @property
    def energy(self) -> float:
        """The energy kept over all modules (each weighted by its difference's squared norm)."""
        total = sum(f.total for f in self.fits)
        return sum(f.energy * f.total for f in self.fits) / total if total else 1.0

    @property
    def worst(self) -> ModuleFit:
        return max(self.fits, key=lambda f: f.error)


def low_rank(
    path: str, diff: torch.Tensor, rank: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, ModuleFit]:
    """(down, up, fit) of the best rank-``rank`` approximation of ``diff`` (float64 SVD; fewer ranks when the
    difference has fewer non-zero singular values); the error is that of the factors rounded to ``dtype``."""
    diff = diff.double()
    u, s, vh = torch.linalg.svd(diff, full_matrices=False)
    squares = s.square()
    total = float(squares.sum())
    keep = max(1, min(rank, int((s > s[0] * RANK_CUTOFF).sum())))
    root = s[:keep].sqrt()
    up, down = (u[:, :keep] * root).to(dtype), (root[:, None] * vh[:keep]).to(dtype)
    error = float((diff - up.double() @ down.double()).norm()) / total**0.5 if total else 0.0
    fit = ModuleFit(path, keep, float(squares[:keep].sum()) / total if total else 1.0, total, error)
    return down.cpu().float(), up.cpu().float(), fit


def extract_lora(
    base: str | Path,
    tuned: str | Path,
    out: str | Path,
    rank: int,
    dtype: str = "bf16",
    fmt: str = "zimage-lora",
    device: str = "cpu",
    echo: Callable[[str], None] | None = None,
) -> Extraction:
    """The LoRA of ``tuned - base`` at ``rank``, written to ``out``; ``echo`` gets each module's line as it is done."""
    if fmt not in FORMATS:
        raise UserError(f"--to: {fmt!r} is not a format; choose one of {', '.join(FORMATS)}")
    if dtype not in SAVE_DTYPES:
        raise UserError(f"--dtype: {dtype!r} is not one of {', '.join(SAVE_DTYPES)}")
    if rank < 1:
        raise UserError(f"--rank: {rank} is not a rank; give 1 or more")
    _check_out_file(Path(out))
    a, b = open_model(base), open_model(tuned)
    for key in sorted(set(a.shapes) | set(b.shapes)):
        if a.shapes.get(key) != b.shapes.get(key):
            sizes = [_size(m.shapes[key]) if key in m.shapes else "absent" for m in (a, b)]
            raise UserError(
                f"the two models differ in shape: {key} is {sizes[0]} in {a.source} but {sizes[1]} in {b.source}; "
                "extract needs a base and a tuned model of the same size"
            )
    modules, fits, other, unchanged = {}, [], [], 0
    for key in a.shapes:
        diff = b.read(key).to(device, torch.float64) - a.read(key).to(device, torch.float64)
        if not bool(diff.any()):
            unchanged += a.is_linear_weight(key)
            continue
        if not a.is_linear_weight(key):
            other.append(key)
            continue
        path = key.removesuffix(".weight")
        down, up, fit = low_rank(path, diff, rank, SAVE_DTYPES[dtype])
        modules[path] = {"lora_A.weight": down, "lora_B.weight": up, "alpha": torch.tensor(float(fit.rank))}
        fits.append(fit)
        if echo is not None:
            echo(fit.line())
    if not modules:
        extra = f" ({len(other)} other tensors differ, which no LoRA can hold)" if other else ""
        raise UserError(
            f"{a.source} and {b.source} have the same Linear weights{extra}: there is no LoRA to extract; nothing "
            "was written"
        )
    metadata = {
        "zimage_lora.network": "lora",
        "zimage_lora.base_model": str(base),
        "zimage_lora.extracted_from": str(tuned),
        "zimage_lora.rank": str(rank),
        "zimage_lora.format": fmt,
    }
    result = Extraction(NetworkFile("lora", modules, metadata), fits, other, unchanged)
    write_network(result.network, Path(out), fmt, dtype)
    return result


def extract_text(result: Extraction, out: Path, fmt: str, dtype: str) -> list[str]:
    """The closing lines for the terminal (each module's line came as it was done)."""
    ranks = sorted({f.rank for f in result.fits})
    worst = result.worst
    lines = [
        f"{out}: {fmt}, {len(result.fits)} modules, rank {ranks[0]}-{ranks[-1]}; energy kept {result.energy:.6f} "
        f"overall; largest relative error {worst.error:.2e} ({worst.path}, factors in {dtype})"
    ]
    if result.unchanged:
        lines.append(f"  {result.unchanged} Linear layers are the same in both models")
    if result.not_representable:
        count, names = len(result.not_representable), result.not_representable
        shown = ", ".join(names[:4]) + (", ..." if count > 4 else "")
        what = "1 tensor differs that is not a Linear weight" if count == 1 else f"{count} tensors differ that are not"
        lines.append(
            f"  {what}{'' if count == 1 else ' Linear weights'} (norms, biases, pad tokens): no LoRA can hold "
            f"{'it' if count == 1 else 'them'}, so the file leaves {'it' if count == 1 else 'them'} out: {shown}"
        )
    return lines


def _check_out_file(out: Path) -> None:
    if not out.parent.is_dir():
        raise UserError(f"-o {out}: the folder {out.parent} does not exist; create it or choose another place")
    if out.is_dir():
        raise UserError(f"-o {out}: that is a folder; give a file name ending in .safetensors")


# --- bake -----------------------------------------------------------------------------------------------------------


@dataclass
class Baked:
    out: Path
    layout: str  # "diffusers" | "comfyui"
    loras: list[tuple[Path, str, str, int, float]]  # path, format, kind, modules, weight
    changed: int  # Linear weights changed


def bake_loras(
    model: str | Path, loras: Sequence[tuple[str | Path, float]], out: str | Path, dtype: str = "bf16"
) -> Baked:
    """``model``'s transformer with every LoRA added at its weight, written to ``out`` (nothing unless all fit)."""
    if dtype not in SAVE_DTYPES:
        raise UserError(f"--dtype: {dtype!r} is not one of {', '.join(SAVE_DTYPES)}")
    if not loras:
        raise UserError("bake: give one or more LoRA files after the model, each optionally with :WEIGHT")
    out = Path(out)
    comfy = out.suffix == ".safetensors"
    if comfy:
        _check_out_file(out)
    elif not out.parent.is_dir():
        raise UserError(f"-o {out}: the folder {out.parent} does not exist; create it or choose another place")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"-o {out}: it exists and is not an empty folder; remove it or choose another name")
    weights = open_model(model)
    names = weights.names()
    touched: dict[str, list[tuple[NetworkFile, float, str | Path]]] = {}  # module -> its LoRAs
    inputs = []
    for path, weight in loras:
        network, fmt, _ = read_checked(Path(path), names)
        foreign = [m for m in network.modules if m not in names.linears]
        if foreign:
            raise UserError(
                f"{path}: {len(foreign)} of its modules are no Linear layer of {weights.source} (e.g. {foreign[0]}); "
                "nothing was written"
            )
        for module, parts in network.modules.items():
            touched.setdefault(module, []).append((NetworkFile(network.kind, {module: parts}, {}), weight, path))
        inputs.append((Path(path), fmt, network.kind, len(network.modules), weight))
    torch_dtype = SAVE_DTYPES[dtype]

    def baked(key: str) -> torch.Tensor:
        tensor = weights.read(key)
        module = key.removesuffix(".weight")
        if not weights.is_linear_weight(key) or module not in touched:
            return tensor.to(torch_dtype)
        total = tensor.to(torch.float32, copy=True)  # each delta is taken against the original weight
        for network, weight, path in touched[module]:
            delta = module_updates(network, base=lambda _: tensor)[module]
            if tuple(delta.shape) != tuple(tensor.shape):
                raise UserError(
                    f"{path} does not fit {weights.source}: it makes a {_size(delta.shape)} update of {module}, "
                    f"which is {_size(tensor.shape)}; nothing was written"
                )
            total += weight * delta.float()
        return total.to(torch_dtype)

    if comfy:
        metadata = {
            "zimage_lora.base_model": str(model),
            "zimage_lora.baked": ", ".join(f"{p.name}:{w:g}" for p, _, _, _, w in inputs),
        }
        write_comfy_file(out, weights.shapes, baked, torch_dtype, metadata)
    else:
        _save_diffusers(out, weights.config, {key: baked(key) for key in weights.shapes})
    return Baked(out, "comfyui" if comfy else "diffusers", inputs, len(touched))


def _save_diffusers(out: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    """``save_pretrained`` into a temporary folder beside ``out``, each file synced, then renamed to ``out``."""
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**config)
    model.load_state_dict(state, assign=True, strict=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)


def write_comfy_file(
    out: Path,
    shapes: Mapping[str, tuple[int, ...]],
    tensor: Callable[[str], torch.Tensor],
    dtype: torch.dtype,
    metadata: Mapping[str, str],
) -> None:
    """The transformer ``tensor(key)`` gives, for each diffusers key of ``shapes``, as one file in ComfyUI's names."""
    entries: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]] = {}
    fused: dict[str, list[str]] = {}
    for key, shape in shapes.items():
        name = comfy_key(key)
        if _QKV.match(key):
            fused.setdefault(name, []).append(key)
        else:
            entries[name] = (tuple(shape), lambda key=key: tensor(key))
    for name, keys in fused.items():
        parts = sorted(keys, key=lambda k: "qkv".index(_QKV.match(k).group("x")))
        if len(parts) != 3:
            raise UserError(f"{name}: the model lacks one of to_q, to_k and to_v, so they cannot be fused")
        shape = (sum(shapes[k][0] for k in parts), *shapes[parts[0]][1:])
        entries[name] = (shape, lambda parts=parts: torch.cat([tensor(k) for k in parts]))
    write_safetensors(out, entries, dtype, metadata)


def write_safetensors(
    out: Path,
    entries: Mapping[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]],
    dtype: torch.dtype,
    metadata: Mapping[str, str],
) -> None:
    """The bytes ``io.serialize_safetensors`` makes (sorted header), written one tensor at a time, each made only
    when its turn comes, to ``out.tmp`` that is synced and renamed over ``out`` as ``atomic_write_bytes`` does: a
    6B model is never held whole, nor twice, in memory. A tensor that cannot be made leaves no file behind."""
    header: dict[str, object] = {"__metadata__": {str(k): str(v) for k, v in sorted(metadata.items())}}
    offset, width = 0, torch.empty((), dtype=dtype).element_size()
    for name in sorted(entries):
        shape = entries[name][0]
        size = width * int(torch.Size(shape).numel())
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if not metadata:
        del header["__metadata__"]
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name in sorted(entries):
                shape, make = entries[name]
                value = make().to(dtype).contiguous()
                if tuple(value.shape) != tuple(shape):
                    raise ValueError(f"{name}: made {tuple(value.shape)}, announced {tuple(shape)}")
                if value.numel():
                    f.write(value.reshape(-1).view(torch.uint8).numpy().data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)


def bake_text(result: Baked, dtype: str) -> list[str]:
    lines = [f"  {p}: {fmt} {kind}, {n} modules, weight {w:g}" for p, fmt, kind, n, w in result.loras]
    what = "a diffusers transformer folder" if result.layout == "diffusers" else "a ComfyUI diffusion model file"
    lines.append(f"{result.out}: {what}, {result.changed} Linear weights changed, {dtype}")
    return lines
