"""The ``backend=`` choice shared by the kernel ops (attention, KDA, selective scan, fused ops).

``"torch"``; ``"triton"`` (CUDA tensors, or CPU tensors in Triton's interpreter, for tests: see
``braid.kernels.triton``); ``"auto"`` = Triton on CUDA tensors when Triton imports, torch otherwise.
With a ``signature``, ``"auto"`` also runs the start-up self-check (``braid.kernels.self_check``) the
first time the kernel would serve it, and answers torch for an op that failed it.
"""

from __future__ import annotations

from typing import Optional

import torch

BACKENDS = ("auto", "torch", "triton")


def _auto_triton(x: torch.Tensor) -> bool:
    """Whether ``"auto"`` picks Triton for tensors living where ``x`` lives (a seam for CPU tests)."""
    if not x.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, x: torch.Tensor, op: str = "attention", signature: Optional[tuple] = None) -> str:
    """``"torch"`` or ``"triton"`` for an op called with ``backend`` on tensors living where ``x`` lives.

    Raises ``ValueError`` naming ``op`` and ``backend`` for an unknown name (``op`` defaults to
    ``attention`` for the context-parallel callers, which resolve attention's backend). ``"triton"`` on
    CPU tensors runs the kernels in Triton's interpreter (``braid.kernels.triton.load`` arranges or
    refuses it). ``signature`` (dtype first): see the module docstring.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is unknown (allowed: {', '.join(BACKENDS)})")
    if backend != "auto":
        return backend
    if not _auto_triton(x):
        return "torch"
    return "triton" if signature is None else checked(op, signature, x)


def checked(op: str, signature: tuple, x: torch.Tensor) -> str:
    """``"triton"`` if ``op``'s kernel passed (or now passes) its self-check for ``signature``, else torch."""
    from braid.kernels import self_check

    return "triton" if self_check.triton_ok(op, signature, x.device) else "torch"
