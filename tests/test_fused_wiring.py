"""The fused ops as the models use them: on CPU the models' RMSNorm, SwiGLU and loss are bit for bit the
arithmetic they had before the ops were wired (torch chosen by dispatch); with ``backend="auto"`` made to
pick Triton (interpreter) they follow the kernels and match the reference; the chunked LM-head loss
(what CUDA runs) equals the full-logits one, values and gradients, also under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from braid.kernels import backend, self_check
from braid.kernels.fused import lm_head_chunk, lm_head_cross_entropy
from braid.models.ffn import SwiGLU
from braid.models.hybrid import HybridLM
from braid.models.layers import RMSNorm
from helpers import interpreter_only, rel_rms, tiny_model_config


def _old_rms_norm(norm, x):
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
    return y.to(x.dtype) * norm.weight.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_modules_are_bit_identical_to_the_former_arithmetic(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(40)
    with torch.no_grad():
        norm.weight.mul_(torch.rand(40) + 0.5)
    x = torch.randn(3, 7, 40).to(dtype)
    assert torch.equal(norm(x), _old_rms_norm(norm, x))
    ffn = SwiGLU(tiny_model_config(d_model=40, ffn_hidden=72), 0).to(dtype)
    assert torch.equal(ffn(x), ffn.down_proj(F.silu(ffn.gate_proj(x)) * ffn.up_proj(x)))


@pytest.mark.parametrize("autocast", [False, True])
def test_cpu_model_loss_is_the_full_logits_cross_entropy(autocast):
    torch.manual_seed(0)
    model = HybridLM(tiny_model_config(pattern="AA", ffn_pattern="S"))
    ids = torch.randint(0, 64, (2, 12))
    labels = torch.randint(0, 64, (2, 12))
    labels[0, :3] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, labels=labels)
        logits = model(ids)
        ref = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                              reduction="none").view(2, 12)
    assert loss.dtype == torch.float32 and torch.equal(loss, ref)


def test_lm_head_dispatch():
    h, w, lab = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))
    full = F.cross_entropy(F.linear(h, w), lab, reduction="none")
    assert torch.equal(lm_head_cross_entropy(h, w, lab), full)  # CPU: auto = full logits
    assert torch.allclose(lm_head_cross_entropy(h, w, lab, backend="chunked"), full, atol=1e-5)
    with pytest.raises(ValueError, match="backend='triton' is unknown"):
        lm_head_cross_entropy(h, w, lab, backend="triton")
    assert lm_head_chunk(160_000) == 838 and lm_head_chunk(64) == 8192 and lm_head_chunk(10**9) == 64


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_loss_equals_full_logits_values_and_gradients(autocast):
    gen = torch.Generator().manual_seed(1)
    h0 = torch.randn(2, 37, 24, generator=gen)
    w0 = torch.randn(300, 24, generator=gen) * 0.3
    lab = torch.randint(0, 300, (2, 37), generator=gen)
    lab[1, 5:9] = -100
    out = {}
    for mode in ("full", "chunked"):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = lm_head_cross_entropy(h.flatten(0, 1), w, lab.flatten(), backend=mode)
        assert loss.dtype == torch.float32
        (loss * torch.linspace(0.5, 1.5, loss.numel())).sum().backward()
        out[mode] = (loss.detach(), h.grad, w.grad)
    assert (out["chunked"][0].view(2, 37)[1, 5:9] == 0).all()
    tol = 2e-2 if autocast else 1e-5
    for name, a, b in zip(("loss", "dh", "dw"), out["chunked"], out["full"]):
        assert a.dtype == b.dtype and rel_rms(a, b) < tol, (name, rel_rms(a, b))


@interpreter_only
def test_auto_routes_the_models_ops_to_triton_where_auto_picks_it(monkeypatch):
    """With ``auto`` resolving as on CUDA, the modules run the Triton kernels (after the self-check)."""
    from braid.kernels.triton import load

    mod = load("fused_norm", interpret=True)
    calls = []
    for cls in ("RMSNormTriton", "SwiGLUTriton"):
        real = getattr(mod, cls).apply
        monkeypatch.setattr(getattr(mod, cls), "apply", lambda *a, _r=real, _c=cls: calls.append(_c) or _r(*a))
    monkeypatch.setattr(backend, "_auto_triton", lambda x: True)
    self_check.reset()
    torch.manual_seed(0)
    norm, ffn = RMSNorm(40), SwiGLU(tiny_model_config(d_model=40, ffn_hidden=72), 0)
    x = torch.randn(3, 5, 40, requires_grad=True)
    y = ffn(norm(x))
    y.sum().backward()
    with torch.no_grad():
        ref = ffn.down_proj(F.silu(ffn.gate_proj(_old_rms_norm(norm, x))) * ffn.up_proj(_old_rms_norm(norm, x)))
    assert not self_check.failed_ops()
    self_check.reset()
    assert calls.count("RMSNormTriton") == 2 and calls.count("SwiGLUTriton") == 2  # self-check + the call
    assert rel_rms(y, ref) < 1e-5
