"""nGPT (Loshchilov et al., "nGPT: Normalized Transformer with Representation Learning on the
Hypersphere", 2024) as a connection, ``model.connection=ngpt``.

The hidden state lives on the unit sphere of R^d. Around each sublayer f (mixer or FFN):

    h_f = Norm(f(h))                      (f reads h itself: no pre-norm)
    h  ← Norm(h + α ⊙ (h_f − h))          (paper eqs. 10-11; Norm(x) = x / ‖x‖₂)

with α ∈ R^d a learned "eigen learning rate" per sublayer, stored as α_p and used as
α = α_p · (α_init / α_scale) with α_p initialised to α_scale = 1/√d (the paper's reparametrisation,
so that the optimizer's step size on α matches that of the other parameters).

The matrices are normalised along their embedding dimension, at init and after every optimizer step
(``normalized_params``: rows of the embedding, the LM head and every projection that reads the
hidden state, columns of the output projections that write it), the final norm is the sphere
projection, and the logits are scaled per vocabulary entry, z = s_z ⊙ (E h) with s_z stored as
s_z,p · (s_z,init / s_z,scale), s_z,init = 1, s_z,scale = 1/√d.

Not here (they live inside the mixers and FFNs, which this connection does not change): the paper's
q/k normalisation with s_qk and softmax scale √d_k (``model.qk_norm`` gives an RMS-normalised
variant), and the SwiGLU input scalings s_u, s_v·√d.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn as nn

from braid.config import ModelConfig

ALPHA_INIT = 0.05  # the paper's α_A,init = α_M,init
LOGIT_SCALE_INIT = 1.0
EPS = 1e-12  # only guards a zero vector; unit-norm inputs never come near it


def sphere(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / ‖x‖₂ along ``dim``, computed in fp32 (fp64 kept), returned in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf / torch.linalg.vector_norm(xf, dim=dim, keepdim=True).clamp_min(EPS)).to(x.dtype)


class Sphere(nn.Module):
    """The final "norm" of an nGPT model: projection onto the unit sphere (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sphere(x)


class ScaledParam(nn.Module):
    """A learned vector used as ``param · (init / scale)``, the parameter itself initialised to ``scale``."""

    def __init__(self, n: int, init: float, scale: float):
        super().__init__()
        self.init, self.scale = init, scale
        self.param = nn.Parameter(torch.empty(n))
        self.param._no_weight_decay = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.param.fill_(self.scale)

    def forward(self) -> torch.Tensor:
        return self.param * (self.init / self.scale)


class NGPTConnection(nn.Module):
    """``h ← Norm(h + α ⊙ (Norm(f(h)) − h))`` on the plain ``[B, T, d]`` stream of unit vectors."""

    def __init__(self, cfg: ModelConfig, sublayer_idx: int):
        super().__init__()
        d = cfg.d_model
        self.alpha = ScaledParam(d, ALPHA_INIT, 1 / math.sqrt(d))

    def forward(self, h: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        hf = sphere(sublayer(h)).to(torch.promote_types(h.dtype, torch.float32))
        h32 = h.to(hf.dtype)
        return sphere(h32 + self.alpha().to(hf.dtype) * (hf - h32)).to(h.dtype)

    def flops_per_token(self, seq_len: int) -> float:
        """No matmuls (norms and the interpolation are not counted)."""
        return 0.0


def normalized_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, int]]:
    """(name, parameter, dim) of every matrix nGPT keeps at unit norm along ``dim``, its embedding dim:
    embedding and head rows ``[V, d]`` (dim 1), rows of every projection that reads the hidden state
    (``nn.Linear`` with ``in_features == d``: dim 1), columns of the output projections that write it
    (``mark_output_projection``: dim 0). Projections between inner sizes are left alone."""
    d = model.cfg.d_model
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            found = (module.weight, 1)
        elif isinstance(module, nn.Linear) and getattr(module, "_braid_residual_out", False):
            found = (module.weight, 0)
        elif isinstance(module, nn.Linear) and module.in_features == d:
            found = (module.weight, 1)
        else:
            continue
        if id(found[0]) not in seen:  # a tied head is the embedding
            seen.add(id(found[0]))
            yield f"{name}.weight", *found


@torch.no_grad()
def normalize_weights_(model: nn.Module) -> None:
    """Single-device form (init, tests); the trainer's sharded form is braid.trainer.ngpt_step."""
    for _, p, dim in normalized_params(model):
        p.copy_(sphere(p, dim))
