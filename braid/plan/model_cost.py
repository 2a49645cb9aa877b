"""What one token costs in a model config: forward FLOPs by op class, parameters by kind, and the bytes of
activations one layer keeps for backward. Everything is read off the model built on the meta device, so
the FLOPs are the same numbers ``braid.params`` prints (their sum over classes equals
``model_stats(...).flops_per_token / 3``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from braid.config import ModelConfig

ATTENTION_LETTERS = set("AGF")
# Op classes the efficiency table has a factor for (``bench/results/efficiency.json``).
CLASSES = ("gemm", "grouped_gemm", "attention", "attention_fox", "attention_sparse", "kda", "ssm_scan")


@dataclass
class LayerCost:
    letter: str  # mixer letter
    ffn: str  # ffn letter
    flops: dict[str, float]  # forward FLOPs per token by class
    params: int  # parameters of the block (mixer + ffn + norms + connections)
    expert_params: int  # routed-expert parameters among them
    act_width: float  # bf16 elements per token kept for backward, sharded by tp (sequence parallel included)
    norm_width: float  # of which norm inputs (not sharded by tp without sequence parallel)
    moe_tokens: int  # top_k of an MoE FFN (tokens sent per token by expert dispatch), else 0
    heads: int  # attention heads of the mixer (0: none)
    kv_heads: int
    head_dim: int
    v_dim: int
    kda_state: int  # fp32 elements of one KDA/SSM segment map per row (state passing), else 0
    conv_halo: tuple = (0, 0)  # (rows, channels) of the short-conv halo, else (0, 0)
    s2: object = None  # the mixer's S2Pattern (block-sparse attention), else None
    window: object = None  # sliding window of the attention, else None


@dataclass
class ModelCost:
    layers: list[LayerCost]
    params: int
    embedding_params: int
    head_params: int  # LM head (0 when tied)
    expert_params: int
    d_model: int
    vocab: int
    flops_per_token: float  # training FLOPs per token (3 × forward), braid.params' figure
    fwd_flops: dict[str, float] = field(default_factory=dict)  # forward FLOPs per token by class
    first_params: int = 0  # outside the blocks, on a pipeline's first stage: embedding, meta tokens
    last_params: int = 0  # outside the blocks, on its last stage: final norm, LM head, logit scales
    fixed_cuts: frozenset = frozenset()  # pipeline cuts that would split shared state (pipeline.shared_state_cuts)

    @property
    def largest_layer_params(self) -> int:
        return max(layer.params for layer in self.layers)


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _gemm_flops(module: nn.Module) -> float:
    return 2.0 * sum(m.weight.numel() for m in _linears(module))


def _stored_width(module: nn.Module, d_model: int) -> float:
    """bf16 elements per token a mixer or dense FFN keeps for backward, counted tensor by tensor as
    Korthikanti et al. (2022) do for a GPT block: each linear keeps its input (the inputs read from the
    block's normed input x counted once), each linear output that feeds a non-linear op (attention, an
    activation, a gate, a convolution) is kept by that op; outputs of width d_model go to the residual."""
    lins = _linears(module)
    # A linear back to d_model (o_proj, down_proj) reads an inner tensor; the others of width d_model read x.
    reads_x = [m.in_features == d_model and m.out_features != d_model for m in lins]
    width = float(d_model) if any(reads_x) else 0.0
    for m, from_x in zip(lins, reads_x):
        if not from_x:
            width += m.in_features
        if m.out_features != d_model:
            width += m.out_features
    return width


def _chunked_delta_rule(h: int, dk: int, dv: int, c: int) -> float:
    """fp32 elements per token the Triton chunked delta rule keeps for backward, per its autograd functions:
    the intra-chunk transform's q, k, v, Γ, β, (I + A)⁻¹, w and u, and the state recurrence's q̃, P, k̃,
    chunk-end states and decays (``h`` heads of ``dk`` × ``dv``, chunks of ``c``)."""
    return h * (6 * dk + 2 * dv + 2 * c + dk * dv / c + 1 + dk / c)


def delta_rule_width(mixer: nn.Module, letter: str, d_model: int) -> float:
    """bf16 elements per token a KDA (``K``) or Gated DeltaNet (``D``) mixer keeps for backward on a GPU,
    tensor by tensor (fp32 ones count twice; ``tests/test_plan_activations.py`` measures the Triton path in
    the interpreter against it): its input; each short conv's input and pre-SiLU output; the fp32
    l2-normalised q and k, decay and β gates; the delta rule's own tensors; the gated output norm's fp32
    intermediates (4 for KDA's sigmoid gate, 5 for GDN's SiLU); the output projection's input."""
    if letter == "K":
        h, hd = mixer.n_heads, mixer.head_dim
        inner = h * hd
        bf16 = d_model + 6 * inner + 2 * hd + inner  # + the low-rank gates' inner inputs (f_a, g_a outputs)
        fp32 = 8 * inner + _chunked_delta_rule(h, hd, hd, mixer.chunk_size) + 4 * h  # + per-head norms, β
        return bf16 + 2 * fp32
    hk, hv, dk, dv = mixer.n_k_heads, mixer.n_v_heads, mixer.head_k_dim, mixer.head_v_dim
    conv = 2 * hk * dk + hv * dv
    bf16 = d_model + 2 * conv + hv * dv
    fp32 = 2 * hk * (dk + 1) + _chunked_delta_rule(hv, dk, dv, mixer.chunk_size) + 4 * hv + 5 * hv * dv
    return bf16 + 2 * fp32


