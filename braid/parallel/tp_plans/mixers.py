"""Tensor-parallel plans: one function per mixer class and one for SwiGLU.

A plan names the dim of each sharded parameter (all others replicate, see ``tensor_parallel.py``)
and the per-rank values of the module's size attributes. The layout is Megatron's: projections
into heads/channels are split by output rows (dim 0), the output projection by input columns
(dim 1), and per-head / per-channel parameters (decays, gates, depthwise convs) follow their heads.
"""

from __future__ import annotations

import dataclasses
import types

import torch
import torch.nn as nn

from braid.errors import ConfigError
from braid.models.attention import Attention
from braid.models.ffn import SwiGLU
from braid.models.fox import FoX
from braid.models.gated_attention import GatedAttention
from braid.models.hymba import Hymba
from braid.models.kda import KDA
from braid.models.mla import MLA
from braid.parallel.tp_plans import comm


def _divisible(value: int, tp: int, key: str) -> None:
    if value % tp:
        raise ConfigError(f"config key '{key}' = {value} must be divisible by parallel.tp = {tp}")


def _present(module: nn.Module, shard: dict[str, int]) -> dict[str, int]:
    """Drop optional parameters this instance does not have (e.g. FoX without kv_shift)."""
    names = dict(module.named_parameters())
    return {k: v for k, v in shard.items() if k in names}


def _kv_replicas(n_kv: int, tp: int, key: str) -> int:
    """1 when the KV heads split over tp; else the number of ranks sharing each (replicated) KV head."""
    if n_kv % tp == 0:
        return 1
    if tp % n_kv == 0:
        return tp // n_kv
    raise ConfigError(f"config key '{key}' = {n_kv} must be divisible by parallel.tp = {tp} or divide it "
                      f"(KV heads are split or replicated over tp)")


