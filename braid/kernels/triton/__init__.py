"""Triton kernels behind braid.kernels ops (attention, KDA, selective scan, fused ops).

Kernels run compiled on CUDA tensors and in Triton's interpreter on CPU tensors (tests). Triton
chooses between the two once per process, from ``TRITON_INTERPRET``, when ``triton`` and a kernel are
first imported (its own ``triton.language`` helpers are decorated then too, so the two modes cannot be
mixed in one process). ``load(name, interpret=True)`` therefore sets ``TRITON_INTERPRET=1`` itself when
Triton is not imported yet and no GPU is present (so ``backend="triton"`` on CPU tensors just works in a
fresh CPU process), and otherwise raises a one-line error telling how to run it: set
``TRITON_INTERPRET=1`` before anything imports Triton (the test modules of the Triton kernels do this
at import; run them in their own process if something compiled Triton first).
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType


def interpreting() -> bool:
    """Whether Triton kernels of this process run in the interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def load(name: str, interpret: bool) -> ModuleType:
    """Kernel module ``braid.kernels.triton.<name>``, for CPU tensors (``interpret=True``) or CUDA ones.

    Raises ``RuntimeError`` when the requested mode cannot be had in this process any more.
    """
    if interpret and not interpreting():
        import torch

        if "triton" in sys.modules or torch.cuda.is_available():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before Triton is first imported "
                "(Triton is already imported in compiled mode, or a GPU is present); use CUDA tensors or "
                "backend='torch'")
        os.environ["TRITON_INTERPRET"] = "1"  # nothing compiled exists yet: this process interprets
    return importlib.import_module(f"{__name__}.{name}")
