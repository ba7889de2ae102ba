"""Input checks shared by the ops: readable errors at the boundary, no host sync.

Value checks that would need the host to read device memory (index ranges,
``cu_seqlens`` contents) go through ``torch._assert_async``: immediate on the
CPU, a device-side assertion on a GPU, and never a silent wrong answer.
"""
from __future__ import annotations

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
