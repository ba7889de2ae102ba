"""Input checks shared by the ops: readable errors at the boundary, no host sync.

Value checks that would need the host to read device memory (index ranges,
``cu_seqlens`` contents) go through ``torch._assert_async``: immediate on the
CPU, a device-side assertion on a GPU, and never a silent wrong answer.
"""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def fail(op: str, msg: str) -> None:
    raise ValueError(f"fastmlm.ops.{op}: {msg}")


def check_tensor(op: str, name: str, t, *, ndim=None, dtypes=None, device=None) -> None:
    """Type, rank, dtype and device of one argument."""
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
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
