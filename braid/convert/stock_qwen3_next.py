"""``Qwen3NextForCausalLM`` (transformers ``qwen3_next``): braid models of Gated DeltaNet (``D``) and
gated attention (``G``) layers as the stock class.

Matches braid exactly when every layer is ``D`` (at least one) or ``G`` (elementwise gate, QK-norm, RoPE,
no window, no S2) with residual connections, no meta tokens, and FFNs SwiGLU (``S``, the stock ``mlp_only_layers``)
or softmax-routed MoE (``E``) with a shared expert, no groups, no capacity, ``routed_scaling = 1`` and
a zero expert bias. Three stock features are braid options:

* RoPE: ``partial_rotary_factor`` (0.25 in the release) is ``model.rotary_percent``; a factor whose
  channel count ``head_dim · factor`` is not a whole even number has no braid equivalent.
* Zero-centred RMSNorms (``x̂ · (1 + w)``, all but the GDN output norm): ``model.norm_zero_centered``
  (what an import sets); a model without it is exported with ``w − 1`` and imported into with ``w + 1``.
* The shared expert's gate ``sigmoid(Linear(d, 1)(x))``: ``model.moe.shared_gate`` (what an import
  sets). A model without it is exported with a zero gate weight (0.5 on every token) and the shared
  ``down_proj`` doubled; both factors are powers of two, so the product is exact.

Layouts: GDN's ``in_proj_qkvz`` / ``in_proj_ba`` are the same matrices; the stock ``conv1d`` over
``q | k | v`` is braid's three short convs stacked. Gated attention's ``q_proj`` is ``[q_h | gate_h]``
per head in the stock class and ``[q (G heads) | gates (G heads)]`` per KV group in braid (rows
permuted). Experts are written in the published per-expert layout, which transformers fuses on load.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial
from typing import Callable

import torch

from braid.config import ModelConfig
from braid.convert.stock import expert_keys, input_major, stack_experts
from braid.models.layers import rotary_dims

QWEN3_NEXT = "Qwen3NextForCausalLM"
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}
# Zero-centred on the stock side (stored as w − 1).
_CENTRED = {"mixer_conn.norm.weight", "ffn_conn.norm.weight", "mixer.q_norm.weight", "mixer.k_norm.weight"}
_SWIGLU = ("gate_proj", "up_proj", "down_proj")
# braid name after "layers.<i>." → stock name after "model.layers.<i>." (a D layer's mixer is linear_attn)
_NAMES = {
    "mixer_conn.norm.weight": "input_layernorm.weight", "ffn_conn.norm.weight": "post_attention_layernorm.weight",
    **{f"mixer.{n}.weight": f"self_attn.{n}.weight" for n in ("k_proj", "v_proj", "o_proj", "q_norm", "k_norm")},
    **{f"mixer.{n}.weight": f"linear_attn.{n}.weight" for n in ("in_proj_qkvz", "in_proj_ba", "norm", "out_proj")},
    "mixer.A_log": "linear_attn.A_log", "mixer.dt_bias": "linear_attn.dt_bias",
    **{f"ffn.{n}.weight": f"mlp.{n}.weight" for n in _SWIGLU},
    "ffn.router.weight": "mlp.gate.weight",
    **{f"ffn.shared.{n}.weight": f"mlp.shared_expert.{n}.weight" for n in ("gate_proj", "up_proj")},
}


def available() -> bool:
    import transformers

    return hasattr(transformers, QWEN3_NEXT)


def _ffn(m: ModelConfig) -> str:
    return m.ffn_pattern * len(m.pattern) if len(m.ffn_pattern) == 1 else m.ffn_pattern


def matches(m: ModelConfig) -> bool:
    """braid's forward for ``m`` is Qwen3NextForCausalLM's (with the export's choices above)."""
    ffn = _ffn(m)
    # At least one D layer: a gated-attention-only model keeps its remote-code export (the stock class
    # would compute it too, but it is not what that class stands for).
    if "D" not in m.pattern or not set(m.pattern) <= {"D", "G"} or not set(ffn) <= {"S", "E"}:
        return False
    if m.connection != "residual":
        return False
    if m.meta_tokens or (getattr(m, "s2", None) is not None and m.s2.enabled):
        return False
    if "G" in m.pattern:
        windowed = m.window is not None and any(i not in m.global_layers for i in range(len(m.pattern)))
        if not m.qk_norm or m.pos_emb != "rope" or m.attn_gate != "elementwise" or windowed:
            return False
        hd = m.head_dim or m.d_model // m.n_heads
        if hd * m.rotary_percent != rotary_dims(hd, m.rotary_percent):  # transformers' int(hd · factor)
            return False
    if "E" in ffn:
        e = m.moe
        if (e.router != "softmax" or e.n_shared_experts < 1 or e.n_groups != 1 or e.capacity_factor is not None
                or e.routed_scaling != 1.0):
            return False
    return True


def weights_match(state: dict[str, torch.Tensor]) -> bool:
    """A non-zero expert bias changes the routing: no stock class has it."""
    return not any(k.endswith("ffn.expert_bias") and bool(v.abs().max() > 0) for k, v in state.items())


def hf_config(m: ModelConfig) -> dict:
    """config.json of Qwen3NextForCausalLM for ``m``."""
    from braid.models.ffn import ffn_hidden_size

    e, g = m.moe, m.gdn
    hk = g.n_k_heads or m.n_heads
    dk = g.head_k_dim or m.d_model // hk
    expert = e.expert_hidden if e.expert_hidden is not None else ffn_hidden_size(m)
    shared = e.shared_hidden if e.shared_hidden is not None else expert * e.n_shared_experts
    return dict(
        architectures=[QWEN3_NEXT], model_type="qwen3_next", vocab_size=m.vocab_size, hidden_size=m.d_model,
        num_hidden_layers=len(m.pattern), intermediate_size=ffn_hidden_size(m), hidden_act="silu",
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads or m.n_heads,
        head_dim=m.head_dim or m.d_model // m.n_heads, attention_bias=False, rms_norm_eps=m.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rope_theta),
                         "partial_rotary_factor": m.rotary_percent},
        tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std, max_position_embeddings=131072,
        layer_types=["linear_attention" if c == "D" else "full_attention" for c in m.pattern],
        linear_num_key_heads=hk, linear_num_value_heads=g.n_v_heads or hk, linear_key_head_dim=dk,
        linear_value_head_dim=g.head_v_dim or dk, linear_conv_kernel_dim=g.conv_size,
        num_experts=e.n_experts, num_experts_per_tok=e.top_k, moe_intermediate_size=expert,
        shared_expert_intermediate_size=shared, norm_topk_prob=e.renormalize, decoder_sparse_step=1,
        mlp_only_layers=[i for i, c in enumerate(_ffn(m)) if c == "S"], router_aux_loss_coef=e.aux_loss_coef,
        output_router_logits=False, use_cache=True, dtype="float32",
    )


