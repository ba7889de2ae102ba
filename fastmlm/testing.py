"""Checking a fast path against its reference: the one home of the rules the tests and benchmarks share.

ARCHITECTURE.md, "Correctness rule for fused kernels": run the op's pure-PyTorch
reference twice on the same values, once exactly (fp64; fp32 on a GPU, see
:func:`oracle_dtype`) with ``upcast=True`` and once in the kernel's own low precision
with ``upcast=False``. The fast path's max error against the exact run must be at most
``ratio`` x the low-precision run's error, plus a small floor (for fp32, where the
low-precision reference is nearly exact):

    max |fast - exact| <= ratio * max |lowp - exact| + floor      ratio 2 for outputs, 3 for gradients

Pieces:

- the rule: :func:`assert_error_ratio` (one tensor, raises), :func:`check_error_ratios`
  (named tensors, returns a note or raises with every failure);
- the reference-check block: :func:`assert_backend_matches` (fast path and reference on
  the same inputs, outputs and gradients), :func:`outputs_and_grads` and
  :func:`reference_runs` (its parts, for a fast run checked on a slice, as the benchmarks do);
- poisoning: :func:`poison_`, :func:`poisoned_allocations`, :func:`strided_view` (fill
  what a kernel must not read, or must write, with NaN so a mistake shows);
- inputs: :func:`random_mask`, :func:`cu_seqlens_of`, :func:`backend_device`.

A failed check raises :class:`CheckFailed`, an ``AssertionError``: a test reports it as
a failed assertion, a benchmark records it as a "failed check" row. This module imports
only torch (no pytest: the benchmarks import it) and queries CUDA only when called.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import torch


class CheckFailed(AssertionError):
    """The fast path disagrees with the reference; the message gives the errors."""


# --------------------------------------------------------------------------- the error-ratio rule
def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in fp64 (0 for empty tensors); a and b have the same shape."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


class ErrorRatio(NamedTuple):
    """One application of the rule: the measured errors and, when it fails, why."""

    what: str
    err: float  # max |fast - exact|
    base: float  # max |lowp - exact|
    limit: float  # ratio * base + floor
    problem: Optional[str]  # None when the rule holds

    @property
    def note(self) -> str:
        return f"{self.what} err {self.err:.1e} (limit {self.limit:.1e})"


def error_ratio(fast: torch.Tensor, exact: torch.Tensor, lowp: torch.Tensor, ratio: float, floor: float,
                what: str = "output") -> ErrorRatio:
    """Apply the rule to one tensor without raising.

    Arguments:
        fast: the fast path's result, any shape and dtype.
        exact: the exact reference's result, the same shape.
        lowp: the low-precision reference's result, the same shape.
        ratio: how many times the low-precision error the fast path may make.
        floor: absolute allowance added to the limit.
        what: the tensor's name in the messages.
    Returns:
        An :class:`ErrorRatio`; ``problem`` is None when fast has exact's shape, is finite
        wherever exact is, and ``max |fast - exact| <= ratio * max |lowp - exact| + floor``.
    """
    if tuple(fast.shape) != tuple(exact.shape):
        return ErrorRatio(what, float("nan"), float("nan"), float("nan"),
                          f"{what}: shape {tuple(fast.shape)} != {tuple(exact.shape)}")
    if not torch.isfinite(fast.double()[torch.isfinite(exact.double())]).all():
        return ErrorRatio(what, float("nan"), float("nan"), float("nan"), f"{what}: non-finite values")
    err, base = max_abs_err(fast, exact), max_abs_err(lowp, exact)
    limit = ratio * base + floor
    problem = None if err <= limit else \
        f"{what}: error {err:.3e} > {ratio} x low-precision error {base:.3e} + {floor:.1e}"
    return ErrorRatio(what, err, base, limit, problem)


def assert_error_ratio(fast, exact, lowp, ratio: float, floor: float = 1e-5, what: str = "output") -> ErrorRatio:
    """fast's error against the fp64 ``exact`` is at most ``ratio`` x the error of the
    low-precision reference ``lowp`` (plus ``floor``, for fp32 where lowp is near exact).

    Arguments and checks as :func:`error_ratio`; raises :class:`CheckFailed` when the rule fails.
    """
    result = error_ratio(fast, exact, lowp, ratio, floor, what)
    if result.problem is not None:
        raise CheckFailed(result.problem)
    return result


def check_error_ratios(fast: dict, exact: dict, lowp: dict, ratios: dict, rel_floor: float = 1e-4,
                       abs_floor: float = 1e-6, default_ratio: float = 3.0) -> str:
    """The rule on named tensors (e.g. ``{"out": ..., "dq": ...}``); every name of ``exact`` is checked.

    Arguments:
        fast, exact, lowp: name -> tensor, the same shapes name by name.
        ratios: name -> ratio (``default_ratio`` for a name not given).
        rel_floor, abs_floor: the floor of each name is ``rel_floor * max |exact| + abs_floor``
            (an allowance for fp32, where the low-precision reference is nearly exact, and
            for long reductions).
    Returns:
        A short note with the measured errors and limits, e.g. ``"out err 1.2e-03 (limit 4.0e-03), ..."``.
    Raises:
        CheckFailed listing every name that fails.
    """
    notes, failures = [], []
    for name, want in exact.items():
        floor = rel_floor * float(want.double().abs().max()) + abs_floor if want.numel() else abs_floor
        result = error_ratio(fast[name], want, lowp[name], ratios.get(name, default_ratio), floor, name)
        if result.problem is None:
            notes.append(result.note)
        else:
            failures.append(result.problem)
    if failures:
        raise CheckFailed("; ".join(failures))
    return ", ".join(notes)


def oracle_dtype(device) -> torch.dtype:
    """The exact reference's dtype: fp64 on the CPU, fp32 on a GPU (where fp64 is slow)."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


