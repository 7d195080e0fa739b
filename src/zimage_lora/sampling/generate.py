"""``zimage-lora generate``: run a base model with one or more LoRAs, as the guide's "Run LoRA" step.

The same sampler as the previews (so a preview is what you get here), the pipeline's noise for a seed, LoRA files
in our layout, diffusers/peft layout or kohya ``lora_unet_`` layout, each at its own weight.

- ``fuse`` (the default): plain LoRAs are added into the transformer's weights at load, as ComfyUI's LoRA loader
  patches them, so a step costs what the base model's does; ``fuse=False`` keeps each as a float32 branch beside
  the weights, as the training previews run it (the same image up to one rounding of each changed weight).
- ``quantize`` stores the transformer's and the text encoder's frozen weights in float8, int8 or nf4
  (``models/quant.py``); plain LoRAs then stay full-precision branches on top (fused, their update would be rounded
  to the quantization grid), and LoKr/LoHa/DoRA deltas are merged into the weights before they are quantized.
- ``compile_blocks`` compiles each transformer block as ``train.compile`` does (the first image pays for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from zimage_lora.errors import UserError
from zimage_lora.lora import network
from zimage_lora.lora.io import read_lora, read_safetensors
from zimage_lora.lora.variants import detect_kind, fuse_lora, merge_into, read_network
from zimage_lora.models.arch import ARCHS
from zimage_lora.models.compile import compile_blocks as compile_transformer_blocks
from zimage_lora.models.loading import default_dtype, load_components, resolve_device
from zimage_lora.models.quant import MODES
from zimage_lora.models.text import encode_prompts
from zimage_lora.models.vae import decode_latents, tensor_to_pil
from zimage_lora.sampling.previews import save_png
from zimage_lora.sampling.sampler import SampleSettings, denoise


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``FILE`` or ``FILE:WEIGHT`` (a Windows drive letter's colon is not a weight)."""
        head, sep, tail = text.rpartition(":")
        if sep and head and not (len(head) == 1 and head.isalpha()):
            try:
                return cls(Path(head), float(tail))
            except ValueError:
                message = f"--lora {text}: the weight after ':' must be a number, e.g. my_lora.safetensors:0.8"
                raise UserError(message) from None
        return cls(Path(text))


class Generator:
    """A loaded base model with LoRAs applied; call ``image`` for each prompt and seed."""

    def __init__(
        self,
        model: str,
        arch: str,
        loras: list[LoraSpec],
        device: str = "auto",
        quantize: str = "none",
        compile_blocks: bool = False,
        fuse: bool = True,
    ):
        if arch not in ARCHS:
            raise UserError(f"--arch: unknown {arch!r}; choose one of {', '.join(ARCHS)}")
        if quantize not in MODES:
            raise UserError(f"--quantize: unknown {quantize!r}; choose one of {', '.join(MODES)}")
        self.arch = ARCHS[arch]
        self.device = resolve_device(device)
        kinds = [detect_kind(read_safetensors(spec.path)[0]) for spec in loras]
        self.fused = fuse and quantize == "none"
        branches = [kind == "lora" and not self.fused for kind in kinds]

        def merge(part: str, module) -> None:
            # LoKr, LoHa, DoRA (and fused LoRAs): their exact delta goes into the weights, before any quantization
            if part != "transformer":
                return
            names = network.linear_module_names(module)
            for spec, kind, branch in zip(loras, kinds, branches, strict=True):
                if branch:
                    continue
                if kind == "lora":
                    fuse_lora(module, _fitting_lora(module, spec, names), spec.weight)
                else:
                    merge_into(module, read_network(spec.path), spec.weight, f"LoRA {spec.path}")

        self.comps = load_components(
            model,
            dtype=default_dtype(self.device),
            device=self.device,
            fallback_ref=self.arch.parts_from,
            scheduler_shift=self.arch.shift if arch == "zimage_base" else None,
            quantization={"transformer": quantize, "text_encoder": quantize},
            edit=merge,
        )
        transformer = self.comps.transformer
        names = network.linear_module_names(transformer)
        adapters = []
        for index, (spec, branch) in enumerate(zip(loras, branches, strict=True)):
            if not branch:
                continue
            name = f"lora_{index}"
            network.add_frozen_lora(transformer, _fitting_lora(transformer, spec, names), name)
            adapters.append((name, spec.weight))
        if adapters:
            transformer.set_adapters([n for n, _ in adapters], [w for _, w in adapters])
        if compile_blocks:  # after the LoRAs are in place, so the compiled blocks include their branches
            compile_transformer_blocks(transformer, self.device)

    @torch.no_grad()
    def image(self, prompt: str, negative: str, settings: SampleSettings):
        tokenizer, encoder = self.comps.tokenizer, self.comps.text_encoder
        pos, neg = encode_prompts(tokenizer, encoder, [prompt, negative], device=self.device, batch_size=1)
        z = denoise(self.comps.transformer, self.comps.scheduler.config, pos, neg, settings, self.device)
        return tensor_to_pil(decode_latents(self.comps.vae, z.to(self.device, self.comps.vae.dtype)))[0]


def _fitting_lora(transformer, spec: LoraSpec, names: list[str]):
    """A plain LoRA file's modules, refused in one sentence when they do not fit ``transformer``."""
    lora = read_lora(spec.path, names)
    network.check_adapter_fits(transformer, lora.modules, f"LoRA {spec.path}")
    return lora.modules


def generate(
    model: str,
    arch: str,
    loras: list[LoraSpec],
    prompt: str,
    negative: str,
    steps: int | None,
    guidance: float | None,
    width: int,
    height: int,
    seed: int,
    count: int,
    out: Path,
    device: str = "auto",
    progress: bool = True,
    quantize: str = "none",
    compile_blocks: bool = False,
    fuse: bool = True,
) -> list[Path]:
    if width % 16 or height % 16 or min(width, height) < 64:
        raise UserError(f"--width/--height: {width}x{height} must be multiples of 16, at least 64")
    gen = Generator(model, arch, loras, device, quantize=quantize, compile_blocks=compile_blocks, fuse=fuse)
    settings_steps = steps if steps is not None else gen.arch.sample_steps
    settings_guidance = guidance if guidance is not None else gen.arch.sample_guidance
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first = _next_index(out)
    paths = []
    for i in tqdm(range(count), disable=not progress, unit="image"):
        settings = SampleSettings(width, height, settings_steps, settings_guidance, seed + i)
        image = gen.image(prompt, negative, settings)
        path = out / f"{first + i:05d}_{seed + i}.png"
        save_png(
            path,
            image,
            {
                "prompt": prompt,
                "negative_prompt": negative,
                "width": width,
                "height": height,
                "steps": settings_steps,
                "guidance": settings_guidance,
                "seed": seed + i,
                "model": model,
                "arch": arch,
                "loras": ", ".join(f"{s.path.name}:{s.weight:g}" for s in loras),
                "quantize": quantize,
                "lora_fused": str(gen.fused and bool(loras)).lower(),
                "software": "zimage-lora",
            },
        )
        paths.append(path)
    return paths


def _next_index(folder: Path) -> int:
    taken = [int(p.name[:5]) for p in folder.glob("*.png") if p.name[:5].isdigit()]
    return max(taken, default=-1) + 1
