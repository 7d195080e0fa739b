"""The job config: one typed section per UI panel, YAML in and out, presets.

A job file is YAML with the sections ``job, model, quantization, target, save, train, datasets, sample, advanced``
(the web UI shows one panel per section, in this order). The pydantic models below are the contract that the docs,
the UI and the training recipe share; each field's ``description`` is the help text the UI shows.

Loading is a pipeline: read YAML -> apply ``--set`` overrides -> validate the schema -> semantic checks (folders
exist, options that fight each other, images that can train). Every failure is a ``ConfigError`` whose message is
one line that starts with the key path (``train.lr``, ``datasets[0].path``).

Relative paths in a job file are resolved against the folder of the job file, never the current directory, so a
job runs the same from anywhere. That applies to ``job.output_dir``, ``datasets[].path``, ``datasets[].cache_dir``
and ``train.validation.images``, which are always local, and to ``model.name_or_path``,
``model.training_adapter``, ``model.text_encoder_path`` and ``model.vae_path``, which may also be Hugging Face hub
ids: those count as local when they are absolute, start with ``./``, ``../`` or ``~``, or exist next to the job file;
anything else (``Tongyi-MAI/Z-Image-Turbo@abc``) is kept as a hub id.

Nothing here imports torch: validating a job must stay instant and work on machines without a GPU stack.
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import re
import types
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from zimage_lora.data.check import FEW_IMAGES, FEW_IMAGES_STEPS, HIGH_LR, untrainable
from zimage_lora.data.dataset import IMAGE_EXTS, list_images
from zimage_lora.errors import ConfigError
from zimage_lora.models.arch import ARCHS, DEFAULT_ARCH, TRAINING_ADAPTERS, arch_for_alias, describe_archs
from zimage_lora.models.devices import DEVICE_PATTERN
from zimage_lora.models.refs import is_hub_ref, is_toy_world, looks_local
from zimage_lora.training.optim import OPTIMIZERS

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Choices and per-architecture defaults
# ---------------------------------------------------------------------------------------------------------------

ArchName = Literal[tuple(ARCHS)]  # the registry's keys, in its order (models/arch.py)
Quant = Literal["none", "float8", "int8", "nf4"]
NetworkType = Literal["lora", "lokr", "loha", "dora"]
SaveDtype = Literal["bf16", "fp16", "fp32"]
Optimizer = Literal[tuple(OPTIMIZERS)]  # the optimizer registry's names (training/optim.py)
Scheduler = Literal["constant", "cosine", "linear"]
TimestepType = Literal["weighted", "sigmoid", "linear", "shift", "lognorm"]
TimestepBias = Literal["balanced", "high_noise", "low_noise"]
MixedPrecision = Literal["auto", "bf16", "fp16", "no"]

# Image sides must be multiples of 16: the VAE downsamples by 8 and the transformer patchifies latents 2x2.
MIN_SIDE, MAX_SIDE, SIDE_STEP = 64, 4096, 16
ImageSide = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_STEP)]
DeviceSpec = Annotated[str, Field(pattern=DEVICE_PATTERN)]  # models/devices.py resolves it
# Generous ceilings: past them a value is a typo, not a plan.
MAX_STEPS = 10_000_000
MAX_BATCH = 1024


DEFAULT_TRAINING_ADAPTER = TRAINING_ADAPTERS[0].ref

# Every linear of the main transformer blocks (not the refiner blocks, embedders or final layer).
DEFAULT_TARGET_REGEX = (
    r"^layers\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.(w1|w2|w3)|adaLN_modulation\.0)$"
)


# ---------------------------------------------------------------------------------------------------------------
# Path resolution (driven by the validation context {"base_dir": Path}; without it paths are kept as written)
# ---------------------------------------------------------------------------------------------------------------


def _base_dir(info: ValidationInfo) -> Path | None:
    context = info.context
    return context.get("base_dir") if isinstance(context, dict) else None


def _local_path(value: str | None, info: ValidationInfo) -> str | None:
    """A path that is always on disk: relative means relative to the job file's folder."""
    base = _base_dir(info)
    if value is None or base is None:
        return value
    path = Path(value).expanduser()
    return os.path.abspath(path if path.is_absolute() else base / path)


def _hub_or_local(value: str | None, info: ValidationInfo) -> str | None:
    """A hub id (``owner/name[@revision]`` or ``owner/name/file``) or a local path; only local ones are resolved.
    The rule is ``models/refs.py``'s, which the downloader follows too."""
    base = _base_dir(info)
    if value == "":
        return None  # an empty entry means "not set" (the arch's default model, no adapter)
    if value is None or base is None:
        return value
    path = Path(value).expanduser()
    if looks_local(value, max_slashes=None) or (base / path).exists():
        return os.path.abspath(path if path.is_absolute() else base / path)
    if not is_hub_ref(value):
        raise ValueError(f"{value!r} is neither an existing path nor a hub id like owner/name[@revision]")
    return value


# ---------------------------------------------------------------------------------------------------------------
# The schema, one section per UI panel
# ---------------------------------------------------------------------------------------------------------------


