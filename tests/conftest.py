"""Test tiers: CPU (always), ``interpreter`` (Triton kernels; on the CPU under TRITON_INTERPRET=1), ``gpu``.

CUDA is queried when a test runs, never at collection, so the suite collects anywhere.
"""
import os

import pytest
import torch


def pytest_runtest_setup(item):
    if "gpu" in item.keywords and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (GPU tier: make gpu-check)")
    if "interpreter" in item.keywords and not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()):
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    """Where kernel tests run: the GPU when there is one, else the CPU (under the interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
