"""AdamW with Megatron's weight-decay grouping, or Muon for the weight matrices (``train.optimizer``)."""

from __future__ import annotations

import torch
import torch.nn as nn

from braid.config import TrainConfig
from braid.parallel.zero3 import full_shape


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: no decay on norms, biases (1-D), embeddings (tied heads included) and
    parameters a module marks with ``_no_weight_decay = True`` (decay rates, connection matrices)."""
    no_decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        exempt = len(full_shape(p)) < 2 or id(p) in no_decay_ids or getattr(p, "_no_weight_decay", False)
        (no_decay if exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def muon_param_ids(model: nn.Module) -> dict[int, bool]:
    """The parameters Muon updates, each with whether it is stored ``[in, out]`` (the experts' stacked
    ``[E, in, out]`` matrices) rather than ``nn.Linear``'s ``[out, in]``: weights of the ``nn.Linear``
    layers inside the blocks and the experts' matrices, except the MoE router and shared-expert gate (their
    rows are per-expert or per-token scores, not a linear map to orthogonalise) and anything marked
    ``_no_weight_decay``. Embeddings, the
    LM head (tied or not), norms, biases, convolutions and other 1-D or scalar parameters stay with AdamW."""
    head = getattr(model, "lm_head", None)
    skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if head is not None:
        skip.add(id(head.weight))
    ids: dict[int, bool] = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in ("router", "shared_gate"):
            continue
        for pname, p in module.named_parameters(recurse=False):
            matrix = isinstance(module, nn.Linear) and pname == "weight"
            experts = p.ndim == 3 and not isinstance(module, nn.Conv1d) and name.split(".")[-1] == "ffn"
            if (matrix or experts) and id(p) not in skip and not getattr(p, "_no_weight_decay", False):
                ids[id(p)] = experts
    return ids


def muon_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Muon's matrices (all decayed; ``[out, in]`` ones, then ``[in, out]`` ones) and the AdamW groups of
    ``param_groups`` without them."""
    ids = muon_param_ids(model)
    params = [p for p in model.parameters() if id(p) in ids and p.requires_grad]
    muon = [{"params": [p for p in params if ids[id(p)] == in_out], "weight_decay": weight_decay, "muon": True,
             "in_out": in_out} for in_out in (False, True)]
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in param_groups(model, weight_decay)]
    # No empty groups: DCP's optimizer state dict keys the groups' settings by their parameters.
    return [g for g in (*muon, *groups) if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    fused = next(model.parameters()).is_cuda
    if cfg.optimizer == "muon":
        from braid.trainer.muon import MuonAdamW

        return MuonAdamW(muon_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                         eps=cfg.eps, momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov,
                         ns_steps=cfg.muon_ns_steps, lr_rule=cfg.muon_lr_scale)
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,
    )
