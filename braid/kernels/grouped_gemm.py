"""Grouped GEMM: rows of ``x`` sorted by group, each group multiplied by its own weight matrix.

This is the expert computation of a mixture-of-experts layer after the tokens are permuted so that
each expert's tokens are contiguous. On CUDA in bf16 it is one ``torch._grouped_mm`` call (CUTLASS
grouped GEMM, no host sync); elsewhere a loop over the groups — a loop over experts, never tokens.
"""

from __future__ import annotations

import torch


def grouped_mm(x_sorted: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """``out[rows of group g] = x_sorted[rows of group g] @ w[g]``.

    Args:
        x_sorted: ``[N, K]`` rows grouped by group: the first ``group_sizes[0]`` rows belong to
            group 0, the next ``group_sizes[1]`` to group 1, ... (any float dtype).
        w: ``[G, K, M]`` one weight matrix per group, same dtype as ``x_sorted``.
        group_sizes: ``[G]`` integer rows per group (may contain zeros), summing to ``N``.
    Returns:
        ``[N, M]`` in the dtype of ``x_sorted``. Differentiable in ``x_sorted`` and ``w``.
    """
    if x_sorted.dim() != 2 or w.dim() != 3 or x_sorted.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_mm: x {tuple(x_sorted.shape)} and w {tuple(w.shape)} do not fit")
    if group_sizes.shape != (w.shape[0],):
        raise ValueError(f"grouped_mm: group_sizes {tuple(group_sizes.shape)} must be [{w.shape[0]}]")
    if _native_applicable(x_sorted, w) or _shapes_only(x_sorted):
        return grouped_mm_native(x_sorted, w, group_sizes)
    return grouped_mm_loop(x_sorted, w, group_sizes)


def _shapes_only(x: torch.Tensor) -> bool:
    """A fake tensor (``python -m braid.rehearse``): the loop cannot read its group sizes, the native
    op's shape rule needs none."""
    from torch._subclasses.fake_tensor import is_fake

    return hasattr(torch, "_grouped_mm") and is_fake(x)


def _native_applicable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """``torch._grouped_mm`` needs CUDA, bf16 operands and rows aligned to 16 bytes (8 bf16)."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and w.dtype == torch.bfloat16
        and x.shape[1] % 8 == 0
        and w.shape[2] % 8 == 0
    )


def grouped_mm_native(x_sorted: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm`` with cumulative int32 offsets (stay on device: no host sync).

    Same contract as :func:`grouped_mm`; the caller checks applicability.
    """
    offs = torch.cumsum(group_sizes, 0).to(torch.int32)
    out = torch.ops.aten._grouped_mm(x_sorted.contiguous(), w.contiguous(), offs)
    # The native backward rejects non-contiguous incoming gradients (e.g. the expanded gradient
    # of a .sum()); route the gradient through a contiguous copy.
    return _ContiguousGrad.apply(out)


def grouped_mm_loop(x_sorted: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """Reference/fallback: one matmul per group (syncs once to read ``group_sizes``).

    Same contract as :func:`grouped_mm`. Empty groups still join the graph, so every ``w[g]`` gets a
    (zero) gradient — DDP then sees no unused parameters.
    """
    chunks = torch.split(x_sorted, group_sizes.tolist(), dim=0)
    return torch.cat([chunk @ w[g] for g, chunk in enumerate(chunks)], dim=0)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()
