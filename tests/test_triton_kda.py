"""Triton KDA (intra-chunk transform + state recurrence kernels, in the interpreter) against the fp64
torch chunked op (itself tested against the token recurrence): output, final state and the gradients
of q, k, v, g, beta, the initial and the restart state; lengths not multiples of the chunk, chunk 64,
several value blocks, document resets (to zeros or to a restart state), strong decays (fp32 overflow if
factored naively), fp32 and fp16 inputs, outputs poisoned with NaN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from braid.kernels import kda
from helpers import compile_in_subprocess, interpreter_only, rel_rms

pytestmark = interpreter_only

NAMES = ["o", "final state", "dq", "dk", "dv", "dg", "dbeta", "dstate", "drestart"]
TOL = {torch.float32: 2e-5, torch.float16: 1e-3}  # fp16: the same rounded inputs; outputs round to fp16

def make_inputs(b=2, t=37, h=2, dk=12, dv=20, *, decay=0.5, seed=0):
    """fp64: unit-norm q, k (as the layer feeds them), v, g ∈ [−decay, 0), β ∈ (0, 1), initial state."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, t, h, dk, generator=gen, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(b, t, h, dk, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(b, t, h, dv, generator=gen, dtype=torch.float64)
    g = -decay * torch.rand(b, t, h, dk, generator=gen, dtype=torch.float64).clamp_min(1e-3)
    beta = torch.rand(b, t, h, generator=gen, dtype=torch.float64).clamp(0.01, 0.99)
    s0 = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    return [q, k, v, g, beta, s0]


def run(inputs, backend, seed=1, **kw):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    if len(xs) > 6:  # a seventh input is the restart state
        kw["restart_state"] = xs[6]
    o, s = kda(*xs[:5], initial_state=xs[5], output_final_state=True, backend=backend, **kw)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    ds = torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype)
    return [o.detach(), s.detach(), *torch.autograd.grad((o * do).sum() + (s * ds).sum(), xs)]


def check(inputs, dtype, **kw):
    xs = [x.to(dtype) for x in inputs[:5]] + [x.float() for x in inputs[5:]]
    got = run(xs, "triton", **kw)
    ref = run([x.double() for x in xs], "torch", **kw)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for name, a, b in zip(NAMES, got, ref):
        assert torch.isfinite(a).all(), f"{name}: not finite"
        assert rel_rms(a, b) < TOL[dtype], f"{name}: rel RMS {rel_rms(a, b):.2e}"


@pytest.mark.parametrize("b,t,h", [(1, 37, 2), (1, 32, 1), (2, 5, 1)])
def test_kda_triton_matches_torch(poison, b, t, h):
    check(make_inputs(b=b, t=t, h=h), torch.float32, chunk_size=16)


def test_kda_triton_value_blocks_and_chunk_64(poison):
    """V = 80 spans two value blocks (partial gradients summed); chunk 64 with T = 70."""
    check(make_inputs(b=1, t=70, h=1, dk=16, dv=80), torch.float32, chunk_size=64)


def test_kda_triton_doc_resets_and_strong_decay(poison):
    inputs = make_inputs(t=45, h=1, decay=30.0, seed=2)
    doc_ids = torch.tensor([[0] * 10 + [1] * 20 + [2] * 15, [5] * 3 + [6] * 40 + [5] * 2])
    check(inputs, torch.float32, chunk_size=16, doc_ids=doc_ids)


@pytest.mark.parametrize("decay", [0.5, 30.0])
def test_kda_triton_doc_restart_state(poison, decay):
    """Documents restart from a restart state (meta tokens' state), the gradient of that state too;
    starts mid-chunk, on a chunk edge (16, 32), a 1-token document, value blocks of 64 + 16."""
    inputs = make_inputs(b=2, t=45, h=1, dv=80, decay=decay, seed=6)
    restart = torch.randn(inputs[5].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    doc_ids = torch.tensor([[0] * 10 + [1] * 6 + [2] * 1 + [3] * 28, [5] * 3 + [6] * 29 + [7] * 13])
    check(inputs + [restart], torch.float32, chunk_size=16, doc_ids=doc_ids)


def test_kda_triton_fp16(poison):
    check(make_inputs(b=1, t=23, h=1, seed=4), torch.float16, chunk_size=16)


def test_kda_triton_rejects_bad_chunk():
    q, k, v, g, beta, _ = (x.float() for x in make_inputs(t=8))
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        kda(q, k, v, g, beta, chunk_size=24, backend="triton")


@pytest.mark.slow
@pytest.mark.parametrize("t", [200, 257])
def test_kda_triton_long(poison, t):
    check(make_inputs(b=1, t=t, h=2, dk=32, dv=48, seed=t), torch.float32, chunk_size=64)


@pytest.mark.parametrize("k,capability", [(128, 90), pytest.param(64, 90, marks=pytest.mark.slow),
                                          pytest.param(128, 80, marks=pytest.mark.slow),
                                          pytest.param(64, 80, marks=pytest.mark.slow)])
def test_state_kernels_fit_the_gpu(k, capability):
    """Compiled for the GPU (no GPU needed): Kimi Linear's 128-wide heads in chunks of 64 must fit a
    block's shared memory (Triton's default pipelining did not: 442 KB on sm_90) without spills."""
    (stats,) = compile_in_subprocess("kda_state", [dict(k=k, v=k, c=64, capability=capability)])
    for name, st in stats.items():
        assert st["fits"] and st["local"] == 0, (name, st)


@pytest.mark.slow  # ~75 s of ahead-of-time compiles on 2 cores
def test_intra_chunk_kernels_fit_the_gpu():
    # sm_90 only: compiling these for sm_80 takes minutes (ptxas), longer than the test's budget.
    (stats,) = compile_in_subprocess("kda_intra", [dict(k=128, v=128, c=64, capability=90)])
    for name, st in stats.items():
        assert st["fits"] and st["local"] == 0, (name, st)
