"""Residual connections around a block's sublayers.

A connection owns the pre-norm and decides how a sublayer's output re-enters the residual stream, so
richer schemes replace this module without touching mixers or FFNs. Every connection is called as
``conn(streams, sublayer) -> streams`` where ``sublayer`` maps ``[B, T, d] -> [B, T, d]``:

* ``PreNormResidual``: the stream is the plain ``[B, T, d]`` hidden state, ``h + f(norm(h))``.
* ``NGPTConnection`` (``braid/models/ngpt.py``): the stream is a unit vector per token,
  ``Norm(h + α ⊙ (Norm(f(h)) − h))``.
* ``HyperConnection`` (Zhu et al., "Hyper-Connections"): ``n`` streams ``H`` of shape ``[B, T, n, d]``.
  Per sublayer, ``h = A_mᵀ H`` feeds the sublayer and ``H' = Bᵀ f(norm(h)) + A_rᵀ H``. The dynamic
  variant (DHC) adds per-token terms ``s·tanh(norm(H) W)``; mHC (Xie et al., DeepSeek) projects the
  residual mixing ``A_r`` onto the doubly stochastic matrices with Sinkhorn-Knopp iterations.

``HybridLM`` copies the embedding into the streams (``expand_streams``) before the first block and
merges them (``merge_streams``) before the final norm; blocks see whatever stream shape the
connections use, so the block code has one path.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from braid.config import ModelConfig
from braid.kernels.precision import at_least_fp32
from braid.models.layers import model_norm

# mHC's residual mixing is Sinkhorn(exp(logits)); exp never reaches 0, so the identity (a vertex of the
# Birkhoff polytope) is only a limit. Off-diagonal logits of -8 give A_r = I to ~1e-3 (diagonal 0.999
# for n = 4): streams keep their identity path through depth (0.999^48 ≈ 0.95 over 24 layers) while
# the off-diagonal logits still get gradients ~3e-4 of their free size, which Adam rescales (logits
# still move ~lr per step, so reaching uniform mixing takes ~8/lr consistent steps). Closer to I also
# means slower Sinkhorn convergence of the row sums (see ``sinkhorn``).
# Whatever this value, the model at init equals the residual network up to rounding: all streams are
# equal at init and every column of a doubly stochastic matrix sums to one.
MHC_OFFDIAG_LOGIT = -8.0
# The paper's DHC initialises the dynamic scales s_α, s_β to 0.01 (with W = 0, so tanh(...) = 0).
DYNAMIC_SCALE_INIT = 0.01


class PreNormResidual(nn.Module):
    """``h + f(norm(h))`` on the plain ``[B, T, d]`` stream."""

    def __init__(self, cfg):
        super().__init__()
        self.norm = model_norm(cfg, cfg.d_model)

    def forward(self, h: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """h ``[B, T, d]`` → ``[B, T, d]`` in h's dtype."""
        return h + sublayer(self.norm(h))

    def flops_per_token(self, seq_len: int) -> float:
        """No matmuls: the residual add is not counted."""
        return 0.0


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Project ``exp(logits)`` towards the doubly stochastic matrices (Sinkhorn-Knopp).

    Args:
        logits: ``[..., n, n]``, any float dtype.
        iters: rounds of (row normalisation, column normalisation); mHC uses 20.
    Returns:
        ``[..., n, n]`` fp32 (fp64 for fp64 logits), non-negative. Columns sum to 1 up to rounding
        (the last step normalises them); rows up to the remaining Sinkhorn error, which is slow to
        vanish near a permutation matrix (~1e-3 after 20 iterations for mHC's near-identity init
        with diagonal logits spread by ±0.3), as in mHC itself.
    """
    x = at_least_fp32(logits)
    # Shifting by the max changes nothing after normalisation but keeps exp from overflowing.
    m = torch.exp(x - x.detach().amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(dim=-1, keepdim=True)
        m = m / m.sum(dim=-2, keepdim=True)
    return m


def _no_decay(p: nn.Parameter) -> nn.Parameter:
    """Mark a connection parameter as exempt from weight decay (the optimizer's param_groups honours it):
    decay would pull A_m, A_r, B towards 0, i.e. away from the residual network they start as."""
    p._no_weight_decay = True
    return p


class HyperConnection(nn.Module):
    """Hyper-connection around sublayer number ``sublayer_idx`` (counted over all mixers and FFNs).

    Parameters (n = ``cfg.hc.rate``, d = ``cfg.d_model``):
        alpha_in ``[n]``: A_m, how the sublayer input is read from the streams (init e_{k mod n}).
        alpha_res ``[n, n]``: A_r, stream ``i`` → stream ``j`` weight (init I); with mHC these are the
            logits of the Sinkhorn projection (init 0 on the diagonal, ``MHC_OFFDIAG_LOGIT`` elsewhere).
        beta ``[n]``: B, how much of the sublayer output each stream receives (init 1).
        dynamic only: stream_norm (RMSNorm over d), dyn_proj ``[d, n + 2]`` (columns: A_m, A_r row,
            B; init 0), dyn_scale_alpha and dyn_scale_beta (``[1]``: the scales s_α for A_m and A_r, s_β for B;
            init 0.01).
    With these inits and equal streams the block is exactly ``h + f(norm(h))`` on every stream.
    """

    def __init__(self, cfg: ModelConfig, sublayer_idx: int):
        super().__init__()
        n, d = cfg.hc.rate, cfg.d_model
        if n < 1:
            raise ValueError(f"model.hc.rate must be >= 1, got {n}")
        if cfg.hc.sinkhorn_iters < 0:
            raise ValueError(f"model.hc.sinkhorn_iters must be >= 0, got {cfg.hc.sinkhorn_iters}")
        self.rate, self.sublayer_idx = n, sublayer_idx
        self.dynamic, self.sinkhorn_iters = cfg.hc.dynamic, cfg.hc.sinkhorn_iters
        self.norm = model_norm(cfg, d)  # the sublayer's pre-norm, same name as PreNormResidual's
        self.alpha_in = nn.Parameter(torch.empty(n))
        self.alpha_res = nn.Parameter(torch.empty(n, n))
        self.beta = nn.Parameter(torch.empty(n))
        if self.dynamic:
            self.stream_norm = model_norm(cfg, d)
            self.dyn_proj = nn.Parameter(torch.empty(d, n + 2))
            # Shape [1], not 0-d: ZeRO flattens parameters through byte views that 0-d tensors lack.
            self.dyn_scale_alpha = nn.Parameter(torch.empty(1))
            self.dyn_scale_beta = nn.Parameter(torch.empty(1))
        for p in self.parameters():  # norms included (1-D, exempt anyway): one rule for the whole module
            _no_decay(p)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The init that makes the network the pre-norm residual one (see the class docstring)."""
        n = self.rate
        self.alpha_in.zero_()
        self.alpha_in[self.sublayer_idx % n].fill_(1.0)
        if self.sinkhorn_iters:
            self.alpha_res.fill_(MHC_OFFDIAG_LOGIT)
            self.alpha_res.diagonal().fill_(0.0)
        else:
            self.alpha_res.zero_()
            self.alpha_res.diagonal().fill_(1.0)
        self.beta.fill_(1.0)
        self.norm.reset_parameters()
        if self.dynamic:
            self.stream_norm.reset_parameters()
            self.dyn_proj.zero_()
            self.dyn_scale_alpha.fill_(DYNAMIC_SCALE_INIT)
            self.dyn_scale_beta.fill_(DYNAMIC_SCALE_INIT)

    def coefficients(self, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mixing coefficients for streams ``H`` ``[B, T, n, d]``, in fp32 (fp64 for fp64 H).

        Returns ``(a_in, a_res, b)``: A_m ``[n]``, A_r ``[n, n]`` (doubly stochastic under mHC), B
        ``[n]`` when static; per token ``[B, T, n]``, ``[B, T, n, n]``, ``[B, T, n]`` when dynamic.
        """
        n = self.rate
        a_in, a_res, b = at_least_fp32(self.alpha_in), at_least_fp32(self.alpha_res), at_least_fp32(self.beta)
        if self.dynamic:
            hbar = self.stream_norm(H)
            # Projection in the stream dtype (a matmul like any other), tanh and sums in fp32.
            dyn = torch.tanh(at_least_fp32(torch.matmul(hbar, self.dyn_proj.to(hbar.dtype))))  # [B, T, n, n+2]
            s_a, s_b = at_least_fp32(self.dyn_scale_alpha), at_least_fp32(self.dyn_scale_beta)
            a_in = a_in + s_a * dyn[..., 0]
            a_res = a_res + s_a * dyn[..., 1:n + 1]  # row i: stream i's weights to every output stream
            b = b + s_b * dyn[..., n + 1]
        if self.sinkhorn_iters:
            a_res = sinkhorn(a_res, self.sinkhorn_iters)
        return a_in, a_res, b

    def forward(self, H: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """H ``[B, T, n, d]`` → ``[B, T, n, d]`` in H's dtype.

        The stream mixing runs in fp32: A_r stays within ~1e-3 of I under mHC, a deviation bf16 would
        round away, and each output stream is an n-term sum.
        """
        a_in, a_res, b = self.coefficients(H)
        Hf = at_least_fp32(H)
        # h = A_mᵀ H: a weighted sum over streams (exact at init: one weight 1, the others 0).
        h = torch.matmul(a_in.unsqueeze(-2), Hf).squeeze(-2)  # [B, T, d]
        y = at_least_fp32(sublayer(self.norm(h.to(H.dtype))))
        # H'_j = B_j y + Σ_i A_r[i, j] H_i
        mixed = torch.matmul(a_res.transpose(-1, -2), Hf)
        return (b.unsqueeze(-1) * y.unsqueeze(-2) + mixed).to(H.dtype)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token, 2 per multiply-add, with n = rate, d = d_model.

        Static: 2·n·d (A_mᵀ H) + 2·n²·d (A_rᵀ H) + 2·n·d (Bᵀ y) = 2·n·d·(n + 2).
        Dynamic adds the projection norm(H) W: 2·n·d·(n + 2). Norms, tanh and Sinkhorn (O(n²) per
        token) are not matmuls and are not counted.
        """
        n, d = self.rate, self.norm.weight.shape[0]
        static = 2 * n * d * (n + 2)
        return float(2 * static if self.dynamic else static)


def n_streams(cfg: ModelConfig) -> int:
    """Number of residual streams the blocks carry: 0 for the plain ``[B, T, d]`` stream (residual),
    ``cfg.hc.rate`` for hyper-connections (streams ``[B, T, n, d]``)."""
    if cfg.connection in ("residual", "ngpt"):
        return 0
    if cfg.connection == "hc":
        if cfg.hc.rate < 1:
            raise ValueError(f"model.hc.rate must be >= 1, got {cfg.hc.rate}")
        return cfg.hc.rate
    raise ValueError(f"model.connection must be residual | hc | ngpt, got {cfg.connection!r}")


def make_connection(cfg: ModelConfig, sublayer_idx: int) -> nn.Module:
    """The connection around sublayer ``sublayer_idx`` (0, 1, ... over the model's mixers and FFNs)."""
    if cfg.connection == "ngpt":
        from braid.models.ngpt import NGPTConnection

        return NGPTConnection(cfg, sublayer_idx)
    if n_streams(cfg) == 0:
        return PreNormResidual(cfg)
    return HyperConnection(cfg, sublayer_idx)


def expand_streams(h: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, T, d]`` → ``[B, T, n, d]``: every stream starts as a copy of the embedding (a view)."""
    return h.unsqueeze(-2).expand(*h.shape[:-1], n, h.shape[-1])


def merge_streams(H: torch.Tensor) -> torch.Tensor:
    """``[B, T, n, d]`` → ``[B, T, d]``: the mean of the streams, in H's dtype.

    The paper sums the streams before the final norm. The norm is scale-invariant, so sum and mean
    give the same outputs and gradients except through the norm's eps (a sum of n equal streams has
    n² times the mean square, so eps would weigh n² times less); the mean keeps the model at init
    exactly the pre-norm residual network.
    """
    return H.mean(dim=-2)
