"""Weight-only quantization of the frozen Linear layers (``quantization.transformer`` / ``.text_encoder``).

Three formats, all our own code on plain torch tensors, identical on CPU and CUDA:

- ``float8``: each weight as ``torch.float8_e4m3fn`` times a per-output-channel fp32 scale (row max / 448);
  1 byte per weight (what torchao's float8 weight-only does, without the dependency).
- ``int8``: symmetric per-output-channel int8 (row max / 127); 1 byte per weight.
- ``nf4``: 4-bit NormalFloat (QLoRA, Dettmers et al. 2023): the flattened weight in blocks of 64, each scaled by its
  absolute maximum to [-1, 1] and rounded to the nearest of 16 levels placed at quantiles of a normal distribution
  (``nf4_levels``); two codes per byte plus one fp32 scale per block = 4.5 bits per weight. The same math as
  bitsandbytes' nf4 (the test compares the levels and the dequantized weights with bitsandbytes). bitsandbytes itself
  is not used: its CPU path warns about a missing kernel package and falls back, it keeps the quantization state
  outside the module's tensors (layer offloading moves module tensors), and peft routes its layers to a separate LoRA
  class; our layer is one code path everywhere.

``none`` keeps the loaded weights (bf16 on a GPU).

What is quantized: every Linear inside the repeated blocks: the transformer's 30 main blocks and its 2 + 2 refiner
blocks (attention q/k/v/out, feed-forward w1/w2/w3, adaLN modulation: 99.8% of its weights), the text encoder's 36
decoder layers. What stays in the load dtype: the transformer's patch and caption embedders, its timestep embedder
and final layer (0.2% of the weights; diffusers marks the embedders precision-sensitive, and the final layer writes
the predicted velocity directly), all norms and pad tokens, and the text encoder's token embedding (an Embedding,
looked up, not multiplied).

A ``QuantLinear`` is still an ``nn.Linear`` to peft, so the user's LoRA and the training adapter wrap it as usual.
Its ``weight`` is a read-only property that dequantizes (in the dtype the layer had), so peft sees the dtype the
unquantized model has and creates adapter weights exactly as it does there; the LoRA weights are then kept in fp32.
The forward dequantizes into a temporary, and its backward dequantizes again rather than keeping the full-precision
weight alive between forward and backward. The training adapter stays its own fp32 branch on top: never merged, so
switching it off gives exactly the quantized Turbo.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from zimage_lora.errors import UserError

MODES = ("none", "float8", "int8", "nf4")
QUANTIZED_MODES = ("float8", "int8", "nf4")

# Linear layers to quantize, by component: everything inside the repeated blocks.
TRANSFORMER_BLOCKS = r"^(layers|noise_refiner|context_refiner)\.\d+\."
TEXT_ENCODER_BLOCKS = r"^layers\.\d+\."

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = 448.0  # largest finite float8_e4m3fn
NF4_BLOCK = 64


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1], from quantiles of the standard normal (float32, ascending).

    Seven negative and eight positive levels at evenly spaced probabilities between 0.5 and ``p`` (the negative
    side one step coarser, so that 0 is a level exactly), each side divided by its largest quantile. ``p`` is the
    mean of 1 - 1/(2*15) and 1 - 1/(2*16), the half-steps of 15- and 16-level grids, so the end levels are finite.
    """
    p = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    positive = torch.special.ndtri(torch.linspace(0.5, p, 9, dtype=torch.float64)[1:])
    negative = -torch.special.ndtri(torch.linspace(0.5, p, 8, dtype=torch.float64)[1:])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive])
    return (levels / positive.max()).sort().values.float()


_NF4_CACHE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _nf4_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (device, dtype)
    if key not in _NF4_CACHE:
        _NF4_CACHE[key] = nf4_levels().to(device, dtype)
    return _NF4_CACHE[key]


