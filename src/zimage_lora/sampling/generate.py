"""``zimage-lora generate``: run a base model with one or more LoRAs, as the guide's "Run LoRA" step.

It takes one ``GenerationRequest`` (``sampling/request.py``), the same type the playground's API takes. The same
sampler as the previews (so a preview is what you get here), the pipeline's noise for a seed, LoRA files in our
layout, diffusers/peft layout or kohya ``lora_unet_`` layout, each at its own weight.

- The arch (steps, guidance, shift): ``request.arch``, else the one the first LoRA records in its metadata, through
  the registry's training-to-inference mapping (a LoRA trained on Turbo with the training adapter runs on plain
  Turbo, a De-Turbo LoRA at 25 steps with CFG). A warning says when the arch or the base model differ from what the
  LoRAs were trained for, when LoRAs disagree, or when a LoRA records nothing.
- ``fuse`` (the default): plain LoRAs are added into the transformer's weights at load, as ComfyUI's LoRA loader
  patches them, so a step costs what the base model's does; ``fuse=False`` keeps each as a float32 branch beside
  the weights, as the training previews run it (the same image up to one rounding of each changed weight).
- ``quantize`` stores the transformer's and the text encoder's frozen weights in float8, int8 or nf4
  (``models/quant.py``); plain LoRAs then stay full-precision branches on top (fused, their update would be rounded
  to the quantization grid), and LoKr/LoHa/DoRA deltas are merged into the weights before they are quantized.
- ``compile`` compiles each transformer block as ``train.compile`` does (the first image pays for it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from zimage_lora.lora import network
from zimage_lora.lora.io import read_lora, read_metadata, read_safetensors
from zimage_lora.lora.variants import detect_kind, fuse_lora, merge_into, read_network
from zimage_lora.models.arch import ARCHS, DEFAULT_INFERENCE_ARCH, Arch, inference_arch
from zimage_lora.models.compile import compile_blocks as compile_transformer_blocks
from zimage_lora.models.devices import resolve_device
from zimage_lora.models.loading import default_dtype, load_components
from zimage_lora.models.refs import portable_ref
from zimage_lora.models.text import encode_prompts
from zimage_lora.models.vae import decode_latents, tensor_to_pil
from zimage_lora.sampling.previews import image_info, save_png
from zimage_lora.sampling.request import GenerationRequest
from zimage_lora.sampling.sampler import SampleSettings, denoise

Warn = Callable[[str], None]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def choose_arch(request: GenerationRequest, warn: Warn = _warn) -> Arch:
    """The arch the request runs with (see the module docstring), saying what the user should know about it."""
    recorded = [(Path(lora.path), read_metadata(lora.path)) for lora in request.loras]
    trained = []  # (file, the arch it records, the arch it is used with) of each LoRA that records a known arch
    for path, meta in recorded:
        name = meta.get("zimage_lora.arch")
        if name in ARCHS:
            trained.append((path, name, inference_arch(name).name))
        elif name:
            warn(f"LoRA {path.name} was trained for arch {name!r}, which this version does not know")
    if len({used for _, _, used in trained}) > 1:
        listed = ", ".join(f"{path.name}: {name}" for path, name, _ in trained)
        warn(f"the LoRAs were trained for different archs ({listed})")
    if request.arch is not None:
        arch = ARCHS[request.arch]
        if arch.use_with != arch.name:  # a training arch: run what its LoRAs are used with
            arch = inference_arch(arch.name)
        if trained and trained[0][2] != arch.name:
            path, name, used = trained[0]
            warn(
                f"LoRA {path.name} was trained for {name} (used with {used}: {ARCHS[used].cfg_label}); it runs on "
                f"{arch.name} ({arch.cfg_label}) as --arch asks"
            )
    elif trained and recorded and recorded[0][0] == trained[0][0]:
        arch = ARCHS[trained[0][2]]
    else:
        arch = ARCHS[DEFAULT_INFERENCE_ARCH]
        if request.loras:
            warn(
                f"LoRA {Path(request.loras[0].path).name} records no arch; running {arch.name} ({arch.cfg_label}); "
                "give --arch to choose"
            )
    model = portable_ref(request.model or arch.default_model)
    for path, meta in recorded:
        base = meta.get("zimage_lora.base_model")
        if base and base != model:
            warn(f"LoRA {path.name} was trained on {base}; this runs {model}")
    return arch


class Generator:
    """A loaded base model with the request's LoRAs applied; call ``image`` for each prompt and seed."""

    def __init__(self, request: GenerationRequest, warn: Warn = _warn):
        self.request = request
        self.arch = choose_arch(request, warn)
        self.model = request.model or self.arch.default_model
        self.device = resolve_device(request.device)
        loras = request.loras
        kinds = [detect_kind(read_safetensors(lora.path)[0]) for lora in loras]
        self.fused = request.fuse and request.quantize == "none"
        branches = [kind == "lora" and not self.fused for kind in kinds]

        def merge(part: str, module) -> None:
            # LoKr, LoHa, DoRA (and fused LoRAs): their exact delta goes into the weights, before any quantization
            if part != "transformer":
                return
            names = network.linear_module_names(module)
            for lora, kind, branch in zip(loras, kinds, branches, strict=True):
                if branch:
                    continue
                if kind == "lora":
                    fuse_lora(module, _fitting_lora(module, lora.path, names), lora.weight)
                else:
                    merge_into(module, read_network(lora.path, names), lora.weight, f"LoRA {lora.path}")

        self.comps = load_components(
            self.model,
            dtype=default_dtype(self.device),
            device=self.device,
            fallback_ref=self.arch.parts_from,
            scheduler_shift=self.arch.shift if self.arch.override_shift else None,
            quantization={"transformer": request.quantize, "text_encoder": request.quantize},
            edit=merge,
            model_key="--model",
        )
        transformer = self.comps.transformer
        names = network.linear_module_names(transformer)
        adapters = []
        for index, (lora, branch) in enumerate(zip(loras, branches, strict=True)):
            if not branch:
                continue
            name = f"lora_{index}"
            network.add_frozen_lora(transformer, _fitting_lora(transformer, lora.path, names), name)
            adapters.append((name, lora.weight))
        if adapters:
            transformer.set_adapters([n for n, _ in adapters], [w for _, w in adapters])
        if request.compile:  # after the LoRAs are in place, so the compiled blocks include their branches
            compile_transformer_blocks(transformer, self.device)

    def settings(self, seed: int) -> SampleSettings:
        """The request's sampler settings for one seed, the arch's steps and guidance where the request has none."""
        r, arch = self.request, self.arch
        steps = r.steps if r.steps is not None else arch.sample_steps
        guidance = r.guidance if r.guidance is not None else arch.sample_guidance
        return SampleSettings(r.width, r.height, steps, guidance, seed)

    @torch.no_grad()
    def image(self, prompt: str, negative: str, settings: SampleSettings):
        tokenizer, encoder = self.comps.tokenizer, self.comps.text_encoder
        pos, neg = encode_prompts(tokenizer, encoder, [prompt, negative], device=self.device, batch_size=1)
        z = denoise(self.comps.transformer, self.comps.scheduler.config, pos, neg, settings, self.device)
        return tensor_to_pil(decode_latents(self.comps.vae, z.to(self.device, self.comps.vae.dtype)))[0]


