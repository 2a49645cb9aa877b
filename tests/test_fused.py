"""Fused ops: Triton RMSNorm / SwiGLU (interpreter) against fp64 torch references, forward and every
gradient, odd sizes, outputs poisoned with NaN; the chunked LM-head cross-entropy against the full
logits (values, gradients, ignore_index, reductions, chunk sizes not dividing the token count)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from braid.kernels.fused import cross_entropy_chunked, cross_entropy_reference, rms_norm, swiglu
from helpers import interpreter_only, rel_rms

TOL = {torch.float32: 2e-6, torch.float16: 2e-3}

def grads_of(fn, inputs, seed=1):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    y = fn(*xs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    return y.detach(), torch.autograd.grad((y * dy).sum(), xs)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 7, 48), (5, 130)])
def test_rms_norm_triton(poison, dtype, shape):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)).to(dtype)
    y, (dx, dw) = grads_of(lambda a, b: rms_norm(a, b, 1e-5, backend="triton"), [x, w])
    y_ref, (dx_ref, dw_ref) = grads_of(lambda a, b: rms_norm(a, b, 1e-5, backend="torch"),
                                       [x.double(), w.double()])
    for name, a, b in [("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)]:
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert rel_rms(a, b) < TOL[dtype], f"{name}: {rel_rms(a, b):.2e}"


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu_triton(poison, dtype):
    gen = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(3, 5, 347, generator=gen, dtype=torch.float64).mul(3).to(dtype) for _ in range(2))
    y, grads = grads_of(lambda a, b: swiglu(a, b, backend="triton"), [gate, up])
    y_ref, grads_ref = grads_of(lambda a, b: F.silu(a) * b, [gate.double(), up.double()])
    for name, a, b in zip(["y", "dgate", "dup"], [y, *grads], [y_ref, *grads_ref]):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert rel_rms(a, b) < TOL[dtype], f"{name}: {rel_rms(a, b):.2e}"


def test_backend_errors_name_the_key():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="backend='cuda' is unknown"):
        rms_norm(x, torch.ones(4), backend="cuda")
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(3))
    with pytest.raises(ValueError, match="same shape"):
        swiglu(x, torch.randn(2, 5))


def _ce_inputs(n_tokens=37, d=24, vocab=53, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n_tokens, d, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(vocab, d, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    labels = torch.randint(0, vocab, (n_tokens,), generator=gen)
    labels[::5] = -100  # ignored tokens
    return h.view(1, n_tokens, d), w, labels.view(1, n_tokens)


@pytest.mark.parametrize("chunk", [1, 8, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_entropy_chunked_matches_full_logits(poison, chunk, dtype):
    h, w, labels = _ce_inputs(dtype=dtype)
    fn = lambda a, b: cross_entropy_chunked(a, b, labels, chunk_size=chunk)  # noqa: E731
    loss, (dh, dw) = grads_of(fn, [h, w])
    ref, (dh_ref, dw_ref) = grads_of(lambda a, b: cross_entropy_reference(a, b, labels), [h.double(), w.double()])
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert loss.shape == labels.shape and (loss[labels == -100] == 0).all()
    for name, a, b in [("loss", loss, ref), ("dh", dh, dh_ref), ("dw", dw, dw_ref)]:
        assert torch.isfinite(a).all(), name
        assert rel_rms(a, b) < tol, f"{name}: {rel_rms(a, b):.2e}"


def test_cross_entropy_chunked_reductions_and_errors():
    h, w, labels = _ce_inputs()
    ref = cross_entropy_reference(h, w, labels)
    n_valid = (labels != -100).sum()
    assert torch.allclose(cross_entropy_chunked(h, w, labels, reduction="sum", chunk_size=7), ref.sum())
    assert torch.allclose(cross_entropy_chunked(h, w, labels, reduction="mean", chunk_size=7), ref.sum() / n_valid)
    with pytest.raises(ValueError, match="reduction='avg'"):
        cross_entropy_chunked(h, w, labels, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        cross_entropy_chunked(h, w, labels, chunk_size=0)
    with pytest.raises(ValueError, match="labels"):
        cross_entropy_chunked(h, w, labels[:, :-1])


def test_rehearsal_paths_are_exact_gradients_and_save_only_what_the_kernels_save():
    """The torch RMSNorm and SwiGLU autograd functions that fake tensors (the rehearsal) take: gradcheck in
    fp64, and the tensors kept for backward are x (its dtype) with the fp32 per-row rsqrt, and gate with
    up, as the Triton kernels keep: no fp32 copy, no normalised output, no silu(gate)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from braid.kernels.fused import _RMSNormTorch, _SwiGLUTorch

    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormTorch.apply(a, b, 1e-5), (x, w))
    g = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLUTorch.apply, (g, u))

    saved = []
    with FakeTensorMode(), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        xb = torch.randn(2, 8, 32, dtype=torch.bfloat16, requires_grad=True)
        rms_norm(xb, torch.ones(32, dtype=torch.bfloat16, requires_grad=True), 1e-5, backend="torch")
        assert sorted(s for s in saved if s[0] != (32,)) == [((2, 8, 1), torch.float32), ((2, 8, 32), torch.bfloat16)]
        saved.clear()
        gb, ub = (torch.randn(2, 8, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        swiglu(gb, ub, backend="torch")
        assert saved == [((2, 8, 64), torch.bfloat16)] * 2
