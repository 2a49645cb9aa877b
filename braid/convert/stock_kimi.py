"""``KimiLinearForCausalLM`` (transformers ≥ 5 ``kimi_linear``): the kimi-linear presets as the stock class.

Matches braid exactly when every layer is KDA (``K``) or NoPE MLA (``M``) with residual connections,
KDA without the output-gate bias (``model.kda.gate_bias=false``, as released), FFNs SwiGLU (``S``) or
sigmoid-routed MoE (``E``) with shared experts, no capacity limit, untied embeddings. The expert bias
is the released ``e_score_correction_bias``, so a trained (non-zero) one exports too.

Weights are written in the released checkpoint's layout (``q/k/v_conv1d``, ``A_log [1, 1, H, 1]``,
``block_sparse_moe.experts.<e>.w1/w2/w3``), which transformers converts on load (its own fused
layout is read too). One difference is transformers', not braid's: its MLA builds ``kv_a_layernorm``
(and ``q_a_layernorm``) with eps 1e-6 whatever ``rms_norm_eps`` is, while the released model (as vLLM
runs it) and braid use ``rms_norm_eps``; logits agree exactly when ``model.norm_eps = 1e-6`` and
to ~1e-5 otherwise (tested).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial
from typing import Callable

import torch

from braid.config import ModelConfig
from braid.convert.stock import expert_keys, input_major, stack_experts

KIMI = "KimiLinearForCausalLM"
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}
# braid name after "layers.<i>." → released name after "model.layers.<i>." (MoE parts get their prefix below)
_NAMES = {
    "mixer_conn.norm.weight": "input_layernorm.weight", "ffn_conn.norm.weight": "post_attention_layernorm.weight",
    **{f"mixer.{n}.weight": f"self_attn.{n}.weight" for n in (
        "q_proj", "k_proj", "v_proj", "b_proj", "o_proj", "o_norm", "kv_a_proj_with_mqa", "kv_a_layernorm",
        "kv_b_proj", "q_a_proj", "q_a_layernorm", "q_b_proj")},
    **{f"mixer.{c}_conv.conv.weight": f"self_attn.{c}_conv1d.weight" for c in "qkv"},
    **{f"mixer.{n}.weight": f"self_attn.{n}_proj.weight" for n in ("f_a", "f_b", "g_a", "g_b")},
    "mixer.dt_bias": "self_attn.dt_bias",
    **{f"ffn.{n}.weight": f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")},
    "ffn.router.weight": "block_sparse_moe.gate.weight",
    "ffn.expert_bias": "block_sparse_moe.gate.e_score_correction_bias",
    **{f"ffn.shared.{n}.weight": f"block_sparse_moe.shared_experts.{n}.weight"
       for n in ("gate_proj", "up_proj", "down_proj")},
}
# transformers' own (fused, renamed) layout, accepted on import
_HF_NATIVE = {"self_attn.forget_gate.f_a_proj.weight": "self_attn.f_a_proj.weight",
              "self_attn.forget_gate.f_b_proj.weight": "self_attn.f_b_proj.weight",
              "self_attn.forget_gate.dt_bias": "self_attn.dt_bias", "self_attn.forget_gate.A_log": "self_attn.A_log"}


def available() -> bool:
    import transformers

    return hasattr(transformers, KIMI)


def matches(m: ModelConfig) -> bool:
    """braid's forward for ``m`` is KimiLinearForCausalLM's (up to its MLA norm eps, see above)."""
    ffn = m.ffn_pattern * len(m.pattern) if len(m.ffn_pattern) == 1 else m.ffn_pattern
    if not set(m.pattern) <= {"K", "M"} or not set(ffn) <= {"S", "E"} or m.connection != "residual":
        return False
    if m.meta_tokens or m.tie_embeddings or m.kda.gate_bias or m.norm_zero_centered:
        return False
    if "M" in m.pattern:
        mla_heads = m.mla.n_heads or m.n_heads
        windowed = m.window is not None and any(i not in m.global_layers for i in range(len(m.pattern)))
        if (m.mla.rope and m.pos_emb == "rope" and m.mla.qk_rope_head_dim > 0) or windowed or mla_heads <= 0:
            return False
    if "E" in ffn:
        e = m.moe
        shared = e.shared_hidden if e.shared_hidden is not None else (e.expert_hidden or 0) * e.n_shared_experts
        if (e.router != "sigmoid" or e.capacity_factor is not None or e.n_shared_experts < 1 or e.expert_hidden is None
                or shared != e.expert_hidden * e.n_shared_experts or e.n_experts % e.n_groups
                or (e.n_groups > 1 and e.n_experts // e.n_groups < 2) or e.shared_gate):
            return False
    return True


def hf_config(m: ModelConfig) -> dict:
    """config.json of KimiLinearForCausalLM for ``m`` (transformers' fields plus the released
    ``linear_attn_config``, 1-indexed, so other runtimes read it too)."""
    from braid.models.ffn import ffn_hidden_size

    ffn = m.ffn_pattern * len(m.pattern) if len(m.ffn_pattern) == 1 else m.ffn_pattern
    heads = m.mla.n_heads or m.n_heads
    kda_heads = m.kda.n_heads or m.n_heads
    kda_dim = m.kda.head_dim or m.d_model // kda_heads
    e = m.moe
    dense = len(ffn) - len(ffn.lstrip("S"))
    return dict(
        architectures=[KIMI], model_type="kimi_linear", vocab_size=m.vocab_size, hidden_size=m.d_model,
        num_hidden_layers=len(m.pattern), intermediate_size=ffn_hidden_size(m), hidden_act="silu",
        rms_norm_eps=m.norm_eps, tie_word_embeddings=False, initializer_range=m.init_std, pad_token_id=None,
        num_attention_heads=heads, num_key_value_heads=heads, q_lora_rank=m.mla.q_lora_rank,
        kv_lora_rank=m.mla.kv_lora_rank, qk_nope_head_dim=m.mla.qk_nope_head_dim,
        qk_rope_head_dim=m.mla.qk_rope_head_dim, v_head_dim=m.mla.v_head_dim, mla_use_nope=True,
        attention_bias=False,
        layer_types=["linear_attention" if c == "K" else "full_attention" for c in m.pattern],
        mlp_layer_types=["dense" if c == "S" else "sparse" for c in ffn], first_k_dense_replace=dense,
        linear_head_dim=kda_dim, linear_num_heads=kda_heads, linear_conv_kernel_dim=m.kda.conv_size,
        linear_attn_config={"kda_layers": [i + 1 for i, c in enumerate(m.pattern) if c == "K"],
                            "full_attn_layers": [i + 1 for i, c in enumerate(m.pattern) if c == "M"],
                            "head_dim": kda_dim, "num_heads": kda_heads, "short_conv_kernel_size": m.kda.conv_size},
        num_experts=e.n_experts, num_experts_per_token=e.top_k, num_shared_experts=e.n_shared_experts,
        moe_intermediate_size=e.expert_hidden if e.expert_hidden is not None else ffn_hidden_size(m),
        moe_renormalize=e.renormalize, routed_scaling_factor=e.routed_scaling, num_expert_group=e.n_groups,
        topk_group=e.topk_groups, moe_router_activation_func="sigmoid", use_grouped_topk=True, moe_layer_freq=1,
        model_max_length=1048576, use_cache=True, dtype="float32",
    )


def model_config_from_hf(hf: dict) -> ModelConfig:
    """Inverse of :func:`hf_config` (also reads the released config.json: ``linear_attn_config``,
    ``first_k_dense_replace``)."""
    n = hf["num_hidden_layers"]
    lin = hf.get("linear_attn_config") or {}
    types = hf.get("layer_types")
    if types is None and lin.get("kda_layers") is not None:
        full = set(lin.get("full_attn_layers") or [])
        types = ["full_attention" if i + 1 in full else "linear_attention" for i in range(n)]
    if types is None or len(types) != n:
        raise ValueError("from-hf: KimiLinear config.json has no layer_types / linear_attn_config layer lists")
    mlp = hf.get("mlp_layer_types") or ["dense" if i < hf.get("first_k_dense_replace", 1) else "sparse"
                                         for i in range(n)]
    if hf.get("mla_use_nope") is False:
        raise ValueError("from-hf: KimiLinear with RoPE in MLA (mla_use_nope=false) is not supported")
    if hf.get("tie_word_embeddings"):
        raise ValueError("from-hf: KimiLinear with tied embeddings is not supported")
    kda_heads = hf.get("linear_num_heads", lin.get("num_heads", 32))
    m = ModelConfig(
        pattern="".join("K" if t == "linear_attention" else "M" for t in types),
        ffn_pattern="".join("S" if t == "dense" else "E" for t in mlp), d_model=hf["hidden_size"],
        n_heads=hf["num_attention_heads"], ffn_hidden=hf["intermediate_size"], vocab_size=hf["vocab_size"],
        pos_emb="none", norm_eps=hf["rms_norm_eps"], tie_embeddings=False,
        init_std=hf.get("initializer_range", 0.02),
    )
    m.kda.n_heads, m.kda.head_dim = kda_heads, hf.get("linear_head_dim", lin.get("head_dim", 128))
    m.kda.conv_size = hf.get("linear_conv_kernel_dim", lin.get("short_conv_kernel_size", 4))
    m.kda.gate_bias = False
    m.mla.n_heads, m.mla.q_lora_rank, m.mla.kv_lora_rank = hf["num_attention_heads"], hf.get("q_lora_rank"), \
        hf["kv_lora_rank"]
    m.mla.qk_nope_head_dim, m.mla.qk_rope_head_dim = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"]
    m.mla.v_head_dim, m.mla.rope = hf["v_head_dim"], False
    e = m.moe
    e.n_experts = hf.get("num_experts", hf.get("num_local_experts"))
    e.top_k = hf.get("num_experts_per_token", hf.get("num_experts_per_tok"))
    e.n_shared_experts = hf.get("num_shared_experts", hf.get("n_shared_experts", 1))
    e.expert_hidden = hf["moe_intermediate_size"]
    e.shared_hidden = e.expert_hidden * e.n_shared_experts
    e.router, e.renormalize = "sigmoid", bool(hf.get("moe_renormalize", hf.get("norm_topk_prob", True)))
    e.routed_scaling = float(hf.get("routed_scaling_factor", 1.0))
    e.n_groups, e.topk_groups = hf.get("num_expert_group", hf.get("n_group", 1)), hf.get("topk_group", 1) or 1
    return m


def to_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """braid state dict → the released KimiLinear layout."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _TOP:
            out[_TOP[key]] = value.contiguous()
            continue
        match = _LAYER.match(key)
        if match is None:
            raise KeyError(f"to-hf: no KimiLinear name for braid weight {key!r}")
        i, rest = match.groups()
        prefix = f"model.layers.{i}."
        if rest in _NAMES:
            out[prefix + _NAMES[rest]] = value.contiguous()
        elif rest == "mixer.A_log":  # [H] → [1, 1, H, 1]
            out[prefix + "self_attn.A_log"] = value.reshape(1, 1, -1, 1).contiguous()
        elif rest == "ffn.gate_up":  # [E, d, 2h]: w1 = gate, w3 = up, both [h, d]
            h = value.shape[-1] // 2
            for e in range(value.shape[0]):
                out[f"{prefix}block_sparse_moe.experts.{e}.w1.weight"] = value[e, :, :h].t().contiguous()
                out[f"{prefix}block_sparse_moe.experts.{e}.w3.weight"] = value[e, :, h:].t().contiguous()
        elif rest == "ffn.down":  # [E, h, d]: w2 [d, h]
            for e in range(value.shape[0]):
                out[f"{prefix}block_sparse_moe.experts.{e}.w2.weight"] = value[e].t().contiguous()
        else:
            raise KeyError(f"to-hf: no KimiLinear name for braid weight {key!r}")
    return out


