"""Shared pieces of the speed benchmarks: model configs, a random-weight transformer, timing, peak memory."""

from __future__ import annotations

import platform
import resource
import time

import torch
from diffusers import ZImageTransformer2DModel

from zimage_lora.models.quant import TRANSFORMER_BLOCKS, quantize_model, quantized_bytes
from zimage_lora.training.memory import ZIMAGE_TRANSFORMER

# "full" is the real Z-Image transformer (6.15 B parameters); "cpu" a scaled one that a 2-core machine steps in seconds.
CONFIGS = {
    "full": ZIMAGE_TRANSFORMER,
    "cpu": dict(
        dim=384,
        n_layers=4,
        n_refiner_layers=1,
        n_heads=4,
        n_kv_heads=4,
        cap_feat_dim=256,
        axes_dims=[32, 32, 32],
        axes_lens=[1536, 512, 512],
    ),
}


def build_transformer(name: str | dict, device: torch.device, dtype: torch.dtype) -> ZImageTransformer2DModel:
    """Random weights, no download; built on the meta device first so the full size never sits in fp32 on the CPU.

    ``name`` is one of ``CONFIGS`` or a config of its own."""
    config = CONFIGS[name] if isinstance(name, str) else name
    torch.manual_seed(0)
    with torch.device("meta"):
        model = ZImageTransformer2DModel(**config).to(dtype)  # on meta: the full size is never held in fp32
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for name, _ in model.named_buffers():
            raise RuntimeError(f"unexpected buffer {name}: to_empty leaves it uninitialised")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peak memory counts the steps, not the build
    return model.requires_grad_(False)


def quantize(model: ZImageTransformer2DModel, mode: str, device: torch.device) -> str:
    """The library's quantization of the transformer blocks (as ``quantization.transformer``); says what it stored."""
    if mode == "none":
        return "quant none"
    quantize_model(model, mode, TRANSFORMER_BLOCKS, work_device=device)
    stored, bf16 = quantized_bytes(model)
    ratio = bf16 / stored
    return f"quant {mode}: quantized layers store {stored / 2**30:.2f} GiB (bf16: {bf16 / 2**30:.2f} GiB, x{ratio:.2f})"


def reset_peak(device: torch.device) -> None:
    """Peak memory from here on: the steps, not the build, quantization or offload set-up."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def inputs(config: dict, width: int, height: int, batch: int, caption: int, device, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 16, height // 8, width // 8, generator=g).to(device)
    caps = [torch.randn(caption, config["cap_feat_dim"], generator=g).to(device, dtype) for _ in range(batch)]
    return x0, caps


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call: the median of ``steps`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """What this device sustains on a large matmul in this dtype: the ceiling utilisation is measured against."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, 10, 3, device)
    return 2 * n**3 / seconds / 1e12


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
