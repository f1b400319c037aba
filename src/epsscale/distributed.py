"""The process group for data-parallel runs under ``torchrun`` (a no-op in a single process).

gloo on CPU and NCCL on GPU (CPU tensors and object collectives still go through gloo); at
world size 1 no process group is created. What runs on top of it: seed-sharded sampling
(:func:`epsscale.sampling.sample_seeds`, with the resumable work directory of
:mod:`epsscale.store`) and FID statistics added over ranks (``epsscale fid``).
"""

from __future__ import annotations

import atexit
import os
from typing import Any

import torch

__all__ = ["rank", "world_size", "init", "shutdown", "barrier", "all_reduce_sum", "broadcast_object", "all_gather_object"]


# ---------------------------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------------------------


def world_size() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def rank() -> int:
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def init() -> None:
    """Join the process group that ``torchrun`` describes in the environment (no-op without it).

    gloo on CPU. With CUDA, NCCL for CUDA tensors and gloo for CPU tensors and Python objects
    (``"cpu:gloo,cuda:nccl"``), so the float64 FID sums and the shard bookkeeping, which live
    on the CPU, work under either.
    """
    try:
        ws = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None
    if ws <= 1 or torch.distributed.is_initialized():
        return
    if not torch.distributed.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend=backend)
    # Tear the group down before interpreter exit: gloo's threads aborting in static
    # destructors ("terminate called without an active exception") otherwise kill a rank.
    atexit.register(shutdown)


def shutdown() -> None:
    """Destroy the process group (registered at exit by :func:`init`; safe to call twice)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (float64 sums stay float64)."""
    if world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects; the identity at world size 1)."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` at world size 1)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