class _Section(BaseModel):
    # Unknown keys are errors (a typo must never be silently ignored); inf/nan are never meaningful settings;
    # YAML turns `name: 2024` into an int, which is still a fine name.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_section(cls, data: Any) -> Any:
        # `train:` with every key commented out reads as null; treat it as an empty section.
        return {} if data is None else data

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_number_mixups(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic would read `every: true` as 1 and `gradient_checkpointing: 0` as false: both are typos.
        annotation = cls.model_fields[info.field_name].annotation
        if annotation is bool and not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        if isinstance(value, bool) and annotation in (int, float, int | None, float | None):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


class JobSection(_Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Run name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit; "
        "the run folder is output_dir/<name>/.",
    )
    trigger_word: str | None = Field(
        None, description="Word that calls up the concept; captions and prompts may write [trigger] for it."
    )
    output_dir: str = Field(
        "output", validate_default=True, description="Folder that holds run folders (relative to the job file)."
    )
    device: str | list[str] = Field(
        "auto",
        description="Where to train: auto, cpu, cuda or cuda:N; a list of GPUs (e.g. [cuda:0, cuda:1]) trains one "
        "job on all of them, one process per GPU (zimage-lora train starts them through accelerate).",
    )
    process_timeout: int = Field(
        60,
        ge=10,
        le=86400,
        description="With several processes: seconds a training step's exchange waits for the others before this "
        "process gives up (so a dead or hung process never leaves the rest waiting); loading, caching and previews "
        "wait without this limit.",
    )
    seed: int = Field(42, ge=0, description="Seed for noise, timesteps and caption dropout; same seed, same run.")

    @field_validator("output_dir")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str | None:
        return _local_path(value, info)

    @field_validator("device", mode="before")
    @classmethod
    def _one_or_several(cls, value: Any) -> str | list[str]:
        what = "Where to train: auto, cpu, cuda or cuda:N, or a list of GPUs such as [cuda:0, cuda:1]."
        several = isinstance(value, list)
        for one in value if several else [value]:
            if not isinstance(one, str) or not re.match(DEVICE_PATTERN, one):
                raise ValueError(f"{_show(one)} is not allowed; {what}")
        if not several:
            return value
        if not value:
            raise ValueError("give a device, or a list of at least one GPU")
        if len(value) == 1:
            return value[0]
        if any(not v.startswith("cuda") for v in value):
            raise ValueError(
                "a list of devices names GPUs (cuda:N); for several CPU processes use zimage-lora train "
                "--num-processes N with device cpu"
            )
        indices = [int(v.partition(":")[2] or 0) for v in value]
        if len(set(indices)) != len(indices):
            raise ValueError(f"a GPU is listed twice in {value}; list each once")
        return [f"cuda:{i}" for i in indices]


class ModelSection(_Section):
    arch: ArchName = Field(
        DEFAULT_ARCH,
        description=f"Which Z-Image variant to train: {describe_archs()}. The first is recommended. AI Toolkit's "
        "names are taken too: zimage:turbo, zimage:deturbo, and zimage (Turbo + adapter when an adapter is given, "
        "else the arch of the model loaded).",
    )
    name_or_path: str | None = Field(
        None,
        description="Hub id (optionally @revision) or local folder of the base model; empty = the arch's default.",
    )
    training_adapter: str | None = Field(
        None,
        description="The de-distilling training adapter: a LoRA applied to Turbo as a separate frozen branch while "
        "training (never merged, never saved with your LoRA, off for previews), so your LoRA does not undo the "
        "distillation; hub file (owner/repo/file.safetensors) or local file. "
        + "; ".join(f"{a.version}: {a.note}" for a in TRAINING_ADAPTERS)
        + ". Only for the archs that take one.",
    )
    text_encoder_path: str | None = Field(None, description="Replace the text encoder (hub id or folder).")
    vae_path: str | None = Field(None, description="Replace the VAE (hub id or folder).")
    low_vram: bool = Field(
        False, description="Keep the text encoder and VAE on the CPU; they visit the GPU only to encode or decode."
    )
    layer_offload: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Fraction of the transformer's main blocks kept in CPU memory and streamed to the GPU when used "
        "(0 = none; saves memory, costs speed).",
    )
    text_encoder_offload: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Fraction of the text encoder's decoder layers kept in CPU memory and streamed to the GPU when "
        "they encode (0 = none); not with low_vram, which keeps the whole text encoder off the GPU already. AI "
        "Toolkit's text-encoder layer offloading.",
    )
    shard: bool = Field(
        False,
        description="With several GPUs: shard the frozen transformer across them (FSDP2, each block's weights "
        "split between the processes and gathered when used), for a model that does not fit one card; the LoRA "
        "trains on top. Off: each GPU holds the whole model (data-parallel, faster when it fits).",
    )

    @model_validator(mode="before")
    @classmethod
    def _alias(cls, data: Any) -> Any:
        """AI Toolkit's arch names (the registry's aliases) become ours."""
        if isinstance(data, dict) and isinstance(data.get("arch"), str):
            try:
                arch, _ = arch_for_alias(data["arch"], data.get("name_or_path"), data.get("training_adapter"))
            except KeyError:
                return data
            return {**data, "arch": arch}
        return data

    @field_validator("name_or_path", "training_adapter", "text_encoder_path", "vae_path")
    @classmethod
    def _resolve(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _hub_or_local(value, info)

    @model_validator(mode="after")
    def _default_weights(self) -> ModelSection:
        if self.name_or_path is None:
            self.name_or_path = ARCHS[self.arch].default_model
        return self


class QuantizationSection(_Section):
    transformer: Quant = Field(
        "none",
        description="Frozen transformer weights: none (bf16, 12.3 GB), float8 or int8 (half), nf4 (about a quarter); "
        "the LoRA trains in full precision on top.",
    )
    text_encoder: Quant = Field(
        "none", description="Frozen text encoder weights: none (bf16, 8 GB), float8 or int8 (half), nf4 (a quarter)."
    )

    @field_validator("transformer", "text_encoder", mode="before")
    @classmethod
    def _null_is_none(cls, value: Any) -> Any:
        return "none" if value is None or value is False else value


class TargetSection(_Section):
    type: NetworkType = Field("lora", description="Kind of trainable network.")
    rank: int = Field(16, ge=1, le=1024, description="Rank of the low-rank update: capacity (and file size).")
    alpha: float | None = Field(None, gt=0, description="Scale numerator (update x alpha/rank); empty = rank.")
    lokr_factor: int = Field(
        -1,
        ge=-1,
        le=1024,
        description="LoKr only: split each layer dimension d into (f, d/f) for the Kronecker factors when f divides "
        "it, else as evenly as possible with the smaller part at most f; -1 = the most even split; AI Toolkit's "
        "lokr_factor.",
    )
    modules: str | None = Field(
        None,
        description="Python regex matched against whole module paths; empty = every linear of the main blocks.",
    )

    @field_validator("modules")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid Python regex ({exc}); fix it or remove it for the default set") from None
        return value

    @model_validator(mode="after")
    def _default_alpha(self) -> TargetSection:
        if self.alpha is None:
            self.alpha = float(self.rank)
        return self

    @property
    def resolved_alpha(self) -> float:
        return self.alpha if self.alpha is not None else float(self.rank)


class SaveSection(_Section):
    dtype: SaveDtype = Field("bf16", description="Precision of the saved LoRA weights.")
    every: int = Field(250, ge=1, le=MAX_STEPS, description="Save a checkpoint every this many steps.")
    keep: int = Field(
        4, ge=1, le=10_000, description="How many intermediate checkpoints to keep (older ones are deleted)."
    )


class EmaSection(_Section):
    enabled: bool = Field(False, description="Keep an exponential moving average of the LoRA weights.")
    decay: float = Field(0.999, gt=0, lt=1, description="EMA decay per step (closer to 1 = smoother).")
    save_raw: bool = Field(False, description="Also save the raw (non-EMA) weights, in raw/ of the run folder.")


class DopSection(_Section):
    enabled: bool = Field(False, description="Differential output preservation: keep the class word unchanged.")
    multiplier: float = Field(1.0, gt=0, description="Weight of the preservation loss.")
    class_word: str | None = Field(None, description="Word the trigger replaces in preservation prompts (e.g. man).")


class BlankPromptSection(_Section):
    enabled: bool = Field(
        False,
        description="Blank Prompt Preservation: keep what the model makes of the empty prompt (DOP's algorithm with "
        "the empty prompt instead of the class word); not together with DOP. AI Toolkit's blank_prompt_preservation.",
    )
    multiplier: float = Field(1.0, gt=0, description="Weight of the blank-prompt preservation loss.")


class GuidanceLossSection(_Section):
    enabled: bool = Field(
        False,
        description="Guidance loss: train toward u + g (target - u), u the LoRA model's own prediction on the empty "
        "prompt (no gradient through it), so the caption's pull is g times stronger; AI Toolkit's do_guidance_loss.",
    )
    target: float = Field(
        3.0, gt=0, description="g, the guidance the target carries; AI Toolkit's guidance_loss_target."
    )


class ValidationSection(_Section):
    enabled: bool = Field(False, description="Measure loss on held-out images at fixed noise levels.")
    every: int = Field(250, ge=1, le=MAX_STEPS, description="Run validation every this many steps.")
    sigmas: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        [0.25, 0.5, 0.75], min_length=1, description="Noise levels (0..1] at which validation loss is measured."
    )
    images: list[str] = Field([], description="Held-out images (relative to the job file).")

    @field_validator("images")
    @classmethod
    def _resolve(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return [_local_path(item, info) for item in value]


class TrainSection(_Section):
    batch_size: int = Field(1, ge=1, le=MAX_BATCH, description="Images per forward pass.")
    grad_accum: int = Field(1, ge=1, le=MAX_BATCH, description="Forward passes per optimizer step.")
    steps: int = Field(3000, ge=1, le=MAX_STEPS, description="Optimizer steps in the run.")
    optimizer: Optimizer = Field(
        next(iter(OPTIMIZERS)), description="; ".join(f"{o.name}: {o.note}" for o in OPTIMIZERS.values()) + "."
    )
    lr: float = Field(1e-4, gt=0, description="Learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="Decoupled weight decay.")
    lr_scheduler: Scheduler = Field("constant", description="Learning-rate schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Steps of linear warmup from 0 to lr.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient norm to this value (0 = no clipping).")
    loss: Literal["mse", "mae", "pseudo_huber"] = Field(
        "mse",
        description="Loss between predicted and target velocity, per element: mse (d^2), mae (|d|, less pulled by "
        "outliers), pseudo_huber (sqrt(d^2 + 0.01^2) - 0.01: like mse near 0, like mae beyond); AI Toolkit's "
        "loss_type. The curves log this loss.",
    )
    timestep_type: TimestepType = Field("weighted", description="How training noise levels are drawn.")
    timestep_bias: TimestepBias = Field(
        "balanced", description="Favour high noise (composition) or low noise (detail) timesteps."
    )
    mixed_precision: MixedPrecision = Field(
        "auto", description="Autocast dtype for training; auto picks from the device."
    )
    gradient_checkpointing: bool = Field(True, description="Recompute activations to save memory (slower).")
    checkpoint_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="With gradient checkpointing, the share of transformer blocks that recompute (1 = least memory; "
        "lower is faster and holds more activations).",
    )
    compile: bool = Field(
        False,
        description="torch.compile each transformer block: faster steps after slow first ones (needs a compiler).",
    )
    cache_text_embeddings: bool = Field(
        False, description="Encode every caption once up front and keep the text encoder off the GPU."
    )
    unload_text_encoder: bool = Field(
        False, description="Encode the fixed captions once, then drop the text encoder from memory."
    )
    ema: EmaSection = Field(default_factory=EmaSection, description="Exponential moving average of the weights.")
    reg_ratio: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="With regularisation datasets (datasets[].is_reg): the share of batches drawn from them.",
    )
    reg_weight: float = Field(1.0, gt=0, le=100, description="The loss weight of regularisation batches.")
    dop: DopSection = Field(default_factory=DopSection, description="Differential output preservation.")
    blank_prompt_preservation: BlankPromptSection = Field(
        default_factory=BlankPromptSection, description="Blank Prompt Preservation."
    )
    guidance_loss: GuidanceLossSection = Field(default_factory=GuidanceLossSection, description="Guidance loss.")
    validation: ValidationSection = Field(default_factory=ValidationSection, description="Validation loss.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` as false.
        return "no" if value is False else value


class DatasetSection(_Section):
    path: str = Field(description="Folder with the images and their caption files (relative to the job file).")
    default_caption: str = Field("", description="Caption for images without a caption file.")
    caption_ext: str = Field("txt", pattern=r"^[A-Za-z0-9]+$", description="Extension of the caption files.")
    caption_dropout: float = Field(
        0.05, ge=0, le=1, description="Chance of training on an empty caption, so the LoRA also works unprompted."
    )
    cache_latents: bool = Field(True, description="Encode images with the VAE once and reuse the latents.")
    cache_dir: str | None = Field(None, description="Where latent caches go; empty = <path>/.zimage_cache.")
    resolutions: list[ImageSide] = Field(
        [512, 768, 1024], min_length=1, description="Training resolutions (multiples of 16, >= 64), bucketed by aspect."
    )
    repeats: int = Field(
        1, ge=1, le=10_000, description="How many times each image counts per epoch (balances datasets)."
    )
    recursive: bool = Field(False, description="Also take images from sub-folders (the cache folder is skipped).")
    network_weight: float = Field(
        1.0,
        gt=0,
        le=10,
        description="The LoRA's multiplier while training on this dataset's images (batches never mix weights); "
        "AI Toolkit's network_weight.",
    )
    flip_x: bool = Field(
        False, description="Mirror each image left-right at random (half the steps); its latent is cached too."
    )
    add_trigger: bool = Field(
        False,
        description="Put job.trigger_word in front of every caption that lacks it (AI Toolkit does this always); "
        "off: captions hold the trigger where they write it or [trigger]. Never for is_reg datasets.",
    )
    is_reg: bool = Field(
        False,
        description="Regularisation images: trained without the trigger word (removed from their captions), in their "
        "own batches, train.reg_ratio of them, their loss weighted by train.reg_weight; AI Toolkit's is_reg.",
    )
    mask_path: str | None = Field(
        None,
        description="Folder of loss masks: a greyscale image per training image, same file name; white trains fully, "
        "black at mask_min_value (per latent cell, cropped and flipped with its image). Empty = no masks.",
    )
    mask_min_value: float = Field(
        0.1, ge=0, le=1, description="The loss weight where a mask is black (AI Toolkit's default 0.1)."
    )
    flip_y: bool = Field(False, description="Flip each image upside down at random (half the steps); cached too.")
    shuffle_tokens: bool = Field(
        False,
        description="Shuffle the caption's comma-separated tags at every step, after the first keep_tokens; needs the "
        "text encoder every step (not with train.cache_text_embeddings).",
    )
    keep_tokens: int = Field(
        0, ge=0, le=1000, description="How many leading tags stay first and are never dropped (e.g. 1: the trigger)."
    )
    token_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Chance that each tag after the first keep_tokens is left out at a step; AI Toolkit's "
        "token_dropout_rate (not with train.cache_text_embeddings).",
    )

    @field_validator("caption_ext", mode="before")
    @classmethod
    def _no_dot(cls, value: Any) -> Any:
        return value.lstrip(".") if isinstance(value, str) else value

    @field_validator("path", "cache_dir", "mask_path")
    @classmethod
    def _resolve(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _local_path(value, info)

    @model_validator(mode="after")
    def _default_cache_dir(self) -> DatasetSection:
        if self.cache_dir is None:
            self.cache_dir = str(Path(self.path) / ".zimage_cache")
        return self


class SamplePrompt(_Section):
    """One preview prompt; a plain string in YAML is the same as ``{prompt: ...}``."""

    prompt: str = Field(min_length=1, description="Prompt text; [trigger] is replaced by the trigger word.")
    seed: int | None = Field(None, ge=0, description="Seed for this prompt; empty = the section's.")
    width: ImageSide | None = Field(None, description="Width; empty = the section's.")
    height: ImageSide | None = Field(None, description="Height; empty = the section's.")
    steps: int | None = Field(None, ge=1, description="Sampling steps; empty = the section's.")
    guidance: float | None = Field(None, ge=0, description="CFG scale; empty = the section's.")
    lora_scale: float = Field(1.0, description="Strength of the LoRA for this preview.")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"prompt": data} if isinstance(data, str) else data


