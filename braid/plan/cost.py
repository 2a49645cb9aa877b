"""Projected step time of a layout: compute per op class at an achievable fraction of peak, collectives
by algorithm, and which of them overlap compute.

Per micro batch on one GPU (tokens ``mb · seq / cp``):

- compute: forward FLOPs per class ÷ tp (heads, hidden units and experts are split by tp, tokens by cp,
  experts by ep with balanced routing), times 3 for forward + backward, plus the recomputed forward under
  activation checkpointing; each class at ``peak × efficiency[class]``. Element-wise work (norms,
  activations, residuals, the loss) is HBM traffic: 3 passes over the kept activations and the logits
  (twice that without ``parallel.compile``, which fuses them), at ``hbm_bw × efficiency.elementwise``.
- exposed communication:
  * tensor parallel (no async TP in braid): all of it — with sequence parallelism an all-gather and a
    reduce-scatter of the ``[tokens, d]`` activations around each mixer and FFN, forward and backward
    (and again in a recomputed forward); without it, all-reduces;
  * context parallel: the bytes of ``braid.parallel.context`` formulas (the ones the CP tests check);
    ring K/V hops hide behind the layer's attention compute, Ulysses/tree collectives, S2 block fetches
    (the most any rank sends), the KDA/SSM state hand-off and conv halos are exposed;
  * expert parallel: dispatch and combine all-to-alls forward and backward, and again in a recomputed
    forward (top_k copies of ``d`` per token); they hide only behind the shared expert's compute;
  * FSDP2: parameter all-gathers (bf16, forward and again in backward) and gradient reduce-scatters (fp32)
    over dp_shard × cp every micro batch, prefetched behind compute: exposed only where they exceed
    the micro batch's compute, plus the first block's gather;
  * HSDP/DDP replicas: one fp32 all-reduce of the gradient shard per step, behind the last backward.
- pipeline parallel (``parallel.pp``): each pp rank runs its stages' layers (the trainer's split, the head
  on the last stage); the slowest rank sets the pace, its hidden-state sends and receives to the other
  stage ranks are exposed P2P transfers, and the schedule adds its bubble (:mod:`braid.plan.stages`).
Each block also costs a fixed ``BLOCK_OVERHEAD_S`` per micro batch (kernel launches).
Per step: ``grad_accum`` micro batches and the AdamW update (28 bytes of HBM traffic per local parameter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from braid.config import Config
from braid.plan.comm import Links, collective_time, sent_time
from braid.plan.layout import Layout
from braid.plan.memory import Memory, estimate_memory
from braid.plan.model_cost import CLASSES, ModelCost

BF16, FP32 = 2, 4
# Fixed cost of one block per micro batch, forward and backward: kernel launches and synchronisation
# (~40 kernels of ~5 µs); what makes a larger micro batch faster when the FLOPs are the same.
BLOCK_OVERHEAD_S = 2e-4


@dataclass
class Projection:
    layout: Layout
    memory: Memory
    compute_s: float
    exposed_comm_s: float
    bubble_s: float
    step_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    comm_s: dict = field(default_factory=dict)  # total (hidden + exposed) per kind, per step
    collectives: list = field(default_factory=list)  # {op, group, bytes} per step, one rank, summed by op and group

    def to_dict(self) -> dict:
        return {"layout": self.layout.to_dict(), "label": self.layout.label(), "memory": self.memory.to_dict(),
                "compute_s": self.compute_s, "exposed_comm_s": self.exposed_comm_s, "bubble_s": self.bubble_s,
                "step_s": self.step_s, "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu, "mfu": self.mfu,
                "comm_s": self.comm_s, "collectives": self.collectives}


def cp_layer_bytes(cfg: Config, layer, lay: Layout, gpus_per_node: int, dtype_bytes: int = BF16) -> dict:
    """Bytes one rank sends for one layer's sequence mixing under context parallelism (forward + backward),
    by the formulas of ``braid.parallel.context`` (COUNTER labels as keys)."""
    from braid.parallel.mesh import layout_pieces, resolve_layout

    if lay.cp == 1:
        return {}
    seq_layout = resolve_layout(cfg.parallel.cp_layout, cfg.model.pattern)
    n_seg = layout_pieces(seq_layout, lay.cp) // lay.cp
    local = cfg.data.seq_len // lay.cp
    b, docs = lay.micro_batch, cfg.data.document_mask
    # tp splits the heads and channels each cp rank holds
    heads, kv = layer.heads // lay.tp, max(1, layer.kv_heads // lay.tp) if layer.kv_heads else 0
    out: dict = {}
    if heads:
        fox = layer.letter == "F"
        if lay.cp_kind == "s2" and layer.s2 is not None:
            from braid.parallel.context.layout import CPLayout
            from braid.parallel.context.s2_shard import s2_fetch_bytes

            per = s2_fetch_bytes(CPLayout(cfg.data.seq_len, lay.cp, 0, seq_layout), layer.s2, batch=b,
                                 n_heads=heads, n_kv_heads=kv, head_dim=layer.head_dim, dtype_bytes=dtype_bytes,
                                 v_head_dim=layer.v_dim, window=layer.window, fox=fox, doc_bytes=8 if docs else 0)
            worst = max(per, key=lambda r: r["fwd_send"] + r["bwd_send"])
            out.update({"s2.kv": worst["fwd_send"], "s2.dkv": worst["bwd_send"]})
        elif lay.cp_kind in ("ring", "s2"):
            from braid.parallel.context.ring import ring_comm_bytes

            out.update(ring_comm_bytes(lay.cp, b, local, kv, layer.head_dim, layer.v_dim, heads, dtype_bytes,
                                       fox=fox, docs=docs, n_segments=n_seg))
        elif lay.cp_kind == "ulysses":
            from braid.parallel.context.ulysses import ulysses_comm_bytes

            out.update(ulysses_comm_bytes(lay.cp, b, local, kv, layer.head_dim, layer.v_dim, heads, dtype_bytes,
                                          fox=fox, docs=docs))
        elif lay.cp_kind == "tree":
            from braid.parallel.context.tree import tree_comm_bytes

            node = max(1, gpus_per_node // lay.tp)
            out.update(tree_comm_bytes(lay.cp, b, local, layer.head_dim, layer.v_dim, heads, dtype_bytes,
                                       fox=fox, docs=docs, node_size=node if node < lay.cp else None,
                                       n_segments=n_seg))
    if layer.kda_state:
        from braid.parallel.context.state import state_comm_bytes

        tag = "kda.state" if layer.letter in "KD" else "ssm.state"  # D runs the KDA op
        for suffix, nbytes in state_comm_bytes(lay.cp, b, n_seg, layer.kda_state // lay.tp).items():
            out[tag + suffix] = nbytes
    rows, channels = layer.conv_halo
    if rows:
        from braid.parallel.context.halo import halo_comm_bytes
        from braid.parallel.context.layout import CPLayout

        worst = max((halo_comm_bytes(CPLayout(cfg.data.seq_len, lay.cp, r, seq_layout), 0, rows, b,
                                     channels // lay.tp, dtype_bytes) for r in range(lay.cp)),
                    key=lambda d: sum(d.values()))
        out.update(worst)
    return out


def tp_layer_bytes(cfg: Config, cost: ModelCost, lay: Layout, recompute: bool) -> list[tuple[str, float]]:
    """(collective, full-buffer bytes) of one block under tensor parallelism, forward + backward (+ the
    recomputed forward). Sequence parallel: all-gather before and reduce-scatter after the mixer and the
    FFN; without it an all-reduce after each, forward and backward."""
    if lay.tp == 1:
        return []
    nbytes = lay.micro_batch * cfg.data.seq_len / lay.cp * cost.d_model * BF16
    passes = 3 if recompute else 2
    if cfg.parallel.sequence_parallel:
        return [("all_gather", nbytes), ("reduce_scatter", nbytes)] * 2 * passes
    return [("all_reduce", nbytes)] * 2 * passes


def ep_layer_bytes(cfg: Config, cost: ModelCost, layer, lay: Layout) -> float:
    """Bytes one rank holds before each of the four expert all-to-alls of an MoE block (dispatch and
    combine, forward and backward): top_k copies of each local token's ``d`` features, bf16."""
    if lay.ep == 1 or not layer.moe_tokens:
        return 0.0
    return lay.micro_batch * cfg.data.seq_len / lay.cp * layer.moe_tokens * cost.d_model * BF16


