"""Muon (momentum + Newton–Schulz orthogonalisation) for weight matrices, AdamW for everything else,
in one ``torch.optim.Optimizer`` so that the trainer, clipping, the LR schedule and DCP checkpoints
see a single optimizer.

Sharded parameters (FSDP2 and/or TP DTensors): momentum and weight decay are elementwise and run on
the local shards; the orthogonalisation is not (it needs every singular direction of the matrix), so
the momentum-corrected update of each matrix is gathered in full (``full_tensor``) on every rank,
orthogonalised there, and each rank keeps the slice of the result its shard holds. Every rank
computes the same full update, so the result does not depend on the layout; the price is one
all-gather per matrix per step and the full matrix in memory on each rank for the iteration.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

# Keller Jordan's quintic: the coefficients maximise the slope at 0 so that 5 steps suffice; the
# singular values land in about [0.7, 1.2] rather than exactly at 1, which does not hurt training.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int, eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately U Vᵀ of ``g = U S Vᵀ`` for the last two dims (leading dims are a batch)."""
    a, b, c = NS_COEFFICIENTS
    shape = g.shape
    x = g.to(dtype).reshape(-1, *shape[-2:])
    wide = x.size(-2) <= x.size(-1)  # iterate on the Gram matrix of the smaller side
    if not wide:
        x = x.mT
    # Frobenius ≥ spectral norm: after this every singular value is ≤ 1, inside the iteration's basin.
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·A + c·A², one rounding in low precision
        x = torch.baddbmm(x, poly, x, beta=a)
    x = x if wide else x.mT
    return x.reshape(shape)


def lr_scale(shape: torch.Size, rule: str) -> float:
    """Per-matrix LR multiplier for ``[out, in]``: ``match_rms_adamw`` (Moonlight) gives the update the RMS
    of a typical AdamW update, 0.2·sqrt(max(out, in)), so AdamW's LR and weight decay carry over;
    ``original`` (Keller Jordan) is sqrt(max(1, out/in))."""
    rows, cols = shape[-2], shape[-1]
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if rule == "original":
        return math.sqrt(max(1.0, rows / cols))
    raise ValueError(f"unknown Muon lr scale rule {rule!r}")


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``ref``: for a DTensor, each rank keeps its own slice (no communication,
    every rank holds the same ``full``)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(ref, DTensor):
        return full
    return distribute_tensor(full, ref.device_mesh, ref.placements, src_data_rank=None)


def set_full(p: torch.Tensor, full: torch.Tensor) -> None:
    """Overwrite parameter ``p`` (plain or DTensor) with the full-size value ``full``."""
    p.copy_(shard_like(full.to(p.dtype), p))


class MuonAdamW(torch.optim.Optimizer):
    """Groups with ``muon=True`` take Muon (``momentum``, ``nesterov``, ``ns_steps``, ``lr_rule``; ``in_out``:
    the matrices are stored ``[in, out]``, which only the ``original`` LR rule cares about), the others
    AdamW (``betas``, ``eps``); ``lr`` and decoupled ``weight_decay`` in both (Muon's decay is lr·wd, not
    scaled by the matrix's LR multiplier, as in Moonlight and ``torch.optim.Muon``)."""

    def __init__(self, groups: Iterable[dict], lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 lr_rule: str = "match_rms_adamw", ns_dtype: torch.dtype = torch.float32):
        defaults = dict(lr=lr, weight_decay=0.0, betas=betas, eps=eps, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, lr_rule=lr_rule, muon=False, in_out=False)
        self.ns_dtype = ns_dtype
        super().__init__(list(groups), defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon if group["muon"] else self._adamw)(group)
        return loss

    def _muon(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(g, 1 - mu)  # an EMA: its scale is the gradient's, which NS discards anyway
            update = g.lerp(buf, mu) if group["nesterov"] else buf
            ortho = newton_schulz(_full(update), group["ns_steps"], dtype=self.ns_dtype)
            p.mul_(1 - lr * wd)
            shape = p.shape[:-2] + p.shape[-2:][::-1] if group["in_out"] else p.shape  # as [out, in]
            p.add_(shard_like(ortho.to(p.dtype), p), alpha=-lr * lr_scale(shape, group["lr_rule"]))

    def _adamw(self, group: dict) -> None:
        lr, wd, (b1, b2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"].item()
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
            p.mul_(1 - lr * wd)
            p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
