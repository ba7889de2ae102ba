"""Shared test tools, kept for the tests' imports: they live in :mod:`fastmlm.testing` (the
error-ratio rule of ARCHITECTURE.md, the reference-check block, poisoning, random batches)."""
from __future__ import annotations

from fastmlm.testing import (STRIDED_KINDS, assert_backend_matches, assert_error_ratio, backend_device,  # noqa: F401
                             cu_seqlens_of, random_mask, strided_view)
from fastmlm.testing import max_abs_err as max_err  # noqa: F401
