"""Whether Transformer Engine can run in this process, and if not, why.

megatron-core detects TE once, when its TE extension module is first imported (every layer-spec module
imports it), with ``try: import transformer_engine ... except ImportError`` (its ``HAVE_TE``). A TE that
is installed but broken raises something else -- e.g. an ``OSError`` for a missing cuBLAS symbol when
the TE core wheel was built against a newer CUDA than torch's -- and that exception would escape
megatron's import, so that even the local spec could not be built. :func:`guard` imports TE first,
catching anything; when the import fails it drops the half-imported modules and marks the package as
absent in ``sys.modules``, so that megatron's own detection sees an ``ImportError`` (``HAVE_TE`` is
False), the local spec keeps working, and :func:`unavailable_reason` can say why TE is missing when a
config asks for it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Optional

_UNSET = object()
_reason: object = _UNSET


def guard() -> Optional[str]:
    """Import Transformer Engine's PyTorch API once (before megatron-core does). Returns None when it
    imported, else the reason it cannot be used; a broken install is then hidden from megatron-core."""
    global _reason
    if _reason is not _UNSET:
        return _reason  # type: ignore[return-value]
    if "transformer_engine" in sys.modules and sys.modules["transformer_engine"] is None:
        _reason = "Transformer Engine is marked absent in this process"
    elif importlib.util.find_spec("transformer_engine") is None:
        _reason = "Transformer Engine is not installed"
    else:
        try:
            importlib.import_module("transformer_engine.pytorch")
            _reason = None
        except Exception as e:  # noqa: BLE001 - any failure means "no TE", with the reason kept
            _reason = f"Transformer Engine is installed but fails to import ({type(e).__name__}: {e})"
            for name in [m for m in sys.modules if m == "transformer_engine" or m.startswith("transformer_engine.")]:
                del sys.modules[name]
            # A None entry makes every later `import transformer_engine` raise ImportError.
            sys.modules["transformer_engine"] = None
    return _reason  # type: ignore[return-value]


def unavailable_reason() -> Optional[str]:
    """None when TE layers can be built here (TE imports and CUDA is present), else why not."""
    import torch

    reason = guard()
    if reason is None and not torch.cuda.is_available():
        reason = "no CUDA device is visible"
    return reason