def layer_costs(cfg: ModelConfig, seq_len: int) -> ModelCost:
    """The per-layer costs of a resolved model config (vocab set) at ``seq_len``."""
    from braid.models.hybrid import HybridLM
    from braid.models.moe import MoE
    from braid.models.stats import model_stats

    with torch.device("meta"):
        model = HybridLM(cfg)
    d = cfg.d_model
    out, total_fwd = [], {c: 0.0 for c in CLASSES}
    for i, layer in enumerate(model.layers):
        letter, ffn_letter = cfg.pattern[i], _ffn_letter(cfg, i)
        flops = {c: 0.0 for c in CLASSES}
        mixer = layer.mixer
        mix_total = mixer.flops_per_token(seq_len)
        gemm = _gemm_flops(mixer)
        flops["gemm"] += gemm
        rest = mix_total - gemm
        width = _stored_width(mixer, d)
        heads = kv_heads = head_dim = v_dim = state = 0
        halo = (0, 0)
        if letter in ATTENTION_LETTERS or letter == "M":
            sparse = getattr(mixer, "s2", None) is not None or getattr(mixer, "window", None) is not None
            kind = "attention_fox" if letter == "F" else "attention_sparse" if sparse else "attention"
            flops[kind] += rest
            heads = mixer.n_heads
            if letter == "M":
                kv_heads, head_dim, v_dim = mixer.n_heads, mixer.qk_dim, mixer.v_dim
            else:
                kv_heads, head_dim, v_dim = mixer.n_kv_heads, mixer.head_dim, mixer.head_dim
        elif letter == "K":
            flops["kda"] += rest
            inner = mixer.n_heads * mixer.head_dim
            width = delta_rule_width(mixer, letter, d)
            state = mixer.n_heads * mixer.head_dim * 2 * mixer.head_dim
            halo = (mixer.conv_size - 1, 3 * inner)
        elif letter == "D":  # Gated DeltaNet: KDA's op on value heads (q, k repeated per group)
            flops["kda"] += rest
            hv, dk, dv = mixer.n_v_heads, mixer.head_k_dim, mixer.head_v_dim
            width = delta_rule_width(mixer, letter, d)
            state = hv * dk * 2 * dv
            halo = (mixer.conv_size - 1, 2 * mixer.n_k_heads * dk + hv * dv)
        elif letter == "H":
            from braid.models.attention import mean_visible_keys

            visible = mean_visible_keys(seq_len, mixer.window, mixer.sink_default)
            attn = 2 * mixer.n_heads * (mixer.head_dim + mixer.v_head_dim) * visible
            flops["attention_sparse" if mixer.window else "attention"] += attn
            flops["ssm_scan"] += rest - attn
            width += 2 * mixer.ssm_inner  # conv output and the scan's gated output
            heads, kv_heads, head_dim, v_dim = mixer.n_heads, mixer.n_kv_heads, mixer.head_dim, mixer.v_head_dim
            state = 2 * mixer.ssm_inner * mixer.d_state
            halo = (mixer.d_conv - 1, mixer.ssm_inner)
        else:
            flops["gemm"] += rest
        ffn, top_k, experts = layer.ffn, 0, 0
        if isinstance(ffn, MoE):
            top_k = ffn.top_k
            experts = ffn.gate_up.numel() + ffn.down.numel()
            routed = ffn.top_k * 2 * 3 * d * ffn.hidden
            flops["grouped_gemm"] += routed
            flops["gemm"] += ffn.flops_per_token(seq_len) - routed
            # router logits (fp32, twice bf16) and per routed copy: its input, gate, up and gated product
            width += 2 * ffn.n_experts + top_k * (d + 3 * ffn.hidden)
            if ffn.shared is not None:
                width += _stored_width(ffn.shared, d)
        elif hasattr(ffn, "flops_per_token"):
            flops["gemm"] += ffn.flops_per_token(seq_len)
            width += _stored_width(ffn, d) + (ffn.gate_proj.out_features if hasattr(ffn, "gate_proj") else 0)
        for conn in (getattr(layer, "mixer_conn", None), getattr(layer, "ffn_conn", None)):
            if conn is not None and hasattr(conn, "flops_per_token"):
                flops["gemm"] += conn.flops_per_token(seq_len)
        norms = 2.0 * d  # the two pre-norm inputs
        params = sum(p.numel() for p in layer.parameters())
        out.append(LayerCost(letter, ffn_letter, flops, params, experts, width + norms, norms, top_k, heads,
                             kv_heads, head_dim, v_dim, state, halo, getattr(mixer, "s2", None),
                             getattr(mixer, "window", None)))
        for c in CLASSES:
            total_fwd[c] += flops[c]
    total_fwd["gemm"] += 2 * d * cfg.vocab_size  # LM head
    from braid.parallel.pipeline import shared_state_cuts

    stats = model_stats(cfg, seq_len)
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    first = model.embed.weight.numel() + (model.meta.numel() if model.meta is not None else 0)
    last = stats.params - first - sum(x.params for x in out)
    return ModelCost(out, stats.params, model.embed.weight.numel(), head, sum(x.expert_params for x in out), d,
                     cfg.vocab_size, stats.flops_per_token, total_fwd, first, last, shared_state_cuts(model))


def _ffn_letter(cfg: ModelConfig, i: int) -> str:
    p = cfg.ffn_pattern
    return p if len(p) == 1 else p[i]
