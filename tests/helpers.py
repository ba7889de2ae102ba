"""Shared test tools, kept for the tests' imports: they live in :mod:`fastmlm.testing` (the
error-ratio rule of ARCHITECTURE.md, the reference-check block, poisoning, random batches)."""
from __future__ import annotations

from fastmlm.testing import (STRIDED_KINDS, assert_backend_matches, assert_error_ratio, backend_device,  # noqa: F401
                             cu_seqlens_of, random_mask, strided_view)
from fastmlm.testing import max_abs_err as max_err  # noqa: F401


def loss_route(monkeypatch, route: str) -> None:
    """Pin the CPU torch backend's route for masked_lm_loss's reduced losses: "fused" (gradients
    computed in the forward, waiting on the op's autograd node) or "native" (autograd records
    the forward itself; small calls only, see torch_impl.masked_ce.differentiable). The memo of
    signatures is emptied now and when the test ends, so that no remembered plan keeps the other."""
    import sys

    import fastmlm.ops  # noqa: F401
    from fastmlm.ops.torch_impl import masked_ce as torch_backend

    registry = sys.modules["fastmlm.ops.masked_ce"].REGISTRY
    monkeypatch.setattr(torch_backend, "NATIVE_LIMIT", -1 if route == "fused" else 1 << 30)
    registry.forget_failures()
    monkeypatch.setattr(registry, "_memo", {})  # restored (with its old plans) when the test ends
