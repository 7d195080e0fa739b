"""Prompt embeddings: encoded once and kept (``train.cache_text_embeddings``), or encoded on demand.

With the cache, every distinct caption, the empty prompt (so caption dropout still works) and the preview prompts
are encoded in one pass; ``release`` then drops the text encoder (8 GB for the real Qwen3-4B) from the device and
from this object, so nothing keeps it alive. With ``low_vram`` the text encoder lives on the CPU and visits the
device only while it encodes.
"""

from __future__ import annotations

import torch

from zimage_lora.models.offload import OnDemand
from zimage_lora.models.text import encode_prompts

# One prompt per text-encoder call: padded batches give the same embeddings only up to float rounding, and a
# prompt's embedding must not depend on which other prompts (captions, previews) happen to be encoded with it.
BATCH = 1


class PromptEmbeddings:
    """Prompt embeddings: from the cache when one was built, else encoded on demand."""

    def __init__(self, tokenizer, encoder, device, low_vram: bool = False):
        self.tokenizer, self.encoder, self.device = tokenizer, encoder, device
        self.cached: dict[str, torch.Tensor] = {}
        self.encoded_prompts = 0  # prompts through the text encoder in this process
        self.on_device = None
        if encoder is not None:
            self.on_device = OnDemand(encoder, device, home="cpu" if low_vram else device)

    @torch.no_grad()
    def cache(self, prompts: list[str], share=None) -> None:
        """Encode ``prompts`` once; with ``share`` (several processes) each encodes its part and all keep all."""
        mine = share.share(prompts) if share is not None else prompts
        if mine:
            with self.on_device.visit():
                embeddings = encode_prompts(self.tokenizer, self.encoder, mine, device=self.device, batch_size=BATCH)
            self.encoded_prompts += len(mine)
            for prompt, emb in zip(mine, embeddings, strict=True):
                self.cached[prompt] = emb.detach().to("cpu")
        if share is not None and share.several:
            for part in share.gather({p: self.cached[p] for p in mine}):
                self.cached.update(part)

    @property
    def visits(self) -> int:
        """How many times the text encoder came to the device (once, without low_vram)."""
        return self.on_device.visits if self.on_device is not None else 0

    def release(self) -> None:
        """Move the text encoder off the device and let go of it (the caller drops its own reference too)."""
        self.encoder.to("cpu")
        self.encoder = None
        self.on_device.module = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> list[torch.Tensor]:
        missing = sorted({p for p in prompts if p not in self.cached})
        if missing and self.encoder is None:
            raise RuntimeError(f"prompt not cached and the text encoder is gone: {missing[0]!r}")
        fresh = {}
        if missing:
            with self.on_device.visit():
                embeddings = encode_prompts(self.tokenizer, self.encoder, missing, device=self.device, batch_size=BATCH)
            self.encoded_prompts += len(missing)
            fresh = dict(zip(missing, embeddings, strict=True))
        return [self.cached[p] if p in self.cached else fresh[p] for p in prompts]
