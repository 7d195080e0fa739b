"""``zimage-lora lora inspect | convert | merge | resize``: what a LoRA file holds, what each tool loads of it, the
same weight updates in another tool's layout, several LoRAs as one, and a LoRA at a lower rank.

Both read through the format registry (``lora/formats.py``) and check the file against the transformer's Linear
layers (built on the meta device; ``--model`` for another configuration): a file whose modules are not Z-Image's
(an SDXL or Flux LoRA) or whose shapes do not fit is refused in one sentence. ``convert`` writes nothing unless every
module's weight update, read back from the new file in float32, equals the old one within ``TOLERANCE`` of its
largest entry; the saved dtype's rounding comes on top. ``merge`` of plain LoRAs is exact (the ranks side by side);
with LoKr/LoHa inputs or a ``--rank``/``--energy`` it sums the dense updates and keeps the best low-rank part of
each by SVD, as ``resize`` does: the energy kept is the sum of the kept singular values squared over all of them.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
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
                    f"{names.source}; the file is for another model size"
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


# --- merge and resize -----------------------------------------------------------------------------------------------


@dataclass
class Reduced:
    """A network made of SVD-truncated updates, with the energy each module kept (sum of kept squared singular
    values over all of them; 1.0 = exact)."""

    network: NetworkFile
    energy: dict[str, float]

    @property
    def overall(self) -> float:
        """The energy kept over all modules together (each module weighted by its update's squared norm)."""
        total = sum(self.totals.values())
        return sum(self.energy[m] * self.totals[m] for m in self.energy) / total if total else 1.0

    totals: dict[str, float] = field(default_factory=dict)  # each module's sum of squared singular values


def svd_factors(
    update: torch.Tensor, rank: int | None, energy: float | None
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(down, up, kept energy, total energy) of the best low-rank factors of ``update`` (float64 SVD): rank
    ``rank``, or the fewest singular values whose squares reach ``energy`` of the total; neither: every non-zero
    one (exact)."""
    u, s, vh = torch.linalg.svd(update.double(), full_matrices=False)
    squares = s.square()
    total = float(squares.sum())
    if rank is not None:
        keep = min(rank, s.numel())
    elif energy is not None:
        reached = torch.cumsum(squares, 0) >= energy * total * (1 - 1e-12)
        keep = int(reached.nonzero()[0]) + 1 if bool(reached.any()) else s.numel()
    else:
        keep = max(int((s > s[0] * 1e-10).sum()) if s.numel() and s[0] > 0 else 1, 1)
    keep = max(keep, 1)
    root = s[:keep].sqrt()
    kept = float(squares[:keep].sum()) / total if total else 1.0
    return (root[:, None] * vh[:keep]).float(), (u[:, :keep] * root).float(), kept, total


def reduce_updates(updates: dict[str, torch.Tensor], rank: int | None, energy: float | None, metadata: dict) -> Reduced:
    modules, kept, totals = {}, {}, {}
    for path, update in updates.items():
        down, up, kept[path], totals[path] = svd_factors(update, rank, energy)
        modules[path] = {"lora_A.weight": down, "lora_B.weight": up, "alpha": torch.tensor(float(down.shape[0]))}
    return Reduced(NetworkFile("lora", modules, metadata), kept, totals)


def _check_reduction(rank: int | None, energy: float | None) -> None:
    if rank is not None and energy is not None:
        raise UserError("--rank and --energy exclude each other; give one")
    if rank is not None and rank < 1:
        raise UserError(f"--rank: {rank} is not a rank; give 1 or more")
    if energy is not None and not 0 < energy <= 1:
        raise UserError(f"--energy: {energy} is not a fraction of the energy; give a number in (0, 1], e.g. 0.99")


def merge_loras(
    inputs: list[tuple[Path, float]], names: TransformerNames, rank: int | None = None, energy: float | None = None
) -> Reduced:
    """Weighted LoRAs as one. Plain LoRAs without ``rank``/``energy``: exact, their ranks concatenated (each scale and
    weight folded into its columns of B). Otherwise (LoKr, LoHa, or a rank asked for): the weighted sum of the dense
    updates, then an SVD."""
    _check_reduction(rank, energy)
    if len(inputs) < 2:
        raise UserError("merge: give two or more LoRA files, each optionally with :WEIGHT (a.safetensors:0.7)")
    networks = [(read_checked(path, names)[0], weight, path) for path, weight in inputs]
    for network, _, path in networks:
        if network.kind == "dora":
            raise UserError(f"{path} is a DoRA file, whose update depends on the base weights; export it first")
        unmatched = [m for m in network.modules if m not in names.linears]
        if unmatched:
            raise UserError(f"{path}: {unmatched[0]} is not a layer of {names.source}; nothing was written")
    metadata = {"zimage_lora.merged_from": ", ".join(f"{Path(p).name}:{w:g}" for _, w, p in networks)}
    if rank is None and energy is None and all(n.kind == "lora" for n, _, _ in networks):
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for network, weight, _ in networks:
            for path, parts in network.modules.items():
                up = parts["lora_B.weight"].float() * (float(parts["alpha"]) / parts["lora_A.weight"].shape[0]) * weight
                held = modules.setdefault(path, {"lora_A.weight": torch.zeros(0, parts["lora_A.weight"].shape[1]),
                                                 "lora_B.weight": torch.zeros(up.shape[0], 0)})  # fmt: skip
                held["lora_A.weight"] = torch.cat([held["lora_A.weight"], parts["lora_A.weight"].float()])
                held["lora_B.weight"] = torch.cat([held["lora_B.weight"], up], dim=1)
        for parts in modules.values():
            parts["alpha"] = torch.tensor(float(parts["lora_A.weight"].shape[0]))
        return Reduced(NetworkFile("lora", dict(sorted(modules.items())), metadata), dict.fromkeys(modules, 1.0))
    total: dict[str, torch.Tensor] = {}
    for network, weight, _ in networks:
        for path, update in module_updates(network).items():
            total[path] = total.get(path, 0) + weight * update
    return reduce_updates(dict(sorted(total.items())), rank, energy, metadata)


def resize_lora(path: Path, names: TransformerNames, rank: int | None, energy: float | None) -> Reduced:
    """The file's updates at a lower rank (or the fewest ranks keeping ``energy``), by SVD."""
    _check_reduction(rank, energy)
    if rank is None and energy is None:
        raise UserError("resize: give --rank R or --energy E (the fraction of each update's energy to keep)")
    network, _, _ = read_checked(path, names)
    if network.kind == "dora":
        raise UserError(f"{path} is a DoRA file, whose update depends on the base weights; export it first")
    metadata = {**network.metadata, "zimage_lora.resized_from": Path(path).name}
    return reduce_updates(module_updates(network), rank, energy, metadata)


def write_network(network: NetworkFile, out: Path, fmt: str, dtype: str) -> None:
    """``network`` in format ``fmt`` and ``dtype``, written atomically."""
    if fmt not in FORMATS:
        raise UserError(f"--to: {fmt!r} is not a format; choose one of {', '.join(FORMATS)}")
    if dtype not in SAVE_DTYPES:
        raise UserError(f"--dtype: {dtype!r} is not one of {', '.join(SAVE_DTYPES)}")
    tensors = {k: v.to(SAVE_DTYPES[dtype]) for k, v in format_tensors(network, fmt).items()}
    atomic_write_bytes(Path(out), serialize_safetensors(tensors, network.metadata))
