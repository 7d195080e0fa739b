"""Device names: the one rule for what a job, a generation or a queue item may name, and what it resolves to.

``auto`` (the first CUDA GPU when there is one, else the CPU), ``cpu``, ``cuda`` (the first GPU) or ``cuda:N``; a job
may name a list of GPUs (one process each), each resolved by ``device_name``.
``device_name`` resolves a spec to ``cpu`` or ``cuda:N`` without importing torch (the web UI's queue keys its
device lock by it); ``resolve_device`` gives the ``torch.device`` and refuses a GPU this machine lacks.
"""

from __future__ import annotations

import re

from zimage_lora.errors import UserError

DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:\d+)$"
_DEVICE = re.compile(DEVICE_PATTERN)


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_name(spec: str, gpus: int | None = None) -> str:
    """``cpu`` or ``cuda:N`` for a device spec; ``gpus`` is the machine's CUDA device count (asked when None)."""
    text = str(spec).strip().lower()
    if not _DEVICE.match(text):
        raise UserError(f"device '{spec}' is not one of auto, cpu, cuda, cuda:N: fix the device setting.")
    if text == "cpu":
        return "cpu"
    gpus = cuda_count() if gpus is None else gpus
    if text == "auto":
        return "cuda:0" if gpus else "cpu"
    if not gpus:
        raise UserError(f"device '{spec}' asks for CUDA but no CUDA GPU is available here: set device to cpu or auto.")
    index = int(text.partition(":")[2] or 0)
    if index >= gpus:
        raise UserError(
            f"device '{spec}' does not exist: this machine has {gpus} CUDA GPU(s), use cuda:0 to cuda:{gpus - 1}."
        )
    return f"cuda:{index}"


def resolve_device(spec: str):
    """The ``torch.device`` of a device spec."""
    import torch

    return torch.device(device_name(spec))
