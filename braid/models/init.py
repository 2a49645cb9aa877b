"""Initial weights as a function of (seed, parameter name): the same values under every layout.

:meth:`HybridLM.reset_parameters` applies the rules in place on a plain model (the generic Normal
init, then every module's own ``reset_parameters``). A parallel build never holds that plain model:
it builds a template on the meta device and asks :func:`draw_parameter` for one parameter at a time.
That runs the same rules on the parameter's *init unit* (the block component or top-level module
that holds it; every rule writes inside its unit) with only this parameter real and every other one
left on the meta device, under an RNG seeded by (seed, name). The value therefore depends on neither
the order of parameters, nor the layout, nor which parameters this rank holds, and its distribution
is exactly that of the in-place rules.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from braid.models.tp_plan import reset_view


def generic_init(root: nn.Module, std: float, out_std: float) -> None:
    """Normal(0, std) Linear/Embedding weights (std/sqrt(2·layers) for residual outputs), zero biases;
    then every other module's own ``reset_parameters()``, so special inits (decay rates, gate biases)
    override the generic one, including on their child Linears."""
    for module in root.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, out_std if getattr(module, "_braid_residual_out", False) else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
    for module in root.modules():
        if type(module).__name__ == "HybridLM":
            continue  # its own rule is the caller (the meta tokens)
        if not isinstance(module, (nn.Linear, nn.Embedding)) and hasattr(module, "reset_parameters"):
            with reset_view(module):  # tensor parallelism: the full-size view of sharded weights
                module.reset_parameters()


def stds(model: nn.Module) -> tuple[float, float]:
    std = model.cfg.init_std
    return std, std / math.sqrt(2 * model.n_layers)


def unit_of(name: str) -> str:
    """The init unit holding parameter/buffer ``name``: ``layers.<i>.<component>`` or a top-level module;
    ``""`` for parameters of the root itself (the meta tokens)."""
    parts = name.split(".")
    if parts[0] == "layers":
        return ".".join(parts[:3])
    return "" if len(parts) == 1 else parts[0]


def key_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, name): stable across runs, processes and Python's hash seed."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


def _run_rules(template: nn.Module, name: str) -> None:
    unit = unit_of(name)
    if unit == "":
        nn.init.normal_(template.get_parameter(name), 0.0, 1.0)  # HybridLM.meta: the meta tokens
    else:
        generic_init(template.get_submodule(unit), *stds(template))


@torch.no_grad()
def draw_parameter(template: nn.Module, name: str, device: torch.device, seed: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full initial value of parameter ``name`` of ``template`` (a HybridLM on the meta device, left
    as it was), drawn on ``device``. Only this one parameter is allocated, unless a rule of its unit
    computes it from another parameter of the unit (reads its device or values): then the whole unit
    is allocated for the draw (still the same values under every layout)."""
    unit = unit_of(name)
    try:
        return _draw(template, name, [name], device, seed, dtype)
    except (NotImplementedError, RuntimeError):  # a rule mixed a meta tensor with a real one
        names = [name] if unit == "" else [f"{unit}.{n}" for n, _ in template.get_submodule(unit).named_parameters()]
        return _draw(template, name, names, device, seed, dtype)


def _draw(template: nn.Module, name: str, real_names: list[str], device: torch.device, seed: int,
          dtype: torch.dtype) -> torch.Tensor:
    saved = []
    for n in real_names:
        owner, attr = _owner(template, n)
        meta = owner._parameters[attr]
        real = nn.Parameter(torch.empty(meta.shape, dtype=dtype, device=device), requires_grad=meta.requires_grad)
        for tag, value in vars(meta).items():
            setattr(real, tag, value)
        owner._parameters[attr] = real
        saved.append((owner, attr, meta))
    try:
        with _seeded(key_seed(seed, name), device):
            _run_rules(template, name)
        return template.get_parameter(name).data
    finally:
        for owner, attr, meta in saved:
            owner._parameters[attr] = meta


@torch.no_grad()
def draw_buffers(template: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """Every buffer's initial value (running counts, rotary frequencies: none is random), on ``device``."""
    saved = {}
    for module in template.modules():
        for n, b in module._buffers.items():
            if b is not None:
                saved[(module, n)] = b
                module._buffers[n] = torch.empty(b.shape, dtype=b.dtype, device=device)
    try:
        generic_init(template, *stds(template))  # parameters stay on the meta device: no work, no memory
        return {name: b.detach().clone() for name, b in template.named_buffers()}
    finally:
        for (module, n), b in saved.items():
            module._buffers[n] = b


__all__ = ["generic_init", "unit_of", "key_seed", "draw_parameter", "draw_buffers"]
