"""Start-up self-check of the Triton kernels (braid/kernels/self_check.py), on CPU through Triton's
interpreter: ``backend="auto"`` is made to pick Triton on CPU tensors, a wrong kernel is injected, and
the op must fall back to torch for the process with one warning line; right kernels pass every case."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from braid.config import load_config
from braid.errors import ConfigError
from braid.kernels import backend, self_check
from braid.kernels.fused import rms_norm, swiglu
from helpers import interpreter_only


@pytest.fixture
def auto_is_triton(monkeypatch):
    """``backend="auto"`` resolves as on CUDA, with fresh verdicts; the check is on."""
    monkeypatch.setattr(backend, "_auto_triton", lambda x: True)
    self_check.reset()
    self_check.configure(True)
    yield
    self_check.reset()
    self_check.configure(True)


def _wrong_swiglu(monkeypatch):
    """Replace the SwiGLU forward kernel by one 10% off (a plausible bug: a wrong constant)."""
    import triton
    import triton.language as tl

    from braid.kernels.triton import load

    mod = load("fused_norm", interpret=True)

    @triton.jit
    def bad_fwd(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, (1.1 * g * tl.sigmoid(g) * u).to(y_ptr.dtype.element_ty), mask=m)

    monkeypatch.setattr(mod, "_swiglu_fwd", bad_fwd)


def _inputs():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 40, generator=gen), torch.randn(2, 3, 40, generator=gen)


@interpreter_only
def test_wrong_kernel_sends_the_op_to_torch_with_one_warning(auto_is_triton, monkeypatch, caplog):
    _wrong_swiglu(monkeypatch)
    a, b = _inputs()
    assert not torch.allclose(swiglu(a, b, backend="triton"), F.silu(a) * b, rtol=1e-3)  # it is wrong
    with caplog.at_level(logging.WARNING, logger="braid"):
        y1 = swiglu(a, b)
        y2 = swiglu(a.double(), b.double())  # another signature: the op stays on torch, no new check
    assert torch.equal(y1, F.silu(a) * b) and torch.equal(y2, F.silu(a.double()) * b.double())
    lines = [r.getMessage() for r in caplog.records if r.name == "braid"]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "Triton swiglu failed its start-up self-check" in lines[0] and "relative RMS error" in lines[0]
    assert "swiglu" in self_check.failed_ops() and "rms_norm" not in self_check.failed_ops()


@interpreter_only
def test_launch_failure_falls_back(auto_is_triton, monkeypatch, caplog):
    from braid.kernels.triton import load

    def boom(*args):
        raise RuntimeError("Triton Error [CUDA]: out of resource: shared memory, Required: 300000\nmore")

    monkeypatch.setattr(load("fused_norm", interpret=True).RMSNormTriton, "apply", boom)
    x, w = torch.randn(4, 24), torch.rand(24) + 0.5
    with caplog.at_level(logging.WARNING, logger="braid"):
        y = rms_norm(x, w)
    assert torch.equal(y, rms_norm(x, w, backend="torch"))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "braid"]
    assert "rms_norm" in line and "RuntimeError: Triton Error [CUDA]: out of resource" in line and "more" not in line


@interpreter_only
def test_right_kernel_serves_after_one_check(auto_is_triton, monkeypatch, caplog):
    from braid.kernels.triton import load

    mod = load("fused_norm", interpret=True)
    calls = []
    real = mod.RMSNormTriton.apply
    monkeypatch.setattr(mod.RMSNormTriton, "apply", lambda *a: calls.append(1) or real(*a))
    x, w = torch.randn(4, 24), torch.rand(24) + 0.5
    with caplog.at_level(logging.WARNING, logger="braid"):
        for _ in range(3):
            y = rms_norm(x, w)
    assert not caplog.records and not self_check.failed_ops()
    assert len(calls) == 1 + 3  # the check's one run, then every call
    assert torch.allclose(y, rms_norm(x, w, backend="torch"), atol=1e-6)


@interpreter_only
def test_disabled_check_trusts_the_kernel(auto_is_triton, monkeypatch):
    _wrong_swiglu(monkeypatch)
    self_check.configure(False)
    a, b = _inputs()
    assert not torch.allclose(swiglu(a, b), F.silu(a) * b, rtol=1e-3)  # the wrong kernel ran unchecked
    assert not self_check.failed_ops()


@interpreter_only
@pytest.mark.parametrize("op,sig", [
    ("attention", (torch.float32, 16, 16, True, "causal+window+sink+doc+forget+lse", None)),
    ("attention", (torch.float32, 16, 8, False, "causal+offset", None)),
    ("attention", (torch.float32, 16, 16, False, "causal+s2", (16, 32, 8))),
    ("kda", (torch.float32, 16, 16, 16, True, True, True)),
    ("selective_scan", (torch.float32, 4, True, True, True, True, 16)),
    ("rms_norm", (torch.float16, 24)),
    ("swiglu", (torch.float16,)),
])
def test_every_case_passes_with_the_real_kernels(op, sig):
    assert self_check._run(op, sig, torch.device("cpu")) is None


def test_self_check_case_catches_a_wrong_torch_free_result(monkeypatch):
    """The comparison itself: a kernel output 5% off in fp32 is refused, and the reason names it."""
    pairs = [("output 0", torch.ones(10) * 1.05, torch.ones(10))]
    monkeypatch.setitem(self_check.CASES, "fake", lambda sig, dev: pairs)
    assert "output 0 relative RMS error 5.00e-02" in self_check._run("fake", (torch.float32,), torch.device("cpu"))
    monkeypatch.setitem(self_check.CASES, "fake", lambda sig, dev: [("g", torch.tensor([float("nan")]),
                                                                     torch.ones(1))])
    assert self_check._run("fake", (torch.bfloat16,), torch.device("cpu")) == "g is not finite"


def test_config_key(tmp_path):
    assert load_config(overrides=["kernels.self_check=false"]).kernels.self_check is False
    assert load_config().kernels.self_check is True
    with pytest.raises(ConfigError, match="kernels.self_check"):
        load_config(overrides=["kernels.self_check=maybe"])