# --- the formats -----------------------------------------------------------------------------------------------
def quantize_weight(weight: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of a 2-D weight; the arithmetic runs in fp32 on the weight's device."""
    w = weight.detach().float()
    if mode in ("float8", "int8"):
        limit = FLOAT8_MAX if mode == "float8" else 127.0
        scale = (w.abs().amax(dim=1, keepdim=True) / limit).clamp(min=torch.finfo(torch.float32).tiny)
        scaled = (w / scale).clamp(-limit, limit)
        codes = scaled.to(FLOAT8).view(torch.uint8) if mode == "float8" else scaled.round().to(torch.int8)
        return codes, scale
    if mode == "nf4":
        flat = w.flatten()
        blocks = math.ceil(flat.numel() / NF4_BLOCK)
        flat = F.pad(flat, (0, blocks * NF4_BLOCK - flat.numel())).view(blocks, NF4_BLOCK)
        absmax = flat.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
        levels = nf4_levels().to(w.device)
        midpoints = (levels[1:] + levels[:-1]) / 2
        index = torch.bucketize(flat / absmax[:, None], midpoints).to(torch.uint8).flatten()
        packed = (index[0::2] << 4) | index[1::2]
        return packed, absmax
    raise ValueError(f"unknown quantization {mode!r}")


def dequantize_weight(
    mode: str, codes: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """The weight in ``dtype`` from its stored codes and scales."""
    if mode == "float8":
        return codes.view(FLOAT8).to(dtype) * scale.to(dtype)
    if mode == "int8":
        return codes.to(dtype) * scale.to(dtype)
    if mode == "nf4":
        index = torch.stack([codes >> 4, codes & 15], dim=1).flatten().long()
        blocks = _nf4_table(codes.device, dtype)[index].view(-1, NF4_BLOCK) * scale.to(dtype)[:, None]
        return blocks.flatten()[: shape[0] * shape[1]].view(shape)
    raise ValueError(f"unknown quantization {mode!r}")


class _QuantLinearFunction(torch.autograd.Function):
    """``x @ W.T + b`` with W dequantized in the forward and again in the backward (only codes are kept)."""

    @staticmethod
    def forward(ctx, x, codes, scale, bias, mode, shape, dtype):
        weight = dequantize_weight(mode, codes, scale, shape, dtype)
        ctx.save_for_backward(codes, scale)
        ctx.mode, ctx.shape, ctx.dtype, ctx.input_dtype = mode, shape, dtype, x.dtype
        return F.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        codes, scale = ctx.saved_tensors
        weight = dequantize_weight(ctx.mode, codes, scale, ctx.shape, ctx.dtype)
        return (grad.to(ctx.dtype) @ weight).to(ctx.input_dtype), None, None, None, None, None, None


class QuantLinear(nn.Linear):
    """A frozen Linear with a weight-only quantized weight; computes like the layer it replaced.

    The codes and scales are buffers (integer codes: ``module.to(dtype)`` leaves them alone, layer offloading moves
    them like any tensor). The compute dtype is the replaced layer's dtype, or the autocast dtype when autocast is on.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: str, device: torch.device | str):
        if mode not in QUANTIZED_MODES:
            raise ValueError(f"unknown quantization {mode!r}")
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.mode = mode
        self.compute_dtype = weight.dtype
        codes, scale = quantize_weight(weight, mode)
        self.register_buffer("codes", codes.to(device))
        self.register_buffer("scale", scale.to(device))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(device), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # read-only: for peft's bookkeeping, DoRA norms and inspection
        return dequantize_weight(self.mode, self.codes, self.scale, self.shape, self.compute_dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        with torch.autocast(kind, enabled=False):
            return _QuantLinearFunction.apply(x, self.codes, self.scale, self.bias, self.mode, self.shape, dtype)

    def stored_bytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


# --- whole models ----------------------------------------------------------------------------------------------
def quantize_model(
    model: nn.Module,
    mode: str,
    pattern: str,
    *,
    work_device: torch.device | str = "cpu",
    home: Callable[[str], torch.device] | None = None,
    key: str = "quantization",
) -> int:
    """Replace each Linear whose path matches ``pattern`` (``re.match``) by a ``QuantLinear``; returns how many.

    Layer by layer: the weight goes to ``work_device`` for the arithmetic, the codes go to ``home(path)`` (default:
    where the layer is), and the full-precision weight is released. So a 12 GB bf16 transformer loaded on the CPU
    never needs to be on the GPU whole: the GPU holds the quantized layers plus one layer in flight.
    """
    if mode == "none":
        return 0
    if mode not in QUANTIZED_MODES:
        raise UserError(f"{key}: unknown mode {mode!r}; use one of {', '.join(MODES)}")
    regex = re.compile(pattern)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and regex.match(n)]
    work_device = torch.device(work_device)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        target = linear.weight.device if home is None else torch.device(home(name))
        with torch.no_grad():
            layer = QuantLinear(linear.weight.to(work_device), linear.bias, mode, device=target)
        layer.train(linear.training)
        setattr(parent, child, layer)
    return len(names)


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes stored by the quantized layers' codes and scales, bytes the same weights take in bf16)."""
    stored = bf16 = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            stored += module.stored_bytes()
            bf16 += 2 * module.in_features * module.out_features
    return stored, bf16
