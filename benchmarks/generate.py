"""Time of one Turbo image (8 transformer forwards, no CFG) with our sampler, random weights, no download.

    python benchmarks/generate.py --config cpu --size 256
    python benchmarks/generate.py --config full --size 1024 --device cuda --dtype bf16
    python benchmarks/generate.py --config full --size 1024 --device cuda --dtype bf16 --quant float8
    python benchmarks/generate.py --config full --size 1024 --device cuda --dtype bf16 --compile
    python benchmarks/generate.py --config full --size 1024 --device cuda --dtype bf16 --loras 1 [--no-fuse]

The VAE decode is not included (its weights are not part of this harness); the denoising loop is what is timed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CONFIGS,
    build_transformer,
    describe,
    inputs,
    matmul_peak_tflops,
    peak_memory_gb,
    quantize,
    reset_peak,
    timed,
)

from zimage_lora.config import DEFAULT_TARGET_REGEX  # noqa: E402
from zimage_lora.lora import network  # noqa: E402
from zimage_lora.lora.io import LoraWeights  # noqa: E402
from zimage_lora.lora.variants import fuse_lora  # noqa: E402
from zimage_lora.models.compile import compile_blocks  # noqa: E402
from zimage_lora.sampling.sampler import SampleSettings, denoise  # noqa: E402
from zimage_lora.training.flops import forward_flops  # noqa: E402


def add_loras(model, count: int, fuse: bool) -> str:
    """``count`` random LoRAs at weight 0.8, as ``Generator`` applies them: fused into the weights (before any
    quantization) or as float32 peft branches."""
    names = network.target_module_names(model, DEFAULT_TARGET_REGEX)
    layers = dict(model.named_modules())
    g = torch.Generator().manual_seed(1)
    for index in range(count):
        modules = {
            name: LoraWeights(
                torch.randn(16, layers[name].in_features, generator=g) * 0.01,
                torch.randn(layers[name].out_features, 16, generator=g) * 0.01,
                alpha=16.0,
            )
            for name in names
        }
        if fuse:
            fuse_lora(model, modules, 0.8)
        else:
            network.add_frozen_lora(model, modules, f"lora_{index}")
    if not fuse:
        model.set_adapters([f"lora_{i}" for i in range(count)], [0.8] * count)
    return f"{count} LoRA{'s' if count > 1 else ''} ({'fused' if fuse else 'float32 branches'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="transformer forwards")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--quant", choices=["none", "float8", "int8", "nf4"], default="none", help="frozen weights")
    parser.add_argument("--compile", action="store_true", help="compile the blocks (the untimed first image pays)")
    parser.add_argument("--loras", type=int, default=0, help="random rank-16 LoRAs on the default targets")
    parser.add_argument("--no-fuse", dest="fuse", action="store_false", help="keep the LoRAs as branches")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = build_transformer(args.config, device, dtype).eval()
    report = add_loras(model, args.loras, args.fuse and args.quant == "none") if args.loras else "no LoRA"
    report += "; " + quantize(model, args.quant, device)
    if args.compile:
        report += f"; {compile_blocks(model, device)} blocks compiled"
    _, caps = inputs(CONFIGS[args.config], args.size, args.size, 1, 128, device, dtype)
    reset_peak(device)
    scheduler_config = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
    settings = SampleSettings(args.size, args.size, args.steps, 1.0, 0)
    seconds = timed(lambda: denoise(model, scheduler_config, caps[0], None, settings, device), args.repeats, 1, device)
    memory = peak_memory_gb(device)  # before the matmul probe below allocates its own buffers
    flops = args.steps * forward_flops(CONFIGS[args.config], args.size, args.size, 128)
    peak = matmul_peak_tflops(device, dtype)
    print(
        f"device: {describe(device)}; config {args.config}, {args.size}x{args.size}, {args.steps} forwards, "
        f"{args.dtype}; {report}"
    )
    print(
        f"{seconds:.3f} s per image (denoising), peak memory {memory:.2f} GB, "
        f"{flops / seconds / 1e12:.3f} TFLOP/s = {100 * flops / seconds / 1e12 / peak:.1f}% of the measured "
        f"{peak:.2f} TFLOP/s matmul peak"
    )


if __name__ == "__main__":
    main()