class SampleSection(_Section):
    every: int = Field(250, ge=1, le=MAX_STEPS, description="Render previews every this many steps.")
    width: ImageSide = Field(1024, description="Preview width (multiple of 16).")
    height: ImageSide = Field(1024, description="Preview height (multiple of 16).")
    steps: int | None = Field(None, ge=1, description="Transformer forwards per preview; empty = the arch's default.")
    guidance: float | None = Field(
        None, ge=0, description="Classic CFG scale (<= 1 means none); empty = the arch's default."
    )
    seed: int = Field(42, ge=0, description="Preview seed, fixed so previews are comparable across steps.")
    prompts: list[SamplePrompt] = Field([], description="Preview prompts: strings or {prompt, seed, ...} mappings.")
    negative_prompt: str = Field("", description="Negative prompt (only used when guidance > 1).")
    walk_seed: bool = Field(
        False, description="Prompt i uses seed + i (a prompt's own seed still wins); AI Toolkit's walk_seed."
    )
    enabled: bool = Field(
        True, description="Render previews at all (off: none, not even the final ones); AI Toolkit's disable_sampling."
    )
    first: bool = Field(
        True,
        description="Show the step-0 previews (the model before training). Off: they are still rendered, into "
        "samples/reference/, because the preview scores compare every round with them, but they are not in the "
        "samples or the contact sheet; AI Toolkit's skip_first_sample.",
    )
    start_step: int = Field(
        0,
        ge=0,
        le=MAX_STEPS,
        description="No scheduled previews before this step (requests and the final previews still render); AI "
        "Toolkit's sample_start_step.",
    )

    @property
    def active(self) -> bool:
        """Whether the run renders previews: sampling on and at least one prompt."""
        return self.enabled and bool(self.prompts)

    def resolved_steps(self, arch: str) -> int:
        return self.steps if self.steps is not None else ARCHS[arch].sample_steps

    def resolved_guidance(self, arch: str) -> float:
        return self.guidance if self.guidance is not None else ARCHS[arch].sample_guidance

    def resolved_prompts(self, arch: str) -> list[SamplePrompt]:
        """Every prompt with its empty fields filled from this section (each field both have; the arch's preview
        steps and guidance where the section has none)."""
        section = {name: getattr(self, name) for name in SamplePrompt.model_fields if name in type(self).model_fields}
        section.update(steps=self.resolved_steps(arch), guidance=self.resolved_guidance(arch))
        out = []
        for index, p in enumerate(self.prompts):
            own = dict(section, seed=self.seed + index) if self.walk_seed else section
            out.append(p.model_copy(update={k: v for k, v in own.items() if getattr(p, k) is None}))
        return out


