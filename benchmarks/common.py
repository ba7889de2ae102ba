"""Pieces shared by the bench modules: provider names, dtypes, random batches, peers' availability.

The checks against the reference (error-ratio rule, reference runs) live in :mod:`fastmlm.testing`.
"""
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
    # The torch backend runs everywhere: ATen CPU flash attention, or varlen_attn / SDPA / FlexAttention on CUDA.


def require_cuda(provider: str, device: str, why: str) -> None:
    """Skip a GPU-only peer on the CPU, saying why it is GPU-only."""
    if not device.startswith("cuda"):
        raise Skip(f"{provider} runs on CUDA only ({why})")


def require_module(name: str, what: str):
    """Import an optional peer or Skip saying it is not installed."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a package that fails while importing
        raise Skip(f"{what} is not available ({type(exc).__name__}: {str(exc)[:120]})") from None


def preset_shapes(table: dict[str, list[dict]]) -> Callable[[str], list[dict]]:
    """A bench module's ``shapes(preset)`` from its table ``{preset: [shape, ...]}``.

    Each call returns fresh copies of the shape dicts; an unknown preset raises ValueError.
    """
    def shapes(preset: str) -> list[dict]:
        if preset not in table:
            raise ValueError(f"unknown preset {preset!r}")
        return [dict(shape) for shape in table[preset]]

    return shapes


def preset_dtypes(preset: str) -> list[torch.dtype]:
    """A bench module's ``dtypes(preset)``: bf16 for the GPU presets, fp32 for the CPU ones."""
    return [torch.bfloat16] if preset.startswith("gpu") else [torch.float32]


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


def zero_grads(*tensors: torch.Tensor) -> None:
    for t in tensors:
        t.grad = None
