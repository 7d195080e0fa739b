"""Keeping weights off the GPU until they are needed: transformer block offloading and on-demand components.

``model.layer_offload = f`` (``BlockOffloader``): ``ceil(f * 30)`` of the transformer's main blocks
(``transformer.layers``), spread evenly, keep their frozen tensors (base weights, quantized codes and scales, norms;
never the LoRA or training-adapter tensors, which stay on the device for the optimizer) in CPU memory, pinned when
CUDA is used. Hooks on every block move them in and out:

- forward: a block's pre-hook makes it resident (waiting for its prefetch, or copying now) and starts copying the
  next offloaded block on a side CUDA stream, so the copy overlaps this block's compute (an event orders the copy
  before the use; ``record_stream`` keeps the allocator from reusing a copy's memory while compute still reads it);
  its post-hook evicts it: each tensor's ``.data`` becomes an empty placeholder, so the memory is really freed.
- backward needs the frozen weights again (input gradients through the base layers). A hook on the block's output
  gradient makes the block resident again before its backward starts and prefetches the previous offloaded block;
  a marker on the block's input (an identity autograd function) runs after the block's whole backward and evicts it.
  Without gradient checkpointing, autograd would keep the forward's weight tensors (views of them) alive until the
  backward; saved-tensor hooks store a reference (block, tensor, view geometry) instead and rebuild the view from the
  reloaded tensor when the backward unpacks it. A block that recomputes (gradient checkpointing; with
  ``train.checkpoint_fraction`` below 1 only some do) saves nothing in the forward, and its recompute goes through
  the pre-hook, which finds the block resident.
- with prefetch at most two offloaded blocks are resident at once (``max_resident`` records it; ``loads`` and
  ``evictions`` count per block). On the CPU the "device copy" is a fresh clone and the home copy stays, so CPU tests
  prove the mechanics (counts, residency, identical losses and gradients); the speed and memory gains need a GPU.

``model.low_vram`` (``OnDemand``): the text encoder and the VAE live on the CPU and visit the device only while they
encode or decode; ``visits`` records each visit, ``active`` says whether one is under way.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from zimage_lora.models.checkpointing import recomputes, spread_indices


def offloaded_indices(n_blocks: int, fraction: float) -> list[int]:
    """``ceil(fraction * n_blocks)`` block indices spread evenly, so resident blocks' compute hides the copies."""
    return spread_indices(n_blocks, fraction)


