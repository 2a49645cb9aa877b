"""HybridLM: embedding → blocks (connection, mixer, FFN per the layer pattern) → RMSNorm → LM head."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from braid.config import ModelConfig
from braid.kernels.fused import lm_head_cross_entropy
from braid.models.connections import expand_streams, make_connection, merge_streams, n_streams
from braid.models.ffn import NoFFN
from braid.models.layers import SeqInfo, model_norm
from braid.models.registry import ffn_class, mixer_class

IGNORE_INDEX = -100


class Block(nn.Module):
    """One layer: ``mixer_conn`` around the mixer, then ``ffn_conn`` around the FFN (absent for ``-``).

    ``first_sublayer`` numbers the mixer among all sublayers of the model (the FFN is the next one);
    hyper-connections use it to pick the stream a sublayer reads at init. Default: ``2·layer_idx``.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, mixer_letter: str, ffn_letter: str,
                 first_sublayer: Optional[int] = None):
        super().__init__()
        self.layer_idx = layer_idx
        k = 2 * layer_idx if first_sublayer is None else first_sublayer
        self.mixer_conn = make_connection(cfg, k)
        self.mixer = mixer_class(mixer_letter)(cfg, layer_idx)
        ffn = ffn_class(ffn_letter)(cfg, layer_idx)
        self.ffn = None if isinstance(ffn, NoFFN) else ffn
        self.ffn_conn = make_connection(cfg, k + 1) if self.ffn is not None else None

    @property
    def n_sublayers(self) -> int:
        return 1 if self.ffn is None else 2

    def forward(self, h: torch.Tensor, seq: SeqInfo) -> torch.Tensor:
        """h: the residual stream(s), ``[B, T, d]`` (residual) or ``[B, T, n, d]`` (hyper-connections)."""
        h = self.mixer_conn(h, lambda x: self.mixer(x, seq))
        if self.ffn is not None:
            h = self.ffn_conn(h, self.ffn)
        return h


class HeadLoss(nn.Module):
    """The LM head and its loss (no parameters of its own): h ``[B, T, d]`` and the head weight
    ``[V, d]`` → per-token fp32 loss ``[B, T]`` (0 where ignored), or logits ``[B, T, V]`` without
    labels. Tensor parallelism swaps in a vocab-parallel one."""

    def forward(self, h: torch.Tensor, weight: torch.Tensor, labels: Optional[torch.Tensor],
                scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, t = h.shape[:2]
        if labels is None or scale is not None:
            logits = F.linear(h, weight)
            if scale is not None:  # per-vocabulary logit scales (nGPT)
                logits = logits * scale.to(logits.dtype)
            if labels is None:
                return logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="none")
        else:
            # On CUDA the loss never holds all [B·T, V] fp32 logits (braid.kernels.fused: chunked); on CPU
            # it is the full-logits F.cross_entropy.
            loss = lm_head_cross_entropy(h.flatten(0, 1), weight, labels.flatten(), ignore_index=IGNORE_INDEX)
        # The loss works on rows [B·T]; its [B·T] result reshaped by .view would be a view, which
        # FSDP2 warns about for a module output (an in-place op on a view bypasses its pre-backward
        # hook). _unsafe_view is the reshape autograd does not track as a view (torch's matmul uses it).
        return torch.ops.aten._unsafe_view(loss, (b, t))


