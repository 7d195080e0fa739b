"""The toy world's components: the real Z-Image classes, small.

- tokenizer: a byte-level ``Qwen2Tokenizer`` with merges for the world's words and the chat template's, so a
  caption is a dozen tokens (every other text still encodes, byte by byte);
- text encoder: a random, frozen 2-layer ``Qwen3Model`` (hidden size 64): the transformer learns to read it;
- VAE: ``AutoencoderKL`` with channels 16/32/64/64 and 16 latent channels (8x, about 1 M parameters), with the FLUX
  VAE's scaling and shift factors;
- transformer: ``ZImageTransformer2DModel``, dim 192, 6 main blocks and one refiner of each kind, 4 heads, caption
  dim 64, patch 2 (5.1 M parameters).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
from transformers import Qwen2Tokenizer, Qwen3Model

from zimage_lora.models.tiny import (
    SPECIAL_TOKENS,
    THINK_TOKENS,
    _byte_symbols,
    byte_level_tokenizer,
    small_text_encoder,
    small_transformer,
    small_vae,
)
from zimage_lora.toyworld.world import COLORS, SHAPES

TEXT_HIDDEN = 64
SPACE = _byte_symbols()[ord(" ")]  # byte-level BPE writes a leading space as this symbol
WORDS = ("a", "on", "background", *COLORS, *SHAPES)
TEMPLATE_WORDS = ("user", "assistant")


def _merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte vocabulary, then each world word built by left-to-right merges, then with its leading space."""
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    merges: list[tuple[str, str]] = []

    def merge(left: str, right: str) -> None:
        if left + right not in vocab:
            merges.append((left, right))
            vocab[left + right] = len(vocab)

    for word in (*TEMPLATE_WORDS, *WORDS):
        for end in range(2, len(word) + 1):
            merge(word[: end - 1], word[end - 1])
    for word in WORDS:  # then the space joins the whole word (BPE applies the earlier merges first)
        merge(SPACE, word)
    for token in (*SPECIAL_TOKENS, *THINK_TOKENS):
        vocab[token] = len(vocab)
    return vocab, merges


def toy_tokenizer() -> Qwen2Tokenizer:
    vocab, merges = _merges()
    return byte_level_tokenizer(vocab, merges, max_length=512)


def toy_text_encoder(vocab_size: int) -> Qwen3Model:
    vocab, _ = _merges()
    return small_text_encoder(
        vocab_size=vocab_size, hidden=TEXT_HIDDEN, intermediate=128, layers=2, heads=4, kv_heads=2, max_positions=512,
        pad_id=vocab["<|endoftext|>"], eos_id=vocab["<|im_end|>"],
    )  # fmt: skip


def toy_vae() -> AutoencoderKL:
    return small_vae(channels=(16, 32, 64, 64), sample_size=128)


def toy_transformer() -> ZImageTransformer2DModel:
    model = small_transformer(dim=192, layers=6, heads=4, caption_dim=TEXT_HIDDEN, axes_dims=(16, 16, 16))
    with torch.no_grad():  # learned pad tokens start random, as the real model's are not zero
        model.x_pad_token.normal_(0, 0.02)
        model.cap_pad_token.normal_(0, 0.02)
    return model


def toy_scheduler(shift: float) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
