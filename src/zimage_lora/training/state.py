"""The training state: what a saved run needs to continue as if it had never stopped, and which job changes a
resumed run accepts.

One ``TrainState`` holds the optimizer step, the data position (epoch, batch within it) and the EMA of the LoRA's
weights; ``snapshot`` adds the LoRA's tensors, the optimizer and the LR schedule to make the dict that
``state/<step>.pt`` stores, and ``restore`` puts them back. The random draws need no state: they are keyed by
(seed, step, sample index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zimage_lora.errors import UserError
from zimage_lora.lora import network


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # the epoch the next batch comes from
    batch: int = 0  # the next batch's index in that epoch's order
    ema: Any = None  # the LoraEMA when train.ema is on (training/ema.py)

    def position(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}


def snapshot(state: TrainState, model, optimizer, scheduler) -> dict:
    """Everything ``restore`` needs, as plain tensors and dicts (the file ``state/<step>.pt``)."""
    return {
        "ema": state.ema.state_dict() if state.ema is not None else None,
        "step": state.step,
        "lora": {k: v.detach().cpu().clone() for k, v in network.named_user_parameters(model).items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "position": state.position(),
    }


def restore(saved: dict, state: TrainState, model, optimizer, scheduler) -> None:
    params = network.named_user_parameters(model)
    if set(params) != set(saved["lora"]):
        raise UserError("--resume: the saved state does not match this job's LoRA (target or rank changed)")
    import torch

    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved["lora"][name])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state.step = int(saved["step"])
    state.epoch, state.batch = int(saved["position"]["epoch"]), int(saved["position"]["batch"])
    if state.ema is not None and saved.get("ema") is not None:
        state.ema.load_state_dict(saved["ema"])


# Keys a resumed run may change: length, saving, previews and how memory is saved (layer offload and low_vram give
# the same numbers; compile within float rounding). Anything else would make the run a different one.
RESUMABLE_CHANGES = (
    "train.steps",
    "save.",
    "sample.",
    "job.device",
    "train.gradient_checkpointing",
    "train.checkpoint_fraction",
    "model.layer_offload",
    "model.low_vram",
    "train.compile",
)


def check_resumable(saved: dict, current: dict, saved_step: int) -> None:
    """Refuse a resume whose job changed in a way that breaks the run, naming the key."""
    old, new = flatten(saved), flatten(current)
    for key in [*old, *(k for k in new if k not in old)]:  # panel order: a key the user set before what follows
        if key.startswith(RESUMABLE_CHANGES) or old.get(key) == new.get(key):
            continue
        raise UserError(
            f"--resume: {key} changed ({old.get(key)!r} -> {new.get(key)!r}) since the run was saved; restore it, "
            "or start afresh with --overwrite"
        )
    if new.get("train.steps", 0) < saved_step:
        raise UserError(
            f"--resume: train.steps ({new.get('train.steps')}) is below the saved step ({saved_step}); raise it to "
            f"{saved_step} or more, or start afresh with --overwrite"
        )


def flatten(data, prefix: str = "") -> dict:
    """Nested job data as ``{"train.lr": 1e-4, "datasets.0.path": ...}``."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(data, list):
        out = {}
        for index, value in enumerate(data):
            out.update(flatten(value, f"{prefix}{index}."))
        return out if data else {prefix.rstrip("."): []}
    return {prefix.rstrip("."): data}
