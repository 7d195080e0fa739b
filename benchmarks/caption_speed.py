"""Captioning speed of the real Qwen3-VL architecture with random weights, no download.

    python benchmarks/caption_speed.py --config 2b --images 3 --size 512x512 --new-tokens 32          # the CPU
    python benchmarks/caption_speed.py --config 8b --device cuda --images 16 --batch 4 --size 1024x768
    python benchmarks/caption_speed.py --config 8b --device cuda --images 16 --batch 4 --quantize nf4

The model is ``Qwen3VLForConditionalGeneration`` built from the published configuration kept in
captioning/registry.py (8B: Qwen/Qwen3-VL-8B-Instruct, the default captioner; 4B; 2B) on the meta device, then
materialised in bf16 with transformers' own initialisation (which also fills the rotary buffers). The pictures go
through the same ``Qwen3VLCaptioner`` as ``zimage-lora caption``: the image processor at the real patch and merge
sizes, the captioner's 1-megapixel cap, greedy decoding, ``--quantize`` through models/quant.py. What is not real: the
tokenizer is the tiny byte-level one (its vision token ids are written into the config), so the instruction is cut
to ``--text-tokens`` bytes to give the text part of the prompt the length the real tokenizer gives the character
instruction (about 120 tokens); and random weights never stop on their own, so every picture gets exactly
``--new-tokens`` tokens (a real caption is 40-100).

Prints the picture and text tokens per picture, seconds per batch (each batch timed; the first also pays one-time
costs, so it is shown apart), images/s and generated tokens/s over the batches after the first (over all when there
is only one), and the peak memory (GPU allocated, or the process's peak RSS on the CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe, peak_memory_gb, reset_peak, synchronize  # noqa: E402

from zimage_lora.captioning import registry  # noqa: E402
from zimage_lora.captioning.captioner import CAPTION_MAX_PIXELS, Qwen3VLCaptioner  # noqa: E402
from zimage_lora.captioning.prompts import instruction  # noqa: E402
from zimage_lora.models import tiny_captioner  # noqa: E402

CONFIGS = {"8b": registry.QWEN3_VL_8B, "4b": registry.QWEN3_VL_4B, "2b": registry.QWEN3_VL_2B}
REAL_PIXELS = {"shortest_edge": 65536, "longest_edge": 16777216}  # Qwen3-VL's preprocessor_config.json


def build(name: str, device: torch.device, new_tokens: int) -> torch.nn.Module:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    vocab = tiny_captioner.qwen3_vl_vocab()
    config = {k: v for k, v in CONFIGS[name].items() if k != "model_type"}
    config.update(
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**config)).to(torch.bfloat16)
    model = model.to_empty(device=device)
    torch.manual_seed(0)
    model.initialize_weights()  # every parameter, and the rotary buffers to_empty left empty
    generation = tiny_captioner.qwen3_vl_generation_config(vocab, config["text_config"]["vocab_size"])
    generation.min_new_tokens = new_tokens  # random weights: exactly new_tokens per picture
    model.generation_config = generation
    return model.requires_grad_(False).eval()


def pictures(count: int, width: int, height: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    small = [rng.integers(0, 256, (6, 8, 3), dtype=np.uint8) for _ in range(count)]
    return [Image.fromarray(p).resize((width, height), Image.Resampling.BILINEAR) for p in small]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="2b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", default="512x512", help="WIDTHxHEIGHT of the pictures")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--text-tokens", type=int, default=120)
    parser.add_argument("--quantize", choices=["nf4", "int8"], default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    width, height = (int(v) for v in args.size.split("x"))

    start = time.perf_counter()
    model = build(args.config, device, args.new_tokens)
    if args.quantize:
        from zimage_lora.models.quant import quantize_model

        quantize_model(model, args.quantize, registry.QWEN3_VL_QUANTIZED, work_device=device)
    built = time.perf_counter() - start
    tokenizer = tiny_captioner.qwen3_vl_tokenizer()
    images = tiny_captioner.qwen3_vl_image_processor(REAL_PIXELS)
    captioner = Qwen3VLCaptioner(model, tokenizer, images, tokenizer.chat_template, max_pixels=CAPTION_MAX_PIXELS)
    request = instruction("character")[: args.text_tokens]
    shown = pictures(args.images, width, height)
    batches = [shown[i : i + args.batch] for i in range(0, args.images, args.batch)]
    prepared = captioner.prepare(batches[0][:1], request)
    picture_tokens = int(prepared["mm_token_type_ids"].sum())
    text_tokens = prepared["input_ids"].shape[1] - picture_tokens

    reset_peak(device)
    seconds = []
    for batch in batches:
        synchronize(device)
        tick = time.perf_counter()
        answers = captioner.answer(batch, request, args.new_tokens)
        synchronize(device)
        seconds.append(time.perf_counter() - tick)
        assert len(answers) == len(batch)
    timed = seconds[1:] or seconds
    counted = sum(len(b) for b in (batches[1:] if len(batches) > 1 else batches))
    quant = f", quantize {args.quantize}" if args.quantize else ""
    print(f"Qwen3-VL {args.config} (random weights, bf16{quant}) on {describe(device)}; built in {built:.0f} s")
    print(f"per picture: {width}x{height} -> {picture_tokens} picture tokens + {text_tokens} text tokens, "
          f"{args.new_tokens} new tokens; batch {args.batch}")  # fmt: skip
    print("seconds per batch: " + ", ".join(f"{s:.1f}" for s in seconds) + " (the first pays one-time costs)")
    print(
        f"{counted / sum(timed):.3f} images/s, {counted * args.new_tokens / sum(timed):.1f} generated tokens/s, "
        f"peak memory {peak_memory_gb(device):.1f} GiB"
    )


if __name__ == "__main__":
    main()
