"""Shared test tools: the error-ratio rule of ARCHITECTURE.md, poisoning, random batches."""
from __future__ import annotations

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_error_ratio(fast, exact, lowp, ratio: float, floor: float = 1e-5, what: str = "output"):
    """fast's error against the fp64 ``exact`` is at most ``ratio`` x the error of the
    low-precision reference ``lowp`` (plus ``floor``, for fp32 where lowp is near exact)."""
    assert fast.shape == exact.shape, f"{what}: shape {tuple(fast.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(fast.double()[torch.isfinite(exact.double())]).all(), f"{what}: non-finite values"
    err, base = max_err(fast, exact), max_err(lowp, exact)
    assert err <= ratio * base + floor, f"{what}: error {err:.3e} > {ratio} x low-precision error {base:.3e} + {floor:.0e}"


def random_mask(batch: int, seqlen: int, min_len: int = 0, generator=None) -> torch.Tensor:
    """(B, S) bool right-padding mask with random lengths in [min_len, S]; row 0 is full."""
    lengths = torch.randint(min_len, seqlen + 1, (batch,), generator=generator)
    lengths[0] = seqlen
    return torch.arange(seqlen)[None, :] < lengths[:, None]


def cu_seqlens_of(lengths) -> torch.Tensor:
    return torch.nn.functional.pad(torch.tensor(lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))


def backend_device(backend: str) -> str:
    """Where a backend's test inputs live: the kernel backends run on the GPU when there is one;
    the references and the CPU-only torch attention backend stay on the CPU."""
    return "cuda" if backend in ("triton", "cuda") and torch.cuda.is_available() else "cpu"
