"""Triton selective scan (interpreter) against the fp64 torch scan: outputs, final state and every
gradient (u, dt, A, B, C, D, z, initial state), lengths not multiples of the chunk, resets with and
without an initial state, optional D/z, fp32 and fp16 inputs, outputs poisoned with NaN."""

from __future__ import annotations

import pytest
import torch

from braid.kernels.ssm import selective_scan
from helpers import compile_in_subprocess, interpreter_only, rel_rms

pytestmark = interpreter_only

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}

def make_inputs(b=2, t=21, c=5, n=3, seed=0):
    """fp64 random inputs (never zero): u, dt > 0, A < 0, B, C, D, z, initial state, resets."""
    g = torch.Generator().manual_seed(seed)
    x = dict(u=torch.randn(b, t, c, generator=g, dtype=torch.float64),
             dt=torch.rand(b, t, c, generator=g, dtype=torch.float64) * 0.5 + 1e-2,
             A=-(torch.rand(c, n, generator=g, dtype=torch.float64) * 3 + 0.1),
             B=torch.randn(b, t, n, generator=g, dtype=torch.float64),
             C=torch.randn(b, t, n, generator=g, dtype=torch.float64),
             D=torch.randn(c, generator=g, dtype=torch.float64),
             z=torch.randn(b, t, c, generator=g, dtype=torch.float64))
    h0 = torch.randn(b, c, n, generator=g, dtype=torch.float64)
    reset = torch.rand(b, t, generator=g) < 0.15
    reset[0, 0] = reset[1, t // 2] = True
    return x, h0, reset


def run(x, h0, reset, backend, chunk, seed=1):
    """(y, final, grads by name) under random output and final-state gradients."""
    xs = {k: v.detach().clone().requires_grad_() for k, v in x.items() if v is not None}
    h = None if h0 is None else h0.detach().clone().requires_grad_()
    y, s = selective_scan(**xs, initial_state=h, reset=reset, output_final_state=True, chunk_size=chunk,
                          backend=backend)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    ds = torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.dtype)
    leaves = list(xs.values()) + ([h] if h is not None else [])
    grads = torch.autograd.grad((y * dy).sum() + (s * ds).sum(), leaves)
    return y.detach(), s.detach(), dict(zip(list(xs) + (["h0"] if h is not None else []), grads))


def check(x, h0, reset, dtype, chunk):
    xd = {k: None if v is None else v.to(dtype) for k, v in x.items()}
    xd["A"] = None if x["A"] is None else x["A"].float()  # parameters stay fp32 under mixed precision
    xd["D"] = None if x["D"] is None else x["D"].float()
    h0d = None if h0 is None else h0.float()
    y, s, grads = run(xd, h0d, reset, "triton", chunk)
    y_ref, s_ref, grads_ref = run({k: None if v is None else v.double() for k, v in xd.items()},
                                  None if h0d is None else h0d.double(), reset, "torch", 16)
    assert y.dtype == dtype and s.dtype == torch.float32
    assert all(grads[k].dtype == (h0d if k == "h0" else xd[k]).dtype for k in grads)
    for name, a, b in [("y", y, y_ref), ("final state", s, s_ref)] + [
            ("d" + k, grads[k], grads_ref[k]) for k in grads_ref]:
        assert torch.isfinite(a).all(), f"{name}: not finite"
        assert rel_rms(a, b) < TOL[dtype], f"{name}: rel RMS {rel_rms(a, b):.2e}"


@pytest.mark.parametrize("t,chunk", [(21, 8), (16, 16), (5, 64)])
def test_scan_triton_matches_torch(poison, t, chunk):
    x, h0, reset = make_inputs(t=t)
    check(x, h0, reset, torch.float32, chunk)


@pytest.mark.parametrize("with_state", [False, True])
def test_scan_triton_options(poison, with_state):
    """No D, no z, no resets; and resets without an initial state (restart from zeros)."""
    x, h0, reset = make_inputs(t=13, c=7, n=5, seed=3)
    check(dict(x, D=None, z=None), h0 if with_state else None, None, torch.float32, 4)
    check(x, h0 if with_state else None, reset, torch.float32, 4)


def test_scan_triton_fp16(poison):
    x, h0, reset = make_inputs(t=19, seed=5)
    check(x, h0, reset, torch.float16, 8)


def test_scan_backend_errors():
    x, _, _ = make_inputs(t=4)
    with pytest.raises(ValueError, match="backend='cuda' is unknown"):
        selective_scan(**{k: v.float() for k, v in x.items()}, backend="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan(**{k: v.float() for k, v in x.items()}, chunk_size=0)


@pytest.mark.slow
@pytest.mark.parametrize("d_state,dtype", [(16, "bf16"), (64, "fp32")])
def test_scan_kernels_compile_for_h100(d_state, dtype):
    """Compiled for sm_90 (no GPU needed): what the interpreter cannot check, shared memory and spills."""
    (stats,) = compile_in_subprocess("scan", [dict(d_state=d_state, dtype=dtype)])
    for name, st in stats.items():
        assert st["fits"] and st["local"] == 0, (name, st)
