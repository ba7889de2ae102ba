"""The ``cuda`` backends: thin wrappers over the compiled extension ``fastmlm._C`` (csrc/)."""
from __future__ import annotations

import importlib
from typing import Optional

_ERROR: Optional[str] = None


def load() -> Optional[str]:
    """Import the extension once; return None when loaded, else why it is unavailable."""
    global _ERROR
    if _ERROR is None:
        try:
            importlib.import_module("fastmlm._C")
            _ERROR = ""
        except ImportError as exc:
            _ERROR = f"the CUDA extension fastmlm._C is not built ({exc}); reinstall with FASTMLM_BUILD_CUDA=1"
    return _ERROR or None
