"""The latent cache: each (image, bucket) is VAE-encoded once and reused by later runs and other jobs.

An entry's name is a fingerprint of the image file's bytes, the crop and the VAE (its config, a checksum of its
weights and its dtype), so a changed image or another VAE never reads a stale entry. Entries are written
atomically, so an interrupted caching pass never leaves a bad one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from zimage_lora import faults
from zimage_lora.data.dataset import crop_to_bucket, flip_image, load_rgb
from zimage_lora.lora.io import atomic_write_bytes, serialize_safetensors
from zimage_lora.models.offload import OnDemand
from zimage_lora.models.vae import encode_latents, pil_to_tensor

CACHE_VERSION = "1"


def vae_identity(vae) -> str:
    """A short fingerprint of a VAE: its config and a checksum of its weights and dtype."""
    # the config's private keys (``_name_or_path``, versions) say where the VAE was loaded from, not what it is:
    # the same VAE copied elsewhere must keep its cache
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(str(p.dtype).encode())
        h.update(f"{float(p.double().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def entry_name(image_digest: str, bucket: tuple[int, int], vae_id: str, flip: str = "") -> str:
    """The entry of an (image, bucket, flip): ``flip`` "", "x", "y" or "xy" (an unflipped entry keeps its old name)."""
    key = f"v{CACHE_VERSION}|{image_digest}|{bucket[0]}x{bucket[1]}|centre|{vae_id}" + (f"|flip-{flip}" if flip else "")
    return hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors"


def read_entry(path: Path) -> torch.Tensor | None:
    """The cached latent, or None if the entry is missing or unreadable (it is then re-encoded)."""
    if not path.is_file():
        return None
    try:
        return st_load(path.read_bytes())["latent"]
    except (SafetensorError, KeyError, ValueError, RuntimeError):
        return None


def write_entry(path: Path, latent: torch.Tensor, source: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = serialize_safetensors({"latent": latent}, {"source": source.name})
    atomic_write_bytes(path, data)


Bucket = tuple[int, int]


class LatentStore:
    """Latents by (image file, bucket): read from the cache, or encoded in batches and written to it.

    ``prepare`` does the one caching pass (call it before training); ``get`` serves latents afterwards and encodes
    on demand for data that is not cached (``cache_latents: false``). With ``low_vram`` the VAE lives on the CPU and
    visits the device only while it encodes (one visit for the whole caching pass).
    """

    def __init__(self, vae, device, batch_size: int = 4, log: Callable[[str], None] = print, low_vram: bool = False):
        self.vae, self.device, self.batch_size, self.log = vae, device, batch_size, log
        # the VAE visits the device to encode; without low_vram it stays there (the recipe moves it afterwards)
        self.vae_on_device = OnDemand(vae, device, home="cpu" if low_vram else device)
        self.memory: dict[tuple[Path, Bucket, str], torch.Tensor] = {}
        self._vae_id: str | None = None
        self.encoded_images = 0  # images through the VAE encoder in this process (the caching pass and on demand)

    @property
    def vae_id(self) -> str:
        if self._vae_id is None:
            self._vae_id = vae_identity(self.vae)
        return self._vae_id

    def prepare(self, wanted: Iterable[tuple], share=None) -> tuple[int, int]:
        """Make sure every (image, bucket[, flip]) has a cache entry in its cache folder; returns (encoded, reused).
        ``wanted`` holds (image, bucket, cache folder) or (image, bucket, cache folder, flip).

        ``share`` (``training.distributed.Processes``, several processes): each process encodes its part of the
        missing entries, then, after all have written theirs, reads the others' from the cache."""
        todo: dict[tuple[Bucket, str], list[tuple[Path, Path]]] = {}
        digests: dict[Path, str] = {}  # each file is read and hashed once, whatever its number of buckets
        reused = 0
        wanted = {(w[0], w[1], w[2], w[3] if len(w) > 3 else "") for w in wanted}
        for path, bucket, cache_dir, flip in sorted(wanted, key=lambda w: (str(w[0]), w[1], w[3])):
            if path not in digests:
                digests[path] = file_digest(path)
            entry = Path(cache_dir) / entry_name(digests[path], bucket, self.vae_id, flip)
            latent = read_entry(entry)
            if latent is None:
                todo.setdefault((bucket, flip), []).append((path, entry))
            else:
                self.memory[(path, bucket, flip)] = latent
                reused += 1
        if share is None or not share.several:
            with self.vae_on_device.visit() if todo else nullcontext():
                return self._encode_all(todo), reused
        share.wait_all()  # every process has looked at the cache before any writes to it: all see the same gaps
        missing = [(key, job) for key, jobs in sorted(todo.items()) for job in jobs]
        own: dict[tuple[Bucket, str], list[tuple[Path, Path]]] = {}
        for key, job in share.share(missing):
            own.setdefault(key, []).append(job)
        with self.vae_on_device.visit() if own else nullcontext():
            encoded = self._encode_all(own)
        share.wait_all()  # every process has written its entries
        for (bucket, flip), (path, entry) in missing:
            if (path, bucket, flip) not in self.memory:
                latent = read_entry(entry)  # none: another machine wrote it where this one cannot read
                if latent is None:
                    latent = self.encode([path], bucket, flip)[0]
                self.memory[(path, bucket, flip)] = latent
        return encoded, reused

    def _encode_all(self, todo: dict[tuple[Bucket, str], list[tuple[Path, Path]]]) -> int:
        encoded = 0
        for (bucket, flip), jobs in sorted(todo.items()):
            for i in range(0, len(jobs), self.batch_size):
                chunk = jobs[i : i + self.batch_size]
                latents = self.encode([p for p, _ in chunk], bucket, flip)
                for (path, entry), latent in zip(chunk, latents, strict=True):
                    write_entry(entry, latent, path)
                    self.memory[(path, bucket, flip)] = latent
                    encoded += 1
                    faults.fire("cache.entry", encoded)
        return encoded

    @torch.no_grad()
    def encode(self, paths: list[Path], bucket: Bucket, flip: str = "") -> torch.Tensor:
        """VAE latents (float32, on the CPU) of images cropped to ``bucket`` (then flipped), in one batch."""
        pixels = torch.stack([pil_to_tensor(flip_image(crop_to_bucket(load_rgb(p), bucket), flip)) for p in paths])
        self.encoded_images += len(paths)
        with self.vae_on_device.visit():
            return encode_latents(self.vae, pixels.to(self.device, self.vae.dtype)).float().cpu()

    def get(self, path: Path, bucket: Bucket, flip: str = "") -> torch.Tensor:
        latent = self.memory.get((path, bucket, flip))
        return latent if latent is not None else self.encode([path], bucket, flip)[0]
