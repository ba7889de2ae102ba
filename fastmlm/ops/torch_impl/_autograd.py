"""Autograd inside a custom op's body, for backends whose backward is "recompute, then differentiate".

A ``torch.library.custom_op`` body runs with the autograd dispatch keys excluded (the
op's own registered autograd is the only one), so ``torch.enable_grad()`` alone records
nothing there. :func:`enabled` lifts that exclusion for the block it guards, keeping every
other exclusion (autocast's), so a backend may differentiate through PyTorch's own kernels
(FlexAttention, the reference) while computing its backward. Private API
(``torch._C._ForceDispatchKeyGuard``, present in torch 2.11 to 2.13 at least); where it is
missing the backward raises a RuntimeError saying so, and ``auto`` moves to the next backend.
"""
from __future__ import annotations

import contextlib

import torch

_AUTOGRAD_KEYS = ("AutogradFunctionality", "ADInplaceOrView", "AutogradOther", "AutogradNestedTensor",
                  "AutogradCPU", "AutogradCUDA")


@contextlib.contextmanager
def enabled():
    """Grad mode on and the autograd dispatch keys back in play, for the guarded block."""
    C = torch._C
    guard = getattr(C, "_ForceDispatchKeyGuard", None)
    if guard is None or not hasattr(C, "_dispatch_tls_local_exclude_set"):
        raise RuntimeError(f"torch {torch.__version__} lacks torch._C._ForceDispatchKeyGuard: cannot "
                           "differentiate inside a custom op here")
    exclude = C._dispatch_tls_local_exclude_set()
    for name in _AUTOGRAD_KEYS:
        key = getattr(C.DispatchKey, name, None)
        if key is not None:
            exclude = exclude.remove(key)
    with guard(C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def vjp(fn, inputs, grad_out):
    """Gradients of ``fn(*inputs)`` (one tensor) against ``inputs`` for the upstream ``grad_out``,
    recomputing ``fn`` under autograd (inputs are detached copies; None for an unused input)."""
    with enabled():
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
