"""The one fp32-promotion rule of braid, for models and kernels alike.

Precision-sensitive steps (statistics, gates, decays, recurrent states, accumulators) run in fp32,
but never lower a wider input: fp64 stays fp64, so fp64 tests and gradcheck see fp64 arithmetic
end to end (``.float()`` would silently drop them to fp32).
"""

from __future__ import annotations

from typing import Optional, Union

import torch


def compute_dtype(*xs: Optional[Union[torch.Tensor, torch.dtype]]) -> torch.dtype:
    """fp32 promoted with the dtype of every given tensor (or dtype; None is skipped): fp32 for
    bf16/fp16/fp32 inputs, fp64 as soon as one input is fp64."""
    dtype = torch.float32
    for x in xs:
        if x is not None:
            dtype = torch.promote_types(dtype, x if isinstance(x, torch.dtype) else x.dtype)
    return dtype


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in :func:`compute_dtype` ``(x)``: fp32, or kept as it is when already fp32 or fp64."""
    return x.to(compute_dtype(x))
