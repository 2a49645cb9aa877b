"""The ``backend=`` choice shared by the kernel ops (attention, KDA, selective scan, fused ops).

``"torch"``; ``"triton"`` (CUDA tensors, or CPU tensors in Triton's interpreter, for tests: see
``braid.kernels.triton``); ``"auto"`` = Triton on CUDA tensors when Triton imports, torch otherwise.
"""

from __future__ import annotations

import torch

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, x: torch.Tensor, op: str = "attention") -> str:
    """``"torch"`` or ``"triton"`` for an op called with ``backend`` on tensors living where ``x`` lives.

    Raises ``ValueError`` naming ``op`` and ``backend`` for an unknown name (``op`` defaults to
    ``attention`` for the context-parallel callers, which resolve attention's backend). ``"triton"`` on
    CPU tensors runs the kernels in Triton's interpreter (``braid.kernels.triton.load`` arranges or
    refuses it).
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is unknown (allowed: {', '.join(BACKENDS)})")
    if backend != "auto":
        return backend
    if not x.is_cuda:
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"
