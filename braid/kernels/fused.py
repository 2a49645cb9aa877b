"""Fused generic ops: RMSNorm, SwiGLU and the LM-head cross-entropy, with backend dispatch.

``rms_norm`` and ``swiglu`` have a torch path (any device) and a Triton path (``braid.kernels.triton
.fused_norm``); the models' ``RMSNorm`` and ``SwiGLU`` call them, so their torch paths are exactly the
models' former arithmetic (a CPU run does not change by a bit). On fake tensors (the rehearsal) they are
autograd functions that save what the Triton kernels save (x and the per-row rsqrt; gate and up), not
every intermediate of the composite, so a rehearsed rank keeps a GPU rank's activations.

``lm_head_cross_entropy`` is the models' loss: on CPU the full-logits loss it always was, on CUDA
``cross_entropy_chunked``, which never holds more than one chunk of fp32 logits (a 160k vocabulary at 8k
tokens would be 5 GiB otherwise).

Backends (``backend=``): ``"torch"``; ``"triton"`` (CUDA tensors, or CPU tensors in Triton's
interpreter, for tests: see ``braid.kernels.triton``); ``"auto"`` = Triton on CUDA tensors (after the
start-up self-check, ``braid.kernels.self_check``), torch otherwise. Tensor subclasses (DTensor) stay
on torch under ``"auto"``: the kernels take plain tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from braid.kernels.backend import BACKENDS, resolve_backend  # noqa: F401 (BACKENDS re-exported)


def _auto_plain(backend: str, *tensors: torch.Tensor) -> bool:
    """False when ``"auto"`` must stay on torch because an input is a tensor subclass (DTensor)."""
    return backend != "auto" or all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, *, backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dim: ``x · rsqrt(mean(x²) + eps) · weight``.

    Args:
        x: ``[..., D]`` any float dtype; weight: ``[D]``; eps: added to the mean square.
    Returns:
        ``[..., D]`` in x's dtype; the statistic is computed in fp32 (fp64 for fp64 input); torch scales
        by the weight in x's dtype, Triton in fp32 before its one rounding.
    """
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be [D] = [{x.shape[-1]}]")
    if _auto_plain(backend, x, weight) and resolve_backend(backend, x, "rms_norm", (x.dtype, x.shape[-1])) == "triton":
        from braid.kernels.triton import load

        return load("fused_norm", interpret=not x.is_cuda).RMSNormTriton.apply(x, weight, eps)
    if _lean(x, weight):
        return _RMSNormTorch.apply(x, weight, eps)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp64 stays fp64 (gradchecks)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight.to(x.dtype)


