"""One dispatcher for every op: pick a backend, or say exactly why none fits.

Each op owns a :class:`Registry` naming its backends. A backend is a module with

    why_not(inputs) -> str | None      # None: "I can run these inputs"
    forward(inputs) -> outputs
    backward(inputs, *saved_outputs, upstream_gradient) -> gradients

where ``inputs`` is the op's one named bundle, the same for every backend of the op:
``AttentionInputs`` / ``BlockSparseInputs`` (``forward -> (out, lse)``,
``backward(inputs, out, lse, dout) -> (dq, dk, dv)``) and ``MaskedCEInputs``
(``forward -> (loss, lse, correct)`` per row, ``backward(inputs, lse, grad_rows) ->
(d_hidden, d_weight, d_bias)``). The custom ops build the bundle from their flat schemas.

Backend modules are imported lazily, on the first call that needs them, so
importing fastmlm never imports triton, never loads the CUDA extension and never
queries CUDA. The choice is made per call from the inputs, never at import time.
The Triton backends live in the package ``fastmlm_kernels`` (see kernels_path.py).
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional

from . import kernels_path

BACKENDS = ("reference", "torch", "triton", "cuda")


class BackendUnavailable(ValueError):
    """Raised when the requested backend (or every backend, for ``auto``) cannot run."""


class Registry:
    """The backends of one op, by name, as importable module paths.

    The reference backend lives in the op's own file and is always available.
    """

    def __init__(self, op: str, modules: dict[str, str]):
        unknown = set(modules) - set(BACKENDS)
        if unknown:
            raise ValueError(f"unknown backend names {sorted(unknown)}")
        self.op = op
        self.modules = modules
        self._loaded: dict[str, ModuleType] = {}

    def module(self, name: str) -> ModuleType:
        if name not in self._loaded:
            self._loaded[name] = kernels_path.import_module(self.modules[name])
        return self._loaded[name]

    def why_not(self, name: str, inputs) -> Optional[str]:
        """Why backend ``name`` cannot run ``inputs`` (the op's bundle); None when it can."""
        if name == "reference":  # the oracle takes every input that passed validation
            return None
        if name not in self.modules:
            return "not implemented for this op"
        try:
            mod = self.module(name)
        except Exception as exc:  # missing triton, extension not built, ...
            return f"cannot be imported ({type(exc).__name__}: {exc})"
        return mod.why_not(inputs)

    def select(self, backend: str, device_type: str, inputs) -> str:
        """Return the backend name to run ``inputs`` (the op's bundle), or raise listing every reason."""
        if backend == "auto":
            # The Triton interpreter is a debugging aid, far too slow to pick on
            # its own: on the CPU, auto stays with the torch backends.
            order = ("cuda", "triton", "torch", "reference") if device_type == "cuda" else ("torch", "reference")
        elif backend in BACKENDS:
            order = (backend,)
        else:
            raise ValueError(f"fastmlm.ops.{self.op}: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        reasons = []
        for name in order:
            why = self.why_not(name, inputs)
            if why is None:
                return name
            reasons.append(f"  {name}: {why}")
        head = "no backend can" if backend == "auto" else f"backend {backend!r} cannot"
        raise BackendUnavailable(f"fastmlm.ops.{self.op}: {head} run these inputs:\n" + "\n".join(reasons))
