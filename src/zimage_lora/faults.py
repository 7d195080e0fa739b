"""Fault injection for tests (developers only): make the trainer fail at a named point, deterministically.

``ZIMAGE_LORA_FAULT`` holds comma-separated ``ACTION@POINT[:N]`` entries:

- actions: ``kill`` (SIGKILL itself: nothing runs after), ``sigint`` (one Ctrl-C), ``sigint2`` (two Ctrl-C),
  ``oom`` (raise an out-of-memory error), ``diskfull`` (raise ENOSPC), ``nan`` (make the loss non-finite),
  ``wait`` (hold there until a test lets it go, see below);
- points: ``setup`` (the trainer starts loading, before it looks at its run folder), ``step`` (after optimizer
  step N, before the after-step control looks at requests), ``loss`` (the loss of step N), ``save.lora.tmp`` /
  ``save.lora.renamed`` / ``save.state.tmp`` / ``save.state.renamed`` / ``save.rotated`` (the phases of the save at
  step N), ``finished`` (the final files and run.json are written, before late requests are answered),
  ``cache.entry`` (the Nth latent cache entry written).

Without ``:N`` a point fires every time. Example: ``ZIMAGE_LORA_FAULT=kill@save.state.tmp:4``. With several
processes, ``#rankR`` after the point limits an entry to the process of that rank (``kill@step:3#rank1``); without
it every process fires. ``#NAME`` limits it to the run of the job named NAME (a comparison trains several jobs in one
process: ``wait@step:2#my_lora_v1`` holds only its second variant).

``wait`` makes a test independent of speed: the process writes ``held-<point>-<N>`` (``held-<point>`` without an
index) into the folder ``ZIMAGE_LORA_FAULT_DIR`` and blocks until a file ``release-<point>-<N>`` appears there, then
removes its ``held-`` file and goes on (with several processes the names end in ``.rankR``:
``held-step-3.rank1``). It gives up after ``ZIMAGE_LORA_FAULT_WAIT_S`` seconds (default 600), so a
test that died never leaves a process waiting for good.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

ENV = "ZIMAGE_LORA_FAULT"
DIR_ENV = "ZIMAGE_LORA_FAULT_DIR"
WAIT_ENV = "ZIMAGE_LORA_FAULT_WAIT_S"


_job = ""  # the job being trained in this process, for ``#NAME`` (set by the trainer)


def set_job(name: str) -> None:
    global _job
    _job = name


def _matches(point: str, index: int | None):
    spec = os.environ.get(ENV, "")
    for part in filter(None, (p.strip() for p in spec.split(","))):
        action, _, where = part.partition("@")
        where, _, who = where.partition("#")
        name, _, n = where.partition(":")
        if who and who not in (f"rank{os.environ.get('RANK', '0')}", _job):
            continue
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
        elif action == "wait":
            _wait(point, index)
        else:
            raise ValueError(f"{ENV}: unknown action {action!r}")
    return poison


def hold_name(point: str, index: int | None) -> str:
    """``<point>-<N>``: the suffix of the ``held-`` and ``release-`` files of a ``wait`` at that point (and
    ``.rankR`` in a job of several processes)."""
    name = point if index is None else f"{point}-{index}"
    return f"{name}.rank{os.environ['RANK']}" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else name


def _wait(point: str, index: int | None) -> None:
    folder = os.environ.get(DIR_ENV)
    if not folder:
        raise ValueError(f"{ENV}: a wait fault needs {DIR_ENV}, the folder of its held- and release- files")
    name = hold_name(point, index)
    held, release = Path(folder) / f"held-{name}", Path(folder) / f"release-{name}"
    held.write_text(str(os.getpid()))
    deadline = time.monotonic() + float(os.environ.get(WAIT_ENV, "600"))
    try:
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        held.unlink(missing_ok=True)
