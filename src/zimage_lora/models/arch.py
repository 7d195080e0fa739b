"""The architecture registry: every difference between the Z-Image variants, and the only place that names them.

An entry says where the weights come from, how the scheduler is set, how previews and inference run, whether the
training adapter is required, allowed or forbidden, what to warn about, and which arch a LoRA trained on it is used
with. The config's choices, the CLI's help, the web UI's labels, the recipe and ``generate`` all read it from here,
so a new variant is one entry below plus a preset in ``presets/``. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TURBO_REPO = "Tongyi-MAI/Z-Image-Turbo"
ADAPTER_REPO = "ostris/zimage_turbo_training_adapter"

AdapterRule = Literal["required", "allowed", "forbidden"]


@dataclass(frozen=True)
class TrainingAdapter:
    """A published de-distilling training adapter for the Turbo path."""

    version: str
    ref: str  # hub file (owner/repo/file) that model.training_adapter takes
    note: str  # what to know when choosing it (the guide's advice)


TRAINING_ADAPTERS = (
    TrainingAdapter(
        "v2",
        f"{ADAPTER_REPO}/zimage_turbo_training_adapter_v2.safetensors",
        "the newer adapter and the presets' default",
    ),
    TrainingAdapter(
        "v1",
        f"{ADAPTER_REPO}/zimage_turbo_training_adapter_v1.safetensors",
        "the safe baseline: go back to it when training with v2 is unstable (noise, Turbo drift, odd artefacts)",
    ),
)


@dataclass(frozen=True)
class Arch:
    name: str
    label: str
    default_model: str
    shift: float  # the scheduler's shift; also used by the ``shift`` and ``lognorm`` timestep types
    sample_steps: int  # transformer forwards for previews and inference
    sample_guidance: float  # classic CFG; <= 1 means none
    adapter: AdapterRule  # the training adapter (``model.training_adapter``) while training
    use_with: str  # the arch a LoRA trained on this one is used with at inference
    parts_from: str | None = None  # where text encoder, tokenizer, VAE and scheduler come from if the repo lacks them
    override_shift: bool = False  # True: ``shift`` replaces the shift in the model folder's scheduler config
    training_warning: str | None = None  # said by ``validate`` and the trainer whenever a job trains this arch
    distilled: bool = False  # step- and guidance-distilled (few steps, no CFG): its LoRAs can drift it
    adapters: tuple[TrainingAdapter, ...] = field(default=())  # the published adapters offered for this arch
    aliases: tuple[str, ...] = ()  # other tools' names for this arch (AI Toolkit's), accepted as model.arch

    @property
    def cfg_label(self) -> str:
        """How previews and inference run, in words."""
        guidance = "no CFG" if self.sample_guidance <= 1 else f"CFG {self.sample_guidance:g}"
        return f"{self.sample_steps} steps, {guidance}"


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch(
            "zimage_turbo_adapter",
            "Z-Image Turbo (w/ Training Adapter)",
            TURBO_REPO,
            shift=3.0,
            sample_steps=8,
            sample_guidance=1.0,
            adapter="required",
            use_with="zimage_turbo",
            adapters=TRAINING_ADAPTERS,
            aliases=("zimage:turbo",),
        ),
        Arch(
            "zimage_deturbo",
            "Z-Image De-Turbo (De-Distilled)",
            "ostris/Z-Image-De-Turbo",
            shift=3.0,
            sample_steps=25,
            sample_guidance=3.0,
            adapter="forbidden",
            use_with="zimage_deturbo",
            parts_from=TURBO_REPO,
            aliases=("zimage:deturbo",),
        ),
        Arch(
            "zimage_base",
            "Z-Image (Base)",
            "Tongyi-MAI/Z-Image",
            shift=6.0,
            sample_steps=30,
            sample_guidance=4.0,
            adapter="forbidden",
            use_with="zimage_base",
            override_shift=True,
        ),
        Arch(
            "zimage_turbo",
            "Z-Image Turbo (raw, drifts)",
            TURBO_REPO,
            shift=3.0,
            sample_steps=8,
            sample_guidance=1.0,
            adapter="forbidden",
            use_with="zimage_turbo",
            distilled=True,
            training_warning=(
                "trains raw Turbo, which undoes its step distillation (Turbo drift: previews blur and need more "
                "steps); zimage_turbo_adapter avoids it"
            ),
        ),
    )
}

# The variants by role, for code that builds or evaluates each of them (the toy world); the names stay in this file.
TURBO, BASE, DETURBO, TURBO_ADAPTER = "zimage_turbo", "zimage_base", "zimage_deturbo", "zimage_turbo_adapter"
DEFAULT_ARCH = "zimage_turbo_adapter"  # what a job trains when model.arch is not given
DEFAULT_INFERENCE_ARCH = "zimage_turbo"  # what ``generate`` runs when neither --arch nor a LoRA's metadata says


# AI Toolkit's name for the whole family: which of ours it means follows from the model and the adapter it loads.
FAMILY_ALIAS = "zimage"
ALIASES = {alias: arch.name for arch in ARCHS.values() for alias in arch.aliases}


def get_arch(name: str) -> Arch:
    return ARCHS[name]


def arch_for_alias(alias: str, name_or_path: str | None, adapter: str | None) -> tuple[str, str]:
    """The arch an alias means, and why: ``zimage:turbo`` and ``zimage:deturbo`` name one arch each; the family
    name ``zimage`` is Turbo + adapter when an adapter is given, else the arch whose default model is loaded (raw
    Turbo, De-Turbo), else Base. KeyError for a name that is not an alias."""
    if alias in ALIASES:
        return ALIASES[alias], f"{alias} is {ALIASES[alias]}"
    if alias != FAMILY_ALIAS:
        raise KeyError(alias)
    if adapter:
        return TURBO_ADAPTER, f"{alias} with a training adapter is {TURBO_ADAPTER}"
    repo = (name_or_path or "").partition("@")[0]
    for arch in (ARCHS[TURBO], ARCHS[DETURBO]):
        if repo == arch.default_model:
            return arch.name, f"{alias} loading {repo} without an adapter is {arch.name}"
    return BASE, f"{alias} loading {repo or 'its default model'} is {BASE}"


def inference_arch(name: str) -> Arch:
    """The arch that LoRAs trained on ``name`` are used with (Turbo + adapter -> plain Turbo)."""
    return ARCHS[ARCHS[name].use_with]


def inference_archs() -> list[Arch]:
    """The archs that ``generate`` and the playground offer: those that LoRAs are used with."""
    targets = {arch.use_with for arch in ARCHS.values()}
    return [arch for arch in ARCHS.values() if arch.name in targets]


def describe_archs() -> str:
    """``name (label)`` of every arch, for help texts."""
    return "; ".join(f"{a.name} ({a.label})" for a in ARCHS.values())


for _arch in ARCHS.values():  # the registry's own consistency, checked once at import
    assert _arch.use_with in ARCHS and ARCHS[_arch.use_with].use_with == _arch.use_with, _arch.name
    assert bool(_arch.adapters) == (_arch.adapter != "forbidden"), _arch.name
assert DEFAULT_ARCH in ARCHS and DEFAULT_INFERENCE_ARCH in ARCHS
assert not set(ALIASES) & set(ARCHS) and FAMILY_ALIAS not in ALIASES