def in_backward() -> bool:
    """True inside the autograd engine (a backward pass, or the recompute of a checkpointed block).

    ``torch._C._current_graph_task_id`` is -1 outside a backward; it is private but has been stable since torch 1.13
    and the offload tests would catch a change."""
    return torch._C._current_graph_task_id() != -1


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor on ``device`` without blocking the host: pinned and copied asynchronously on CUDA."""
    if torch.device(device).type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device=device, dtype=dtype)


class _AfterBackward(torch.autograd.Function):
    """Identity on a block's input whose backward runs once the block's whole backward is done."""

    @staticmethod
    def forward(ctx, x, anchor, callback):
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.callback()
        return grad, None, None


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class _Saved:
    """What a saved-tensor hook keeps instead of a view of an offloaded tensor."""

    block: int
    slot: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class BlockOffloader:
    """Offloads ``model.layers[i]`` for ``i`` in ``offloaded_indices(len(model.layers), fraction)``; see the module
    docstring. Install after the LoRA (and training adapter) are injected; ``remove`` puts everything back."""

    def __init__(self, model: nn.Module, fraction: float, device: torch.device | str):
        self.model = model
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        blocks = list(model.layers)
        self.n_blocks = len(blocks)
        self.offloaded = offloaded_indices(self.n_blocks, fraction)
        self.loads = [0] * self.n_blocks
        self.evictions = [0] * self.n_blocks
        self.max_resident = 0
        self.saved_references = 0  # weight tensors autograd would have kept, saved as references instead
        self.resident: set[int] = set()
        self.in_flight: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.pending = [0] * self.n_blocks  # forwards with grad whose backward has not passed the block yet
        self.tensors: dict[int, list[torch.Tensor]] = {}
        self.homes: dict[int, list[torch.Tensor]] = {}
        self.storage: dict[int, tuple[int, int]] = {}  # data pointer of a resident copy -> (block, slot)
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.anchor = torch.zeros(0, device=self.device, requires_grad=True)
        self._hook_contexts: dict[int, object] = {}
        pin = self.cuda and torch.cuda.is_available()
        for index in self.offloaded:
            frozen, adapter = _split_tensors(blocks[index])
            for t in adapter:  # LoRA and adapter tensors stay on the device for good
                t.data = t.data.to(self.device)
            self.tensors[index] = frozen
            self.homes[index] = [_home_copy(t, pin) for t in frozen]
            for t in frozen:
                t.data = torch.empty(0, dtype=t.dtype, device=self.device)
        self.handles = [model.register_forward_pre_hook(self._model_pre)]
        for index, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(partial(self._pre, index), with_kwargs=True))
            self.handles.append(block.register_forward_hook(partial(self._post, index), always_call=True))

    # --- moving -----------------------------------------------------------------------------------------------
    def _start_copy(self, index: int) -> None:
        if index in self.resident or index in self.in_flight:
            return
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                copies = [home.to(self.device, non_blocking=True) for home in self.homes[index]]
                event = torch.cuda.Event()
                event.record(self.copy_stream)
        else:
            copies, event = [home.to(self.device, copy=True) for home in self.homes[index]], None
        self.in_flight[index] = (copies, event)
        self.max_resident = max(self.max_resident, len(self.resident) + len(self.in_flight))

    def load(self, index: int) -> None:
        """Make block ``index`` resident (waits for its prefetch, or copies now)."""
        if index in self.resident or index not in self.tensors:
            return
        self._start_copy(index)
        copies, event = self.in_flight.pop(index)
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for copy in copies:
                copy.record_stream(stream)
        for slot, (t, copy) in enumerate(zip(self.tensors[index], copies, strict=True)):
            t.data = copy
            if copy.numel():
                self.storage[copy.untyped_storage().data_ptr()] = (index, slot)
        self.resident.add(index)
        self.loads[index] += 1

    def evict(self, index: int) -> None:
        """Free block ``index``'s device copies (the home copies stay)."""
        if index not in self.resident:
            return
        for t in self.tensors[index]:
            if t.numel():
                self.storage.pop(t.untyped_storage().data_ptr(), None)
            t.data = torch.empty(0, dtype=t.dtype, device=self.device)
        self.resident.discard(index)
        self.evictions[index] += 1

    def _next(self, index: int) -> int | None:
        return next((j for j in self.offloaded if j > index), None)

    def _previous(self, index: int) -> int | None:
        return next((j for j in reversed(self.offloaded) if j < index), None)

    # --- hooks ------------------------------------------------------------------------------------------------
    def _model_pre(self, module, args):
        if self.offloaded and not in_backward():
            self._start_copy(self.offloaded[0])  # overlaps the embedders and refiners

    def _pre(self, index, module, args, kwargs):
        offloaded = index in self.tensors
        if offloaded:
            self.load(index)
        recompute = in_backward()  # a checkpointed block recomputed in the backward: it only needs to be resident
        if not recompute:
            following = self._next(index)
            if following is not None:
                self._start_copy(following)
        if not offloaded or not torch.is_grad_enabled():
            return None
        # the recompute gets the marker too (with nothing to do), so it saves the same tensors as the forward did
        done = _nothing if recompute else partial(self._backward_done, index)
        if args:
            args = (_AfterBackward.apply(args[0], self.anchor, done), *args[1:])
        else:
            kwargs = {**kwargs, "x": _AfterBackward.apply(kwargs["x"], self.anchor, done)}
        if recompute:
            return args, kwargs
        self.pending[index] += 1
        if not recomputes(self.model, module):
            hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            hooks.__enter__()
            self._hook_contexts[index] = hooks
        return args, kwargs

    def _post(self, index, module, args, output):
        hooks = self._hook_contexts.pop(index, None)
        if hooks is not None:
            hooks.__exit__(None, None, None)
        if in_backward():
            return None
        self.evict(index)
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(partial(self._before_backward, index))
        return None

    def _before_backward(self, index, grad):
        self.load(index)
        previous = self._previous(index)
        if previous is not None:
            self._start_copy(previous)
        return None

    def _backward_done(self, index):
        self.pending[index] = max(0, self.pending[index] - 1)
        if self.pending[index] == 0:
            self.evict(index)

    def _pack(self, tensor: torch.Tensor):
        ref = self.storage.get(tensor.untyped_storage().data_ptr()) if tensor.device == self.device else None
        if ref is None or tensor.dtype != self.tensors[ref[0]][ref[1]].dtype:
            return tensor
        self.saved_references += 1
        return _Saved(ref[0], ref[1], tensor.size(), tensor.stride(), tensor.storage_offset())

    def _unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        self.load(saved.block)
        base = self.tensors[saved.block][saved.slot]
        return base.detach().as_strided(saved.size, saved.stride, saved.offset)

    # --- bookkeeping ------------------------------------------------------------------------------------------
    def on_device(self, index: int) -> bool:
        """Whether offloaded block ``index`` holds its tensors on the device now (not empty placeholders)."""
        return all(t.numel() == h.numel() for t, h in zip(self.tensors[index], self.homes[index], strict=True))

    def remove(self) -> None:
        """Take the hooks off and put every offloaded tensor back on the device."""
        for handle in self.handles:
            handle.remove()
        for index in self.tensors:
            self.load(index)
        self.tensors.clear()


