"""Tiny wrappers over ``torch.distributed`` that are no-ops in a single process.

Policies must see the same statistics on every rank, so anything a policy reads goes through
:func:`all_reduce_sum` or :func:`all_gather_objects` first.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "from_rank_zero",
    "is_distributed",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _comm_device(tensor: torch.device) -> torch.device:
    # gloo reduces CPU tensors only; NCCL needs CUDA tensors.
    return torch.device("cpu") if dist.get_backend() == "gloo" else tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks (returns a new tensor on the input's device)."""
    if not is_distributed():
        return tensor.clone()
    work = tensor.detach().to(_comm_device(tensor.device)).clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def all_gather_objects(obj: Any) -> list[Any]:
    """Gather one picklable object per rank, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_rank_zero(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a broadcast of one picklable object); ``obj`` itself in one process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()