class DifferentialGuidanceSection(_Section):
    enabled: bool = Field(False, description="Push the training target past the data, away from the prediction.")
    scale: float = Field(3.0, gt=0, description="How far past the target to push.")


class AdvancedSection(_Section):
    differential_guidance: DifferentialGuidanceSection = Field(
        default_factory=DifferentialGuidanceSection, description="Differential guidance."
    )


class JobConfig(_Section):
    """A whole training job. Validation fills every default that depends on another section."""

    version: Literal[1] = Field(1, description="Job file format version.")
    job: JobSection = Field(description="Run name, trigger word, output folder, device, seed.")
    model: ModelSection = Field(default_factory=ModelSection, description="Base model and training adapter.")
    quantization: QuantizationSection = Field(default_factory=QuantizationSection, description="Quantization.")
    target: TargetSection = Field(default_factory=TargetSection, description="The trainable network.")
    save: SaveSection = Field(default_factory=SaveSection, description="Checkpoints.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimisation.")
    datasets: list[DatasetSection] = Field(min_length=1, description="Image folders to train on.")
    sample: SampleSection = Field(default_factory=SampleSection, description="Preview images during training.")
    advanced: AdvancedSection = Field(default_factory=AdvancedSection, description="Experimental training tricks.")

    @model_validator(mode="after")
    def _arch_sample_defaults(self) -> JobConfig:
        self.sample.steps = self.sample.resolved_steps(self.model.arch)
        self.sample.guidance = self.sample.resolved_guidance(self.model.arch)
        return self


