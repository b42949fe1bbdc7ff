"""Data parallelism on ``torch.distributed``: shard examples across ranks, sum partial results with all-reduce.

Under ``torchrun --nproc-per-node N -m llmeraser erase ...`` every rank holds the whole model and adapter,
computes gradients and curvature products over its shard of the examples, and all-reduces the sums; the
solver then runs identically on every rank (the same b, the same operator outputs), and rank 0 writes.
Outside ``torchrun`` every function here is the single-process identity.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def init_from_environment() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1).

    Uses NCCL when CUDA is available, gloo otherwise. Returns whether this process is distributed.
    """
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return is_distributed()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item starting at ``rank`` (all, when single)."""
    return list(items[rank() :: world_size()])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (fp32/fp64 as given) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def wait_for_rank_zero() -> None:
    """Under torchrun: every rank waits here until rank 0 has written what they read next (a barrier)."""
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (after a barrier) if one was joined."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
