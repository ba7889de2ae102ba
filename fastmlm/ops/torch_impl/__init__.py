"""The ``torch`` backends: fast paths built from PyTorch's own kernels."""
