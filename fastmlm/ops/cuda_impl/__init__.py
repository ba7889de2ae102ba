"""The ``cuda`` backends: thin Python drivers over the compiled extension ``fastmlm._C`` (csrc/).

The drivers (attention.py, block_sparse.py, masked_ce.py) allocate outputs and call the registered ops
``torch.ops.fastmlm_C.*``, which check their inputs and launch the kernels. For tests on a
machine without a GPU, :func:`emulation` swaps those ops for the same kernel templates
built for a CPU emulator (csrc/emulate/, see emulate.py): the drivers and kernels then run
on CPU tensors, slowly, through the very code paths the GPU uses.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Optional

import torch

_ERROR: Optional[str] = None
_EMULATOR = None  # set inside `with emulation():`


def why_not_built() -> Optional[str]:
    """Import the extension once; return None when it is loaded, else why it cannot be."""
    global _ERROR
    if _ERROR is None:
        try:
            importlib.import_module("fastmlm._C")
            _ERROR = ""
        except ImportError as exc:
            _ERROR = f"the CUDA extension fastmlm._C is not built ({exc}); reinstall with FASTMLM_BUILD_CUDA=1"
    return _ERROR or None


def kernel_ops():
    """The kernel entry points: ``torch.ops.fastmlm_C``, or the CPU emulator inside :func:`emulation`."""
    return _EMULATOR if _EMULATOR is not None else torch.ops.fastmlm_C


def emulating() -> bool:
    return _EMULATOR is not None


def why_not_device(t: torch.Tensor) -> Optional[str]:
    """Why the cuda backend cannot run on t's device (None: it can)."""
    if emulating():
        return None if t.device.type == "cpu" else "the CPU emulator takes CPU tensors only"
    if t.device.type != "cuda":
        return f"runs on CUDA tensors only, got {t.device.type}"
    error = why_not_built()
    if error:
        return error
    if torch.cuda.get_device_capability(t.device)[0] < 8:
        return "needs an sm_80+ GPU (mma.sync for fp16/bf16)"
    return None


@contextlib.contextmanager
def emulation():
    """Run the cuda backends on CPU tensors through the kernel emulator (tests only)."""
    global _EMULATOR
    from . import emulate

    previous, _EMULATOR = _EMULATOR, emulate.EmulatedOps()
    try:
        yield
    finally:
        _EMULATOR = previous


def contiguous_aligned16(t: torch.Tensor) -> torch.Tensor:
    """t, contiguous and 16-byte aligned, as the kernels' vector loads need (a copy only when not)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()
