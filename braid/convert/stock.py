"""Stock Hugging Face classes whose forward equals a braid model exactly, and the weight renaming.

* ``LlamaForCausalLM``: all layers ``A`` + ``S``, no QK-norm, no window, RoPE, residual connections.
* ``Qwen3ForCausalLM``: the same with QK-norm, optionally sliding windows (``global_layers`` full).
* ``Qwen3MoeForCausalLM``: all layers ``A`` + ``E`` with QK-norm, softmax routing, no shared experts,
  no groups, no capacity, ``routed_scaling = 1`` and a zero expert bias (checked on the weights).
* ``KimiLinearForCausalLM`` and ``Qwen3NextForCausalLM``: see ``stock_kimi`` and ``stock_qwen3_next``.

Both sides use rotate-half RoPE, so q/k rows need no permutation. MoE experts are written in the
published per-expert layout (``mlp.experts.<e>.{gate,up,down}_proj.weight``); braid stacks them as
``gate_up [E, d, 2h]`` and ``down [E, h, d]`` (input-major), hence the transposes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial
from typing import Callable, Optional

import torch

from braid.config import ModelConfig

LLAMA, QWEN3, QWEN3_MOE = "LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"
MODEL_TYPES = {LLAMA: "llama", QWEN3: "qwen3", QWEN3_MOE: "qwen3_moe"}


def _ffn_letters(m: ModelConfig) -> str:
    return m.ffn_pattern * len(m.pattern) if len(m.ffn_pattern) == 1 else m.ffn_pattern


def stock_architecture(m: ModelConfig, state: Optional[dict] = None) -> Optional[str]:
    """The stock class that computes exactly what braid computes for ``m`` (and its weights), or None."""
    from braid.convert import stock_kimi, stock_qwen3_next

    if stock_kimi.matches(m):  # the kimi-linear presets; older transformers lack the class
        return stock_kimi.KIMI if stock_kimi.available() else None
    if stock_qwen3_next.matches(m):  # Gated DeltaNet + gated attention
        ok = stock_qwen3_next.available() and (state is None or stock_qwen3_next.weights_match(state))
        return stock_qwen3_next.QWEN3_NEXT if ok else None
    ffn = _ffn_letters(m)
    if set(m.pattern) != {"A"} or m.connection != "residual" or m.meta_tokens or m.pos_emb != "rope":
        return None
    if m.rotary_percent != 1.0 or m.norm_zero_centered:  # Llama, Qwen3, Mixtral: full RoPE, plain norms
        return None
    if getattr(m, "s2", None) is not None and m.s2.enabled:
        return None
    windowed = m.window is not None and any(i not in m.global_layers for i in range(len(m.pattern)))
    if set(ffn) == {"S"}:
        if not m.qk_norm:
            return None if windowed else LLAMA
        return QWEN3
    if set(ffn) == {"E"} and m.qk_norm and not windowed:
        e = m.moe
        if (e.router != "softmax" or e.n_shared_experts or e.n_groups != 1 or e.capacity_factor is not None
                or e.routed_scaling != 1.0):
            return None
        if state is not None and any(k.endswith("ffn.expert_bias") and bool(v.abs().max() > 0)
                                     for k, v in state.items()):
            return None  # a non-zero selection bias changes the routing: no stock class has it
        return QWEN3_MOE
    return None


def hf_config(m: ModelConfig, arch: str) -> dict:
    """config.json fields of the stock class ``arch`` for braid's model section ``m``."""
    from braid.convert import stock_kimi, stock_qwen3_next
    from braid.models.ffn import ffn_hidden_size

    if arch == stock_kimi.KIMI:
        return stock_kimi.hf_config(m)
    if arch == stock_qwen3_next.QWEN3_NEXT:
        return stock_qwen3_next.hf_config(m)

    head_dim = m.head_dim or m.d_model // m.n_heads
    cfg = dict(
        architectures=[arch], model_type=MODEL_TYPES[arch], vocab_size=m.vocab_size, hidden_size=m.d_model,
        num_hidden_layers=len(m.pattern), num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads or m.n_heads, head_dim=head_dim, hidden_act="silu",
        rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rope_theta)},
        initializer_range=m.init_std, max_position_embeddings=131072, use_cache=True,
        intermediate_size=ffn_hidden_size(m), dtype="float32",
    )
    if arch == LLAMA:
        cfg["mlp_bias"] = False
    if arch == QWEN3:
        n = len(m.pattern)
        if m.window is not None:
            cfg.update(use_sliding_window=True, sliding_window=m.window, max_window_layers=0,
                       layer_types=["full_attention" if i in m.global_layers else "sliding_attention"
                                    for i in range(n)])
        else:
            cfg.update(use_sliding_window=False, sliding_window=None, layer_types=["full_attention"] * n)
    if arch == QWEN3_MOE:
        e = m.moe
        # num_local_experts: the name transformers itself writes (num_experts is its alias).
        cfg.update(num_local_experts=e.n_experts, num_experts_per_tok=e.top_k,
                   moe_intermediate_size=e.expert_hidden if e.expert_hidden is not None else ffn_hidden_size(m),
                   norm_topk_prob=e.renormalize, decoder_sparse_step=1, mlp_only_layers=[],
                   router_aux_loss_coef=e.aux_loss_coef, output_router_logits=False,
                   use_sliding_window=False, sliding_window=None)
    return cfg


