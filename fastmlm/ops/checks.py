"""Input checks shared by the ops: readable errors at the boundary, no host sync.

Value checks that would need the host to read device memory (index ranges,
``cu_seqlens`` contents) go through ``torch._assert_async``: immediate on the
CPU, a device-side assertion on a GPU, and never a silent wrong answer.
"""
from __future__ import annotations

import math
import numbers

import torch

try:  # the C helpers of the boundary (fastmlm/ops/_boundary.c; setup.py builds them where a C
    # compiler is found): the Python paths below stand in where they are absent
    from . import _boundary as native_boundary
except ImportError:
    native_boundary = None

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
SHORT_CHECK = 64  # entries up to which a CPU value check reads a Python list rather than a NumPy array


def fail(op: str, msg: str) -> None:
    raise ValueError(f"fastmlm.ops.{op}: {msg}")


def check_tensor(op: str, name: str, t, *, ndim=None, dtypes=None, device=None) -> None:
    """Type, rank, dtype and device of one argument."""
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        fail(op, f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if ndim is not None and t.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        fail(op, f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        fail(op, f"{name} has dtype {t.dtype}; expected one of {[str(d) for d in dtypes]}")
    if device is not None and t.device != device:
        fail(op, f"{name} is on {t.device} but the other inputs are on {device}")


def assert_async(op: str, cond: torch.Tensor, msg: str) -> None:
    """Assert a 0-d boolean tensor without a host synchronisation.

    On the CPU this raises ``RuntimeError(msg)`` at once; on a GPU it is a
    device-side assertion that stops the program at the next synchronisation.
    """
    torch._assert_async(cond, f"fastmlm.ops.{op}: {msg}")


def host_readable(t: torch.Tensor) -> bool:
    """True when ``t``'s values can be read in place at no cost: a plain CPU tensor in eager mode
    (nothing to synchronise with), not a fake or traced one."""
    return type(t) is torch.Tensor and t.is_cpu and not torch.compiler.is_compiling()  # is_cpu: no device object


def native_reads(t: torch.Tensor, dtypes=INDEX_DTYPES) -> bool:
    """Whether the C helper reads ``t``'s values for :func:`check_ids` (``dtypes`` int32/int64) or
    :func:`check_cu_seqlens` (int32): a plain, contiguous, dense CPU tensor in eager mode. Metadata
    only (all of it in ``dispatch.call_key``), so an op may remember it per signature and pass it
    to the check as ``native``."""
    return (native_boundary is not None and host_readable(t) and t.layout == torch.strided
            and t.dtype in dtypes and t.is_contiguous())


def check_cu_seqlens(op: str, cu_seqlens: torch.Tensor, total: int, max_seqlen: int,
                     native: bool | None = None) -> None:
    """``cu_seqlens`` ((B+1,) int32) starts at 0, never decreases, ends at ``total`` and no step
    exceeds ``max_seqlen``; a RuntimeError naming them otherwise.

    On the CPU the values are read in place: by the C helper when contiguous, else in Python up
    to :data:`SHORT_CHECK` entries and with NumPy beyond (a handful of tensor ops would cost more
    than the attention of a short batch); elsewhere one fused device-side assertion, no host sync.
    ``native``: ``native_reads(cu_seqlens, (torch.int32,))``, where the caller remembers it (None: found here).
    """
    if native_boundary is not None and (native or (native is None and native_reads(cu_seqlens, (torch.int32,)))):
        if not native_boundary.offsets_ok(cu_seqlens.data_ptr(), cu_seqlens.numel(), total, max_seqlen):
            raise RuntimeError(f"fastmlm.ops.{op}: {_offsets_message(total, max_seqlen)}")
        return
    if host_readable(cu_seqlens):
        if cu_seqlens.numel() <= SHORT_CHECK:  # a short list: plain Python beats any vectorised call
            c = cu_seqlens.tolist()
            ok, previous = c[0] == 0 and c[-1] == total, 0
            for offset in c:  # a plain loop: a generator's set-up costs more than a batch's few steps
                if not 0 <= offset - previous <= max_seqlen:
                    ok = False
                    break
                previous = offset
        else:
            c = cu_seqlens.numpy().astype("int64")  # int32 differences could wrap
            lengths = c[1:] - c[:-1]
            in_range = not lengths.size or 0 <= lengths.min() <= lengths.max() <= max_seqlen
            ok = c[0] == 0 and c[-1] == total and in_range
        if not ok:
            raise RuntimeError(f"fastmlm.ops.{op}: {_offsets_message(total, max_seqlen)}")
        return
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    assert_async(op, (cu_seqlens[0] == 0) & (cu_seqlens[-1] == total) & (lengths >= 0).all()
                 & (lengths <= max_seqlen).all(), _offsets_message(total, max_seqlen))


def _offsets_message(total: int, max_seqlen: int) -> str:
    """check_cu_seqlens's error (built only where needed: formatting it costs a CPU call ~0.5 µs)."""
    return (f"cu_seqlens must start at 0, be non-decreasing, end at total_tokens={total}, "
            f"and no sequence may exceed max_seqlen={max_seqlen}")


SHORT_IDS = 256  # up to this many CPU entries, check_ids reads a Python set: NumPy's round trip costs more


def check_ids(op: str, t: torch.Tensor, low: int, high: int, msg, allowed: int | None = None,
              native: bool | None = None) -> None:
    """Every entry of the integer tensor ``t`` lies in [low, high) or equals ``allowed``; a
    RuntimeError with ``msg`` (a string, or a function returning it: built only on failure)
    otherwise. On the CPU the values are read in place: a contiguous tensor by the C helper
    (~1 µs for a batch's labels), else a short one as a Python set (several microseconds cheaper
    on tiny inputs than any tensor or NumPy call) and a long one in one NumPy pass; elsewhere one
    device-side assertion, no host sync. ``native``: :func:`native_reads` of ``t``, where the caller
    remembers it (None: found here)."""
    if native_boundary is not None and (native or (native is None and native_reads(t))):  # (it reads t's memory: we hold t)
        if not native_boundary.ids_in_range(t.data_ptr(), t.numel(), t.element_size(), low, high, allowed):
            raise RuntimeError(f"fastmlm.ops.{op}: {msg() if callable(msg) else msg}")
        return
    if host_readable(t):
        if t.numel() <= SHORT_IDS:
            values = set((t if t.dim() == 1 else t.reshape(-1)).tolist())  # (even a no-op view costs ~2 µs)
            values.discard(allowed)
            bad = bool(values) and not (low <= min(values) and max(values) < high)
        else:
            a = t.numpy()
            if allowed is not None:
                a = a[a != allowed]
            bad = bool(a.size) and not low <= a.min() <= a.max() < high
        if bad:
            raise RuntimeError(f"fastmlm.ops.{op}: {msg() if callable(msg) else msg}")
        return
    ok = (t >= low) & (t < high)
    assert_async(op, (ok if allowed is None else ok | (t == allowed)).all(), msg() if callable(msg) else msg)


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the references and torch backends compute in: fp64 stays fp64, the rest use fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_real(op: str, name: str, value, low: float, high: float | None = None) -> float:
    """A finite Python number with ``low <= value`` (and ``value < high`` when given); returns it as a float.

    NaN fails every comparison, so a bare ``value < low`` test would let it through.
    """
    expected = f"a finite number >= {low}" if high is None else f"a finite number in [{low}, {high})"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(op, f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and low <= value and (high is None or value < high)):
        fail(op, f"{name} must be {expected}, got {value!r}")
    return float(value)