class HybridLM(nn.Module):
    """A causal LM whose layer ``i`` uses mixer ``cfg.pattern[i]`` and FFN ``cfg.ffn_pattern[i]``.

    With ``cfg.connection == "hc"`` the residual stream is ``cfg.hc.rate`` hyper-connection streams:
    the embedding (meta tokens included) is copied into each, and their mean feeds the final norm.

    ``cfg.vocab_size`` must be resolved (see ``braid.models.stats.resolve_vocab``) before building.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be resolved before building HybridLM")
        self.cfg = cfg
        ffn_letters = cfg.ffn_pattern * len(cfg.pattern) if len(cfg.ffn_pattern) == 1 else cfg.ffn_pattern
        if len(ffn_letters) != len(cfg.pattern):
            raise ValueError(f"model.ffn_pattern {cfg.ffn_pattern!r} must be one letter or one per layer of "
                             f"model.pattern {cfg.pattern!r}")
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # 0: one plain [B, T, d] residual stream; n: hyper-connection streams [B, T, n, d].
        self.n_streams = n_streams(cfg)
        self.layers = nn.ModuleList()
        sublayer = 0  # counted over the model so hyper-connections spread their reads over the streams
        for i, (m, f) in enumerate(zip(cfg.pattern, ffn_letters)):
            self.layers.append(Block(cfg, i, m, f, first_sublayer=sublayer))
            sublayer += self.layers[-1].n_sublayers
        # Hymba's meta tokens: learned prefix states every query may attend to; dropped before the head.
        self.meta = nn.Parameter(torch.empty(cfg.meta_tokens, cfg.d_model)) if cfg.meta_tokens else None
        self.ngpt = cfg.connection == "ngpt"
        self.norm = model_norm(cfg, cfg.d_model)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head_loss = HeadLoss()  # no parameters; tensor parallelism swaps in its vocab-parallel one
        if self.ngpt:  # the hidden states stay on the sphere; per-token logit scales s_z (braid/models/ngpt.py)
            from braid.models.ngpt import LOGIT_SCALE_INIT, ScaledParam, Sphere

            self.norm = Sphere()
            self.logit_scale = ScaledParam(cfg.vocab_size, LOGIT_SCALE_INIT, 1 / math.sqrt(cfg.d_model))
        # Set by braid.parallel.context.apply_cp: inputs are then this rank's part of each sequence.
        self.context_parallel = None
        self.reset_parameters()

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2·layers).

        Then every other module's own ``reset_parameters()`` runs, so a mixer's special inits (decay
        rates, gate biases, ...) override the generic one, including on its child Linears.
        """
        from braid.models.init import generic_init, stds

        generic_init(self, *stds(self))
        if self.meta is not None:
            nn.init.normal_(self.meta, 0.0, 1.0)
        if self.ngpt:
            from braid.models.ngpt import normalize_weights_

            normalize_weights_(self)

    def _head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            input_ids: ``[B, T]`` token ids; for a pipeline stage without the embedding
                (:func:`braid.parallel.pipeline.prune`), the previous stage's hidden states. A stage
                without the final norm returns its hidden states.
            labels: ``[B, T]`` next-token targets (``-100`` = ignored), or None.
            position_ids: ``[B, T]`` positions; default ``0..T-1`` (under context parallelism: this
                rank's global positions, see ``braid.parallel.context``).
            doc_ids: ``[B, T]`` document ids of packed sequences; mixers never cross a boundary.
        Returns:
            per-token loss ``[B, T]`` in fp32 (0 where ignored) when labels are given, else logits
            ``[B, T, V]``.
        """
        first, last = self.embed is not None, self.norm is not None  # a pipeline stage holds a part
        m = self.cfg.meta_tokens
        b, t = input_ids.shape[0], input_ids.shape[1] - (0 if first else m)
        cp = None if self.context_parallel is None else self.context_parallel.bind(t, m)
        if position_ids is None:
            position_ids = (torch.arange(t, device=input_ids.device) if cp is None
                            else cp.layout.positions(input_ids.device)).expand(b, t)
        if m:
            position_ids, doc_ids = self._meta_positions(position_ids, doc_ids)
        seq = SeqInfo(position_ids=position_ids, doc_ids=doc_ids, meta_tokens=m, ops=cp)
        if first:
            h = self.embed(input_ids)
            if m:
                h = torch.cat([self.meta.to(h.dtype).expand(b, m, -1), h], dim=1)
            if self.n_streams:
                h = expand_streams(h, self.n_streams)
        else:  # a later pipeline stage: the previous stage's residual stream(s), meta tokens included
            h = input_ids
        for layer in self.layers:
            h = layer(h, seq)
        if not last:
            return h
        if self.n_streams:
            h = merge_streams(h)
        h = self.norm(h[:, m:])
        return self.output(h, labels)

    def output(self, h: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """LM head and loss: h ``[B, T, d]`` → per-token fp32 loss ``[B, T]``, or logits ``[B, T, V]``
        without labels (``self.head_loss``); nGPT scales the logits per vocabulary entry."""
        if self.ngpt:
            return self.head_loss(h, self._head_weight(), labels, self.logit_scale())
        return self.head_loss(h, self._head_weight(), labels)

    def _meta_positions(self, position_ids: torch.Tensor, doc_ids: Optional[torch.Tensor]):
        """Meta tokens take positions 0..M-1 and text shifts by M; they belong to no document."""
        (b, _), m, device = position_ids.shape, self.cfg.meta_tokens, position_ids.device
        meta_pos = torch.arange(m, device=device).expand(b, m)
        position_ids = torch.cat([meta_pos, position_ids + m], dim=1)
        if doc_ids is not None:
            doc_ids = torch.cat([torch.full((b, m), -1, dtype=doc_ids.dtype, device=device), doc_ids], dim=1)
        return position_ids, doc_ids


def aux_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """Sum of the auxiliary losses (MoE balance, z-loss) recorded by modules in the last forward.

    A module records one by setting ``self.aux_loss`` (a scalar, coefficients already applied).
    """
    total = None
    for module in model.modules():
        value = getattr(module, "aux_loss", None)
        if isinstance(value, torch.Tensor):
            total = value if total is None else total + value
    return total
