"""One job on several processes (one per GPU, or CPU processes for tests): who does what, and how they agree.

The processes are started by accelerate (``zimage-lora train --num-processes N`` / ``--gpus``, ``accelerate launch``)
or ``torchrun``; each runs the same recipe. ``Processes`` is what the recipe asks:

- ``share(items)``: this process's part of a list of work (latents to encode, prompts to embed or preview);
- ``wait_all()``: a barrier for phases of uneven length (loading, caching, previews, a save), on a side gloo group
  without the step timeout;
- ``gather(obj)``: every process's object, in rank order (the preview images, the prompt embeddings);
- ``union(flags)`` and ``total(tensor)``: the after-step decision (a stop or save asked on any process counts on all,
  at the same step) and the step's logged numbers, summed, on the training group, whose collectives give up after
  ``job.process_timeout`` seconds (a dead or hung process never leaves the others waiting for gloo's 30 minutes).

A batch is split by ``split_sizes``: sizes as even as possible (they differ by at most one), each process's loss
weighted by its share so that the all-reduced gradient is the single-process gradient of the whole batch. A
process left without an example (a bucket's last batch with fewer images than processes) trains the batch's first
example at weight 0, so that it still takes part in the gradient exchange.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch

SLOW_PHASE_TIMEOUT = timedelta(hours=6)  # a barrier of a phase of uneven length: a preview round, a caching pass


def launched_world() -> tuple[int, int]:
    """(rank, world size) as the launcher set them (accelerate and torchrun set ``RANK`` and ``WORLD_SIZE``)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def split_sizes(n: int, world: int) -> list[int]:
    """How ``n`` examples of a batch are shared among ``world`` processes: in rank order, sizes differ by at most 1."""
    return [(n * (r + 1)) // world - (n * r) // world for r in range(world)]


class Processes:
    """The job's processes; one process (world 1) answers every question locally, without a collective."""

    def __init__(self, accelerator):
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.main = accelerator.is_main_process
        self.device = accelerator.device
        self._slow = None
        if self.world > 1:
            import torch.distributed as dist

            self._slow = dist.new_group(backend="gloo", timeout=SLOW_PHASE_TIMEOUT)

    @property
    def several(self) -> bool:
        return self.world > 1

    def share(self, items: list) -> list:
        """This process's part of ``items``: every ``world``-th item from its rank on (interleaved, so that work
        sorted by size stays balanced)."""
        return list(items[self.rank :: self.world])

    def wait_all(self) -> None:
        if self._slow is not None:
            import torch.distributed as dist

            dist.barrier(group=self._slow)

    def gather(self, obj) -> list:
        """Every process's ``obj`` (picklable, CPU tensors), in rank order."""
        if self._slow is None:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self._slow)
        return out

    def union(self, flags: list[bool]) -> list[bool]:
        """Each flag set on any process."""
        if not self.several:
            return flags
        import torch.distributed as dist

        t = torch.tensor([int(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the processes (on the training group, under the step timeout)."""
        if not self.several:
            return values
        import torch.distributed as dist

        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values


class BucketCounter:
    """A DDP communication hook that all-reduces each gradient bucket as DDP's default does, and counts them: the
    record that gradients are exchanged once per optimizer step and never on accumulation micro-steps."""

    def __init__(self):
        self.calls = 0

    @staticmethod
    def hook(state: BucketCounter, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        state.calls += 1
        return allreduce_hook(None, bucket)

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


# --- a sharded frozen base (FSDP2) --------------------------------------------------------------------------------
def shard_transformer(transformer: torch.nn.Module, device: torch.device, world: int) -> int:
    """``fully_shard`` on each refiner and main block, then on the whole transformer (its embedders and final
    layer): each process keeps 1/``world`` of every weight, frozen base and LoRA alike, and a block's weights are
    gathered just before it runs (the next one prefetched) and freed after. Returns the number of blocks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    blocks = [*transformer.noise_refiner, *transformer.context_refiner, *transformer.layers]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(transformer, mesh=mesh)
    return len(blocks)


def _is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@contextmanager
def whole_parameters(model: torch.nn.Module, wanted):
    """For a save: each parameter named by ``wanted(name)`` gathered whole from its shards (every process must
    enter, in the same order) and put in its module's place; the shards go back afterwards. No forward may run
    inside."""
    swapped = []
    try:
        for module_name, module in model.named_modules():
            for name, p in list(module._parameters.items()):
                if p is not None and _is_sharded(p) and wanted(f"{module_name}.{name}" if module_name else name):
                    module._parameters[name] = torch.nn.Parameter(p.full_tensor().detach(), requires_grad=False)
                    swapped.append((module, name, p))
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def whole_tensors(data):
    """``data`` (an optimizer's state dict) with each sharded tensor gathered whole (every process must call)."""
    if _is_sharded(data):
        return data.full_tensor().cpu()
    if isinstance(data, dict):
        return {k: whole_tensors(v) for k, v in data.items()}
    if isinstance(data, list):
        return [whole_tensors(v) for v in data]
    return data


def shard_like(param, whole: torch.Tensor):
    """``whole`` cut as ``param`` is sharded: this process's part, cut locally (every process holds ``whole``)."""
    if not _is_sharded(param):
        return whole
    from torch.distributed.tensor import distribute_tensor

    whole = whole.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)


def shard_optimizer_state(optimizer, state: dict) -> dict:
    """A whole optimizer state dict (``whole_tensors``) cut back to the shards of the optimizer's parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = dict(state, state={})
    for index, values in state["state"].items():
        param = params[int(index)]
        out["state"][index] = {
            k: shard_like(param, v) if torch.is_tensor(v) and v.shape == param.shape else v for k, v in values.items()
        }
    return out
