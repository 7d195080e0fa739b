"""Reading and writing LoRA files.

Our files use the key layout that loads unchanged in diffusers (`ZImagePipeline.load_lora_weights`) and in
ComfyUI: ``diffusion_model.<diffusers module path>.lora_A.weight`` (rank x in), ``.lora_B.weight`` (out x rank)
and a scalar ``.alpha`` (scale = alpha / rank). ``read_lora`` accepts every layout of the format registry
(``lora/formats.py``: AI Toolkit, diffusers/peft, kohya/musubi-tuner, ComfyUI's fused qkv, DiffSynth-Studio).

Every write goes through ``atomic_write_bytes``: a ``.tmp`` file, fsync, rename, fsync of the folder. A crash
or kill leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from zimage_lora.errors import UserError
from zimage_lora.files import atomic_write_bytes, fsync_dir  # noqa: F401 - part of this module's API

PREFIX = "diffusion_model."
SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoraWeights:
    """One module's low-rank update: delta W = (alpha / rank) * B @ A."""

    down: torch.Tensor  # A: (rank, in)
    up: torch.Tensor  # B: (out, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up.float() @ self.down.float())


@dataclass
class LoraFile:
    modules: dict[str, LoraWeights]  # diffusers module path -> weights
    metadata: dict[str, str]
    layout: str  # the format registry's name (lora/formats.py): "zimage-lora", "diffusers", "kohya", "comfyui", ...


def lora_state_dict(modules: Mapping[str, LoraWeights], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """File tensors for ``modules`` in our layout (the format registry's ``zimage-lora``); alpha is stored in the
    same dtype as the weights."""
    from zimage_lora.lora.formats import format_tensors
    from zimage_lora.lora.variants import NetworkFile

    parts = {
        path: {
            "lora_A.weight": w.down.detach().to("cpu", torch.float32),
            "lora_B.weight": w.up.detach().to("cpu", torch.float32),
            "alpha": torch.tensor(float(w.alpha)),
        }
        for path, w in modules.items()
    }
    tensors = format_tensors(NetworkFile("lora", parts, {}), "zimage-lora")
    return {key: value.to(dtype).contiguous() for key, value in tensors.items()}


def save_lora(
    path: Path,
    modules: Mapping[str, LoraWeights],
    dtype: str | torch.dtype,
    metadata: Mapping[str, str],
    fault: str | None = None,
    index: int | None = None,
) -> None:
    """Write a LoRA file atomically. Same weights and metadata give the same bytes."""
    torch_dtype = SAVE_DTYPES[dtype] if isinstance(dtype, str) else dtype
    meta = {str(k): str(v) for k, v in sorted(metadata.items())}
    atomic_write_bytes(Path(path), serialize_safetensors(lora_state_dict(modules, torch_dtype), meta), fault, index)


_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def serialize_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors byte layout with a sorted header, so equal inputs give equal bytes.

    (``safetensors.torch.save`` orders the metadata by hash, which differs from one process to the next.)
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + b"".join(chunks)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with one clear sentence if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file not found: {path}")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} is not a readable .safetensors file ({e}); re-download or re-export it") from None
    meta = _read_metadata(data)
    return tensors, meta


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file, from its header only (the tensors are not read)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file not found: {path}")
    try:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            if size > 100_000_000:
                raise ValueError("header too large")
            return _read_metadata(struct.pack("<Q", size) + f.read(size))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable .safetensors file ({e}); re-download or re-export it") from None


def _read_metadata(data: bytes) -> dict[str, str]:
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__") or {})


def read_lora(path: Path, module_names: Iterable[str] | None = None) -> LoraFile:
    """Read a LoRA file in any supported layout into diffusers module paths.

    ``module_names`` (the transformer's module paths) is needed only for kohya files, whose underscores are
    ambiguous: ``lora_unet_layers_0_attention_to_q`` maps back through the model's own names.
    """
    tensors, meta = read_safetensors(path)
    modules, layout = parse_lora_tensors(tensors, module_names, source=str(path))
    return LoraFile(modules=modules, metadata=meta, layout=layout)


def parse_lora_tensors(
    tensors: Mapping[str, torch.Tensor], module_names: Iterable[str] | None = None, source: str = "LoRA file"
) -> tuple[dict[str, LoraWeights], str]:
    """A plain LoRA in any layout of the format registry (``lora/formats.py``) as our modules, and the format's
    name; LoKr, LoHa and DoRA files are refused here (``variants.read_network`` reads them)."""
    from zimage_lora.lora.formats import read_network_file

    if any(k.endswith(".dora_scale") or ".lokr_" in k or ".hada_" in k for k in tensors):
        key = next(k for k in tensors if k.endswith(".dora_scale") or ".lokr_" in k or ".hada_" in k)
        raise UserError(f"{source} is a DoRA/LoKr/LoHa file ({key}); only plain LoRA files are read here")
    names = list(module_names) if module_names is not None else None
    network, fmt = read_network_file(tensors, {}, names, source)
    if network.kind != "lora":
        raise UserError(f"{source} is a DoRA/LoKr/LoHa file ({network.kind}); only plain LoRA files are read here")
    modules = {
        path: LoraWeights(down=parts["lora_A.weight"], up=parts["lora_B.weight"], alpha=float(parts["alpha"]))
        for path, parts in network.modules.items()
    }
    return modules, fmt


# --- ComfyUI compatibility -------------------------------------------------------------------------------------
# ComfyUI's Z-Image model (a Lumina2 "NextDiT") stores attention as one fused ``qkv`` Linear and names the output
# projection ``out``; its LoRA loader maps diffusers module paths onto those weights. These are the rules that
# mapping follows for the transformer blocks; ``comfyui_target`` answers "where would ComfyUI apply this key?".
_BLOCK = r"(?P<block>(?:layers|noise_refiner|context_refiner)\.\d+)\."
_COMFY_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(_BLOCK + r"attention\.to_(?P<qkv>[qkv])$"), "{block}.attention.qkv"),
    (re.compile(_BLOCK + r"attention\.to_out\.0$"), "{block}.attention.out"),
    (re.compile(_BLOCK + r"feed_forward\.(?P<w>w[123])$"), "{block}.feed_forward.{w}"),
    (re.compile(_BLOCK + r"adaLN_modulation\.0$"), "{block}.adaLN_modulation.0"),
]


def comfyui_target(module_path: str, dim: int) -> tuple[str, tuple[int, int] | None] | None:
    """ComfyUI weight (and output-row slice for fused q/k/v) that a diffusers module path maps to, or None."""
    for pattern, template in _COMFY_RULES:
        m = pattern.match(module_path)
        if m is None:
            continue
        name = "diffusion_model." + template.format(**m.groupdict())
        if m.groupdict().get("qkv"):
            offset = "qkv".index(m.group("qkv")) * dim
            return name, (offset, offset + dim)
        return name, None
    return None
