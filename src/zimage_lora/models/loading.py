"""Loading the frozen Z-Image components from a diffusers-layout folder or hub id.

One code path serves the real weights and the tiny test models: every component is loaded with its class's
``from_pretrained(folder, subfolder=...)``. The text encoder (with its tokenizer) and the VAE may come from another
folder than the transformer, because De-Turbo publishes only a transformer and borrows the rest from Turbo.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3Model

from zimage_lora.errors import UserError
from zimage_lora.models.hub import resolve_model_dir
from zimage_lora.models.offload import offloaded_indices
from zimage_lora.models.quant import TEXT_ENCODER_BLOCKS, TRANSFORMER_BLOCKS, quantize_model

PARTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")

# The part that decides where each part is read from: the tokenizer always travels with its text encoder.
_OWNER = {"transformer": "transformer", "text_encoder": "text_encoder", "tokenizer": "text_encoder",
          "vae": "vae", "scheduler": "scheduler"}  # fmt: skip


@dataclass
class Components:
    """The loaded parts (``None`` for parts not asked for) and where each came from, for run metadata."""

    transformer: ZImageTransformer2DModel | None
    text_encoder: Qwen3Model | None
    tokenizer: PreTrainedTokenizerBase | None
    vae: AutoencoderKL | None
    scheduler: FlowMatchEulerDiscreteScheduler
    source: dict[str, str] = field(default_factory=dict)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA (the real transformer is 12 GB in bf16), fp32 on CPU where bf16 matmuls are slow."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_components(
    name_or_path: str,
    *,
    text_encoder_path: str | None = None,
    vae_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    parts: Iterable[str] = PARTS,
    scheduler_shift: float | None = None,
    fallback_ref: str | None = None,
    quantization: Mapping[str, str] | None = None,
    layer_offload: float = 0.0,
    low_vram: bool = False,
    edit: Callable[[str, torch.nn.Module], None] | None = None,
    model_key: str = "model.name_or_path",
) -> Components:
    """Load the asked-for parts, frozen and in eval mode.

    ``text_encoder_path`` (text encoder and tokenizer) and ``vae_path`` are diffusers-layout folders or hub ids
    that replace ``name_or_path`` for those parts. When ``name_or_path`` lacks a part other than the transformer
    and no override is given, it is taken from ``fallback_ref`` (the caller passes Turbo for De-Turbo). The VAE
    stays in fp32 whatever ``dtype`` says: it is small, and latents and decoded previews are more exact in fp32.
    The scheduler is always returned; when not asked for, it is the Z-Image default (shift 3.0).

    Placement (see ``_place``): ``quantization`` maps ``transformer`` / ``text_encoder`` to a mode of
    ``models/quant.py``, applied layer by layer with the arithmetic on ``device``, so the full-precision weights never
    sit whole on the GPU; ``layer_offload`` leaves that fraction of the transformer's main blocks on the CPU for
    ``BlockOffloader``; ``low_vram`` leaves the text encoder and the VAE on the CPU (their users bring them in while
    encoding or decoding). ``edit(part, module)`` runs on each loaded module before quantization (on the CPU, in
    ``dtype``): ``generate`` merges LoKr/LoHa/DoRA files there. ``model_key`` is how messages name ``name_or_path``
    (a job file's key, or ``--model`` for ``generate``).
    """
    wanted = tuple(dict.fromkeys(parts))
    unknown = [p for p in wanted if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {PARTS}")
    device = torch.device(device)

    overrides = {"text_encoder": (text_encoder_path, "model.text_encoder_path"), "vae": (vae_path, "model.vae_path")}
    groups: dict[tuple[str, str], list[str]] = {}  # (ref, config key) -> parts read from it
    for part in wanted:
        ref, key = overrides.get(_OWNER[part], (None, ""))
        groups.setdefault((ref, key) if ref else (name_or_path, model_key), []).append(part)

    folders: dict[str, Path] = {}
    source: dict[str, str] = {}
    missing: list[str] = []
    for (ref, key), group in groups.items():
        folder = _resolve(ref, group, key)
        elsewhere = _parts_from(folder) if key == model_key else None
        for part in group:
            if (folder / part).is_dir():
                folders[part], source[part] = folder, _shown(ref, folder)
            elif elsewhere is not None and part != "transformer" and (elsewhere / part).is_dir():
                folders[part], source[part] = elsewhere, str(elsewhere.resolve())
            elif key == model_key and part != "transformer" and fallback_ref:
                missing.append(part)
            else:
                raise UserError(_missing_message(ref, folder, part, key))
    if missing:
        folder = _resolve(fallback_ref, missing, "the fallback model")
        for part in missing:
            if not (folder / part).is_dir():
                raise UserError(_missing_message(fallback_ref, folder, part, "the fallback model"))
            folders[part], source[part] = folder, _shown(fallback_ref, folder)

    loaders = {
        "transformer": lambda f: ZImageTransformer2DModel.from_pretrained(
            f, subfolder="transformer", torch_dtype=dtype
        ),
        "text_encoder": lambda f: Qwen3Model.from_pretrained(f, subfolder="text_encoder", dtype=dtype),
        "tokenizer": lambda f: AutoTokenizer.from_pretrained(f, subfolder="tokenizer"),
        "vae": lambda f: AutoencoderKL.from_pretrained(f, subfolder="vae", torch_dtype=torch.float32),
        "scheduler": lambda f: FlowMatchEulerDiscreteScheduler.from_pretrained(f, subfolder="scheduler"),
    }
    loaded = {}
    for part, folder in folders.items():
        try:
            loaded[part] = loaders[part](folder)
        except OSError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"could not load the {part} from {folder / part} ({reason}): re-download that folder."
            ) from err
        if isinstance(loaded[part], torch.nn.Module):
            loaded[part].requires_grad_(False).eval()
            if edit is not None:
                edit(part, loaded[part])
            _place(part, loaded[part], device, dict(quantization or {}), layer_offload, low_vram)
    scheduler = loaded.get("scheduler")
    if scheduler is None:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    if scheduler_shift is not None:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, shift=float(scheduler_shift))

    source.setdefault("scheduler", "builtin Z-Image default")
    return Components(
        transformer=loaded.get("transformer"),
        text_encoder=loaded.get("text_encoder"),
        tokenizer=loaded.get("tokenizer"),
        vae=loaded.get("vae"),
        scheduler=scheduler,
        source=source,
    )


def _parts_from(folder: Path) -> Path | None:
    """The folder named by ``<folder>/parts_from.json`` (``{"parts_from": "../turbo"}``, relative to ``folder``): where
    a model folder that holds only its own transformer keeps the rest, as the toy De-Turbo keeps the toy Turbo's."""
    pointer = folder / "parts_from.json"
    if not pointer.is_file():
        return None
    try:
        target = json.loads(pointer.read_text(encoding="utf-8"))["parts_from"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f'{pointer} is not valid: it must be {{"parts_from": "<folder>"}}') from None
    path = (folder / target).resolve()
    if not path.is_dir():
        raise UserError(f"{pointer} names {target}, which is not a folder next to {folder}; restore it")
    return path


def _resolve(ref: str, parts: list[str], key: str) -> Path:
    """The folder of ``ref``, downloading only the subfolders of ``parts`` from the hub."""
    patterns = ["model_index.json", *(f"{part}/*" for part in parts)]
    return resolve_model_dir(ref, allow_patterns=patterns, subfolders=parts, key=key)


def _missing_message(ref: str, folder: Path, part: str, key: str) -> str:
    where = str(folder) if Path(ref).expanduser().is_dir() else f"{ref} (downloaded to {folder})"
    owner = _OWNER[part]
    if owner in ("text_encoder", "vae") and key == "model.name_or_path":
        fix = (
            f"set model.{owner}_path to a diffusers-layout folder or hub id that has it (e.g. Tongyi-MAI/Z-Image-Turbo)"
        )
    else:
        fix = f"point {key} at a diffusers-layout Z-Image folder that has it"
    return f"{key} {where} has no {part}/ subfolder: {fix}."


def _place(
    part: str, module: torch.nn.Module, device: torch.device, quantization: dict, layer_offload: float, low_vram: bool
) -> None:
    """Quantize (per layer, the arithmetic on ``device``) and move the loaded module where it lives."""
    cpu = torch.device("cpu")
    if part == "transformer":
        kept = tuple(f"layers.{i}." for i in offloaded_indices(len(module.layers), layer_offload))

        def home(name: str) -> torch.device:
            return cpu if (name + ".").startswith(kept) else device

        mode = quantization.get(part, "none")
        quantize_model(module, mode, TRANSFORMER_BLOCKS, work_device=device, home=home, key=f"quantization.{part}")
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            tensor.data = tensor.data.to(home(name))
        return
    home = cpu if low_vram and part in ("text_encoder", "vae") else device
    if part == "text_encoder":
        mode = quantization.get(part, "none")
        quantize_model(
            module, mode, TEXT_ENCODER_BLOCKS, work_device=device, home=lambda _: home, key=f"quantization.{part}"
        )
    module.to(home)


def _shown(ref: str, folder: Path) -> str:
    """A hub id is recorded as given (with its revision); a local folder as its absolute path."""
    return str(folder.resolve()) if Path(ref).expanduser().is_dir() else ref.strip()
