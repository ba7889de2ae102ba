"""Devices and data-parallel ranks: which device a run uses, the process group under ``torchrun``, DDP or FSDP.

Distributed data parallel: run under ``torchrun``; each rank trains on its own device
(``cuda:LOCAL_RANK``, or the CPU), gloo on the CPU and NCCL on GPUs. :class:`Dist` is this
process's place in the group, with the few collectives the training loop needs (a no-op
for a single process). CUDA is queried when a command runs, never at import.

:func:`wrap_model` makes the training module: the model itself (one process), DDP, or FSDP2
(``fully_shard`` per encoder layer, then the root; on GPUs bf16/fp16 parameters with fp32
gradient reductions). :func:`no_sync` skips the gradient communication of every micro-batch
but the last (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Optional

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



def wrap_model(model: torch.nn.Module, ranks: Dist, device: torch.device, fsdp: bool = False,
               amp_dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """The module the training step runs: ``model`` itself, DDP around it, or ``model`` sharded in place by FSDP2.

    With ``fsdp`` on one process nothing is sharded (there is nothing to shard over), but the
    run still saves sharded checkpoints, which load on any number of ranks. Build the optimizer
    after this: FSDP2 replaces the parameters by sharded DTensors.
    """
    if ranks.world_size == 1:
        return model
    if not fsdp:
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                         else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # On GPUs the layers compute on low-precision copies of the weights and reduce gradients in
    # fp32; the sharded master weights and the optimizer stay fp32. On the CPU all is fp32.
    low = amp_dtype if device.type == "cuda" else None
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None)
    # The model returns hidden_states as a view (the repadded layout); nothing modifies it in place, which is
    # what FSDP2 warns about on every forward.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for layer in model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the embeddings, the head (tied to the word embeddings), the norms
    return model


def no_sync(net: torch.nn.Module):
    """A context in which a backward accumulates gradients locally, without communicating them."""
    if hasattr(net, "no_sync"):  # DDP
        return net.no_sync()
    if hasattr(net, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(net)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(net):
    net.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 has sharded ``model``'s parameters (they are DTensors then)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