def _lean(*tensors: torch.Tensor) -> bool:
    """Fake tensors (``braid.rehearse``, which stands in for a GPU rank) take the autograd functions that
    save what the Triton kernels save. Real CPU tensors keep the composite, whose gradients' rounding the
    parity tests' fp32-vs-fp64 floors were measured with."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.is_grad_enabled() and all(is_fake(t) for t in tensors)


class _RMSNormTorch(torch.autograd.Function):
    """The torch RMSNorm, the same arithmetic, saving x (its dtype) and the fp32 ``rsqrt`` per row only:
    autograd through the composite would keep the fp32 copy of x and the normalised output as well (three
    times x's bytes in bf16), and Korthikanti et al.'s per-layer budget counts the input alone."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return (xf * r).to(x.dtype) * weight.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        xf = x.to(r.dtype)
        n = xf * r
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (g * n.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        dn = (g * weight.to(x.dtype)).to(r.dtype)
        dx = r * dn - n * (r * (dn * n).mean(-1, keepdim=True))
        return dx.to(x.dtype), gw, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) · up`` (the SwiGLU activation between the gate/up and down projections).

    Args:
        gate, up: same shape ``[..., F]`` and dtype.
    Returns:
        ``[..., F]`` in gate's dtype (Triton computes in fp32 and rounds once).
    """
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if _auto_plain(backend, gate, up) and resolve_backend(backend, gate, "swiglu", (gate.dtype,)) == "triton":
        from braid.kernels.triton import load

        return load("fused_norm", interpret=not gate.is_cuda).SwiGLUTriton.apply(gate, up)
    if _lean(gate, up):
        return _SwiGLUTorch.apply(gate, up)
    return F.silu(gate) * up


class _SwiGLUTorch(torch.autograd.Function):
    """``silu(gate) · up`` saving gate and up only (autograd through the composite also keeps
    ``silu(gate)``, one more hidden-sized tensor per layer); the backward recomputes the sigmoid."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        acc = torch.promote_types(gate.dtype, torch.float32)
        gf, gg = gate.to(acc), g.to(acc)
        sig = torch.sigmoid(gf)
        silu = gf * sig
        d_up = (gg * silu).to(up.dtype) if ctx.needs_input_grad[1] else None
        d_gate = (gg * up.to(acc) * sig * (1 + gf * (1 - sig))).to(gate.dtype) if ctx.needs_input_grad[0] else None
        return d_gate, d_up


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token loss ``lse(h Wᵀ) − (h Wᵀ)[label]``; logits exist one token chunk at a time, in the
    forward and again (recomputed) in the backward. Saves only h, W, labels and the fp32 lse."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        n = hidden.shape[0]
        loss = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            logits = (hidden[s:e] @ weight.t()).to(acc)  # [chunk, V]: the only vocab-sized tensor
            lse[s:e] = torch.logsumexp(logits, -1)
            lab = labels[s:e]
            valid = lab != ignore_index
            tgt = logits.gather(1, torch.where(valid, lab, 0)[:, None])[:, 0]
            loss[s:e] = torch.where(valid, lse[s:e] - tgt, 0.0)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index, ctx.chunk = ignore_index, chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, lse = ctx.saved_tensors
        acc = lse.dtype
        n = hidden.shape[0]
        d_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        for s in range(0, n, ctx.chunk):
            e = min(n, s + ctx.chunk)
            lab = labels[s:e]
            valid = lab != ctx.ignore_index
            # d loss / d logits = softmax − onehot(label), per token scaled by its incoming gradient.
            p = torch.exp((hidden[s:e] @ weight.t()).to(acc) - lse[s:e, None])
            rows = torch.arange(e - s, device=p.device)
            p[rows, torch.where(valid, lab, 0)] -= 1.0
            p *= torch.where(valid, grad_loss[s:e].to(acc), 0.0)[:, None]
            p = p.to(hidden.dtype)
            if d_hidden is not None:
                d_hidden[s:e] = p @ weight
            if d_weight is not None:
                d_weight += (p.t() @ hidden[s:e]).to(acc)
        return d_hidden, None if d_weight is None else d_weight.to(weight.dtype), None, None, None


def cross_entropy_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    reduction: str = "none",
) -> torch.Tensor:
    """Cross-entropy of the LM head ``logits = hidden @ weightᵀ`` without materialising all logits.

    Tokens are processed ``chunk_size`` at a time: peak extra memory is one ``[chunk_size, V]`` fp32
    logits block (forward, and again in the backward, which recomputes it) instead of ``[N, V]``.

    Args:
        hidden: ``[..., D]`` final hidden states (any float dtype; the matmul runs in it).
        weight: ``[V, D]`` LM head (or tied embedding) weight, same dtype as hidden.
        labels: ``[...]`` int64 targets (hidden's leading shape); ``ignore_index`` marks no-loss tokens.
        chunk_size: tokens per chunk (> 0).
        reduction: ``"none"`` (per-token losses, 0 at ignored tokens), ``"sum"``, or ``"mean"`` (over
            non-ignored tokens).
    Returns:
        fp32 (fp64 for fp64 input) losses of labels' shape, or a scalar.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"cross_entropy_chunked: labels {tuple(labels.shape)} must match hidden's leading "
                         f"shape {tuple(hidden.shape[:-1])}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"cross_entropy_chunked: weight {tuple(weight.shape)} must be [V, {hidden.shape[-1]}]")
    if chunk_size <= 0:
        raise ValueError(f"cross_entropy_chunked: chunk_size must be > 0, got {chunk_size}")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"cross_entropy_chunked: reduction={reduction!r} is unknown (allowed: none, sum, mean)")
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        # Autocast does not reach inside an autograd.Function's backward: cast once here, so that the
        # forward and the recomputing backward both run their matmuls in the autocast dtype.
        dt = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dt), weight.to(dt)
    with torch.autocast(dev, enabled=False):
        loss = _ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                          ignore_index, chunk_size).view(labels.shape)
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / (labels != ignore_index).sum().clamp_min(1)


def cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            ignore_index: int = -100) -> torch.Tensor:
    """Unchunked per-token loss (full fp32 logits), the reference for tests and benchmarks."""
    logits = (hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=ignore_index,
                           reduction="none").view(labels.shape)


def lm_head_chunk(vocab: int) -> int:
    """Tokens per chunk: about 2²⁷ logits (512 MiB in fp32) at a time, 64 to 8192 tokens."""
    return max(64, min(8192, 2**27 // max(1, vocab)))


def lm_head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          ignore_index: int = -100, backend: str = "auto") -> torch.Tensor:
    """The models' loss: per-token fp32 cross-entropy of ``hidden @ weightᵀ`` against ``labels``.

    Args:
        hidden: ``[N, D]``; weight: ``[V, D]``; labels: ``[N]`` (``ignore_index``: no loss, 0 there).
        backend: ``"full"`` (the logits ``[N, V]`` in fp32, then ``F.cross_entropy``), ``"chunked"``
            (``cross_entropy_chunked``) or ``"auto"`` = chunked on CUDA tensors, full elsewhere.
    Returns:
        ``[N]`` fp32 losses (fp64 for fp64 input on the chunked path).
    """
    if backend not in ("auto", "full", "chunked"):
        raise ValueError(f"lm_head_cross_entropy: backend={backend!r} is unknown (allowed: auto, full, chunked)")
    if backend == "chunked" or (backend == "auto" and hidden.is_cuda):
        return cross_entropy_chunked(hidden, weight, labels, ignore_index=ignore_index,
                                     chunk_size=lm_head_chunk(weight.shape[0]))
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