def attention_plan(m: Attention, tp: int):
    """A and G: query, key and value heads split over tp (GQA groups stay on one rank).

    Gated attention's widened ``q_proj`` is laid out per KV group ``[Hkv, G·D | G·E]``, so its
    contiguous row blocks are whole KV groups: each rank gets its heads' queries and gates together.
    QK-norm weights (shared by all heads) replicate.

    tp a multiple of n_kv_heads (Megatron's KV replication): ``k_proj``/``v_proj`` replicate and rank
    r computes with the rows of KV head ``r // (tp / n_kv_heads)`` only (:attr:`ModulePlan.pick`); the
    tp all-reduce of replicated gradients sums the replicas of each KV head. Query heads still split
    (``n_heads`` divisible by tp). Gated attention's ``q_proj`` then holds part of a KV group per rank,
    whose query and gate rows are not contiguous: it replicates too, each rank picking its two row
    ranges (the full q_proj on every rank: memory, not FLOPs, is what this costs).
    """
    from braid.parallel.tensor_parallel import ModulePlan

    rep = _kv_replicas(m.n_kv_heads, tp, "model.n_kv_heads")
    _divisible(m.n_heads, tp, "model.n_heads")
    local_heads = m.n_heads // tp

    def setup(module: Attention, group) -> None:
        if getattr(module, "s2", None) is not None:  # S2 residues follow the global head index
            start = torch.distributed.get_rank(group) * local_heads
            module.s2 = dataclasses.replace(module.s2, head_start=module.s2.head_start + start)

    if rep == 1:
        shard = {"q_proj.weight": 0, "k_proj.weight": 0, "v_proj.weight": 0, "o_proj.weight": 1}
        return ModulePlan(shard=shard, local={"n_heads": local_heads, "n_kv_heads": m.n_kv_heads // tp},
                          setup=setup)
    hd = m.head_dim
    kv_rows = lambda r: [((r // rep) * hd, hd)]  # noqa: E731
    pick = {"k_proj.weight": kv_rows, "v_proj.weight": kv_rows}
    local = {"n_heads": local_heads, "n_kv_heads": 1}
    shard = {"q_proj.weight": 0, "o_proj.weight": 1}
    if isinstance(m, GatedAttention):
        g, e = m.group, m.gate_dim
        gl = g // rep  # this rank's query heads within its KV group

        def q_rows(r: int) -> list:
            base, g0 = (r // rep) * g * (hd + e), (r % rep) * gl
            return [(base + g0 * hd, gl * hd), (base + g * hd + g0 * e, gl * e)]

        del shard["q_proj.weight"]
        pick["q_proj.weight"] = q_rows
        local["group"] = gl
    return ModulePlan(shard=shard, local=local, setup=setup, pick=pick)


def fox_plan(m: FoX, tp: int):
    """F: attention's split plus the per-head forget gate, per-KV-head shift gates and the
    per-channel output gate; the output norm (per head, shared weight) replicates. With KV heads
    replicated, the shift gates replicate too and each rank picks its KV head's row."""
    plan = attention_plan(m, tp)
    plan.shard.update(_present(m, {"fgate_proj.weight": 0, "fgate_proj.bias": 0, "out_gate_proj.weight": 0}))
    shift = _present(m, {"k_shift_proj.weight": 0, "v_shift_proj.weight": 0})
    if not plan.pick:
        plan.shard.update(shift)
    else:
        rep = tp // m.n_kv_heads
        plan.pick.update({name: (lambda r: [(r // rep, 1)]) for name in shift})
    return plan


def kda_plan(m: KDA, tp: int):
    """K: heads split; short convs follow their channels; the low-rank gates' first projections
    (``f_a``, ``g_a``) replicate and their second (``f_b``, ``g_b``) split; ``A_log``, ``dt_bias``
    and ``b_proj`` follow their heads; the output norm's weight (shared by heads) replicates."""
    from braid.parallel.tensor_parallel import ModulePlan

    _divisible(m.n_heads, tp, "model.kda.n_heads")
    shard = {name: 0 for name in (
        "q_proj.weight", "k_proj.weight", "v_proj.weight", "q_conv.conv.weight", "k_conv.conv.weight",
        "v_conv.conv.weight", "f_b.weight", "A_log", "dt_bias", "b_proj.weight", "g_b.weight", "g_b.bias")}
    shard["o_proj.weight"] = 1
    return ModulePlan(shard=shard, local={"n_heads": m.n_heads // tp})


def mla_plan(m: MLA, tp: int):
    """M: heads split (q or q_b rows, kv_b rows, o_proj columns); the latent down-projections, their
    norms and the shared rope key replicate (the rope key's gradient is summed over tp like any
    replicated weight's)."""
    from braid.parallel.tensor_parallel import ModulePlan

    _divisible(m.n_heads, tp, "model.mla.n_heads")
    shard = _present(m, {"q_proj.weight": 0, "q_b_proj.weight": 0, "kv_b_proj.weight": 0})
    shard["o_proj.weight"] = 1
    return ModulePlan(shard=shard, local={"n_heads": m.n_heads // tp})


def _sharded_rms_forward(full_dim: int, group):
    """RMSNorm over a channel dim split over tp: the sum of squares is all-reduced (both ways)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        ss = comm.all_reduce_both(xf.pow(2).sum(-1, keepdim=True), group)
        y = xf * torch.rsqrt(ss / full_dim + self.eps)
        return y.to(x.dtype) * self.weight.to(x.dtype)

    return forward


def hymba_plan(m: Hymba, tp: int):
    """H: attention heads and SSM channels split together (rank r's attention output channels are
    its SSM channels, so the fusion stays local).

    ``in_proj`` packs ``[q | k | v | x | z]``: it is a plain ``Shard(0)`` (rank s stores and
    multiplies the contiguous rows ``[s·N/p, (s+1)·N/p)``), and one all-to-all of its output
    (:class:`comm.PackedColumns`) hands each rank its 1/p of every block. The depthwise conv,
    ``dt_proj``, ``A_log``, ``D`` and the fusion norms follow their channels; ``x_proj`` mixes all
    channels into dt/B/C: split by input columns, its partial sums all-reduced forward (the total
    feeds every channel) and backward (each rank's gradient of the total covers its channels only);
    the dt/B/C norms and QK-norms replicate; the fusion norms' statistic is all-reduced.
    """
    from braid.parallel.tensor_parallel import ModulePlan

    _divisible(m.n_heads, tp, "model.n_heads")
    # Every layer of a KV-sharing group must lay its heads out alike, producer or not.
    replicas = _kv_replicas(m.n_kv_heads, tp, "model.n_kv_heads")
    _divisible(m.ssm_inner, tp, "model.hymba.ssm_inner")
    sizes = [m.q_dim, m.k_dim, m.v_dim, m.ssm_inner, m.ssm_inner]
    _divisible(sum(sizes), tp, "model.n_kv_heads (Hymba's in_proj rows: q + k + v + 2·ssm_inner)")
    shard = {"in_proj.weight": 0, "conv1d.weight": 0, "conv1d.bias": 0, "x_proj.weight": 1,
             "dt_proj.weight": 0, "dt_proj.bias": 0, "A_log": 0, "D": 0, "pre_avg_layernorm1.weight": 0,
             "pre_avg_layernorm2.weight": 0, "out_proj.weight": 1}
    kv_local = m.n_kv_heads // tp if replicas == 1 else 1
    local = {"n_heads": m.n_heads // tp, "n_kv_heads": kv_local, "ssm_inner": m.ssm_inner // tp,
             "q_dim": m.q_dim // tp, "k_dim": m.k_dim * kv_local // m.n_kv_heads,
             "v_dim": m.v_dim * kv_local // m.n_kv_heads}
    full_inner, n_kv = m.ssm_inner, m.n_kv_heads  # read now: setup runs after the sizes turn local

    def wanted_columns(r: int, p: int) -> torch.Tensor:
        # Rank r's 1/p of q, x and z; of k and v its KV heads' columns: its 1/p of them, or with
        # replicas > 1 (tp a multiple of n_kv_heads, Megatron-style) the whole KV head r // replicas,
        # which several ranks then receive (the all-to-all backward sums their gradients).
        cols, start = [], 0
        for i, size in enumerate(sizes):
            if i in (1, 2) and replicas > 1:
                width = size // n_kv
                lo = start + (r // replicas) * width
            else:
                width = size // p
                lo = start + r * width
            cols.append(torch.arange(lo, lo + width))
            start += size
        return torch.cat(cols)

    def setup(module: Hymba, group) -> None:
        p = torch.distributed.get_world_size(group)
        relayout = comm.PackedColumns([wanted_columns(r, p) for r in range(p)], sum(sizes), group)
        module.in_proj.register_forward_hook(lambda mod, inp, out: relayout(out))
        module.x_proj.register_forward_hook(lambda mod, inp, out: comm.all_reduce_both(out, group))
        for norm in (module.pre_avg_layernorm1, module.pre_avg_layernorm2):
            norm.forward = types.MethodType(_sharded_rms_forward(full_inner, group), norm)

    return ModulePlan(shard=shard, local=local, setup=setup)


def swiglu_plan(m: SwiGLU, tp: int):
    """S: gate/up split by hidden units (rows), down by its input columns."""
    from braid.parallel.tensor_parallel import ModulePlan

    _divisible(m.gate_proj.out_features, tp, "model.ffn_hidden")
    return ModulePlan(shard={"gate_proj.weight": 0, "up_proj.weight": 0, "down_proj.weight": 1})


# Exact classes (subclasses share code but not necessarily layouts: each gets its own entry).
MIXER_PLANS = {Attention: attention_plan, GatedAttention: attention_plan, FoX: fox_plan, KDA: kda_plan,
               MLA: mla_plan, Hymba: hymba_plan}


def mixer_plan(mixer: nn.Module, tp: int):
    """The plan of ``mixer`` for ``tp`` ranks; an unknown mixer class is an error naming it."""
    fn = MIXER_PLANS.get(type(mixer))
    if fn is None:
        raise ConfigError(f"config key 'parallel.tp' = {tp}: no tensor-parallel plan for mixer "
                          f"{type(mixer).__name__} (add one to braid/parallel/tp_plans/mixers.py)")
    return fn(mixer, tp)


def ffn_plan(ffn: nn.Module, tp: int):
    if type(ffn) is not SwiGLU:
        raise ConfigError(f"config key 'parallel.tp' = {tp}: no tensor-parallel plan for FFN "
                          f"{type(ffn).__name__}")
    return swiglu_plan(ffn, tp)


__all__ = ["MIXER_PLANS", "mixer_plan", "ffn_plan"]
