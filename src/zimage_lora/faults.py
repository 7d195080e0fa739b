"""Fault injection for tests (developers only): make the trainer fail at a named point, deterministically.

``ZIMAGE_LORA_FAULT`` holds comma-separated ``ACTION@POINT[:N]`` entries:

- actions: ``kill`` (SIGKILL itself: nothing runs after), ``sigint`` (one Ctrl-C), ``sigint2`` (two Ctrl-C),
  ``oom`` (raise an out-of-memory error), ``diskfull`` (raise ENOSPC), ``nan`` (make the loss non-finite);
- points: ``step`` (after optimizer step N), ``loss`` (the loss of step N), ``save.lora.tmp`` / ``save.lora.renamed`` /
  ``save.state.tmp`` / ``save.state.renamed`` / ``save.rotated`` (the phases of the save at step N),
  ``cache.entry`` (the Nth latent cache entry written).

Without ``:N`` a point fires every time. Example: ``ZIMAGE_LORA_FAULT=kill@save.state.tmp:4``.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "ZIMAGE_LORA_FAULT"


def _matches(point: str, index: int | None):
    spec = os.environ.get(ENV, "")
    for part in filter(None, (p.strip() for p in spec.split(","))):
        action, _, where = part.partition("@")
        name, _, n = where.partition(":")
        if name == point and (not n or (index is not None and int(n) == index)):
            yield action


def fire(point: str, index: int | None = None) -> bool:
    """Carry out the faults set for ``point``; True if a ``nan`` fault is set there (the caller poisons the loss)."""
    poison = False
    for action in _matches(point, index):
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action in ("sigint", "sigint2"):
            os.kill(os.getpid(), signal.SIGINT)
            if action == "sigint2":
                os.kill(os.getpid(), signal.SIGINT)
        elif action == "oom":
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected at {point})")
        elif action == "diskfull":
            raise OSError(errno.ENOSPC, f"No space left on device (injected at {point})")
        elif action == "nan":
            poison = True
        else:
            raise ValueError(f"{ENV}: unknown action {action!r}")
    return poison
