"""Multi-process training through ``torchrun``: process group, sharding and gathering.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) every helper degrades to the
single-process case, so the training code has one path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when running under a process group of more than one process."""
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the ``torchrun`` process group if there is one (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def cleanup_distributed() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every process.

    DDP broadcasts buffers at the start of each forward, so after the last training step
    each process holds its own batch's update; evaluation and checkpoints need one model.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=0)


def shard(rows: np.ndarray, info: DistInfo) -> np.ndarray:
    """This process's share of ``rows`` for evaluation: strided, never padded.

    Unlike ``DistributedSampler`` nothing is duplicated to even out the shards, so gathered
    predictions cover every row exactly once.
    """
    return rows[info.rank::info.world_size]


def gather_predictions(pred: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate every process's prediction arrays and de-duplicate by ``row``, sorted by row.

    Args:
        pred: arrays of equal length, one of them ``row`` (the cache row of each sample).
    """
    parts = all_gather_objects(pred)
    merged = {k: np.concatenate([p[k] for p in parts]) for k in pred}
    _, first = np.unique(merged["row"], return_index=True)
    return {k: v[first] for k, v in merged.items()}


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of a short list of numbers across processes."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