def _layer_times(cfg: Config, cost: ModelCost, lay: Layout, links: Links, eff: dict, elem_bw: float,
                 i: int, recompute: bool, cp_cache: dict) -> tuple[float, float, list, float]:
    """(compute s, exposed communication s, notes, zero-bubble excess s) of layer ``i`` for one micro batch;
    notes are ``(kind, op, group, bytes, seconds)`` (``op`` None: seconds only). The excess is the layer's
    ``T_F + T_B − 2·T_W`` (:mod:`braid.plan.stages`): a GEMM's backward splits evenly into input and weight
    gradients, the weightless work's (attention, KDA and scans, element-wise) is all input gradient, so it is
    3 × the weightless forward, plus the recomputed forward under checkpointing."""
    layer, gpu = cost.layers[i], links.gpu
    tokens = lay.micro_batch * cfg.data.seq_len / lay.cp
    tp_span, cp_span, ep_span = lay.tp, lay.cp * lay.tp, lay.ep * lay.tp
    passes = 3.0 + (1.0 if recompute else 0.0)
    t_cls = {c: layer.flops[c] * tokens / lay.tp * passes / (gpu.peak_flops * eff[c]) for c in CLASSES
             if layer.flops[c]}
    elementwise = 3 * 2 * tokens * layer.act_width / lay.tp / elem_bw + BLOCK_OVERHEAD_S
    compute = sum(t_cls.values()) + elementwise
    # forward-pass times: the classes' per pass, the element-wise work's a third (it counts 3 passes)
    forward = sum(t_cls.values()) / passes + elementwise / 3
    weightless = sum(v for c, v in t_cls.items() if c not in ("gemm", "grouped_gemm")) / passes + elementwise / 3
    excess = 3 * weightless + (forward if recompute else 0.0)
    exposed, notes = 0.0, []
    for op, nbytes in tp_layer_bytes(cfg, cost, lay, recompute):
        t = collective_time(op, nbytes, lay.tp, links, tp_span)
        exposed += t
        notes.append(("tp", op, "tp", nbytes * (lay.tp - 1) / lay.tp, t))
    key = (layer.letter, layer.heads, layer.kv_heads, layer.head_dim, layer.v_dim, layer.kda_state,
           layer.conv_halo, layer.window, repr(layer.s2), lay.cp, lay.cp_kind, lay.micro_batch, lay.tp)
    if key not in cp_cache:
        cp_cache[key] = cp_layer_bytes(cfg, layer, lay, links.gpus_per_node)
    sent = cp_cache[key]
    if sent:
        attn_t = sum(v for c, v in t_cls.items() if c.startswith("attention"))
        ring = sum(v for k, v in sent.items() if k.startswith("ring."))
        t_ring = sent_time(ring, 3 * (lay.cp - 1), links, cp_span)
        t_rest = sent_time(sum(sent.values()) - ring, 4, links, cp_span)
        exposed += max(0.0, t_ring - attn_t) + t_rest
        notes += [("cp", k, "cp", v, 0.0) for k, v in sent.items()]
        notes.append(("cp", None, None, 0.0, t_ring + t_rest))
    a2a = ep_layer_bytes(cfg, cost, layer, lay)
    if a2a:
        n_a2a = 6 if recompute else 4  # a recomputed forward dispatches and combines again
        t = n_a2a * collective_time("all_to_all", a2a, lay.ep, links, ep_span)
        shared = t_cls.get("gemm", 0.0) * 0.5  # the dense FLOPs of an MoE block are mostly the shared expert
        exposed += max(0.0, t - shared)
        notes.append(("ep", "all_to_all", "ep", n_a2a * a2a * (lay.ep - 1) / lay.ep, t))
    return compute, exposed, notes, excess


