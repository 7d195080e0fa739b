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
from tokenizers import AddedToken
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

from zimage_lora.models.tiny import QWEN3_STYLE_CHAT_TEMPLATE, SPECIAL_TOKENS, THINK_TOKENS, _byte_symbols
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
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=512,
        padding_side="right",
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]}
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tokenizer.chat_template = QWEN3_STYLE_CHAT_TEMPLATE
    return tokenizer


def toy_text_encoder(vocab_size: int) -> Qwen3Model:
    vocab, _ = _merges()
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=vocab["<|endoftext|>"],
        bos_token_id=None,
        eos_token_id=vocab["<|im_end|>"],
    )
    return Qwen3Model(config).eval()


def toy_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def toy_transformer() -> ZImageTransformer2DModel:
    model = ZImageTransformer2DModel(
        dim=192,
        n_layers=6,
        n_refiner_layers=1,
        n_heads=4,
        n_kv_heads=4,
        cap_feat_dim=TEXT_HIDDEN,
        axes_dims=[16, 16, 16],
        axes_lens=[1536, 512, 512],
    )
    with torch.no_grad():  # learned pad tokens start random, as the real model's are not zero
        model.x_pad_token.normal_(0, 0.02)
        model.cap_pad_token.normal_(0, 0.02)
    return model


def toy_scheduler(shift: float) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
