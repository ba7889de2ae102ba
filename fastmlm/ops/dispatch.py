"""One dispatcher for every op: pick a backend, or say exactly why none fits.

Each op owns a :class:`Registry` naming its backends. A backend is a module with

    why_not(**inputs) -> str | None   # None: "I can run these inputs"
    forward(...), backward(...)       # same signature for every backend of an op

Backend modules are imported lazily, on the first call that needs them, so
importing fastmlm never imports triton, never loads the CUDA extension and never
queries CUDA. The choice is made per call from the inputs, never at import time.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

BACKENDS = ("reference", "torch", "triton", "cuda")


class BackendUnavailable(ValueError):
    """Raised when the requested backend (or every backend, for ``auto``) cannot run."""


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def import_backend(path: str) -> ModuleType:
    """Import a backend module; from a source checkout, expose ``kernels/`` as ``fastmlm_kernels``."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name != "fastmlm_kernels":
            raise
    init = Path(__file__).resolve().parents[2] / "kernels" / "__init__.py"
    if not init.exists():
        raise ModuleNotFoundError("fastmlm_kernels is neither installed nor beside this checkout")
    spec = importlib.util.spec_from_file_location("fastmlm_kernels", init, submodule_search_locations=[str(init.parent)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["fastmlm_kernels"] = package
    spec.loader.exec_module(package)
    return importlib.import_module(path)


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
            self._loaded[name] = import_backend(self.modules[name])
        return self._loaded[name]

    def _reason(self, name: str, inputs: dict) -> str | None:
        if name == "reference":  # the oracle takes every input that passed validation
            return None
        if name not in self.modules:
            return "not implemented for this op"
        try:
            mod = self.module(name)
        except Exception as exc:  # missing triton, extension not built, ...
            return f"cannot be imported ({type(exc).__name__}: {exc})"
        return mod.why_not(**inputs)

    def select(self, backend: str, device_type: str, inputs: dict) -> str:
        """Return the backend name to run, or raise listing every reason."""
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
            why = self._reason(name, inputs)
            if why is None:
                return name
            reasons.append(f"  {name}: {why}")
        head = "no backend can" if backend == "auto" else f"backend {backend!r} cannot"
        raise BackendUnavailable(f"fastmlm.ops.{self.op}: {head} run these inputs:\n" + "\n".join(reasons))
