"""``train.compile``: regional ``torch.compile`` of the transformer's repeated blocks, and a word on attention.

Each ``ZImageTransformerBlock`` (the 30 main blocks and the 2 + 2 refiners) is compiled on its own, after the LoRA
and the training adapter are injected, so the compiled graphs include their branches. The blocks' weights are
graph inputs, so the 30 identical main blocks share one compiled graph: compile time is that of a block or two, not
of the whole model, and the embedders, padding and list handling around the blocks stay eager.

Attention needs no switch: diffusers' Z-Image attention processor calls ``dispatch_attention_fn`` with its default
``native`` backend, which is ``torch.nn.functional.scaled_dot_product_attention``. On CUDA, PyTorch then picks the
flash, cuDNN or memory-efficient kernel itself (nothing here forces the math backend), and the attention mask is
``None`` whenever the items of a batch have the same length (always at batch size 1), which keeps flash eligible.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch
from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock
from torch import nn

from zimage_lora.errors import UserError


def check_compiler(device: torch.device) -> None:
    """torch.compile's inductor builds C++ on the CPU and Triton kernels (with a C launcher) on CUDA."""
    if torch.device(device).type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            raise UserError(
                "train.compile: torch.compile on CUDA needs Triton, which is not installed; install the CUDA build "
                "of torch (it brings triton) or set train.compile: false"
            ) from None
        if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
            raise UserError(
                "train.compile: torch.compile needs a C compiler (cc/gcc), which this machine lacks; install one "
                "(e.g. apt install gcc) or set train.compile: false"
            )
        return
    compiler = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")  # what inductor runs
    if not shutil.which(compiler):
        raise UserError(
            f"train.compile: torch.compile on the CPU needs a C++ compiler ({compiler}), which this machine lacks; "
            "install one (e.g. apt install g++) or set train.compile: false"
        )


def compile_blocks(model: nn.Module, device: torch.device) -> int:
    """Compile every repeated block of ``model`` in place; returns how many."""
    check_compiler(device)
    blocks = [m for m in model.modules() if isinstance(m, ZImageTransformerBlock)]
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)
