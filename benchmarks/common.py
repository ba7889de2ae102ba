"""Pieces shared by the bench modules: provider names, random batches, peers' availability."""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

from .harness import Skip

# fastmlm's own backends as benchmark providers ("reference" is the oracle, listed separately).
FASTMLM_BACKENDS = ("torch", "triton", "cuda")


def fastmlm_backend(provider: str) -> Optional[str]:
    """"fastmlm-triton" -> "triton"; None for a provider that is not one of fastmlm's backends."""
    if provider.startswith("fastmlm-"):
        name = provider[len("fastmlm-"):]
        return name if name in FASTMLM_BACKENDS else None
    return None


def require_backend_device(backend: str, device: str) -> None:
    """Skip the kernel backends where timing them would be meaningless."""
    if backend in ("triton", "cuda") and not device.startswith("cuda"):
        raise Skip(f"the {backend} backend runs on CUDA devices (the Triton interpreter is for tests, not timing)")
    if backend == "torch" and device.startswith("cuda"):
        raise Skip("fastmlm's torch backend is the CPU path")


def require_module(name: str, what: str):
    """Import an optional peer or Skip saying it is not installed."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a package that fails while importing
        raise Skip(f"{what} is not available ({type(exc).__name__}: {str(exc)[:120]})") from None


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, device, gen, scale: float = 1.0) -> torch.Tensor:
    """Seeded normal values made on the CPU (identical on every device), then moved."""
    return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)


def random_lengths(batch: int, seqlen: int, gen, low_fraction: float = 0.25) -> torch.Tensor:
    """(B,) int64 sequence lengths in [low_fraction * S, S]; the first sequence is full."""
    low = max(1, int(seqlen * low_fraction))
    lengths = torch.randint(low, seqlen + 1, (batch,), generator=gen)
    lengths[0] = seqlen
    return lengths


def cu_seqlens(lengths: torch.Tensor, device) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)


def zero_grads(*tensors: torch.Tensor) -> None:
    for t in tensors:
        t.grad = None


def grads_of(fn: Callable[[], torch.Tensor], leaves: dict, dout: Optional[torch.Tensor] = None) -> dict:
    """Run fn, backpropagate dout (or the scalar), return {"out": out, name: grad} as fresh tensors."""
    for t in leaves.values():
        t.grad = None
    out = fn()
    out.backward(dout) if dout is not None else out.backward()
    result = {"out": out.detach().clone()}
    result.update({name: t.grad.detach().clone() for name, t in leaves.items()})
    for t in leaves.values():
        t.grad = None
    return result