def model_config_from_hf(hf: dict) -> ModelConfig:
    """Inverse of :func:`hf_config`; a stock feature braid lacks (an odd partial RoPE, a dense-only
    model without layer types) is a ValueError naming it."""
    n = hf["num_hidden_layers"]
    rope = dict(hf.get("rope_parameters") or {})
    factor = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25)))
    if hf["head_dim"] * factor != rotary_dims(hf["head_dim"], factor):
        raise ValueError(f"from-hf: partial_rotary_factor {factor} of head_dim {hf['head_dim']} is not a whole even "
                         "number of channels (braid's model.rotary_percent rotates pairs)")
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"from-hf: rope scaling {rope} is not supported (braid has plain RoPE)")
    types = hf.get("layer_types") or ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]
    dense = set(hf.get("mlp_only_layers") or [])
    if hf.get("decoder_sparse_step", 1) != 1:
        raise ValueError("from-hf: Qwen3-Next with decoder_sparse_step != 1 is not supported (use mlp_only_layers)")
    m = ModelConfig(
        pattern="".join("D" if t == "linear_attention" else "G" for t in types),
        ffn_pattern="".join("S" if i in dense else "E" for i in range(n)), d_model=hf["hidden_size"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf["num_key_value_heads"], head_dim=hf["head_dim"],
        ffn_hidden=hf["intermediate_size"], vocab_size=hf["vocab_size"], pos_emb="rope",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), rotary_percent=factor,
        qk_norm=True, attn_gate="elementwise", norm_eps=hf["rms_norm_eps"], norm_zero_centered=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=hf.get("initializer_range", 0.02),
    )
    g = m.gdn
    g.n_k_heads, g.n_v_heads = hf["linear_num_key_heads"], hf["linear_num_value_heads"]
    g.head_k_dim, g.head_v_dim = hf["linear_key_head_dim"], hf["linear_value_head_dim"]
    g.conv_size = hf["linear_conv_kernel_dim"]
    e = m.moe
    e.n_experts, e.top_k, e.expert_hidden = hf["num_experts"], hf["num_experts_per_tok"], hf["moe_intermediate_size"]
    e.n_shared_experts, e.shared_hidden, e.shared_gate = 1, hf["shared_expert_intermediate_size"], True
    e.router, e.renormalize = "softmax", bool(hf.get("norm_topk_prob", True))
    e.aux_loss_coef = float(hf.get("router_aux_loss_coef", 0.0))
    return m


