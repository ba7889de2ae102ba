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


# Memory layouts a caller can hand an op: the same values, other strides.
STRIDED_KINDS = ("last_dim_stride_2", "interleaved", "fused_slice", "last_two_dims_swapped", "first_two_dims_swapped")


def strided_view(x: torch.Tensor, kind: str) -> torch.Tensor:
    """A view equal to ``x`` (and differentiable back to it) laid out differently in memory.

    The memory between its elements holds NaN (-7 for integers: no valid id or position), so
    a backend that reads the wrong elements (for instance by assuming unit stride) fails
    loudly instead of being slightly off.
    """
    nan = torch.full_like(x, float("nan") if x.dtype.is_floating_point else -7)
    if kind == "last_dim_stride_2":  # x[..., ::2] of a twice-wider tensor
        return torch.stack([x, nan], dim=-1)[..., 0]
    if kind == "interleaved":  # the middle one of three interleaved tensors: stride 3, offset 1
        return torch.stack([nan, x, nan], dim=-1)[..., 1]
    if kind == "fused_slice":  # q of a fused (..., 3, H, D) qkv projection: unit stride, wide rows
        return torch.stack([x, nan, nan], dim=-3)[..., 0, :, :] if x.dim() >= 2 else strided_view(x, "interleaved")
    if kind == "last_two_dims_swapped":  # a transposed copy viewed back: the last dim is not unit stride
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "first_two_dims_swapped":  # e.g. a (S, B, ...) tensor viewed as (B, S, ...)
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    raise ValueError(f"unknown strided kind {kind!r}")


def assert_backend_matches(fast, reference, inputs, valid=None):
    """The error-ratio rule for ``fast(*inputs)`` in fp32, outputs (2x) and gradients (3x).

    ``reference(*inputs, upcast=...)`` gives the fp64 oracle and the fp32 baseline on the
    same values; ``valid`` (bool, broadcastable to the output) marks the rows to compare,
    and only those rows get an upstream gradient.
    """
    exact_in, low_in, fast_in = ([t.detach().to(dt).requires_grad_() for t in inputs]
                                 for dt in (torch.float64, torch.float32, torch.float32))
    exact, lowp, out = reference(*exact_in, upcast=True), reference(*low_in, upcast=False), fast(*fast_in)
    valid = torch.ones(exact.shape, dtype=torch.bool) if valid is None else valid.expand(exact.shape)
    assert_error_ratio(out[valid], exact[valid], lowp[valid], 2.0, 1e-5)
    dout = torch.randn(exact.shape, dtype=torch.float64) * valid
    grads = [torch.autograd.grad(y, x, dout.to(y.dtype))
             for y, x in ((out, fast_in), (exact, exact_in), (lowp, low_in))]
    for i, (f, e, l) in enumerate(zip(*grads)):
        assert_error_ratio(f, e, l, 3.0, 1e-5, f"gradient of input {i}")
