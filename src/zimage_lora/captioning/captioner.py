"""Captioning models through transformers' own classes: finding ``--model``, loading it, and asking it about pictures.

``--model`` is a short name of the registry (``qwen3-vl-2b``), a hub id (``org/name[@revision]``, a registry
entry's pinned revision when none is given) or a local folder saved with ``save_pretrained``; the folder's
``config.json`` says the family. Hub downloads go through models/hub.py, so an offline machine gets one sentence
that says how to bring the files over. The model is ``AutoModelForImageTextToText`` in either family:

- ``qwen3_vl`` (``Qwen3VLForConditionalGeneration``) follows a plain-text instruction. Its inputs are made from
  the repo's own tokenizer, image processor and chat template the way transformers' ``Qwen3VLProcessor`` makes
  them (the image placeholder repeated once per merged patch, ``mm_token_type_ids`` marking those tokens): that
  class cannot be built without torchvision (for its video half), which zimage-lora does not depend on. A picture
  is scaled to at most ``CAPTION_MAX_PIXELS`` (1 megapixel, about 1000 picture tokens) rather than the model's 16.
- ``florence2`` (``Florence2ForConditionalGeneration``, through ``AutoProcessor``) answers fixed task tokens
  (``<MORE_DETAILED_CAPTION>``, ...): no tags, no custom instruction.

Decoding is greedy whatever the folder's generation_config suggests (Qwen3-VL's asks for sampling, Florence-2's for
beam search), so a rerun gives the same captions. ``--quantize nf4|int8`` replaces the language model's Linear
layers with models/quant.py's layers, one at a time on the target device, so the bf16 model never has to fit the
card whole. ``close`` (or leaving the ``with`` block) releases the model.
"""

from __future__ import annotations

import copy
import gc
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from zimage_lora.captioning import prompts
from zimage_lora.captioning.registry import MODELS, QWEN3_VL_QUANTIZED, known
from zimage_lora.errors import UserError

CAPTION_MAX_PIXELS = 1024 * 1024
MAX_NEW_TOKENS = 300  # about 220 words: far more than a caption needs, a bound for a model that rambles
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]
QUANTIZE_MODES = ("nf4", "int8")


@dataclass(frozen=True)
class Family:
    name: str  # config.json's model_type
    prompt_style: str  # "instruction" or "task"
    quantized: str  # the Linear layers --quantize replaces (a regex over module names)


FAMILIES = {
    "qwen3_vl": Family("qwen3_vl", "instruction", QWEN3_VL_QUANTIZED),
    "florence2": Family("florence2", "task", r"^model\.language_model\.(?:encoder|decoder)\.layers\.\d+\."),
}

# Florence-2's caption tasks; the mode picks one (it knows no tags and takes no instruction).
FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
FLORENCE_MODE_TASKS = {"character": "<MORE_DETAILED_CAPTION>", "object": "<MORE_DETAILED_CAPTION>",
                       "style": "<DETAILED_CAPTION>"}  # fmt: skip


def max_new_tokens(max_words: int | None) -> int:
    """Room for the answer: about two tokens a word (a margin for punctuation and long words)."""
    return MAX_NEW_TOKENS if not max_words else min(MAX_NEW_TOKENS, 2 * max_words + 16)


# --- finding and loading ------------------------------------------------------------------------------------------
def resolve_captioner(ref: str) -> Path:
    """The folder of ``--model``: a local folder, or a registry name or hub id downloaded into the hub cache."""
    from zimage_lora.models.hub import resolve_model_dir
    from zimage_lora.models.refs import is_hub_id, looks_local

    ref = ref.strip()
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"--model folder {path} has no config.json: point --model at a model folder saved with "
                "save_pretrained (config.json, the weights, the tokenizer and processor files)."
            )
        return path
    if path.exists():
        raise UserError(f"--model {path} is a file, not a folder: point --model at the model's folder.")
    entry = known(ref)
    if entry is not None:
        ref = entry.ref
    if looks_local(ref, max_slashes=1):
        raise UserError(f"--model folder {path} does not exist: fix the path, or give a hub id like org/name.")
    if not is_hub_id(ref):
        names = ", ".join(MODELS)
        raise UserError(
            f"--model '{ref}' is not a folder, a hub id or a known name: give a folder, org/name[@revision] or one "
            f"of {names}."
        )
    return resolve_model_dir(ref, allow_patterns=HUB_FILES, key="--model")


