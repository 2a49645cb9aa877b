"""Mixture of experts (FFN letter E): top-k routing, SwiGLU experts, shared experts, load balancing.

Routing (router logits and scores in fp32):
  - ``router="softmax"`` (Mixtral, Qwen3-MoE): ``s = softmax(logits)``.
  - ``router="sigmoid"`` (DeepSeek-V3): ``s = sigmoid(logits)``.
  Experts are chosen by top-k on ``s + b`` (``b`` = ``expert_bias``, aux-loss-free balancing, no
  gradient; zero unless ``bias_update_rate > 0``), optionally limited to the ``topk_groups`` best of
  ``n_groups`` expert groups (group score = sum of its two best ``s + b``). The weights are ``s`` at
  the chosen experts (without ``b``), renormalised to sum to 1 if ``renormalize``, times
  ``routed_scaling``. Shared experts (one SwiGLU) are added ungated.

Dispatch: token–expert pairs are sorted by expert, the tokens gathered, both expert matmuls run as
grouped GEMMs over the stacked expert weights, and the weighted results are scatter-added back.

Capacity (``capacity_factor`` set): each expert keeps at most ``ceil(cf · tokens · k / E)`` pairs of
the micro-batch; the overflow is dropped by LATEST POSITION (ties across rows: higher row index).
Dropping the lowest routing weight instead would let a future token evict an earlier one, leaking
the future into the past; dropping by position keeps every sequence causal. Under context
parallelism ``tokens`` and the order are those of the whole sequences (the ranks exchange per-segment
expert counts), so the same pairs are dropped as at cp = 1.

Auxiliary losses (recorded in ``self.aux_loss``, coefficients applied; None when both are 0):
  - sequence-level balance loss (DeepSeek-V3 eq. 17-20): per sequence of T tokens,
    ``L = α Σ_i f_i P_i``, ``f_i = E/(k·T) · count_i``, ``P_i = (1/T) Σ_t s'_{t,i}`` with
    ``s' = s / Σ_j s_j`` (the softmax scores already sum to 1), i.e.
    ``α · E/(k·T²) · Σ_i count_i · Σ_t s'_{t,i}``; averaged over the sequences of the micro-batch.
    ``count_i`` counts the experts actually chosen (bias and group limit included, before drops).
  - z-loss: ``coef · mean_t logsumexp(logits_t)²``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from braid.config import ModelConfig, validate_moe
from braid.kernels.grouped_gemm import grouped_mm
from braid.models.ffn import SwiGLU, ffn_hidden_size
from braid.models.registry import register_ffn, register_options
from braid.models.tp_plan import Split, TPPlan


@register_options("moe")
@dataclass
class MoEConfig:
    """Mixture of experts (FFN letter E)."""

    n_experts: int = 8
    top_k: int = 2
    expert_hidden: Optional[int] = None  # default: the dense FFN hidden size
    n_shared_experts: int = 0
    shared_hidden: Optional[int] = None  # default: expert_hidden × n_shared_experts
    shared_gate: bool = False  # the shared experts' output × sigmoid(Linear(d, 1)(x)) per token (Qwen2-MoE/Qwen3-Next)
    router: str = "softmax"  # softmax (Mixtral/Qwen3) | sigmoid (DeepSeek-V3)
    renormalize: bool = True  # renormalise the chosen weights to sum to 1
    routed_scaling: float = 1.0
    n_groups: int = 1  # group-limited routing: choose topk_groups of n_groups first
    topk_groups: int = 1
    bias_update_rate: float = 0.0  # aux-loss-free balancing step γ (DeepSeek-V3: 1e-3); 0 = off
    aux_loss_coef: float = 0.0  # sequence-level balance loss α
    z_loss_coef: float = 0.0
    capacity_factor: Optional[float] = None  # None: dropless

    def check(self, m, layers: list, require) -> None:
        """The checks involving several keys (``m``, ``layers``: the model and its E layers, unused)."""
        require(self.top_k <= self.n_experts, "model.moe.top_k", f"in [1, model.moe.n_experts={self.n_experts}]",
                self.top_k)
        require(self.n_experts % self.n_groups == 0, "model.moe.n_groups",
                f"must divide model.moe.n_experts={self.n_experts}", self.n_groups)
        require(self.topk_groups <= self.n_groups, "model.moe.topk_groups",
                f"in [1, model.moe.n_groups={self.n_groups}]", self.topk_groups)
        require(self.top_k <= self.topk_groups * (self.n_experts // self.n_groups), "model.moe.top_k",
                "at most topk_groups × experts per group", self.top_k)
        require(not self.shared_gate or self.n_shared_experts > 0, "model.moe.shared_gate",
                "needs shared experts (model.moe.n_shared_experts > 0)", self.shared_gate)


class LocalExperts(nn.Module):
    """``MoE.experts`` with every expert on this rank: the grouped SwiGLU of the sorted rows."""

    def forward(self, moe: nn.Module, xs: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
        return moe.expert_ffn(xs, group_sizes, moe.gate_up, moe.down)


@register_ffn("E")
class MoE(nn.Module):
    """Routed SwiGLU experts (+ shared experts); ``forward(x [B, T, d]) -> [B, T, d]`` in x's dtype.

    Parameters: ``router.weight [E, d]``, ``gate_up [E, d, 2h]`` (columns ``[:h]`` gate, ``[h:]``
    up), ``down [E, h, d]``, optional ``shared`` (a :class:`SwiGLU`). Buffers: ``expert_bias [E]``
    fp32 (persistent: checkpoints carry it), ``load_counts [E]`` / ``drop_counts [E]`` int64
    (non-persistent: routed / dropped token–expert pairs of training forwards since the last
    :func:`moe_step`).
    """

    # The trainer asks the modules, not the pattern letters, whether to reduce and log aux losses and
    # call moe_step once per optimizer step.
    step_statistics = True

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        m = cfg.moe
        validate_moe(m)
        self.layer_idx = layer_idx
        self.n_experts, self.top_k = m.n_experts, m.top_k
        self.router_kind, self.renormalize, self.routed_scaling = m.router, m.renormalize, m.routed_scaling
        self.n_groups, self.topk_groups = m.n_groups, m.topk_groups
        self.capacity_factor = m.capacity_factor
        self.aux_loss_coef, self.z_loss_coef = m.aux_loss_coef, m.z_loss_coef
        self.bias_update_rate = m.bias_update_rate
        self.init_std = cfg.init_std
        self.n_layers = len(cfg.pattern)
        d = cfg.d_model
        self.hidden = h = m.expert_hidden if m.expert_hidden is not None else ffn_hidden_size(cfg)
        self.router = nn.Linear(d, m.n_experts, bias=False)
        # Stacked expert weights: one grouped GEMM per projection, and a leading expert dim that
        # expert parallelism can shard.
        self.gate_up = nn.Parameter(torch.empty(m.n_experts, d, 2 * h))
        self.down = nn.Parameter(torch.empty(m.n_experts, h, d))
        self.shared = self.shared_gate = None
        if m.n_shared_experts > 0:
            shared_hidden = m.shared_hidden if m.shared_hidden is not None else h * m.n_shared_experts
            self.shared = SwiGLU(dataclasses.replace(cfg, ffn_hidden=shared_hidden), layer_idx)
            if m.shared_gate:
                self.shared_gate = nn.Linear(d, 1, bias=False)
        # Where tensor parallelism hooks its collectives (identities otherwise, no parameters): the
        # experts' input, the routing weights, the shared gate's logit and the packed [gate | up] output
        # (see ``tp_plan``).
        self.expert_input, self.route_weights, self.gate_up_out = nn.Identity(), nn.Identity(), nn.Identity()
        self.shared_gate_out = nn.Identity()
        # Runs the routed experts (no parameters); expert parallelism swaps in its all-to-all one.
        self.dispatch = LocalExperts()
        self.register_buffer("expert_bias", torch.zeros(m.n_experts, dtype=torch.float32))
        self.register_buffer("load_counts", torch.zeros(m.n_experts, dtype=torch.int64), persistent=False)
        self.register_buffer("drop_counts", torch.zeros(m.n_experts, dtype=torch.int64), persistent=False)
        self.aux_loss: Optional[torch.Tensor] = None
        # Context parallelism: each rank holds part of every sequence, so the sequence-level balance
        # statistics and the capacity are those of the whole sequence, through the ranks' view of it
        # that braid.parallel.context.apply_cp sets (a MoESequence: ``meta`` rows replicated on every
        # rank, ``parts`` ranks, ``sum``, ``segments``, ``earlier``).
        self.sequence_parallel: Optional[Any] = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std); residual outputs (expert and shared down) std/sqrt(2·layers); b = 0.

        HybridLM's generic init only reaches nn.Linear, so the stacked experts are set here; the
        router and shared Linears are set too so a standalone module matches one inside HybridLM.
        """
        std = self.init_std
        out_std = std / math.sqrt(2 * self.n_layers)
        nn.init.normal_(self.router.weight, 0.0, std)
        nn.init.normal_(self.gate_up, 0.0, std)
        nn.init.normal_(self.down, 0.0, out_std)
        if self.shared is not None:
            nn.init.normal_(self.shared.gate_proj.weight, 0.0, std)
            nn.init.normal_(self.shared.up_proj.weight, 0.0, std)
            nn.init.normal_(self.shared.down_proj.weight, 0.0, out_std)
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, 0.0, std)
        self.expert_bias.zero_()
        self.load_counts.zero_()
        self.drop_counts.zero_()

    # ------------------------------------------------------------------ routing

    def route(self, x2: torch.Tensor):
        """Router for flattened tokens.

        Args:
            x2: ``[N, d]`` tokens.
        Returns:
            ``(experts [N, k] int64, weights [N, k], scores [N, E], logits [N, E])``, the last three
            in fp32 (fp64 for fp64 input);
            ``experts`` are distinct per token, ``weights`` the routed (renormalised, scaled) gates.
        """
        # fp32 and outside autocast: near-tied logits decide the top-k, and the z-loss squares them.
        acc = torch.promote_types(x2.dtype, torch.float32)  # fp32, or fp64 for gradcheck
        with torch.autocast(x2.device.type, enabled=False):
            logits = F.linear(x2.to(acc), self.router.weight.to(acc))
        scores = logits.softmax(-1) if self.router_kind == "softmax" else logits.sigmoid()
        choice = scores.detach() + self.expert_bias.to(scores.dtype)  # selection only: b gets no gradient
        if self.n_groups > 1:
            choice = self._limit_groups(choice)
        experts = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, experts)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return experts, weights * self.routed_scaling, scores, logits

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Mask (-inf) the experts outside the ``topk_groups`` groups with the best top-2 sums."""
        n = choice.shape[0]
        grouped = choice.view(n, self.n_groups, -1)
        best = min(2, grouped.shape[-1])
        group_score = grouped.topk(best, dim=-1).values.sum(-1)  # [N, G]
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(self.topk_groups, dim=-1).indices, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view(n, -1)

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, T, d]`` → ``[B, T, d]`` (x's dtype); sets ``self.aux_loss``, counts the load."""
        b, t, d = x.shape
        n, k, e = b * t, self.top_k, self.n_experts
        x2 = x.reshape(n, d)
        experts, weights, scores, logits = self.route(x2)
        weights = self.route_weights(weights)
        xe = self.expert_input(x)
        self.aux_loss = self._aux_loss(experts, scores, logits, b, t)

        # Sort the N·k pairs by (expert, position t, row b): position order inside an expert is what
        # the capacity drop needs, and it costs nothing extra for dropless routing.
        token = torch.arange(n, device=x.device)
        priority = (token % t) * b + token // t  # t-major rank of token (row, position)
        flat_expert = experts.reshape(-1)
        key = flat_expert * n + priority.repeat_interleave(k)
        order = torch.argsort(key)
        # scatter_add, not bincount: bincount reads the max back to the host (a sync on CUDA).
        counts = torch.zeros(e, dtype=torch.int64, device=x.device).scatter_add_(
            0, flat_expert, torch.ones_like(flat_expert))
        group_sizes = counts
        if self.capacity_factor is not None:
            rank, tokens = self._rank_in_expert(order, flat_expert, counts, b, t)
            capacity = math.ceil(self.capacity_factor * tokens * k / e)
            order = order[rank < capacity]  # boolean indexing: one host sync, capacity mode only
            group_sizes = torch.zeros_like(counts).scatter_add_(0, flat_expert[order], torch.ones_like(order))
        if self.training:
            with torch.no_grad():
                self.load_counts += counts
                self.drop_counts += counts - group_sizes

        pair_token = order // k
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ys = self.experts(xe.reshape(n, d)[pair_token].to(dtype), group_sizes)
        # Weight and accumulate the k expert outputs of a token in fp32 (the routing weights' dtype).
        ys = ys.to(weights.dtype) * weights.reshape(-1)[order, None]
        out = torch.zeros(n, d, dtype=weights.dtype, device=x.device).index_add_(0, pair_token, ys)
        out = out.view(b, t, d).to(x.dtype)
        if self.shared is not None:
            shared = self.shared(xe)
            if self.shared_gate is not None:  # reads the layer input as the router does (replicated under tp)
                shared = shared * torch.sigmoid(self.shared_gate_out(self.shared_gate(x)))
            out = out + shared.to(x.dtype)
        return out

    def _rank_in_expert(self, order, flat_expert, counts, b: int, t: int) -> tuple[torch.Tensor, int]:
        """Rank of each sorted pair among its expert's pairs in (position, row) order over the whole
        sequences, and their token count. Under context parallelism a pair's rank adds the pairs of
        its expert in the segments before its own on other ranks (meta rows: on every rank, first)."""
        sorted_expert = flat_expert[order]
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=order.device) - starts[sorted_expert]
        sp = self.sequence_parallel
        if sp is None:
            return rank, b * t
        lengths = [sp.meta] + sp.segments(t - sp.meta)  # local piece 0: the meta rows, then text segments
        piece_of = torch.repeat_interleave(torch.arange(len(lengths), device=order.device),
                                           torch.tensor(lengths, device=order.device))
        piece = piece_of[(order // self.top_k) % t]
        per_piece = torch.zeros(len(lengths), self.n_experts, dtype=counts.dtype, device=counts.device)
        per_piece.index_put_((piece, sorted_expert), torch.ones_like(piece), accumulate=True)
        local_before = per_piece.cumsum(0) - per_piece
        global_before = per_piece[:1] + sp.earlier(per_piece[1:], t - sp.meta)
        shift = torch.cat([torch.zeros_like(per_piece[:1]), global_before - local_before[1:]])
        return rank + shift[piece, sorted_expert], b * (sp.meta + (t - sp.meta) * sp.parts)

    def experts(self, xs: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
        """The routed experts on token copies sorted by expert.

        Args:
            xs: ``[P, d]`` the P kept token–expert pairs' inputs, expert-major (compute dtype).
            group_sizes: ``[E]`` int64 pairs per expert, summing to P.
        Returns:
            ``[P, d]`` expert outputs in xs's dtype, same order. ``self.dispatch`` runs them: here, or
            with expert parallelism (``braid.parallel.expert_parallel``) dispatch, local experts, combine.
        """
        return self.dispatch(self, xs, group_sizes)

    def expert_ffn(self, xs: torch.Tensor, sizes: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """SwiGLU of expert-sorted rows ``xs [P, d]`` with expert weights ``w1 [e, d, 2h]``, ``w2 [e, h, d]``
        (``sizes [e]`` rows per expert; expert parallelism passes its local experts)."""
        gate, up = self.gate_up_out(grouped_mm(xs, w1.to(xs.dtype), sizes)).chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, w2.to(xs.dtype), sizes)

    def _aux_loss(self, experts, scores, logits, b: int, t: int) -> Optional[torch.Tensor]:
        """Coefficient-weighted balance loss + z-loss (fp32 scalar), or None when both are off."""
        total = None
        if self.aux_loss_coef > 0:
            e, k = self.n_experts, self.top_k
            chosen = torch.zeros_like(scores).scatter_(1, experts, 1.0).view(b, t, e)
            s_norm = (scores / scores.sum(-1, keepdim=True)).view(b, t, e)
            count, p = chosen.sum(1), s_norm.sum(1)  # [B, E]
            sp = self.sequence_parallel
            if sp is not None:  # the whole sequence's sums: this rank's rows are a part
                count = sp.sum(chosen[:, sp.meta:].sum(1)) + chosen[:, :sp.meta].sum(1)
                p = sp.sum(s_norm[:, sp.meta:].sum(1)) + s_norm[:, :sp.meta].sum(1)
                t = sp.meta + (t - sp.meta) * sp.parts
            per_seq = (count * p).sum(-1) * (e / (k * t * t))
            total = self.aux_loss_coef * per_seq.mean()
        if self.z_loss_coef > 0:
            z = self.z_loss_coef * torch.logsumexp(logits, dim=-1).square().mean()
            total = z if total is None else total + z
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Forward matmul FLOPs per token: router + top_k active experts + shared experts."""
        d = self.router.in_features
        flops = 2 * d * self.n_experts + self.top_k * 2 * 3 * d * self.hidden
        if self.shared is not None:
            flops += self.shared.flops_per_token(seq_len)
        if self.shared_gate is not None:
            flops += 2 * d
        return float(flops)

    def tp_plan(self, tp: int) -> TPPlan:
        """Every expert's SwiGLU hidden units split over tp (Megatron's layout per expert): ``gate_up
        [E, d, 2h]`` column-parallel (``Split(2)``; it packs ``[gate | up]``, so its output is re-laid to
        each rank's gate and up columns), ``down [E, h, d]`` row-parallel, the shared experts as a
        sharded SwiGLU.

        Routing is replicated: the router stays plain and sees the layer input as it is (every tp rank
        routes the same tokens to the same experts, counts the same load and computes the same
        auxiliary loss, so its gradient is already complete); so does the shared gate. The experts' input,
        the routing weights and the shared gate's logit (the last two multiply partial outputs) get
        ``copy_to_region``; the experts' and the shared experts' partial sums are added and reduced once."""
        checks = [(self.hidden, "model.moe.expert_hidden")]
        children = {}
        if self.shared is not None:
            checks.append((self.shared.gate_proj.out_features, "model.moe.shared_hidden"))
            children["shared"] = self.shared.tp_plan(tp)
        plain, copies = ("router.weight",), ("expert_input", "route_weights")
        if self.shared_gate is not None:
            plain, copies = (*plain, "shared_gate.weight"), (*copies, "shared_gate_out")
        return TPPlan(params={"gate_up": Split(2), "down": Split(1)}, checks=tuple(checks), plain=plain,
                      children=children, copy_outputs=copies,
                      packed_outputs={"gate_up_out": (self.hidden, self.hidden)}, replicated_input=True)


def moe_step(model: nn.Module, all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
    """Once per optimizer step: aux-loss-free bias update, reset of the load counts, metrics.

    For every :class:`MoE` in ``model``: sum ``load_counts``/``drop_counts`` over ranks with
    ``all_reduce`` (a callable summing a tensor over the data-parallel ranks, in place or returned;
    one call for all layers), apply ``b += γ · sign(mean_load − load_i)`` (skipped when γ = 0),
    reset the counts.

    Returns:
        ``{"moe/layer{i}/load_max_over_mean": float, "moe/layer{i}/drop_rate": float (capacity
        only), "moe/layer{i}/aux_loss": float (this rank's last forward, when recorded)}``.
    """
    mods = [m for m in model.modules() if isinstance(m, MoE)]
    if not mods:
        return {}
    stats = torch.cat([torch.cat([m.load_counts, m.drop_counts]) for m in mods])
    if all_reduce is not None:
        reduced = all_reduce(stats)
        stats = stats if reduced is None else reduced
    names, values = [], []
    offset = 0
    with torch.no_grad():
        for m in mods:
            e = m.n_experts
            load = stats[offset:offset + e].double()
            dropped = stats[offset + e:offset + 2 * e].double()
            offset += 2 * e
            mean = load.mean()
            prefix = f"moe/layer{m.layer_idx}/"
            names.append(prefix + "load_max_over_mean")
            values.append(load.max() / mean.clamp(min=1e-12))
            if m.capacity_factor is not None:
                names.append(prefix + "drop_rate")
                values.append(dropped.sum() / load.sum().clamp(min=1))
            if m.aux_loss is not None:
                names.append(prefix + "aux_loss")
                values.append(m.aux_loss.detach().double())
            if m.bias_update_rate > 0:
                m.expert_bias += (m.bias_update_rate * torch.sign(mean - load)).to(m.expert_bias.dtype)
            m.load_counts.zero_()
            m.drop_counts.zero_()
    # One device→host copy for all metrics.
    return dict(zip(names, torch.stack(values).tolist()))