def rank_params(cost: ModelCost, part) -> tuple[float, float]:
    """(all, routed-expert) parameters of a pp rank's part, unsharded."""
    layers = [cost.layers[i] for i in part.layers]
    total = sum(x.params for x in layers) + part.first * cost.first_params + part.last * cost.last_params
    return total, sum(x.expert_params for x in layers)


def stream_bytes(cfg: Config, lay: Layout) -> float:
    """Bytes of the hidden states one micro batch hands to the next stage: ``[b, t + meta, (streams,) d]`` in
    the stream's dtype (bf16 where FSDP2 casts, as on GPU ranks with data or context parallelism)."""
    from braid.models.connections import n_streams

    m = cfg.model
    elements = lay.micro_batch * (cfg.data.seq_len / lay.cp + m.meta_tokens) * max(1, n_streams(m)) * m.d_model
    bf16 = cfg.train.precision != "fp32" and lay.dp * lay.cp > 1
    return elements * (BF16 if bf16 else FP32)


def project(cfg: Config, cost: ModelCost, lay: Layout, links: Links, eff: dict,
            eager_factor: float = 2.0, cp_cache: dict | None = None, overlap_grad_reduce: bool = True) -> Projection:
    """Step time, throughput, MFU and memory of ``lay`` (which must pass ``check_world``). ``cp_cache``:
    CP bytes per layer shape, layer times and the pipeline split, shared between the layouts of one config
    on one GPU kind.
    ``overlap_grad_reduce=False``: the replicas' gradient all-reduce runs after the backward (as in stacks
    without bucketed overlap). Under a pipeline the slowest pp rank sets the pace; its collectives are the
    ones reported, and the memory is the fullest rank's."""
    from braid.parallel.pipeline import stage_sends
    from braid.plan.stages import bubble_seconds, checkpointed, rank_parts

    cp_cache = {} if cp_cache is None else cp_cache
    gpu = links.gpu
    seq = cfg.data.seq_len
    tokens = lay.micro_batch * seq / lay.cp  # per GPU per micro batch
    grad_accum = cfg.train.global_batch_size // (lay.micro_batch * lay.dp)
    elem_bw = gpu.hbm_bw * eff["elementwise"] / (1.0 if cfg.parallel.compile else eager_factor)
    parts = rank_parts(cfg, cost, lay, grad_accum, cp_cache, gpu.hbm_bytes)
    head_t = (2 * cost.d_model * cost.vocab * tokens / lay.tp * 3 / (gpu.peak_flops * eff["gemm"])
              + 3 * 6 * tokens * cost.vocab / lay.tp / elem_bw)
    shard_group = lay.dp_shard * lay.cp
    p2p_t = collective_time("p2p", stream_bytes(cfg, lay), 2, links, lay.world) if lay.pp > 1 else 0.0

    per_rank = []
    for part in parts:
        ckpt = checkpointed(lay, part)
        compute = exposed = excess = 0.0
        notes: list = []
        for i in part.layers:
            key = ("layer", i, i in ckpt, lay.tp, lay.cp, lay.cp_kind, lay.ep, lay.micro_batch)
            if key not in cp_cache:
                cp_cache[key] = _layer_times(cfg, cost, lay, links, eff, elem_bw, i, i in ckpt, cp_cache)
            c, e, n, x = cp_cache[key]
            compute, exposed, excess = compute + c, exposed + e, excess + x
            notes.extend(n)
        if part.last:
            compute += head_t
        total, expert = rank_params(cost, part)
        dense, experts = (total - expert) / lay.tp, expert / (lay.tp * lay.ep)
        fsdp_t = 0.0
        if cfg.parallel.engine == "fsdp" or cfg.parallel.zero_stage == 3:
            for nparams, n in ((dense, shard_group), (experts, shard_group // lay.ep)):
                if n > 1 and nparams:
                    span = lay.dp_shard * lay.cp * lay.tp
                    ag = collective_time("all_gather", nparams * BF16, n, links, span)
                    rs = collective_time("reduce_scatter", nparams * FP32, n, links, span)
                    fsdp_t += 2 * ag + rs
                    notes.append(("fsdp", "all_gather", "dp_shard_cp", 2 * nparams * BF16 * (n - 1) / n, 2 * ag))
                    notes.append(("fsdp", "reduce_scatter", "dp_shard_cp", nparams * FP32 * (n - 1) / n, rs))
            exposed += max(0.0, fsdp_t - compute) + fsdp_t / (2 * len(part.layers) + 1)
        sends = stage_sends(lay.pp_schedule, part.rank, lay.pp, lay.virtual) if lay.pp > 1 else 0
        if sends:
            exposed += sends * p2p_t
            notes.append(("pp", "p2p", "pp", sends * stream_bytes(cfg, lay), sends * p2p_t))
        per_rank.append((compute + exposed, compute, part, dense + experts, notes, excess))
    mb_time, compute, part, local_unsharded, notes, excess = max(per_rank, key=lambda r: r[0])

    comm: dict = {}
    sums: dict = {}
    for kind, op, group, nbytes, seconds in notes:
        comm[kind] = comm.get(kind, 0.0) + seconds * grad_accum
        if op is not None:
            sums[(op, group)] = sums.get((op, group), 0.0) + nbytes * grad_accum

    step_extra = 0.0
    local_params = local_unsharded / (shard_group if cfg.parallel.engine == "fsdp" else 1)
    replicas = lay.dp_replicate if cfg.parallel.engine == "fsdp" else lay.dp
    if replicas > 1 and (cfg.parallel.engine == "fsdp" or cfg.parallel.zero_stage < 3):
        ar = collective_time("all_reduce", local_params * FP32, replicas, links, lay.world)
        comm["dp"] = ar
        group = "dp_replicate" if cfg.parallel.engine == "fsdp" else "dp"
        sums[("all_reduce", group)] = 2 * local_params * FP32 * (replicas - 1) / replicas
        step_extra += max(0.0, ar - compute * 2 / 3) if overlap_grad_reduce else ar
    optimizer = 28 * local_params / (gpu.hbm_bw * eff["elementwise"])
    bubble = bubble_seconds(lay, mb_time, excess)
    step = grad_accum * mb_time + bubble + step_extra + optimizer
    compute_total = grad_accum * compute + optimizer
    tps = cfg.train.global_batch_size * seq / step / lay.world
    mfu = cost.flops_per_token * tps / gpu.peak_flops
    mem = max((estimate_memory(cfg, cost, lay, gpu.hbm_bytes, p) for p in parts), key=lambda m: m.peak_bytes)
    collectives = [{"op": op, "group": group, "bytes": nbytes} for (op, group), nbytes in sums.items()]
    return Projection(lay, mem, compute_total, step - compute_total - bubble, bubble, step, tps, mfu, comm,
                      collectives)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def powers_of_two_upto(n: int) -> list[int]:
    return [2 ** k for k in range(int(math.log2(n)) + 1)] if n >= 1 else []
