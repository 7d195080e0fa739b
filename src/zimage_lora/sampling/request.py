"""One generation request, typed once: what ``zimage-lora generate``, the library's ``generate``, the playground's
API and the web UI's command-line builder all take.

Every field is checked here (sizes, counts, steps, the device, the quantization mode), with the descriptions the
CLI's help shows, so no caller keeps its own copy of a rule. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zimage_lora.config import ArchName, DeviceSpec, ImageSide, Quant, explain_errors
from zimage_lora.errors import UserError

MAX_COUNT = 64


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: str = Field(min_length=1, description="A LoRA file (our layout, diffusers/peft, kohya, LoKr, LoHa, DoRA).")
    weight: float = Field(1.0, description="Its strength; 0.6-1.0 is the usual range.")

    @classmethod
    def parse(cls, text: str) -> LoraRef:
        """``FILE`` or ``FILE:WEIGHT`` (a Windows drive letter's colon is not a weight)."""
        head, sep, tail = text.rpartition(":")
        if sep and head and not (len(head) == 1 and head.isalpha()):
            try:
                return cls(path=head, weight=float(tail))
            except ValueError:
                message = f"--lora {text}: the weight after ':' must be a number, e.g. my_lora.safetensors:0.8"
                raise UserError(message) from None
        return cls(path=text)

    def cli(self) -> str:
        return f"{self.path}:{self.weight:g}"


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(
        None,
        description="Base model: hub id (optionally @revision) or a diffusers-layout folder; empty = the arch's "
        "default model.",
    )
    arch: ArchName | None = Field(
        None,
        description="How to run the base model (steps, guidance, shift); empty = the arch the first LoRA was "
        "trained for (a LoRA trained with the training adapter runs on plain Turbo), or Turbo without LoRAs.",
    )
    loras: list[LoraRef] = Field([], description="LoRA files with their weights.")
    prompt: str = Field(min_length=1, description="The prompt.")
    negative_prompt: str = Field("", description="Negative prompt (used when guidance > 1).")
    steps: int | None = Field(None, ge=1, le=1000, description="Transformer forwards; empty = the arch's.")
    guidance: float | None = Field(None, ge=0, description="Classic CFG scale (<= 1: none); empty = the arch's.")
    width: ImageSide = Field(1024, description="Image width (a multiple of 16).")
    height: ImageSide = Field(1024, description="Image height (a multiple of 16).")
    seed: int = Field(42, ge=0, description="Seed of the first image; the next ones take seed+1, seed+2, ...")
    count: int = Field(1, ge=1, le=MAX_COUNT, description="How many images to make.")
    quantize: Quant = Field("none", description="Frozen transformer and text encoder weights: none (bf16), "
                            "float8, int8 or nf4.")  # fmt: skip
    compile: bool = Field(False, description="torch.compile the transformer blocks (pays off from a few images).")
    fuse: bool = Field(
        True,
        description="Add plain LoRAs into the weights (no per-step cost); off keeps them as branches, as the "
        "previews run them. With quantize they always stay branches.",
    )
    device: DeviceSpec = Field("auto", description="auto, cpu, cuda or cuda:N.")

    @classmethod
    def build(cls, _flags: dict[str, str] | None = None, **values) -> GenerationRequest:
        """Validate, or end in one sentence naming the field (``_flags`` names it as a command line spells it)."""
        try:
            return cls(**values)
        except ValidationError as exc:
            first = explain_errors(exc, cls)[0]
            name = first.split(":", 1)[0].split(".")[0].split("[")[0]
            if _flags and name in _flags:
                first = _flags[name] + first[len(name) :]
            raise UserError(first) from None

    def cli_args(self) -> list[str]:
        """The ``zimage-lora generate`` arguments that make this request (for a process the web UI starts)."""
        args = [f"--prompt={self.prompt}", f"--negative={self.negative_prompt}"]
        args += [f"--model={self.model}"] if self.model else []
        args += [f"--arch={self.arch}"] if self.arch else []
        args += [f"--lora={lora.cli()}" for lora in self.loras]
        args += [f"--width={self.width}", f"--height={self.height}", f"--seed={self.seed}", f"--count={self.count}"]
        args += [f"--steps={self.steps}"] if self.steps is not None else []
        args += [f"--guidance={self.guidance}"] if self.guidance is not None else []
        args += [f"--quantize={self.quantize}", f"--device={self.device}"]
        args += ["--compile"] if self.compile else []
        args += [] if self.fuse else ["--no-fuse"]
        return args

    @property
    def lora_paths(self) -> list[Path]:
        return [Path(lora.path) for lora in self.loras]