def from_hf_lazy(hf: Mapping[str, torch.Tensor], n_experts: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Released (or transformers' fused) KimiLinear weights → braid key → a function computing that tensor
    (``hf`` is indexed only inside those functions; see :func:`braid.convert.stock.from_hf_lazy`)."""
    inv = {v: k for k, v in _NAMES.items()}
    # transformers renames block_sparse_moe ↔ mlp both ways: accept either prefix for every FFN weight
    inv.update({k.replace("block_sparse_moe.", "mlp."): v for k, v in list(inv.items()) if "block_sparse_moe." in k})
    inv.update({k.replace("mlp.", "block_sparse_moe."): v for k, v in list(inv.items()) if k.startswith("mlp.")})
    inv_top = {v: k for k, v in _TOP.items()}
    out: dict[str, Callable[[], torch.Tensor]] = {}
    experts: dict[tuple[str, str], dict[int, str]] = {}
    for key in hf:
        if key in inv_top:
            out[inv_top[key]] = partial(hf.__getitem__, key)
            continue
        match = _HF_LAYER.match(key)
        if match is None:
            raise KeyError(f"from-hf: unexpected weight {key!r}")
        i, rest = match.groups()
        rest = _HF_NATIVE.get(rest, rest)
        em = re.match(r"^(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3)\.weight$", rest)
        if rest in inv:
            out[f"layers.{i}.{inv[rest]}"] = partial(hf.__getitem__, key)
        elif rest == "self_attn.A_log":
            out[f"layers.{i}.mixer.A_log"] = partial(_flat, hf, key)
        elif em:
            experts.setdefault((i, em.group(2)), {})[int(em.group(1))] = key
        elif rest == "self_attn.conv1d.weight":  # transformers' fused [3·C, 1, k] = q | k | v
            for j, c in enumerate("qkv"):
                out[f"layers.{i}.mixer.{c}_conv.conv.weight"] = partial(_third, hf, key, j)
        elif rest in ("mlp.experts.gate_up_proj", "block_sparse_moe.experts.gate_up_proj"):  # [E, 2h, d]
            out[f"layers.{i}.ffn.gate_up"] = partial(input_major, hf, key)
        elif rest in ("mlp.experts.down_proj", "block_sparse_moe.experts.down_proj"):  # [E, d, h]
            out[f"layers.{i}.ffn.down"] = partial(input_major, hf, key)
        else:
            raise KeyError(f"from-hf: unexpected weight {key!r}")
    for i in sorted({i for i, _ in experts}):
        w1, w2, w3 = (expert_keys(experts, i, name, n_experts) for name in ("w1", "w2", "w3"))
        out[f"layers.{i}.ffn.gate_up"] = partial(stack_experts, hf, w1, w3)
        out[f"layers.{i}.ffn.down"] = partial(stack_experts, hf, w2)
    return out


def _flat(hf: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    return hf[key].reshape(-1)


def _third(hf: Mapping[str, torch.Tensor], key: str, j: int) -> torch.Tensor:
    return hf[key].chunk(3, dim=0)[j].contiguous()


def from_hf_state(hf: Mapping[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """Released (or transformers' fused) KimiLinear weights → braid state dict."""
    return {k: value() for k, value in from_hf_lazy(hf, n_experts).items()}
