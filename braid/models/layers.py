"""Small building blocks shared by mixers: RMSNorm, rotary embeddings, the per-sequence info."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from braid.kernels.fused import rms_norm
from braid.kernels.precision import compute_dtype
from braid.models.seq_ops import LocalOps


class Scratch:
    """A per-forward mapping that every block sees as the same object. Not a dict: FSDP2's mixed precision
    rebuilds the dicts (and dataclasses) among a module's inputs when it casts them, so a plain dict would
    give each block its own copy and lose what an earlier block stored."""

    def __init__(self):
        self._items: dict = {}

    def __getitem__(self, key):
        return self._items[key]

    def __setitem__(self, key, value) -> None:
        self._items[key] = value

    def __contains__(self, key) -> bool:
        return key in self._items

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class SeqInfo:
    """What mixers may need besides the hidden states.

    position_ids: ``[B, T]`` int64 positions (global ones under context parallelism).
    doc_ids: ``[B, T]`` document ids of packed sequences, or None for one document per row.
    meta_tokens: the first ``meta_tokens`` positions are learned prefix tokens that every query may
        see (attention passes them as ``sink``), whatever its window or document.
    shared: per-forward scratch space for cross-layer reuse (e.g. Hymba's shared K/V), keyed by
        the producing layer's index.
    ops: the sequence-mixing ops (``attention``, ``kda``, ``selective_scan``, ``local_mix``) every
        mixer calls for whatever mixes positions. Default: ``braid.models.seq_ops.LocalOps`` (the
        whole sequence is here); under context parallelism the per-forward
        ``braid.parallel.context.CPSeq`` (the tensors hold the meta tokens then this rank's segments).
    """

    position_ids: torch.Tensor
    doc_ids: Optional[torch.Tensor] = None
    meta_tokens: int = 0
    shared: Scratch = field(default_factory=Scratch)
    ops: Optional[object] = None

    def __post_init__(self):
        if self.ops is None:
            self.ops = LocalOps(self.meta_tokens)


def layer_window(cfg, layer_idx: int) -> Optional[int]:
    """The sliding window of layer ``layer_idx``: ``cfg.window`` unless listed in ``cfg.global_layers``."""
    return None if layer_idx in cfg.global_layers else cfg.window


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (the statistic is the precision-sensitive part), scaled in the input dtype.

    ``zero_centered``: the scale is ``1 + weight`` (formed in fp32), the weight starts at 0 (Megatron's
    ``layernorm_zero_centered_gamma``, Qwen3-Next), so weight decay pulls the scale to 1, not 0."""

    def __init__(self, dim: int, eps: float = 1e-5, zero_centered: bool = False):
        super().__init__()
        self.eps, self.zero_centered = eps, zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.float() + 1.0 if self.zero_centered else self.weight
        return rms_norm(x, scale, self.eps)  # torch on CPU, Triton on CUDA (braid.kernels.fused)

    def reset_parameters(self) -> None:
        (nn.init.zeros_ if self.zero_centered else nn.init.ones_)(self.weight)


def model_norm(cfg, dim: int) -> RMSNorm:
    """The norms ``model.norm_zero_centered`` applies to: residual-stream pre-norms, the final norm and
    q/k norms (a mixer's inner norms, e.g. Gated DeltaNet's gated output norm, stay plain)."""
    return RMSNorm(dim, cfg.norm_eps, zero_centered=cfg.norm_zero_centered)


class Rotary(nn.Module):
    """Rotary position embedding, rotate-half convention (as Llama in Hugging Face transformers).

    ``fraction`` < 1 rotates only the first ``rotary_dims(head_dim, fraction)`` channels of each head
    (partial RoPE: GPT-NeoX, Qwen3-Next; the frequencies are those of a head that size); the others pass."""

    def __init__(self, head_dim: int, theta: float = 10000.0, fraction: float = 1.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.dims = rotary_dims(head_dim, fraction)
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.dims, 2, dtype=torch.float32) / self.dims))

    def reset_parameters(self) -> None:
        # Buffers are not in the state dict: recompute after a meta-device build.
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """x ``[B, T, H, D]``, position_ids ``[B, T]`` → rotated x (angles in fp32)."""
        if self.dims < x.shape[-1]:
            rot, rest = x.split([self.dims, x.shape[-1] - self.dims], dim=-1)
            return torch.cat([self._rotate(rot, position_ids), rest], dim=-1)
        return self._rotate(x, position_ids)

    def _rotate(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        angles = position_ids[..., None].to(dtype) * self.inv_freq.to(dtype)  # [B, T, D/2]
        cos = torch.cat([angles.cos()] * 2, dim=-1)[:, :, None, :]
        sin = torch.cat([angles.sin()] * 2, dim=-1)[:, :, None, :]
        xf = x.to(dtype)
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)


def rotary_dims(head_dim: int, fraction: float) -> int:
    """The channels partial RoPE rotates: ``fraction`` of ``head_dim``, rounded down to pairs."""
    return int(head_dim * fraction) // 2 * 2


def mark_output_projection(linear: nn.Linear) -> nn.Linear:
    """Tag a projection that writes into the residual stream (initialised with std/sqrt(2·layers))."""
    linear._braid_residual_out = True
    return linear
