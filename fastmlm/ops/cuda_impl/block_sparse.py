"""``cuda`` backend of block-sparse attention: not written in CUDA C++ (yet).

There is no csrc/ kernel for block-sparse attention; the triton backend (kernels/) is the
fast path. This module exists so the dispatcher can say so plainly.
"""
from __future__ import annotations

from typing import Optional


def why_not(inputs) -> Optional[str]:
    """Always a reason: there is no kernel to run."""
    return "no CUDA C++ kernel for block-sparse attention; use the triton backend"
