"""Captions for a dataset from a vision-language model (``zimage-lora caption``; docs/captioning.md).

- ``registry``: the captioning models offered (hub id, licence, family, prompt style) and the default's size and
  memory, computed from its published configuration;
- ``prompts``: the modes' instructions and ``clean_caption``, which makes a caption of a model's answer (pure);
- ``captioner``: ``--model`` to a folder, loading it through transformers' own classes, greedy answers per batch;
- ``run``: the folder's plan, the batches, the files written atomically, the report and the proposals' JSON.
"""

from zimage_lora.captioning.prompts import MODES, TRIGGER_STYLES
from zimage_lora.captioning.registry import DEFAULT_MODEL, MODELS

__all__ = ["DEFAULT_MODEL", "MODELS", "MODES", "TRIGGER_STYLES"]
