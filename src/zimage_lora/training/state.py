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
    reg_epoch: int = 0  # the same for the regularisation datasets' batches (their own order)
    reg_batch: int = 0
    ema: Any = None  # the LoraEMA when train.ema is on (training/ema.py)

    def position(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "reg_epoch": self.reg_epoch, "reg_batch": self.reg_batch}


def snapshot(state: TrainState, model, optimizer_state: dict, scheduler) -> dict:
    """Everything ``restore`` needs, as plain tensors and dicts (the file ``state/<step>.pt``); ``optimizer_state`` is
    the optimizer's state dict (gathered whole when the model is sharded)."""
    return {
        "ema": state.ema.state_dict() if state.ema is not None else None,
        "step": state.step,
        "lora": {k: v.detach().cpu().clone() for k, v in network.named_user_parameters(model).items()},
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "position": state.position(),
    }


def restore(saved: dict, state: TrainState, model, optimizer, scheduler) -> None:
    params = network.named_user_parameters(model)
    if set(params) != set(saved["lora"]):
        raise UserError("--resume: the saved state does not match this job's LoRA (target or rank changed)")
    import torch

    from zimage_lora.training.distributed import shard_like, shard_optimizer_state

    with torch.no_grad():
        for name, p in params.items():
            p.copy_(shard_like(p, saved["lora"][name]))  # a sharded model takes its part of each
    optimizer.load_state_dict(shard_optimizer_state(optimizer, saved["optimizer"]))
    scheduler.load_state_dict(saved["scheduler"])
    state.step = int(saved["step"])
    position = saved["position"]
    state.epoch, state.batch = int(position["epoch"]), int(position["batch"])
    state.reg_epoch, state.reg_batch = int(position.get("reg_epoch", 0)), int(position.get("reg_batch", 0))
    if state.ema is not None and saved.get("ema") is not None:
        state.ema.load_state_dict(saved["ema"])


# Keys a resumed run may change: length, saving, previews, the devices and how memory is saved (layer offload, text
# encoder offload and low_vram give the same numbers; compile, sharding and another number of processes within float
# rounding; the batch size is checked as images per whole micro-batch, see check_processes). Anything else would make
# the run a different one.
RESUMABLE_CHANGES = (
    "train.steps",
    "save.",
    "sample.",
    "job.device",
    "job.process_timeout",
    "model.shard",
    "train.gradient_checkpointing",
    "train.checkpoint_fraction",
    "model.layer_offload",
    "model.low_vram",
    "model.text_encoder_offload",
    "train.compile",
)


def check_resumable(
    saved: dict, current: dict, saved_step: int, facts: dict | None = None, saved_facts: dict | None = None
) -> None:
    """Refuse a resume whose job changed in a way that breaks the run, naming the key. ``facts`` (this start's
    ``processes`` and ``batch_images``, the images of a whole micro-batch) against ``saved_facts`` (the saved run's,
    from its run.json): another number of processes is fine when a whole micro-batch keeps its images."""
    old, new = flatten(saved), flatten(current)
    if facts is not None:
        check_processes(saved_facts or {}, facts, int(old.get("train.batch_size", 1)))
    for key in [*old, *(k for k in new if k not in old)]:  # panel order: a key the user set before what follows
        if key.startswith(RESUMABLE_CHANGES) or old.get(key) == new.get(key):
            continue
        if facts is not None and key == "train.batch_size":  # checked above, as images per whole micro-batch
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


def check_processes(saved_facts: dict, facts: dict, saved_batch_size: int) -> None:
    """The data position counts whole micro-batches: a resumed run must keep their images (``train.batch_size`` x
    processes); say which ``train.batch_size`` keeps them with this number of processes."""
    processes = int(saved_facts.get("processes", 1))
    images = int(saved_facts.get("batch_images", saved_batch_size * processes))
    if images == facts["batch_images"]:
        return
    now = facts["processes"]
    fix = (
        f"set train.batch_size: {images // now}"
        if images % now == 0
        else f"run it on a number of processes that divides {images}"
    )
    raise UserError(
        f"--resume: the run was saved with {images} images per micro-batch (train.batch_size {images // processes} x "
        f"{processes} process{'es' if processes > 1 else ''}); on {now} process{'es' if now > 1 else ''} {fix} "
        "(or start afresh with --overwrite)"
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