def run_dir(cfg: JobConfig) -> Path:
    """The run folder: checkpoints, samples and logs of this job."""
    return Path(cfg.job.output_dir) / cfg.job.name


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def load_job(
    path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    *,
    check_paths: bool = True,
    warnings: list[str] | None = None,
) -> JobConfig:
    """Read a job file, apply ``--set`` overrides and validate it; relative paths are relative to the file.

    ``check_paths=False`` skips the checks that look at the disk (dataset folders, local model files), for presets
    and templates that are validated away from their data.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"job file is a folder, not a YAML file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"job file not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; a job file is YAML") from None
    return load_job_text(text, path.parent, overrides, check_paths=check_paths, source=str(path), warnings=warnings)


def load_job_text(
    text: str,
    base_dir: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    *,
    check_paths: bool = True,
    source: str = "job",
    warnings: list[str] | None = None,
) -> JobConfig:
    """Like ``load_job`` for YAML that is not in a file (a preset, a web UI form); ``source`` names it in errors."""
    data = _parse_yaml(text, source)
    return parse_job(apply_overrides(data, overrides), base_dir, check_paths=check_paths, warnings=warnings)


def parse_job(
    data: Mapping[str, Any],
    base_dir: str | os.PathLike[str],
    *,
    check_paths: bool = True,
    warnings: list[str] | None = None,
) -> JobConfig:
    """Validate a job given as plain data (parsed YAML, web UI JSON) with the same errors as ``load_job``.

    What is allowed but unwise (raw Turbo, a high learning rate, many steps on few images) goes to ``warnings``
    when a list is given, else to this module's logger."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"job config: the top level must be a mapping of sections (job, model, ...), got {_show(data)}"
        )
    context = {"base_dir": Path(base_dir).expanduser().absolute()}
    try:
        cfg = JobConfig.model_validate(dict(data), context=context)
    except ValidationError as exc:
        raise _config_error(explain_errors(exc)) from None
    found = check_job(cfg, check_paths=check_paths)
    if warnings is None:
        for warning in found:
            log.warning(warning)
    else:
        warnings.extend(found)
    return cfg


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that rejects duplicate keys: with plain YAML the last one silently wins."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


StrictYamlLoader = _StrictLoader  # for other readers of job YAML (the web UI)


def _parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: plain data only
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(_one_line(f"{source}: YAML syntax error{where}: {problem}")) from None
    if data is None:
        raise ConfigError(f"{source}: the job file is empty; start from a preset (turbo-adapter-v2, deturbo)")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (job, model, ...), got {_show(data)}")
    return data


# ---------------------------------------------------------------------------------------------------------------
# --set overrides
# ---------------------------------------------------------------------------------------------------------------