def load_captioner(ref: str, device: str = "auto", quantize: str | None = None) -> Captioner:
    """The captioner of ``ref`` on ``device`` (bf16 on a GPU, fp32 on the CPU), quantized when asked."""
    from transformers import AutoModelForImageTextToText

    from zimage_lora.models.devices import resolve_device
    from zimage_lora.models.quant import quantize_model

    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise UserError(f"--quantize: {quantize!r} is not one of {', '.join(QUANTIZE_MODES)}")
    folder = resolve_captioner(ref)
    family = _family(folder, ref)
    target = resolve_device(device)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            folder, dtype=dtype, device_map=None if quantize else {"": str(target)}
        )
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"could not load the captioning model from {folder} ({reason}): re-download it.") from err
    model.requires_grad_(False).eval()
    if quantize:
        quantize_model(model, quantize, family.quantized, work_device=target, home=lambda _: target, key="--quantize")
        model.to(target)
    if family.name == "qwen3_vl":
        return Qwen3VLCaptioner.from_folder(model, folder)
    return Florence2Captioner.from_folder(model, folder)


def _family(folder: Path, ref: str) -> Family:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"--model {ref}: cannot read {folder / 'config.json'} ({err}); re-download it.") from None
    model_type = config.get("model_type")
    if model_type == "florence2" and "auto_map" in config:
        raise UserError(
            f"--model {ref} is Florence-2 in its remote-code format, which transformers' own class cannot read: use "
            "florence-community/Florence-2-large (or -base), the same weights in transformers' format."
        )
    if model_type not in FAMILIES:
        raise UserError(
            f"--model {ref} is a {model_type or 'model without a model_type'}; the captioner reads "
            f"{' and '.join(FAMILIES)} models (e.g. {MODELS['qwen3-vl-8b'].hub_id})."
        )
    return FAMILIES[model_type]


# Settings that only sampling or beam search read; unset in a greedy config.
_NOT_GREEDY = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
               "early_stopping", "length_penalty", "num_beam_groups", "diversity_penalty")  # fmt: skip


def greedy(config, max_new_tokens: int = MAX_NEW_TOKENS):
    """A copy of a model's generation config that decodes greedily with one beam, up to ``max_new_tokens``.

    The captioner makes it the model's own ``generation_config``: ``generate`` fills what a call leaves unset from
    there, so the sampling settings of the folder's generation_config.json never come back.
    """
    config = copy.deepcopy(config)
    for name in _NOT_GREEDY:
        if hasattr(config, name):
            setattr(config, name, None)
    config.do_sample = False
    config.num_beams = 1
    config.num_return_sequences = 1
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    return config


