"""Tiny random captioning models of the real classes (Qwen3-VL and Florence-2), for tests and benchmarks.

Each is written the way its hub repo is laid out (``config.json``, ``generation_config.json``, ``model.safetensors``,
the tokenizer files, ``preprocessor_config.json``, the chat template), so ``zimage_lora.captioning`` loads it by
exactly the path that reads ``Qwen/Qwen3-VL-8B-Instruct`` or ``florence-community/Florence-2-large``. The
tokenizers are byte-level over an in-memory vocabulary (every byte one token, no merges) plus the special tokens
that each family's chat format and image placeholders need: nothing is downloaded.

Random weights answer anything, the end-of-sequence token among it (an empty caption). So each generation config
suppresses every token except lowercase letters, space, comma and period: a caption is always a line of made-up
words as long as ``max_new_tokens`` allows, which depends on the picture. The Qwen3-VL config also asks for
sampling, as the real one does (temperature 0.7, top-p 0.8, top-k 20), so a test shows the captioner decodes
greedily whatever the model folder suggests.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    BartConfig,
    BartTokenizer,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    Florence2VisionConfig,
    GenerationConfig,
    Qwen2Tokenizer,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from zimage_lora.models.tiny import _byte_symbols

VOCAB_SIZE = 320  # the embedding rows; the tokenizers use fewer ids, the rest are never produced
SPOKEN = string.ascii_lowercase + " ,."  # what the tiny models may say
# Seeds whose random models say something: Qwen3-VL's answers in several words, which differ from picture to picture;
# Florence-2's in letters (with seed 0 the one says a single word, the other only commas).
QWEN_SEED = 6
FLORENCE_SEED = 1

# --- Qwen3-VL -------------------------------------------------------------------------------------------------------
QWEN_TEXT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# Qwen3-VL's chat format for messages of text and image parts: an image part is a vision block holding one image
# placeholder (the captioner repeats the placeholder once per merged patch), text parts are written as they are.
QWEN3_VL_STYLE_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen3-VL's image processor settings (its preprocessor_config.json), with a tiny pixel budget: a picture becomes at
# most 4 merged patches of 32x32 pixels.
TINY_QWEN_PIXELS = {"shortest_edge": 32 * 32, "longest_edge": 64 * 64}


def qwen3_vl_vocab() -> dict[str, int]:
    """Byte symbols get ids 0..255 (the id is the byte value); the chat and vision tokens follow."""
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    for token in (*QWEN_TEXT_TOKENS, *QWEN_VISION_TOKENS):
        vocab[token] = len(vocab)
    return vocab


def qwen3_vl_tokenizer() -> Qwen2Tokenizer:
    """A byte-level ``Qwen2Tokenizer`` (the class Qwen3-VL's repos name) with Qwen's chat and vision tokens."""
    tokenizer = Qwen2Tokenizer(
        vocab=qwen3_vl_vocab(),
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=8192,
    )
    tokens = [AddedToken(t, special=True, normalized=False) for t in (*QWEN_TEXT_TOKENS, *QWEN_VISION_TOKENS)]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    tokenizer.chat_template = QWEN3_VL_STYLE_CHAT_TEMPLATE
    return tokenizer


def qwen3_vl_image_processor(pixels: dict[str, int] | None = None) -> Qwen2VLImageProcessorPil:
    """Qwen3-VL's image processor: 16-pixel patches merged 2x2, mean and std 0.5 (its preprocessor_config.json)."""
    return Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        size=dict(pixels or TINY_QWEN_PIXELS),
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def tiny_qwen3_vl_config() -> Qwen3VLConfig:
    """The real class at hidden size 32: 2 text layers, a 2-block vision tower with one deepstack layer."""
    vocab = qwen3_vl_vocab()
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=8192,
            # the real [24, 20, 20] halves of a 128-wide head, for a 16-wide one
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
            pad_token_id=vocab["<|endoftext|>"],
            eos_token_id=vocab["<|im_end|>"],
            bos_token_id=vocab["<|endoftext|>"],
        ),  # fmt: skip
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=32,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def qwen3_vl_generation_config(vocab: dict[str, int], vocab_size: int = VOCAB_SIZE) -> GenerationConfig:
    """Qwen3-VL-Instruct's sampling settings, the tiny model's speech limited to ``SPOKEN``."""
    return GenerationConfig(
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        bos_token_id=vocab["<|endoftext|>"],
        eos_token_id=vocab["<|im_end|>"],
        pad_token_id=vocab["<|endoftext|>"],
        suppress_tokens=_unspoken(vocab, vocab_size),
    )


def build_tiny_qwen3_vl(out_dir: Path, seed: int = QWEN_SEED) -> Path:
    """Write a tiny random Qwen3-VL (``Qwen3VLForConditionalGeneration``) with its tokenizer, image processor and
    chat template to ``out_dir`` and return it; the same seed gives the same weights."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(tiny_qwen3_vl_config()).eval()
    model.generation_config = qwen3_vl_generation_config(qwen3_vl_vocab())
    model.save_pretrained(out_dir)
    qwen3_vl_tokenizer().save_pretrained(out_dir)  # with chat_template.jinja
    qwen3_vl_image_processor().save_pretrained(out_dir)
    return out_dir


# --- Florence-2 -----------------------------------------------------------------------------------------------------
def florence2_vocab() -> dict[str, int]:
    """BART's special tokens first (as in its vocabulary), then the byte symbols, the mask and the image token."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for symbol in _byte_symbols():
        vocab[symbol] = len(vocab)
    vocab["<mask>"] = len(vocab)
    vocab["<image>"] = len(vocab)
    return vocab


def build_tiny_florence2(out_dir: Path, seed: int = FLORENCE_SEED) -> Path:
    """Write a tiny random Florence-2 (``Florence2ForConditionalGeneration``, transformers' own class) with its
    processor (BART tokenizer, CLIP image processor at 64x64) to ``out_dir`` and return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = florence2_vocab()
    tokenizer = BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    # 64 px through the vision tower's 32x down-sampling: 2x2 patch tokens plus one pooled token
    images = CLIPImageProcessorPil(
        size={"height": 64, "width": 64},
        do_center_crop=False,
        image_seq_length=5,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    vision = Florence2VisionConfig(
        depths=[1, 1, 1, 1],
        embed_dim=[16, 16, 32, 32],
        num_heads=[1, 1, 2, 2],
        num_groups=[1, 1, 2, 2],
        window_size=2,
        projection_dim=32,
        max_position_embeddings=8,
        max_temporal_embeddings=4,
        drop_path_rate=0.0,
    )
    text = BartConfig(
        vocab_size=VOCAB_SIZE,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=1024,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    config = Florence2Config(vision_config=vision, text_config=text, image_token_id=vocab["<image>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Florence2ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        num_beams=3,  # Florence-2's own setting; the captioner decodes greedily
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        decoder_start_token_id=2,
        suppress_tokens=_unspoken(vocab, VOCAB_SIZE),
    )
    model.save_pretrained(out_dir)
    Florence2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


def _unspoken(vocab: dict[str, int], vocab_size: int) -> list[int]:
    """Every token id of the model except the byte symbols of ``SPOKEN``."""
    symbols = _byte_symbols()
    spoken = {vocab[symbols[ord(c)]] for c in SPOKEN}
    return [i for i in range(vocab_size) if i not in spoken]
