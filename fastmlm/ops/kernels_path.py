"""Where the Triton kernels come from: the package ``fastmlm_kernels``, installed or beside a checkout.

The kernels live in the top-level folder ``kernels/``, which must never be importable
as a bare ``kernels`` package (PyPI has one, and Hugging Face transformers looks for
it). Two layouts resolve the same name:

  installed  setup.py maps the package ``fastmlm_kernels`` to ``kernels/``
             (``package_dir``; the editable install in .venv does the same);
  source     only the repository root is on sys.path (``benchmarks/gpu_check.py``
             on a GPU machine, a fresh checkout): :func:`ensure` registers
             ``kernels/`` under the name ``fastmlm_kernels`` on first use.

This module imports only the standard library, so ``kernels/`` may import it (with
``fastmlm.ops.block_layout`` and ``fastmlm.ops.checks``, the other leaf modules)
without an import cycle. It never imports triton itself.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

PACKAGE = "fastmlm_kernels"
SOURCE_DIR = Path(__file__).resolve().parents[2] / "kernels"  # kernels/ beside this checkout
_from_source = False  # set when ensure() registered SOURCE_DIR itself


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def ensure() -> ModuleType:
    """Return the package ``fastmlm_kernels``: the installed one, else ``kernels/`` of this checkout.

    Raises:
        ModuleNotFoundError: neither is there (an installed fastmlm without its kernels).
    """
    try:
        return importlib.import_module(PACKAGE)
    except ModuleNotFoundError as exc:
        if exc.name != PACKAGE:
            raise
    init = SOURCE_DIR / "__init__.py"
    if not init.exists():
        raise ModuleNotFoundError(f"{PACKAGE} is neither installed nor beside this checkout ({SOURCE_DIR})",
                                  name=PACKAGE)
    spec = importlib.util.spec_from_file_location(PACKAGE, init, submodule_search_locations=[str(SOURCE_DIR)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    try:
        spec.loader.exec_module(package)
    except BaseException:
        del sys.modules[PACKAGE]
        raise
    global _from_source
    _from_source = True
    return package


def describe() -> str:
    """Where ``fastmlm_kernels`` resolves here, for reports: "installed: DIR", "source checkout: DIR" or "missing".

    Imports nothing: a package not imported yet is looked up, not loaded.
    """
    module = sys.modules.get(PACKAGE)
    if module is not None:
        return f"{'source checkout' if _from_source else 'installed'}: {Path(module.__file__).parent}"
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.origin:
        return f"installed: {Path(spec.origin).parent}"
    return f"source checkout: {SOURCE_DIR}" if (SOURCE_DIR / "__init__.py").exists() else "missing"


def import_module(path: str) -> ModuleType:
    """``importlib.import_module(path)``, resolving ``fastmlm_kernels`` first when ``path`` lies inside it.

    Arguments:
        path: a dotted module path, e.g. ``"fastmlm_kernels.attention"`` or
            ``"fastmlm.ops.torch_impl.attention"``.
    Returns:
        The module.
    """
    if path == PACKAGE or path.startswith(PACKAGE + "."):
        ensure()
    return importlib.import_module(path)
