"""``zimage-lora lora inspect | convert``: what a LoRA file holds, what each tool loads of it, and the same weight
updates in another tool's layout.

Both read through the format registry (``lora/formats.py``) and check the file against the transformer's Linear
layers (built on the meta device; ``--model`` for another configuration): a file whose modules are not Z-Image's
(an SDXL or Flux LoRA) or whose shapes do not fit is refused in one sentence. ``convert`` writes nothing unless every
module's weight update, read back from the new file in float32, equals the old one within ``TOLERANCE`` of its
largest entry; the saved dtype's rounding comes on top.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch

from zimage_lora.errors import UserError
from zimage_lora.files import atomic_write_bytes
from zimage_lora.lora.formats import (
    FORMATS,
    TransformerNames,
    format_tensors,
    largest_difference,
    module_updates,
    read_network_file,
)
from zimage_lora.lora.io import SAVE_DTYPES, read_safetensors, serialize_safetensors
from zimage_lora.lora.variants import NetworkFile

TOLERANCE = 1e-6
_BLOCK = re.compile(r"^(layers|noise_refiner|context_refiner)\.(\d+)\.")
_KINDS = [
    ("attention q/k/v", re.compile(r"\.attention\.to_[qkv]$")),
    ("attention out", re.compile(r"\.attention\.to_out\.0$")),
    ("feed-forward", re.compile(r"\.feed_forward\.w[123]$")),
    ("adaLN modulation", re.compile(r"\.adaLN_modulation\.0$")),
]
META_FIELDS = {
    "trigger word": "zimage_lora.trigger_word",
    "arch": "zimage_lora.arch",
    "base model": "zimage_lora.base_model",
    "steps": "zimage_lora.step",
    "network": "zimage_lora.network",
}


def read_checked(path: Path, names: TransformerNames) -> tuple[NetworkFile, str, dict[str, torch.Tensor]]:
    """The file as a network (diffusers paths), its format and raw tensors; UserError when it does not fit."""
    tensors, metadata = read_safetensors(path)
    network, fmt = read_network_file(tensors, metadata, list(names.linears), source=str(path))
    foreign = [m for m in network.modules if m not in names.linears]
    if foreign and len(foreign) == len(network.modules):
        raise UserError(
            f"{path} is not a LoRA for this transformer ({names.source}): none of its modules is one of its layers "
            f"(e.g. {foreign[0]}); a LoRA for another model family (SDXL, Flux...)?"
        )
    for module, parts in network.modules.items():
        if module not in names.linears:
            continue
        out, inp = names.linears[module]
        if network.kind in ("lora", "dora"):
            shape = (parts["lora_B.weight"].shape[0], parts["lora_A.weight"].shape[1])
            if shape != (out, inp):
                raise UserError(
                    f"{path}: {module} makes a {shape[0]}x{shape[1]} update but the layer is {out}x{inp} in "
                    f"{names.source}; the file is for another model size (--model names the right one)"
                )
    return network, fmt, tensors


def inspect_lora(path: Path, names: TransformerNames) -> dict:
    from zimage_lora.lora.loaders import COMFYUI_COMMIT, comfyui_count, diffusers_count

    network, fmt, tensors = read_checked(path, names)
    blocks: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    unmatched = [m for m in network.modules if m not in names.linears]
    for module in network.modules:
        m = _BLOCK.match(module)
        blocks[m.group(1) if m else "outside the blocks"] += 1
        kinds[next((label for label, pattern in _KINDS if pattern.search(module)), "other")] += 1
    ranks = sorted({int(p["lora_A.weight"].shape[0]) for p in network.modules.values() if "lora_A.weight" in p})
    alphas = sorted({round(float(p["alpha"]), 6) for p in network.modules.values() if "alpha" in p})
    meta = {label: network.metadata[key] for label, key in META_FIELDS.items() if network.metadata.get(key)}
    return {
        "file": str(path),
        "format": fmt,
        "format_label": FORMATS[fmt].label,
        "kind": network.kind,
        "modules": len(network.modules),
        "by_block": dict(sorted(blocks.items())),
        "by_kind": dict(sorted(kinds.items())),
        "ranks": ranks,
        "alphas": alphas,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "bytes": Path(path).stat().st_size,
        "metadata": meta,
        "unmatched": unmatched,
        "model": names.source,
        "loaders": {
            "diffusers": diffusers_count(tensors, names).as_dict(),
            "comfyui": {**comfyui_count(list(tensors), names).as_dict(), "rules": COMFYUI_COMMIT},
        },
    }


def inspect_text(report: dict) -> list[str]:
    """The report as lines for the terminal."""
    lines = [
        f"{report['file']}: {report['format_label']} ({report['format']}), {report['kind']}, "
        f"{report['modules']} modules, {report['bytes'] / 2**20:.1f} MiB, {'/'.join(report['dtypes'])}",
        "  blocks: " + ", ".join(f"{k} {v}" for k, v in report["by_block"].items()),
        "  layers: " + ", ".join(f"{k} {v}" for k, v in report["by_kind"].items()),
    ]
    if report["ranks"]:
        lines.append(
            f"  rank {', '.join(map(str, report['ranks']))}; alpha {', '.join(f'{a:g}' for a in report['alphas'])}"
        )
    for label, value in report["metadata"].items():
        lines.append(f"  {label}: {value}")
    if report["unmatched"]:
        lines.append(
            f"  {len(report['unmatched'])} modules match no layer of {report['model']}: {report['unmatched'][0]}, ..."
        )
    for name, count in report["loaders"].items():
        if count["refused"]:
            lines.append(f"  {name}: refuses the file: {count['refused']}")
            continue
        lines.append(
            f"  {name}: applies {count['modules']} modules ({count['applied']} keys), drops {count['dropped']} keys"
        )
        lines += [f"    ! {w}" for w in count["warnings"]]
    return lines


def convert_lora(source: Path, out: Path, fmt: str, dtype: str, names: TransformerNames) -> tuple[NetworkFile, float]:
    """Write ``source``'s updates in format ``fmt``; nothing is written unless they are kept (within TOLERANCE)."""
    if fmt not in FORMATS:
        raise UserError(f"--to: {fmt!r} is not a format; choose one of {', '.join(FORMATS)}")
    if dtype not in SAVE_DTYPES:
        raise UserError(f"--dtype: {dtype!r} is not one of {', '.join(SAVE_DTYPES)}")
    network, source_fmt, _ = read_checked(source, names)
    unmatched = [m for m in network.modules if m not in names.linears]
    if unmatched:
        raise UserError(
            f"{source}: {len(unmatched)} modules match no layer of {names.source} (e.g. {unmatched[0]}); they "
            "cannot be written in any layout, so nothing was written"
        )
    tensors = format_tensors(network, fmt)
    metadata = {**network.metadata, "zimage_lora.converted_from": source_fmt, "zimage_lora.format": fmt}
    written, _ = read_network_file(tensors, metadata, list(names.linears), source=str(out))
    worst, where = largest_difference(module_updates(network), module_updates(written))
    if worst > TOLERANCE:
        raise UserError(
            f"converting to {fmt} would change {where}'s update by {worst:.1e} of its largest entry; nothing written"
        )
    data = {k: v.to(SAVE_DTYPES[dtype]) for k, v in tensors.items()}
    atomic_write_bytes(Path(out), serialize_safetensors(data, metadata))
    return written, worst