def _q_rows(w: torch.Tensor, kv_heads: int, head_dim: int, to_stock: bool) -> torch.Tensor:
    """Gated attention's q_proj rows: braid ``[Hkv, (q | gate), G, D]`` ↔ stock ``[Hkv, G, (q | gate), D]``."""
    group = w.shape[0] // (2 * kv_heads * head_dim)
    shape = (kv_heads, 2, group, head_dim) if to_stock else (kv_heads, group, 2, head_dim)
    return w.reshape(*shape, -1).transpose(1, 2).reshape(w.shape).contiguous()


def to_hf_state(state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """braid state dict → Qwen3NextForCausalLM's published layout."""
    out: dict[str, torch.Tensor] = {}
    head_dim, kv_heads = m.head_dim or m.d_model // m.n_heads, m.n_kv_heads or m.n_heads
    shift = 0 if m.norm_zero_centered else 1  # braid's plain norms hold 1 + w
    for key, value in state.items():
        if key in _TOP:
            out[_TOP[key]] = (value - shift if key == "norm.weight" else value).contiguous()
            continue
        match = _LAYER.match(key)
        if match is None:
            raise KeyError(f"to-hf: no Qwen3-Next name for braid weight {key!r}")
        i, rest = match.groups()
        prefix = f"model.layers.{i}."
        if rest in _NAMES:
            out[prefix + _NAMES[rest]] = (value - shift if rest in _CENTRED else value).contiguous()
        elif rest == "mixer.q_proj.weight":
            out[prefix + "self_attn.q_proj.weight"] = _q_rows(value, kv_heads, head_dim, to_stock=True)
        elif rest == "mixer.q_conv.conv.weight":  # k and v convs join it here, in q | k | v order
            convs = [state[f"layers.{i}.mixer.{c}_conv.conv.weight"] for c in "qkv"]
            out[prefix + "linear_attn.conv1d.weight"] = torch.cat(convs, 0).contiguous()
        elif rest in ("mixer.k_conv.conv.weight", "mixer.v_conv.conv.weight", "ffn.expert_bias"):
            continue  # in conv1d above; the bias is zero (weights_match)
        elif rest == "ffn.shared_gate.weight":
            out[prefix + "mlp.shared_expert_gate.weight"] = value.contiguous()
        elif rest == "ffn.shared.down_proj.weight" and m.moe.shared_gate:
            out[prefix + "mlp.shared_expert.down_proj.weight"] = value.contiguous()
        elif rest == "ffn.shared.down_proj.weight":  # × 2 against a zero gate's constant 0.5
            out[prefix + "mlp.shared_expert.down_proj.weight"] = (2 * value).contiguous()
            out[prefix + "mlp.shared_expert_gate.weight"] = value.new_zeros(1, value.shape[0])
        elif rest == "ffn.gate_up":  # [E, d, 2h]: columns [:h] gate, [h:] up
            h = value.shape[-1] // 2
            for e in range(value.shape[0]):
                out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = value[e, :, :h].t().contiguous()
                out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = value[e, :, h:].t().contiguous()
        elif rest == "ffn.down":  # [E, h, d]
            for e in range(value.shape[0]):
                out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = value[e].t().contiguous()
        else:
            raise KeyError(f"to-hf: no Qwen3-Next name for braid weight {key!r}")
    return out


def _centred(hf: Mapping[str, torch.Tensor], key: str, shift: int) -> torch.Tensor:
    return hf[key] + shift


def _q_from_hf(hf: Mapping[str, torch.Tensor], key: str, kv_heads: int, head_dim: int) -> torch.Tensor:
    return _q_rows(hf[key], kv_heads, head_dim, to_stock=False)


def _conv_part(hf: Mapping[str, torch.Tensor], key: str, sizes: tuple[int, int, int], j: int) -> torch.Tensor:
    return hf[key].split(list(sizes), 0)[j].contiguous()


def from_hf_lazy(hf: Mapping[str, torch.Tensor], m: ModelConfig) -> dict[str, Callable[[], torch.Tensor]]:
    """Inverse of :func:`to_hf_state` (also transformers' fused expert layout), one braid tensor at a time."""
    inv = {v: k for k, v in _NAMES.items()}
    inv_top = {v: k for k, v in _TOP.items()}
    head_dim, kv_heads = m.head_dim or m.d_model // m.n_heads, m.n_kv_heads or m.n_heads
    g = m.gdn
    hk = g.n_k_heads or m.n_heads
    dk = g.head_k_dim or m.d_model // hk
    conv_sizes = (hk * dk, hk * dk, (g.n_v_heads or hk) * (g.head_v_dim or dk))
    shift = 0 if m.norm_zero_centered else 1
    out: dict[str, Callable[[], torch.Tensor]] = {}
    experts: dict[tuple[str, str], dict[int, str]] = {}
    for key in hf:
        if key in inv_top:
            out[inv_top[key]] = partial(_centred, hf, key, shift) if key == "model.norm.weight" else \
                partial(hf.__getitem__, key)
            continue
        match = _HF_LAYER.match(key)
        if match is None:
            raise KeyError(f"from-hf: unexpected weight {key!r}")
        i, rest = match.groups()
        em = re.match(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", rest)
        if rest in inv:
            name = inv[rest]
            out[f"layers.{i}.{name}"] = partial(_centred, hf, key, shift) if name in _CENTRED else \
                partial(hf.__getitem__, key)
        elif rest == "self_attn.q_proj.weight":
            out[f"layers.{i}.mixer.q_proj.weight"] = partial(_q_from_hf, hf, key, kv_heads, head_dim)
        elif rest == "linear_attn.conv1d.weight":
            for j, c in enumerate("qkv"):
                out[f"layers.{i}.mixer.{c}_conv.conv.weight"] = partial(_conv_part, hf, key, conv_sizes, j)
        elif rest == "mlp.shared_expert.down_proj.weight":
            out[f"layers.{i}.ffn.shared.down_proj.weight"] = partial(hf.__getitem__, key)
        elif rest == "mlp.shared_expert_gate.weight":
            out[f"layers.{i}.ffn.shared_gate.weight"] = partial(hf.__getitem__, key)
        elif em:
            experts.setdefault((i, em.group(2)), {})[int(em.group(1))] = key
        elif rest in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):  # [E, 2h, d], [E, d, h]
            out[f"layers.{i}.ffn.{'gate_up' if rest.endswith('gate_up_proj') else 'down'}"] = \
                partial(input_major, hf, key)
        else:
            raise KeyError(f"from-hf: unexpected weight {key!r}")
    for i in sorted({i for i, _ in experts}):
        gate, up, down = (expert_keys(experts, i, name, m.moe.n_experts) for name in _SWIGLU)
        out[f"layers.{i}.ffn.gate_up"] = partial(stack_experts, hf, gate, up)
        out[f"layers.{i}.ffn.down"] = partial(stack_experts, hf, down)
    for i in {mt.group(1) for mt in map(_LAYER.match, out) if mt and mt.group(2) == "ffn.router.weight"}:
        out[f"layers.{i}.ffn.expert_bias"] = partial(torch.zeros, m.moe.n_experts, dtype=torch.float32)
    return out