# --- the captioners -------------------------------------------------------------------------------------------------
class Captioner:
    """A loaded captioning model. ``request`` says what it is asked for a mode; ``answer`` gives the raw answer for
    each picture of a batch (``clean_caption`` makes captions of them)."""

    family: Family

    def __init__(self, model: torch.nn.Module):
        model.generation_config = greedy(model.generation_config)
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def request(self, mode: str, prompt: str | None = None, max_words: int | None = None) -> str:
        raise NotImplementedError

    def prepare(self, images: list[Image.Image], request: str) -> dict[str, torch.Tensor]:
        """The model's inputs for a batch of upright RGB pictures, on its device."""
        raise NotImplementedError

    def decode(self, output: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[str]:
        raise NotImplementedError

    @torch.no_grad()
    def answer(self, images: list[Image.Image], request: str, max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
        inputs = self.prepare(images, request)
        output = self.model.generate(**inputs, generation_config=greedy(self.model.generation_config, max_new_tokens))
        return [text.strip() for text in self.decode(output, inputs)]

    def close(self) -> None:
        """Release the model (and the GPU memory it held)."""
        cuda = self.model is not None and self.device.type == "cuda"
        self.model = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    def __enter__(self) -> Captioner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


IMAGE_PAD = "<|image_pad|>"


class Qwen3VLCaptioner(Captioner):
    family = FAMILIES["qwen3_vl"]

    def __init__(self, model, tokenizer, image_processor, chat_template: str, max_pixels: int = CAPTION_MAX_PIXELS):
        super().__init__(model)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.max_pixels = max_pixels
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        if self.image_token_id != model.config.image_token_id:
            raise UserError(
                f"the captioning model's tokenizer gives {IMAGE_PAD} id {self.image_token_id} but its config.json says "
                f"image_token_id {model.config.image_token_id}: the folder mixes two models; re-download it."
            )

    @classmethod
    def from_folder(cls, model, folder: Path) -> Qwen3VLCaptioner:
        from transformers import AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        template = tokenizer.chat_template or _chat_template_file(folder)
        if not template:
            raise UserError(f"the captioning model in {folder} has no chat template: re-download the folder whole.")
        return cls(model, tokenizer, AutoImageProcessor.from_pretrained(folder), template)

    def request(self, mode: str, prompt: str | None = None, max_words: int | None = None) -> str:
        return prompts.instruction(mode, prompt, max_words)

    def prepare(self, images: list[Image.Image], request: str) -> dict[str, torch.Tensor]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request}]}]
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )
        if text.count(IMAGE_PAD) != 1:
            raise UserError(f"the captioning model's chat template does not write one {IMAGE_PAD} for a picture.")
        size = self.image_processor.size
        limits = {"shortest_edge": size.shortest_edge, "longest_edge": min(size.longest_edge, self.max_pixels)}
        pixels = self.image_processor(images=images, size=limits, return_tensors="pt")
        merge = self.image_processor.merge_size**2
        texts = [text.replace(IMAGE_PAD, IMAGE_PAD * (int(grid.prod()) // merge)) for grid in pixels["image_grid_thw"]]
        tokens = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        device = self.device
        return {
            "input_ids": tokens["input_ids"].to(device),
            "attention_mask": tokens["attention_mask"].to(device),
            # which tokens are picture tokens (1) or text (0): the model's multimodal positions need it
            "mm_token_type_ids": (tokens["input_ids"] == self.image_token_id).long().to(device),
            "pixel_values": pixels["pixel_values"].to(device, self.dtype),
            "image_grid_thw": pixels["image_grid_thw"].to(device),
        }

    def decode(self, output: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[str]:
        return self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _chat_template_file(folder: Path) -> str | None:
    """The chat template a repo keeps beside the tokenizer (chat_template.jinja, or the older chat_template.json)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        try:
            return json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        except ValueError:
            return None
    return None


class Florence2Captioner(Captioner):
    family = FAMILIES["florence2"]

    def __init__(self, model, processor):
        super().__init__(model)
        self.processor = processor

    @classmethod
    def from_folder(cls, model, folder: Path) -> Florence2Captioner:
        from transformers import AutoProcessor

        return cls(model, AutoProcessor.from_pretrained(folder))

    def request(self, mode: str, prompt: str | None = None, max_words: int | None = None) -> str:
        if prompt:
            if prompt.strip() not in FLORENCE_TASKS:
                raise UserError(
                    f"--prompt: Florence-2 takes no instruction, only one of its tasks {', '.join(FLORENCE_TASKS)}; "
                    "use a Qwen3-VL model for a prompt of your own."
                )
            return prompt.strip()
        if mode not in FLORENCE_MODE_TASKS:
            raise UserError(f"--mode {mode}: Florence-2 writes sentences, not tags; use a Qwen3-VL model for tags.")
        return FLORENCE_MODE_TASKS[mode]

    def prepare(self, images: list[Image.Image], request: str) -> dict[str, torch.Tensor]:
        inputs = self.processor(text=[request] * len(images), images=images, padding=True, return_tensors="pt")
        return {
            key: value.to(self.device, self.dtype) if key == "pixel_values" else value.to(self.device)
            for key, value in inputs.items()
        }

    def decode(self, output: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[str]:
        texts = self.processor.batch_decode(output, skip_special_tokens=True)
        return [re.sub(r"<[^>]*>", "", text) for text in texts]  # location tokens, should a task write any
