"""Parameter counts and FLOPs per token of a model config (for logs and MFU)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from braid.config import ModelConfig
from braid.errors import ConfigError


def resolve_vocab(cfg: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    """Return a copy with ``vocab_size`` set: the tokenizer's size padded to ``vocab_multiple``."""
    cfg = copy.deepcopy(cfg)
    if cfg.vocab_size is None:
        cfg.vocab_size = -(-tokenizer_vocab // cfg.vocab_multiple) * cfg.vocab_multiple
    elif cfg.vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"config key 'model.vocab_size' = {cfg.vocab_size} is smaller than the tokenizer's {tokenizer_vocab}"
        )
    return cfg


@dataclass
class ModelStats:
    params: int
    embedding_params: int
    flops_per_token: float  # training (forward + backward) FLOPs per token
    active_params: int  # parameters one token uses (MoE: top-k of the routed experts)

    @property
    def non_embedding_params(self) -> int:
        return self.params - self.embedding_params


def _inactive_params(module: torch.nn.Module) -> int:
    """Routed-expert parameters a token does not use: (E − k)/E of the stacked expert weights."""
    n_experts, top_k = getattr(module, "n_experts", None), getattr(module, "top_k", None)
    if not n_experts or not top_k:
        return 0
    routed = sum(p.numel() for name, p in module.named_parameters(recurse=False))
    return routed * (n_experts - top_k) // n_experts


def model_stats(cfg: ModelConfig, seq_len: int) -> ModelStats:
    """Counts for a resolved config, built on the meta device (no memory, no init cost).

    FLOPs follow Megatron's convention: 2 per multiply-add in every matmul (projections, attention
    scores and values over the visible keys, LM head), backward = 2 × forward, no recomputation.
    Each layer's mixer, FFN and connections contribute their ``flops_per_token(seq_len)``.
    """
    from braid.models.hybrid import HybridLM

    with torch.device("meta"):
        model = HybridLM(cfg)
    params = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel()
    forward = 2 * cfg.d_model * cfg.vocab_size
    for layer in model.layers:
        for part in (layer.mixer, layer.ffn, getattr(layer, "mixer_conn", None), getattr(layer, "ffn_conn", None)):
            if part is not None and hasattr(part, "flops_per_token"):
                forward += part.flops_per_token(seq_len)
    inactive = sum(_inactive_params(m) for m in model.modules())
    return ModelStats(params=params, embedding_params=embedding, flops_per_token=3 * forward,
                      active_params=params - inactive)