def _split_tensors(block: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(frozen base tensors, adapter tensors) of a block; everything a peft layer holds beside ``base_layer`` is
    an adapter tensor."""
    adapter_modules: set[int] = set()
    for module in block.modules():
        if isinstance(module, BaseTunerLayer):
            adapter_modules.add(id(module))
            for name, child in module.named_children():
                if name != "base_layer":
                    adapter_modules.update(id(m) for m in child.modules())
    frozen, adapter = [], []
    for module_name, module in block.named_modules():
        own = [*module._parameters.items(), *module._buffers.items()]
        for name, t in own:
            if t is None:
                continue
            if id(module) in adapter_modules:
                adapter.append(t)
            elif t.requires_grad:
                raise RuntimeError(f"layer offloading: {module_name}.{name} is trainable but not an adapter tensor")
            else:
                frozen.append(t)
    return frozen, adapter


def _home_copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    """The CPU copy a block streams from: the tensor's own storage when it is on the CPU already (the module then
    points elsewhere), pinned for asynchronous copies when CUDA is used."""
    home = tensor.detach().cpu()
    return home.pin_memory() if pin else home


class OnDemand:
    """A component that lives on ``home`` and visits ``device`` only inside ``with visit():`` (nested visits share
    one move). With ``home == device`` it simply stays on the device."""

    def __init__(self, module: nn.Module, device: torch.device | str, home: torch.device | str):
        self.module, self.device, self.home = module, torch.device(device), torch.device(home)
        self.visits = 0
        self.depth = 0
        module.to(self.home)

    @property
    def active(self) -> bool:
        return self.depth > 0

    @contextmanager
    def visit(self):
        if self.depth == 0:
            self.module.to(self.device)
            self.visits += 1
        self.depth += 1
        try:
            yield self.module
        finally:
            self.depth -= 1
            if self.depth == 0:
                self.module.to(self.home)
