"""Devices and data-parallel ranks: which device a run uses, and the process group under ``torchrun``.

Distributed data parallel: run under ``torchrun``; each rank trains on its own device
(``cuda:LOCAL_RANK``, or the CPU), gloo on the CPU and NCCL on GPUs. :class:`Dist` is this
process's place in the group, with the few collectives the training loop needs (a no-op
for a single process). CUDA is queried when a command runs, never at import.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's place among the ranks (rank 0, the main one, writes the run folder) and the
    collectives the training loop uses; each is a no-op for a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def all_min(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device named by a ``--device`` value: "auto" (the GPU when there is one), "cpu", "cuda" or "cuda:N".

    ValueError names the value and what is expected, also when it names a GPU this machine lacks.
    CUDA is queried here, when a command runs, never at import.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r} is not a device fastmlm runs on; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: no CUDA GPU is available on this machine "
                         f"(torch.cuda.is_available() is False); use 'cpu' or 'auto'")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device={name!r}: GPU {index} does not exist; this machine has "
                         f"{torch.cuda.device_count()} (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun; pick the device (each rank its own GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    ranks = Dist()
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        ranks = Dist(dist.get_rank(), dist.get_world_size(), local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return ranks, device


def launch_rank() -> int:
    """This process's rank, known before the process group exists (torchrun sets RANK)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))

