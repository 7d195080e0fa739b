"""The latent cache: each (image, bucket) is VAE-encoded once and reused by later runs and other jobs.

An entry's name is a fingerprint of the image file's bytes, the crop and the VAE (its config, a checksum of its
weights and its dtype), so a changed image or another VAE never reads a stale entry. Entries are written
atomically, so an interrupted caching pass never leaves a bad one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from zimage_lora.lora.io import atomic_write_bytes, serialize_safetensors

CACHE_VERSION = "1"


def vae_identity(vae) -> str:
    """A short fingerprint of a VAE: its config and a checksum of its weights and dtype."""
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
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


def entry_name(image_digest: str, bucket: tuple[int, int], vae_id: str) -> str:
    key = f"v{CACHE_VERSION}|{image_digest}|{bucket[0]}x{bucket[1]}|centre|{vae_id}"
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