def _fitting_lora(transformer, path: str, names: list[str]):
    """A plain LoRA file's modules, refused in one sentence when they do not fit ``transformer``."""
    lora = read_lora(Path(path), names)
    network.check_adapter_fits(transformer, lora.modules, f"LoRA {path}")
    return lora.modules


def generate(request: GenerationRequest, out: Path, progress: bool = True, warn: Warn = _warn) -> list[Path]:
    """The request's images as PNGs in ``out`` (numbered after what is there), their settings in text metadata."""
    gen = Generator(request, warn)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first = _next_index(out)
    paths = []
    for i in tqdm(range(request.count), disable=not progress, unit="image"):
        settings = gen.settings(request.seed + i)
        image = gen.image(request.prompt, request.negative_prompt, settings)
        path = out / f"{first + i:05d}_{settings.seed}.png"
        info = image_info(
            request.prompt,
            request.negative_prompt,
            settings,
            gen.arch.name,
            gen.comps.scheduler.config.shift,
            model=gen.model,
            loras=", ".join(f"{Path(lora.path).name}:{lora.weight:g}" for lora in request.loras),
            quantize=request.quantize,
            lora_fused=str(gen.fused and bool(request.loras)).lower(),
        )
        save_png(path, image, info)
        paths.append(path)
    return paths


def _next_index(folder: Path) -> int:
    taken = [int(p.name[:5]) for p in folder.glob("*.png") if p.name[:5].isdigit()]
    return max(taken, default=-1) + 1