class _UnknownKey(Exception):
    def __init__(self, index: int, candidates: Sequence[str], problem: str = "unknown key") -> None:
        super().__init__(problem)
        self.index, self.candidates, self.problem = index, list(candidates), problem


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` strings (``train.lr=5e-5``, ``datasets.0.path=/x``, ``datasets[0].path=/x``).

    The key must exist in the schema. Values are YAML (``[a, b]``, ``true``, ``5e-5``), except for text fields,
    which take the value literally so ``job.trigger_word=on`` stays the word "on" (quote it to force YAML).
    """
    data = copy.deepcopy(dict(data))
    for item in [overrides] if isinstance(overrides, str) else overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("[", ".").replace("]", "")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, like train.lr=5e-5")
        keys: list[str | int] = [int(part) if part.isdigit() else part for part in key.split(".")]
        try:
            annotation = _annotation_at(keys)
        except _UnknownKey as exc:
            where = _format_loc(keys[: exc.index + 1])
            hint = _did_you_mean(keys[exc.index], exc.candidates)
            raise ConfigError(f"{where}: {exc.problem}{hint} in --set {item}") from None
        _set_in(data, keys, _override_value(raw, annotation, keys))
    return data


def _override_value(raw: str, annotation: Any, keys: Sequence[str | int]) -> Any:
    text = raw.strip()
    inner = _unwrap(annotation)
    is_text = inner is str or (get_origin(inner) is Literal and all(isinstance(a, str) for a in get_args(inner)))
    if is_text and not text.startswith(("'", '"')):
        return None if text in ("null", "~") and _nullable(annotation) else text
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(_one_line(f"{_format_loc(keys)}: cannot read --set value {raw!r} ({problem})")) from None


def _set_in(data: dict[str, Any], keys: Sequence[str | int], value: Any) -> None:
    node: Any = data
    for depth, key in enumerate(keys[:-1]):
        node = _child(node, key, keys[: depth + 1], next_key=keys[depth + 1])
    last = keys[-1]
    if isinstance(node, list):
        _check_index(node, last, keys)
    node[last] = value


def _child(node: Any, key: str | int, loc: Sequence[str | int], next_key: str | int) -> Any:
    if isinstance(node, list):
        _check_index(node, key, loc)
        if isinstance(node[key], str) and _unwrap(_annotation_at(loc)) is SamplePrompt:
            node[key] = {"prompt": node[key]}  # a plain-string prompt is getting one of its fields set
    elif isinstance(node, dict):
        if node.get(key) is None:
            node[key] = [] if isinstance(next_key, int) else {}
    else:
        raise ConfigError(f"{_format_loc(loc[:-1])}: is {_show(node)}, not a mapping; set the whole value instead")
    child = node[key]
    if not isinstance(child, dict | list):
        raise ConfigError(f"{_format_loc(loc)}: is {_show(child)}, not a mapping or list; set the whole value instead")
    return child


def _check_index(node: list[Any], index: int | str, loc: Sequence[str | int]) -> None:
    if not isinstance(index, int) or index >= len(node):
        count = f"{len(node)} item" + ("" if len(node) == 1 else "s")
        raise ConfigError(f"{_format_loc(loc)}: index out of range (the list has {count}); set the whole list instead")


# ---------------------------------------------------------------------------------------------------------------
# Walking the schema (for overrides and error messages)
# ---------------------------------------------------------------------------------------------------------------


def _unwrap(annotation: Any) -> Any:
    """``Annotated[X, ...]`` and ``X | None`` -> ``X``."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _nullable(annotation: Any) -> bool:
    if get_origin(annotation) is Annotated:
        return _nullable(get_args(annotation)[0])
    return type(None) in get_args(annotation)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _annotation_at(keys: Sequence[str | int], root: type[BaseModel] | None = None) -> Any:
    """The type annotation at a key path of ``root`` (``JobConfig``); raises ``_UnknownKey`` for a path not in it."""
    annotation: Any = root or JobConfig
    for index, key in enumerate(keys):
        inner = _unwrap(annotation)
        if _is_model(inner):
            if not isinstance(key, str) or key not in inner.model_fields:
                raise _UnknownKey(index, list(inner.model_fields))
            annotation = inner.model_fields[key].annotation
        elif get_origin(inner) is list:
            if not isinstance(key, int):
                raise _UnknownKey(index, [], "expected a list index (a number)")
            annotation = get_args(inner)[0]
        else:
            raise _UnknownKey(index, [], "unknown key (the parent is a single value)")
    return annotation


def _schema_type(loc: Sequence[str | int], root: type[BaseModel] | None = None) -> Any:
    """The unwrapped type at ``loc``, or None when ``loc`` is not a schema path."""
    try:
        return _unwrap(_annotation_at(loc, root))
    except _UnknownKey:
        return None


def _field_description(loc: Sequence[str | int], root: type[BaseModel] | None = None) -> str:
    """The description of the field at ``loc``, or of the list field holding the item at ``loc``."""
    names = [i for i, key in enumerate(loc) if isinstance(key, str)]
    if not names:
        return ""
    last = names[-1]
    try:
        parent = _unwrap(_annotation_at(loc[:last], root))
    except _UnknownKey:
        return ""
    field = parent.model_fields.get(loc[last]) if _is_model(parent) else None
    return (field.description or "") if field is not None else ""


# ---------------------------------------------------------------------------------------------------------------
# Turning pydantic errors into one line
# ---------------------------------------------------------------------------------------------------------------

_EXPECTED = {
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "finite_number": "expected a finite number",
    "int_parsing": "expected a whole number",
    "int_type": "expected a whole number",
    "int_from_float": "expected a whole number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected text",
    "list_type": "expected a list",
    "model_type": "expected a mapping of keys",
    "model_attributes_type": "expected a mapping of keys",
    "dict_type": "expected a mapping of keys",
}

_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
_BOUND_KEYS = {"greater_than_equal": "ge", "greater_than": "gt", "less_than_equal": "le", "less_than": "lt"}


def explain_errors(exc: ValidationError, root: type[BaseModel] | None = None) -> list[str]:
    """Every problem pydantic found in a ``root`` (``JobConfig``, or another model such as a generation request),
    one line each."""
    # A misspelt key usually also causes a "missing" error for the right one: report the misspelling first.
    errors = sorted(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
    return [_one_line(_explain_one(error, root)) for error in errors]


def _explain_one(error: Mapping[str, Any], root: type[BaseModel] | None = None) -> str:
    loc = tuple(error["loc"])
    path = _format_loc(loc) or "top level"
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        parent = _schema_type(loc[:-1], root)
        candidates = list(parent.model_fields) if _is_model(parent) else []
        return f"{path}: unknown key{_did_you_mean(loc[-1], candidates)}"
    if kind == "missing":
        hint = _field_description(loc, root)
        return f"{path}: required but missing" + (f" ({hint})" if hint else "")
    if kind == "literal_error":
        choices = ", ".join(str(a) for a in get_args(_schema_type(loc, root))) or ctx.get("expected", "")
        return f"{path}: {_show(value)} is not one of {choices}"
    if kind == "model_type" and _schema_type(loc, root) is SamplePrompt:
        return f"{path}: expected a prompt (text) or a mapping with a prompt key, got {_show(value)}"
    if kind in _EXPECTED:
        return f"{path}: {_EXPECTED[kind]}, got {_show(value)}"
    if kind in _BOUNDS:
        return f"{path}: must be {_BOUNDS[kind]} {ctx.get(_BOUND_KEYS[kind])}, got {_show(value)}"
    if kind == "multiple_of":
        return f"{path}: must be a multiple of {ctx.get('multiple_of')}, got {_show(value)}"
    if kind == "too_short":
        need = ctx.get("min_length")
        return f"{path}: needs at least {need} item{'' if need == 1 else 's'}, got {ctx.get('actual_length')}"
    if kind == "string_too_short":
        return f"{path}: must not be empty"
    if kind == "string_pattern_mismatch":
        return f"{path}: {_show(value)} is not allowed; {_field_description(loc, root)}"
    if kind == "value_error":
        return f"{path}: {ctx.get('error', error['msg'])}"
    return f"{path}: {error['msg']}, got {_show(value)}"


def _format_loc(loc: Sequence[str | int]) -> str:
    """('datasets', 0, 'resolutions', 1) -> 'datasets[0].resolutions[1]'."""
    out = ""
    for key in loc:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def _did_you_mean(key: Any, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), candidates, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (allowed: {', '.join(candidates)})" if candidates else ""


def _show(value: Any) -> str:
    """A user's value, short and on one line, spelled the way YAML spells it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _plain(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------------------------
# Semantic checks
# ---------------------------------------------------------------------------------------------------------------


def check_job(cfg: JobConfig, *, check_paths: bool = True) -> list[str]:
    """Check what the schema cannot see; raise ``ConfigError`` for the first error, return warnings."""
    errors: list[str] = []
    warnings: list[str] = []
    model = cfg.model
    arch = ARCHS[model.arch]
    if arch.adapter == "required" and model.training_adapter is None:
        errors.append(
            f"model.training_adapter: required for arch {arch.name}; set it to {arch.adapters[0].ref} or a local file"
        )
    if arch.adapter == "forbidden" and model.training_adapter is not None:
        takers = " or ".join(a.name for a in ARCHS.values() if a.adapter != "forbidden")
        errors.append(
            f"model.training_adapter: only used with arch {takers}, not {arch.name}; remove it "
            f"(or set model.arch: {takers})"
        )
    if arch.training_warning:
        warnings.append(f"model.arch: {arch.name} {arch.training_warning}")
    if cfg.train.cache_text_embeddings and cfg.train.unload_text_encoder:
        errors.append(
            "train.unload_text_encoder: cannot be combined with train.cache_text_embeddings; pick one of the two"
        )
    if cfg.train.dop.enabled and not cfg.job.trigger_word:
        errors.append("train.dop.enabled: needs job.trigger_word (DOP contrasts the trigger with the class word)")
    if cfg.train.dop.enabled and not cfg.train.dop.class_word:
        errors.append("train.dop.class_word: needed with DOP: the word the trigger stands for (e.g. woman, dog)")
    if cfg.train.dop.enabled and cfg.target.type == "dora":
        errors.append(
            "train.dop.enabled: not available with target.type dora (its prior is not the plain base); "
            "use lora, lokr or loha"
        )
    if cfg.train.compile and model.layer_offload > 0:
        errors.append(
            "train.compile: cannot be combined with model.layer_offload (the offload hooks move weights in and out of "
            "the blocks that would be compiled); turn one of them off"
        )
    errors += _shard_conflicts(cfg)
    if cfg.model.text_encoder_offload > 0 and cfg.model.low_vram:
        errors.append(
            "model.text_encoder_offload: not with model.low_vram, which already keeps the whole text encoder in CPU "
            "memory between uses; turn one of them off"
        )
    if cfg.datasets and all(ds.is_reg for ds in cfg.datasets):
        errors.append(
            "datasets[].is_reg: every dataset is regularisation; leave at least one to learn the concept from"
        )
    elif any(ds.is_reg for ds in cfg.datasets) and cfg.train.reg_ratio == 0:
        errors.append("train.reg_ratio: 0 never draws the regularisation datasets; raise it (e.g. 0.5) or drop is_reg")
    for index, ds in enumerate(cfg.datasets):
        edited = "shuffle_tokens" if ds.shuffle_tokens else "token_dropout" if ds.token_dropout > 0 else None
        if edited and (cfg.train.cache_text_embeddings or cfg.train.unload_text_encoder):
            which = "cache_text_embeddings" if cfg.train.cache_text_embeddings else "unload_text_encoder"
            errors.append(
                f"datasets[{index}].{edited}: each step's caption differs, so it needs the text encoder at every "
                f"step; turn off train.{which}, or turn this off"
            )
    if cfg.train.blank_prompt_preservation.enabled and cfg.train.dop.enabled:
        errors.append(
            "train.blank_prompt_preservation.enabled: cannot be combined with train.dop.enabled (both add a "
            "preservation loss on another prompt); pick one"
        )
    if cfg.train.blank_prompt_preservation.enabled and cfg.target.type == "dora":
        errors.append(
            "train.blank_prompt_preservation.enabled: not available with target.type dora (its prior is not the "
            "plain base); use lora, lokr or loha"
        )
    if cfg.train.dop.enabled and cfg.train.unload_text_encoder:
        errors.append("train.dop.enabled: needs captions; it cannot be combined with train.unload_text_encoder")
    for index, prompt in enumerate(cfg.sample.prompts):
        if "[trigger]" in prompt.prompt and not cfg.job.trigger_word:
            errors.append(f"sample.prompts[{index}]: uses [trigger] but job.trigger_word is not set; set it")
    warnings += _longer_than_the_run(cfg)
    toy = is_toy_world(cfg.model.name_or_path)  # the toy world learns at larger rates (docs/toyworld.md)
    if not OPTIMIZERS[cfg.train.optimizer].lr_is_multiplier and cfg.train.lr >= HIGH_LR and not toy:
        warnings.append(
            f"train.lr: {cfg.train.lr:g} is high for Z-Image; the guide warns that {HIGH_LR:g} and above makes "
            "Turbo-style models unstable quickly: start at 1e-4 (5e-5 to 8e-5 if samples get noisy)"
        )
    if check_paths:
        errors += _check_model_paths(cfg)
        images = set()
        for index, dataset in enumerate(cfg.datasets):
            folder = Path(dataset.path)
            problem = _check_image_folder(folder, dataset.recursive)
            if problem:
                errors.append(f"datasets[{index}].path: {problem}")
                continue
            problem = untrainable(folder, dataset.resolutions, dataset.recursive)
            if problem:
                errors.append(f"datasets[{index}].resolutions: {problem}")
            if dataset.mask_path is not None and not Path(dataset.mask_path).is_dir():
                errors.append(
                    f"datasets[{index}].mask_path: folder not found: {dataset.mask_path}; point it at the folder "
                    "of the masks or remove it"
                )
            images.update(list_images(folder, dataset.recursive, dataset.cache_dir))
        low, high = FEW_IMAGES_STEPS
        if images and len(images) < FEW_IMAGES and cfg.train.steps > high:
            warnings.append(
                f"train.steps: {cfg.train.steps} steps on {len(images)} image{'s' if len(images) > 1 else ''} will "
                "likely overfit; the guide "
                f"suggests {low}-{high} steps for fewer than {FEW_IMAGES} images"
            )
    _raise_first(errors)
    return warnings


def _longer_than_the_run(cfg: JobConfig) -> list[str]:
    """Intervals longer than the run: allowed (the run still trains, saves at its end and renders its final
    previews), but seldom meant, so each is a warning."""
    steps = cfg.train.steps
    out = []
    if cfg.train.warmup_steps > steps:
        out.append(
            f"train.warmup_steps: {cfg.train.warmup_steps} is longer than the run ({steps} steps), so the learning "
            "rate never reaches train.lr; lower it (e.g. 5-10% of the steps)"
        )
    if cfg.save.every > steps:
        out.append(
            f"save.every: {cfg.save.every} is longer than the run ({steps} steps), so only the final LoRA is saved "
            "and a crash loses everything; lower it to save on the way"
        )
    if cfg.sample.active and cfg.sample.every > steps:
        out.append(
            f"sample.every: {cfg.sample.every} is longer than the run ({steps} steps), so previews appear only at "
            "the start and the end; lower it to watch the LoRA learn"
        )
    return out


def _shard_conflicts(cfg: JobConfig) -> list[str]:
    """What ``model.shard`` (FSDP2) does not combine with, one sentence each: sharding splits plain weights."""
    if not cfg.model.shard:
        return []
    out = []
    if cfg.quantization.transformer != "none":
        out.append(
            f"model.shard: cannot shard a {cfg.quantization.transformer}-quantized transformer (sharding splits "
            "plain bf16 weights and already divides their memory by the number of GPUs); set "
            "quantization.transformer: none, or keep the quantization and train without model.shard"
        )
    if cfg.model.layer_offload > 0:
        out.append(
            "model.shard: cannot be combined with model.layer_offload (both decide where each block's weights live); "
            "turn one of them off"
        )
    if cfg.train.compile:
        out.append("model.shard: cannot be combined with train.compile yet; turn one of them off")
    if cfg.target.type != "lora":
        out.append(f"model.shard: trains target.type lora only, not {cfg.target.type}; use lora, or train unsharded")
    if cfg.train.optimizer != "adamw":
        out.append(
            f"model.shard: train.optimizer {cfg.train.optimizer} cannot step sharded parameters; use adamw (its state "
            "is sharded too)"
        )
    if cfg.train.ema.enabled:
        out.append("model.shard: cannot be combined with train.ema yet; turn one of them off")
    return out


def _check_model_paths(cfg: JobConfig) -> list[str]:
    """Local model files must exist; hub ids are checked when they are downloaded."""
    model = cfg.model
    wanted = [
        ("model.name_or_path", model.name_or_path, "folder"),
        ("model.training_adapter", model.training_adapter, "file"),
        ("model.text_encoder_path", model.text_encoder_path, "folder"),
        ("model.vae_path", model.vae_path, "folder"),
    ]
    return [
        f"{key}: {kind} not found: {value}"
        for key, value, kind in wanted
        if value is not None and Path(value).expanduser().is_absolute() and not Path(value).expanduser().exists()
    ]


def _check_image_folder(folder: Path, recursive: bool = False) -> str | None:
    if not folder.is_dir():
        return f"folder not found: {folder}"

    def has_images(files) -> bool:
        return any(p.suffix.lower() in IMAGE_EXTS and p.is_file() for p in files)

    if has_images(folder.rglob("*") if recursive else folder.iterdir()):
        return None
    if not recursive and has_images(folder.rglob("*")):
        return f"no images in {folder} itself, only in its sub-folders; set recursive: true to use them"
    return f"no images (png, jpg, webp, bmp) in {folder}"


def _raise_first(problems: Sequence[str]) -> None:
    if problems:
        raise _config_error(problems)


def _config_error(problems: Sequence[str]) -> ConfigError:
    """One line for the CLI (the first problem and how many more); every problem for the web UI's form."""
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return ConfigError(_one_line(problems[0] + more), [_one_line(p) for p in problems])


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def job_to_dict(cfg: JobConfig) -> dict[str, Any]:
    """The resolved job as plain data in panel order; preview prompts without overrides become plain strings."""
    data = cfg.model_dump(mode="json")
    data["sample"]["prompts"] = [_compact_prompt(p) for p in cfg.sample.prompts]
    return data


def _compact_prompt(prompt: SamplePrompt) -> str | dict[str, Any]:
    fields = prompt.model_dump(mode="json", exclude_none=True)
    if fields.get("lora_scale") == 1.0:
        del fields["lora_scale"]
    return fields["prompt"] if list(fields) == ["prompt"] else fields


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)  # indent list items under their key, as people write them


def _represent_list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.Node:
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=numbers and bool(value))


_Dumper.add_representer(list, _represent_list)


def dump_yaml(cfg: JobConfig) -> str:
    """The fully resolved job as YAML (every default written out); ``load_job`` reads it back to an equal config."""
    header = "# zimage-lora job, fully resolved: every default is written out.\n"
    body = yaml.dump(job_to_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
    # A blank line before each section after the first, as in the presets.
    return header + re.sub(r"\n(?=[a-z])", "\n\n", body)


# ---------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------


def _presets_folder() -> Any:
    return resources.files("zimage_lora") / "presets"


def preset_names() -> list[str]:
    """Names of the shipped presets (the YAML files in zimage_lora/presets/)."""
    return sorted(p.name[: -len(".yaml")] for p in _presets_folder().iterdir() if p.name.endswith(".yaml"))


def preset_yaml(name: str) -> str:
    """The commented YAML of a preset, to copy next to a dataset and edit."""
    name = name.removesuffix(".yaml")
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}{_did_you_mean(name, names)}; presets: {', '.join(names)}")
    return (_presets_folder() / f"{name}.yaml").read_text(encoding="utf-8")


def parse_resolutions(text: str, key: str = "resolutions") -> list[int]:
    """``"512,768,1024"`` as image sides (the rule of ``ImageSide``); a ``ConfigError`` naming ``key`` otherwise."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{key}: expected numbers like 512,768,1024, got {text!r}") from None
    if not sizes or any(not (MIN_SIDE <= r <= MAX_SIDE and r % SIDE_STEP == 0) for r in sizes):
        raise ConfigError(f"{key}: each must be a multiple of {SIDE_STEP} from {MIN_SIDE} to {MAX_SIDE}, got {text!r}")
    return sizes
