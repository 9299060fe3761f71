"""Data parallelism under torchrun: process group set-up and the few collective helpers.

``torchrun --nproc-per-node N -m blossom_ops.cli train ...`` sets RANK, WORLD_SIZE and
LOCAL_RANK; we then use NCCL on CUDA and gloo on CPU. Every process holds the full model
(DistributedDataParallel averages gradients), draws the same shuffled global batch and keeps
its slice of it, and normalises its loss by the global target count (see models.py), so N
processes take exactly the step one process would take on the combined batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def from_env() -> DistInfo:
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def setup(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (a no-op for a single process)."""
    info = from_env()
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world)
    return info


def wrap(model: torch.nn.Module, device: torch.device, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when running under torchrun, else ``model``.

    find_unused_parameters: BlossomAttention keeps its gate weights in the dense pattern too
    (so dense and blossom checkpoints share one layout) but the dense pattern never uses them.
    Without the flag DDP would wait forever for their gradient bucket, and on the first step
    it silently skips that bucket's all-reduce, leaving each process with its own gradient.
    """
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=True)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``t`` over processes (a copy; ``t`` itself is untouched)."""
    if not info.enabled:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
