"""Test tiers: CPU (always), ``interpreter`` (Triton kernels; on the CPU under TRITON_INTERPRET=1), ``gpu``.

CUDA is queried when a test runs, never at collection, so the suite collects anywhere.
"""
import pytest
import torch

from fastmlm.ops import kernels_path


def pytest_report_header(config):
    # Installed (setup.py maps fastmlm_kernels to kernels/) or the source checkout (gpu_check's layout).
    return f"fastmlm_kernels: {kernels_path.describe()}"


def pytest_runtest_setup(item):
    if "gpu" in item.keywords and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (GPU tier: make gpu-check)")
    if "interpreter" in item.keywords and not (kernels_path.triton_interpret() or torch.cuda.is_available()):
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    """Where kernel tests run: the GPU when there is one, else the CPU (under the interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
