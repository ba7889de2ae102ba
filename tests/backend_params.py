"""The backend parameters the op tests share: a backend name, where it runs, and how.

  torch               the CPU path (ATen CPU flash attention)
  torch-cuda-emulated the torch backend's CUDA paths on CPU tensors, kernels replaced by reference
                      math (fastmlm.ops.torch_impl.emulate): CPU tier
  torch-cuda          the same paths on a GPU with the real kernels (varlen_attn, SDPA, FlexAttention): GPU tier
  triton / cuda       the kernels (interpreter / GPU tier)
  cuda-emulated       the cuda backend's kernels on CPU tensors, in the CPU kernel emulator
                      (fastmlm.ops.cuda_impl.emulation, csrc/emulate/): CPU tier, skipped without g++
"""
from __future__ import annotations

import contextlib

import pytest

from fastmlm.testing import backend_device

PARAMS = {
    "torch": pytest.param("torch", id="torch"),
    "torch-cuda-emulated": pytest.param("torch-cuda-emulated", id="torch-cuda-emulated"),
    "torch-cuda": pytest.param("torch-cuda", id="torch-cuda", marks=pytest.mark.gpu),
    "triton": pytest.param("triton", id="triton", marks=pytest.mark.interpreter),
    "cuda": pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
    "cuda-emulated": pytest.param("cuda-emulated", id="cuda-emulated"),
}


def params(*names):
    return [PARAMS[n] for n in names]


def split(param: str) -> tuple[str, str]:
    """("backend name", "device") of a test parameter."""
    if param == "torch-cuda":
        return "torch", "cuda"
    if param == "torch-cuda-emulated":
        return "torch", "cpu"
    if param == "cuda-emulated":
        return "cuda", "cpu"
    return param, backend_device(param)


@contextlib.contextmanager
def running(param: str):
    """Yield (backend, device) with whatever the parameter needs around the call (the emulation)."""
    backend, device = split(param)
    if param == "torch-cuda-emulated":
        from fastmlm.ops.torch_impl.emulate import emulation

        with emulation():
            yield backend, device
    elif param == "cuda-emulated":
        from fastmlm.ops import cuda_impl
        from fastmlm.ops.cuda_impl import emulate

        why = emulate.unavailable()
        if why:
            pytest.skip(f"kernel emulator unavailable: {why}")
        with cuda_impl.emulation():
            yield backend, device
    else:
        yield backend, device
