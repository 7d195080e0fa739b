"""Latent-caching throughput: images per second for the first (encoding) pass and the second (cached) pass.

    python benchmarks/cache_latents.py --vae full --count 8 --resolutions 512
    python benchmarks/cache_latents.py --vae tiny --count 30 --resolutions 512,768,1024

``--vae full`` builds the real Z-Image/FLUX VAE architecture (84 M parameters) with random weights, so no download
is needed and the compute is the real one; ``--vae tiny`` is the test model (measures everything around the VAE:
JPEG decoding, EXIF, resizing, hashing, atomic writes). Source images are synthetic 4:3 JPEGs, like phone photos.
The time is split into the VAE's share and the rest, measured in the same run.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from zimage_lora.data import cache as cache_module
from zimage_lora.data.cache import LatentStore
from zimage_lora.data.dataset import nearest_bucket
from zimage_lora.models.tiny import tiny_vae


def full_vae() -> AutoencoderKL:
    """The FLUX VAE's architecture as Z-Image uses it (16 latent channels, 8x), random weights."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def make_images(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        path = folder / f"img_{i:03d}.jpg"
        coarse.save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", choices=["tiny", "full"], default="full")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--size", default="1600x1200", help="source image size, WxH")
    parser.add_argument("--resolutions", default="512")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    resolutions = [int(r) for r in args.resolutions.split(",")]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    vae = (full_vae() if args.vae == "full" else tiny_vae()).to(device, dtype)

    vae_seconds = 0.0
    real_encode = cache_module.encode_latents

    def timed_encode(model, pixels):
        nonlocal vae_seconds
        start = time.perf_counter()
        out = real_encode(model, pixels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        vae_seconds += time.perf_counter() - start
        return out

    cache_module.encode_latents = timed_encode
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp, args.count, size)
        wanted = [(p, nearest_bucket(*size, r), tmp / "cache") for p in paths for r in resolutions]
        store = LatentStore(vae, device, batch_size=args.batch, log=lambda m: None)
        _ = store.vae_id  # the VAE fingerprint is computed once per run; not part of per-image throughput
        start = time.perf_counter()
        encoded, _ = store.prepare(wanted)
        first = time.perf_counter() - start
        start = time.perf_counter()
        _, reused = LatentStore(vae, device, batch_size=args.batch, log=lambda m: None).prepare(wanted)
        second = time.perf_counter() - start
    params = sum(p.numel() for p in vae.parameters()) / 1e6
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, device {device}, VAE {args.vae} ({params:.1f} M params, {args.dtype})"
    )
    print(f"{args.count} source images {size[0]}x{size[1]} JPEG, resolutions {resolutions}, batch {args.batch}")
    print(
        f"first pass : {encoded} encodes in {first:.2f} s = {encoded / first:.2f} images/s "
        f"(VAE {vae_seconds:.2f} s = {100 * vae_seconds / first:.0f}%, the rest {first - vae_seconds:.2f} s)"
    )
    print(f"second pass: {reused} cached in {second:.3f} s = {reused / second:.1f} images/s (no VAE call)")


if __name__ == "__main__":
    main()