# --------------------------------------------------------------------------- the reference-check block
def outputs_and_grads(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                      dout: Optional[torch.Tensor] = None, *, dtype: Optional[torch.dtype] = None,
                      names: Optional[Sequence[str]] = None) -> dict:
    """Run ``fn`` on fresh leaf copies of ``inputs`` and backpropagate ``dout``.

    Arguments:
        fn: ``fn(*leaves) -> out``; non-differentiable arguments belong in its closure.
        inputs: floating tensors; each becomes a new leaf (``detach()``, cast to ``dtype``
            when given, ``requires_grad_()``), so the caller's tensors and their ``.grad``
            are left alone.
        dout: the upstream gradient, shaped like ``out`` (cast to ``out``'s dtype); None
            for a scalar ``out``.
        dtype: the dtype to run in; None keeps each input's own.
        names: the result's keys, the output's first, then one per input; default
            ``("out", "grad0", "grad1", ...)``.
    Returns:
        ``{names[0]: out.detach(), names[i + 1]: d out / d inputs[i]}``.
    """
    names = list(names) if names is not None else ["out"] + [f"grad{i}" for i in range(len(inputs))]
    leaves = [(t.detach() if dtype is None else t.detach().to(dtype)).requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, None if dout is None else dout.to(out.dtype))
    return dict(zip(names, [out.detach(), *grads]))


def reference_runs(reference: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                   dout: Optional[torch.Tensor] = None, *, low_dtype: torch.dtype,
                   exact_dtype: torch.dtype = torch.float64,
                   names: Optional[Sequence[str]] = None) -> tuple[dict, dict]:
    """The two reference runs of the rule, with gradients: exact and low precision.

    Arguments:
        reference: ``reference(*leaves, upcast=bool) -> out``, the op's reference.
        inputs, dout, names: as :func:`outputs_and_grads`.
        low_dtype: the fast path's dtype; the low-precision run uses it with ``upcast=False``.
        exact_dtype: the exact run's dtype (see :func:`oracle_dtype`), with ``upcast=True``.
    Returns:
        ``(exact, lowp)``, two dicts as :func:`outputs_and_grads` returns.
    """
    exact = outputs_and_grads(lambda *t: reference(*t, upcast=True), inputs, dout, dtype=exact_dtype, names=names)
    lowp = outputs_and_grads(lambda *t: reference(*t, upcast=False), inputs, dout, dtype=low_dtype, names=names)
    return exact, lowp