def model_config_from_hf(hf: dict) -> ModelConfig:
    """Inverse of :func:`hf_config` for the supported stock classes (others raise ValueError)."""
    from braid.convert import stock_kimi, stock_qwen3_next

    arch = (hf.get("architectures") or [None])[0]
    if arch == stock_kimi.KIMI:
        return stock_kimi.model_config_from_hf(hf)
    if arch == stock_qwen3_next.QWEN3_NEXT:
        return stock_qwen3_next.model_config_from_hf(hf)
    if arch not in MODEL_TYPES:
        raise ValueError(f"from-hf supports {', '.join([*MODEL_TYPES, stock_kimi.KIMI, stock_qwen3_next.QWEN3_NEXT])}; "
                         f"this checkpoint is "
                         f"{arch!r}")
    n = hf["num_hidden_layers"]
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ValueError(f"from-hf: rope scaling {rope or hf.get('rope_scaling')} is not supported (braid has "
                         "plain RoPE)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("from-hf: attention/MLP biases are not supported")
    m = ModelConfig(
        pattern="A" * n, ffn_pattern="E" if arch == QWEN3_MOE else "S", d_model=hf["hidden_size"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        ffn_hidden=hf["intermediate_size"], vocab_size=hf["vocab_size"], pos_emb="rope",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), qk_norm=arch != LLAMA,
        norm_eps=hf["rms_norm_eps"], tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
    )
    if arch == QWEN3 and hf.get("use_sliding_window") and hf.get("sliding_window"):
        types = hf.get("layer_types") or ["sliding_attention"] * n
        m.window = hf["sliding_window"]
        m.global_layers = [i for i, t in enumerate(types) if t != "sliding_attention"]
    if arch == QWEN3_MOE:
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise ValueError("from-hf: Qwen3-MoE with dense layers (mlp_only_layers/decoder_sparse_step) is "
                             "not supported")
        m.moe.n_experts = hf.get("num_local_experts", hf.get("num_experts"))
        m.moe.top_k = hf["num_experts_per_tok"]
        m.moe.expert_hidden, m.moe.renormalize = hf["moe_intermediate_size"], bool(hf.get("norm_topk_prob", True))
        m.moe.router = "softmax"
    return m


# braid key (layer part after "layers.<i>.") → HF key (after "model.layers.<i>.")
_LAYER_KEYS = {
    "mixer_conn.norm.weight": "input_layernorm.weight",
    "ffn_conn.norm.weight": "post_attention_layernorm.weight",
    "mixer.q_proj.weight": "self_attn.q_proj.weight",
    "mixer.k_proj.weight": "self_attn.k_proj.weight",
    "mixer.v_proj.weight": "self_attn.v_proj.weight",
    "mixer.o_proj.weight": "self_attn.o_proj.weight",
    "mixer.q_norm.weight": "self_attn.q_norm.weight",
    "mixer.k_norm.weight": "self_attn.k_norm.weight",
    "ffn.gate_proj.weight": "mlp.gate_proj.weight",
    "ffn.up_proj.weight": "mlp.up_proj.weight",
    "ffn.down_proj.weight": "mlp.down_proj.weight",
    "ffn.router.weight": "mlp.gate.weight",
}
_TOP_KEYS = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def to_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """braid state dict → HF state dict (contiguous tensors, same dtypes; ``expert_bias`` dropped, as
    :func:`stock_architecture` checked it is zero)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _TOP_KEYS:
            out[_TOP_KEYS[key]] = value.contiguous()
            continue
        match = _LAYER_RE.match(key)
        if match is None:
            raise KeyError(f"to-hf: no stock name for braid weight {key!r}")
        i, rest = match.groups()
        prefix = f"model.layers.{i}."
        if rest in _LAYER_KEYS:
            out[prefix + _LAYER_KEYS[rest]] = value.contiguous()
        elif rest == "ffn.gate_up":  # [E, d, 2h]: columns [:h] gate, [h:] up
            h = value.shape[-1] // 2
            for e in range(value.shape[0]):
                out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = value[e, :, :h].t().contiguous()
                out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = value[e, :, h:].t().contiguous()
        elif rest == "ffn.down":  # [E, h, d]
            for e in range(value.shape[0]):
                out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = value[e].t().contiguous()
        elif rest == "ffn.expert_bias":
            continue
        else:
            raise KeyError(f"to-hf: no stock name for braid weight {key!r}")
    return out


def from_hf_lazy(hf: Mapping[str, torch.Tensor], n_experts: int = 0) -> dict[str, Callable[[], torch.Tensor]]:
    """Inverse of :func:`to_hf_state`, one braid tensor at a time: braid key → a function computing it from
    the HF tensors it needs (``hf`` is only indexed inside those functions, so a lazy mapping reads one
    parameter's worth at a time). HF's fused ``mlp.experts.gate_up_proj [E, 2h, d]`` / ``down_proj [E, d, h]``
    layout is accepted too; rotary ``inv_freq`` buffers are ignored."""
    inv_layer = {v: k for k, v in _LAYER_KEYS.items()}
    inv_top = {v: k for k, v in _TOP_KEYS.items()}
    out: dict[str, Callable[[], torch.Tensor]] = {}
    experts: dict[tuple[str, str], dict[int, str]] = {}
    for key in hf:
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key in inv_top:
            out[inv_top[key]] = partial(hf.__getitem__, key)
            continue
        match = _HF_LAYER_RE.match(key)
        if match is None:
            raise KeyError(f"from-hf: unexpected weight {key!r}")
        i, rest = match.groups()
        if rest in inv_layer:
            out[f"layers.{i}.{inv_layer[rest]}"] = partial(hf.__getitem__, key)
            continue
        em = re.match(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", rest)
        if em:
            experts.setdefault((i, em.group(2)), {})[int(em.group(1))] = key
        elif rest in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):  # [E, 2h, d] (gate rows first), [E, d, h]
            name = "gate_up" if rest.endswith("gate_up_proj") else "down"
            out[f"layers.{i}.ffn.{name}"] = partial(input_major, hf, key)
        else:
            raise KeyError(f"from-hf: unexpected weight {key!r}")
    for i in sorted({i for i, _ in experts}):
        gate, up, down = (expert_keys(experts, i, name, n_experts) for name in ("gate_proj", "up_proj", "down_proj"))
        out[f"layers.{i}.ffn.gate_up"] = partial(stack_experts, hf, gate, up)
        out[f"layers.{i}.ffn.down"] = partial(stack_experts, hf, down)
    for i in {m.group(1) for m in map(_LAYER_RE.match, out) if m and m.group(2) == "ffn.router.weight"}:
        out[f"layers.{i}.ffn.expert_bias"] = partial(torch.zeros, n_experts, dtype=torch.float32)
    return out


def input_major(hf: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """braid's input-major expert stack [E, in, out] from HF's fused [E, out, in]."""
    return hf[key].transpose(1, 2).contiguous()


def expert_keys(experts: dict, layer: str, name: str, n_experts: int) -> list[str]:
    """The HF keys of ``name`` for experts 0..n-1 of ``layer``; a clear error when some are missing."""
    got = experts.get((layer, name), {})
    if sorted(got) != list(range(n_experts)):
        raise KeyError(f"from-hf: layer {layer} has {name} for experts {sorted(got)}, expected 0..{n_experts - 1}")
    return [got[e] for e in range(n_experts)]


def stack_experts(hf: Mapping[str, torch.Tensor], *parts: list[str]) -> torch.Tensor:
    """braid's stacked ``[E, in, out]`` from per-expert HF ``[out, in]`` weights; several parts (gate, up)
    are concatenated along ``out``."""
    stacked = [torch.stack([hf[k].t() for k in keys]) for keys in parts]
    return (stacked[0] if len(stacked) == 1 else torch.cat(stacked, dim=-1)).contiguous()


def from_hf_state(hf: Mapping[str, torch.Tensor], n_experts: int = 0) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_hf_state` (see :func:`from_hf_lazy`)."""
    return {k: value() for k, value in from_hf_lazy(hf, n_experts).items()}
