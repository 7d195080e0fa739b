"""A tiny random Z-Image pipeline made of the real classes, for tests and the offline demo.

The folder has the real diffusers layout (``model_index.json``, ``transformer/``, ``text_encoder/``, ``tokenizer/``,
``vae/``, ``scheduler/``), so it goes through exactly the loading, encoding and sampling code that the real
weights go through, and ``diffusers.ZImagePipeline.from_pretrained`` loads it too. The tokenizer is built from an
in-memory byte-level vocabulary, so nothing is downloaded. The weights are random: images look like noise, but
every shape, dtype, padding path and convention matches the real model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from tokenizers import AddedToken
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

TEXT_HIDDEN_SIZE = 32  # the transformer's cap_feat_dim must equal it

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")

# The semantics of Qwen3's chat template for plain text messages: with add_generation_prompt the assistant turn is
# opened, and only enable_thinking=False appends an empty think block.
QWEN3_STYLE_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random Z-Image pipeline to ``out_dir`` and return it; the same seed gives the same bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = tiny_transformer()
        text_encoder = tiny_text_encoder()
        vae = tiny_vae()
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        transformer=transformer,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def tiny_transformer() -> ZImageTransformer2DModel:
    """The real transformer class at dim 64; draws from torch's global RNG."""
    model = small_transformer(dim=64, layers=2, heads=2, caption_dim=TEXT_HIDDEN_SIZE, axes_dims=(8, 12, 12))
    # diffusers zero-initialises the learned pad tokens; the real ones are not zero, and a zero token would hide
    # bugs in the padding path (wrong lengths, padding that changes results).
    with torch.no_grad():
        model.x_pad_token.copy_(torch.randn_like(model.x_pad_token))
        model.cap_pad_token.copy_(torch.randn_like(model.cap_pad_token))
    return model.eval()


def tiny_text_encoder() -> Qwen3Model:
    """The real text encoder class (Qwen3Model) at hidden size 32 with 3 layers."""
    return small_text_encoder(
        vocab_size=320, hidden=TEXT_HIDDEN_SIZE, intermediate=64, layers=3, heads=2, kv_heads=1, max_positions=1024,
        pad_id=_token_id("<|endoftext|>"), eos_id=_token_id("<|im_end|>"),
    )  # fmt: skip


# A random encoder squeezes every image into nearly the same latent (std ~0.13 after scale/shift), so images would
# be indistinguishable from one another next to unit noise. The real VAE's scaled latents have std ~1; scaling the
# mean half of the encoder's output layer by this factor gives the tiny one that property too.
TINY_VAE_LATENT_GAIN = 8.0


def tiny_vae() -> AutoencoderKL:
    """The real VAE class with 4 blocks of 16 channels (so 8x down-sampling) and the FLUX VAE's latent scaling."""
    vae = small_vae(channels=(16, 16, 16, 16), sample_size=64).eval()
    with torch.no_grad():
        mean = vae.encoder.conv_out
        mean.weight[: vae.config.latent_channels] *= TINY_VAE_LATENT_GAIN
        mean.bias[: vae.config.latent_channels] *= TINY_VAE_LATENT_GAIN
    return vae


def tiny_tokenizer() -> Qwen2Tokenizer:
    """A byte-level Qwen2Tokenizer: every byte is one token (no merges), plus Qwen3's chat special tokens."""
    return byte_level_tokenizer(_vocab(), [], max_length=1024)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for bytes 0..255, in byte order.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, a few Latin-1 gaps) are mapped in
    byte order to the code points from 256 upward.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def _vocab() -> dict[str, int]:
    """Byte symbols get ids 0..255 (the id is the byte value); the special and think tokens follow."""
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    for token in (*SPECIAL_TOKENS, *THINK_TOKENS):
        vocab[token] = len(vocab)
    return vocab


def _token_id(token: str) -> int:
    return _vocab()[token]


# --- the real classes, small: shared by the tiny random model and the toy world (toyworld/models.py) ---------------


def small_transformer(
    dim: int, layers: int, heads: int, caption_dim: int, axes_dims: tuple[int, int, int]
) -> ZImageTransformer2DModel:
    """The real transformer class: one refiner of each kind, as many key/value heads as heads."""
    return ZImageTransformer2DModel(
        dim=dim,
        n_layers=layers,
        n_refiner_layers=1,
        n_heads=heads,
        n_kv_heads=heads,
        cap_feat_dim=caption_dim,
        axes_dims=list(axes_dims),
        axes_lens=[1536, 512, 512],
    )


def small_text_encoder(
    vocab_size: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, max_positions: int,
    pad_id: int, eos_id: int,
) -> Qwen3Model:  # fmt: skip
    """The real text encoder class (Qwen3Model) with tied embeddings and 16-wide heads."""
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        bos_token_id=None,
        eos_token_id=eos_id,
    )
    return Qwen3Model(config).eval()


def small_vae(channels: tuple[int, int, int, int], sample_size: int) -> AutoencoderKL:
    """The real VAE class with 4 blocks (8x down-sampling), 16 latent channels and the FLUX VAE's latent scaling."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=sample_size,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def byte_level_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int) -> Qwen2Tokenizer:
    """A byte-level Qwen2Tokenizer over ``vocab`` and ``merges``, with Qwen3's chat special tokens and template."""
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=max_length,
        padding_side="right",
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]}
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tokenizer.chat_template = QWEN3_STYLE_CHAT_TEMPLATE
    return tokenizer