def assert_backend_matches(fast, reference, inputs, valid=None, *, dtype: torch.dtype = torch.float32,
                           exact_dtype: torch.dtype = torch.float64, floor: float = 1e-5) -> None:
    """The error-ratio rule for ``fast(*inputs)`` in ``dtype`` (fp32), outputs (2x) and gradients (3x).

    Arguments:
        fast: ``fast(*leaves) -> out``, the path under test.
        reference: ``reference(*leaves, upcast=...)``; gives the ``exact_dtype`` (fp64) oracle
            with ``upcast=True`` and the ``dtype`` baseline with ``upcast=False``, on the same values.
        inputs: floating tensors, on any device; each run gets its own leaf copies.
        valid: bool, broadcastable to the output: the rows to compare. Only those rows get an
            upstream gradient (``randn`` in fp64 from the global generator, zero elsewhere).
        floor: the absolute floor of every comparison.
    Raises:
        CheckFailed (an AssertionError) at the first tensor that breaks the rule, output first.
    """
    exact_in, low_in, fast_in = ([t.detach().to(dt).requires_grad_() for t in inputs]
                                 for dt in (exact_dtype, dtype, dtype))
    exact, lowp, out = reference(*exact_in, upcast=True), reference(*low_in, upcast=False), fast(*fast_in)
    valid = (torch.ones(exact.shape, dtype=torch.bool) if valid is None else valid.expand(exact.shape)).to(exact.device)
    assert_error_ratio(out[valid], exact[valid], lowp[valid], 2.0, floor)
    dout = torch.randn(exact.shape, dtype=torch.float64).to(exact.device) * valid  # drawn on the CPU: same everywhere
    grads = [torch.autograd.grad(y, x, dout.to(y.dtype))
             for y, x in ((out, fast_in), (exact, exact_in), (lowp, low_in))]
    for i, (f, e, l) in enumerate(zip(*grads)):
        assert_error_ratio(f, e, l, 3.0, floor, f"gradient of input {i}")


# --------------------------------------------------------------------------- poisoning
POISON_INT = -7  # no valid id, position or length


def poison_value(dtype: torch.dtype) -> float:
    """What fills memory no kernel may read or leave unwritten: NaN, or -7 for integer dtypes."""
    return float("nan") if dtype.is_floating_point else POISON_INT


def poison_(*tensors: torch.Tensor) -> None:
    """Fill each tensor (an output buffer, before the run) with :func:`poison_value`, in place:
    an element the run forgets to write then shows as NaN (or -7)."""
    for t in tensors:
        t.fill_(poison_value(t.dtype))


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Within the block, ``torch.empty`` and ``torch.empty_like`` return NaN-filled tensors.

    Launchers allocate their outputs with these, so an output element a kernel never writes
    stays NaN instead of holding whatever the allocator left there. Floating dtypes only:
    filling an integer buffer with NaN raises, which names the allocation.
    """
    real_empty_like, real_empty = torch.empty_like, torch.empty
    torch.empty_like = lambda *a, **kw: real_empty_like(*a, **kw).fill_(float("nan"))
    torch.empty = lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan"))
    try:
        yield
    finally:
        torch.empty_like, torch.empty = real_empty_like, real_empty


# Memory layouts a caller can hand an op: the same values, other strides.
STRIDED_KINDS = ("last_dim_stride_2", "interleaved", "fused_slice", "last_two_dims_swapped", "first_two_dims_swapped")


def strided_view(x: torch.Tensor, kind: str) -> torch.Tensor:
    """A view equal to ``x`` (and differentiable back to it) laid out differently in memory.

    The memory between its elements holds NaN (-7 for integers: no valid id or position), so
    a backend that reads the wrong elements (for instance by assuming unit stride) fails
    loudly instead of being slightly off.
    """
    nan = torch.full_like(x, poison_value(x.dtype))
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


# --------------------------------------------------------------------------- inputs
def random_mask(batch: int, seqlen: int, min_len: int = 0, generator=None) -> torch.Tensor:
    """(B, S) bool right-padding mask with random lengths in [min_len, S]; row 0 is full."""
    lengths = torch.randint(min_len, seqlen + 1, (batch,), generator=generator)
    lengths[0] = seqlen
    return torch.arange(seqlen)[None, :] < lengths[:, None]


def cu_seqlens_of(lengths, device=None) -> torch.Tensor:
    """(N + 1,) int32 offsets ``[0, l0, l0 + l1, ...]`` of N sequence lengths (a list or a tensor)."""
    cu = torch.nn.functional.pad(torch.as_tensor(lengths).to(torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    return cu if device is None else cu.to(device)


def backend_device(backend: str) -> str:
    """Where a backend's test inputs live: the kernel backends run on the GPU when there is one;
    the references and the CPU-only torch attention backend stay on the CPU."""
    return "cuda" if backend in ("triton", "cuda") and torch.cuda.is_available() else "cpu"
