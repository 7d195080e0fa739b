"""Crash-safe file writes, shared by the trainer, the caches and the web UI (no torch needed)."""

from __future__ import annotations

import os
from pathlib import Path

from zimage_lora import faults


def atomic_write_bytes(path: Path, data: bytes, fault: str | None = None, index: int | None = None) -> None:
    """Write ``data`` to ``path`` so that a crash at any moment leaves the old file or the new one.

    ``fault`` names the write for fault injection (``<fault>.tmp`` after the temporary file is on disk,
    ``<fault>.renamed`` after it replaced the target); see ``zimage_lora.faults``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if fault:
            faults.fire(f"{fault}.tmp", index)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, Ctrl-C) leaves the old file and no debris
        raise
    fsync_dir(path.parent)
    if fault:
        faults.fire(f"{fault}.renamed", index)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
