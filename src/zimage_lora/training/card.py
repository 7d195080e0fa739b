"""What a run writes about its LoRA: the metadata inside each LoRA file and the model card (``README.md``)."""

from __future__ import annotations

import json
from pathlib import Path

from zimage_lora import __version__
from zimage_lora.config import JobConfig
from zimage_lora.models.arch import inference_arch
from zimage_lora.models.refs import portable_ref


def lora_metadata(cfg: JobConfig, arch, step: int) -> dict[str, str]:
    """Deterministic metadata: what the LoRA is for, never when or where it was made."""
    return {
        "zimage_lora.version": __version__,
        "zimage_lora.arch": arch.name,
        "zimage_lora.base_model": portable_ref(cfg.model.name_or_path),
        "zimage_lora.training_adapter": portable_ref(cfg.model.training_adapter),
        "zimage_lora.network": cfg.target.type,
        "zimage_lora.rank": str(cfg.target.rank),
        "zimage_lora.alpha": f"{cfg.target.resolved_alpha:g}",
        "zimage_lora.step": str(step),
        "zimage_lora.trigger_word": cfg.job.trigger_word or "",
        "zimage_lora.resolutions": json.dumps(sorted({r for ds in cfg.datasets for r in ds.resolutions})),
        "zimage_lora.format": "diffusion_model.<module>.lora_A/lora_B/alpha (diffusers + ComfyUI)",
        "zimage_lora.suggested_weight": "0.6-1.0",
    }


# what each preview score means in words, and which way is better (training/scores.py)
SCORES = {
    "leak": ("change on prompts without the trigger", min),
    "concept": ("concept score (toy world)", max),
    "accuracy": ("attributes right without the trigger (toy world)", max),
    "turbo_drift": ("Turbo drift (toy world)", min),
}


def scores_section(rows: list[dict], checkpoints: dict[int, str], final: tuple[int, str]) -> list[str]:
    """The model card's table of the preview scores: the final value and the best step by each, with the file that
    holds that step's LoRA (a checkpoint still kept, or the final LoRA)."""
    lines = ["## Preview scores", ""]
    files = {**checkpoints, final[0]: final[1]}
    table = []
    for key, (label, better) in SCORES.items():
        values = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
        if not values:
            continue
        step, value = better(values, key=lambda item: item[1])  # ties: the earliest step
        where = f"`{files[step]}`" if step in files else "no checkpoint kept"
        table.append(f"| {label} | {values[-1][1]:.3f} | {value:.3f} at step {step} ({where}) |")
    if not table:
        notes = {row.get("leak_note") for row in rows if row.get("leak_note")}
        reason = next(iter(notes), "no preview prompts (sampling is off)")
        return [*lines, f"Change on prompts without the trigger: n/a ({reason}).", ""]
    return [*lines, "| score | final | best |", "|---|---|---|", *table, ""]


def model_card(
    cfg: JobConfig,
    arch,
    final_lora: Path,
    steps: int,
    contact_sheet: Path | None,
    scores: list[str] | None = None,
) -> str:
    """The run's README: what the LoRA is for, how it was trained, and how to run it (on the arch it is used with:
    a LoRA trained with the training adapter runs on plain Turbo)."""
    trigger = cfg.job.trigger_word
    adapter = cfg.model.training_adapter is not None
    used = inference_arch(arch.name)
    lines = [
        f"# {cfg.job.name}",
        "",
        f"A LoRA trained on **{arch.label}** with zimage-lora {__version__}, used with **{used.label}**.",
        "",
        f"- Base model: `{cfg.model.name_or_path}`"
        + (" (trained with the training adapter, which is not part of this LoRA)" if adapter else ""),
        f"- Trigger word: `{trigger}`" if trigger else "- Trigger word: none",
        "- Suggested LoRA weight: 0.6-1.0",
        f"- Inference: {used.cfg_label}",
        f"- Rank {cfg.target.rank}, alpha {cfg.target.resolved_alpha:g}, {steps} steps, LR {cfg.train.lr:g}, "
        f"optimizer {cfg.train.optimizer}, resolutions {sorted({r for d in cfg.datasets for r in d.resolutions})}",
        "",
        f"Files: `{final_lora.name}` (loads in ComfyUI and in diffusers `load_lora_weights`).",
        "",
    ]
    if contact_sheet is not None:
        lines += ["## Samples", "", "![samples](samples/contact_sheet.png)", ""]
    lines += scores or []
    guidance = 0.0 if used.sample_guidance <= 1 else used.sample_guidance - 1.0  # diffusers counts CFG from 0
    lines += [
        "## Run it (diffusers)",
        "",
        "```python",
        "from diffusers import ZImagePipeline",
        f'pipe = ZImagePipeline.from_pretrained("{portable_ref(cfg.model.name_or_path)}")',
        f'pipe.load_lora_weights("{final_lora.name}", adapter_name="lora")',
        'pipe.set_adapters(["lora"], [0.8])',
        f'image = pipe("{trigger or "a photo"}, ...", num_inference_steps={used.sample_steps}, '
        f"guidance_scale={guidance:g}).images[0]",
        "```",
        "",
        "In ComfyUI: put the file in `models/loras` and load it on the Z-Image model.",
        "",
    ]
    return "\n".join(lines)
