"""What only a GPU can check, for bench/gpu_check.sh's test stage (skipped without CUDA): every op's
Triton kernel passes its start-up self-check in bf16 at the models' head sizes, a small hybrid model
in bf16 autocast on CUDA (Triton kernels, chunked loss) agrees with itself in fp32 on CPU, and the
chunked LM-head loss equals the full-logits one at a large vocabulary."""

from __future__ import annotations

import pytest
import torch

from braid.kernels import self_check
from braid.kernels.fused import cross_entropy_reference, lm_head_cross_entropy
from braid.models.hybrid import HybridLM
from helpers import rel_rms, tiny_model_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
BF16 = torch.bfloat16


@pytest.mark.parametrize("op,sig", [
    ("attention", (BF16, 128, 128, True, "causal+doc", None)),
    ("attention", (BF16, 128, 128, False, "causal+window+sink+doc+forget+lse", None)),
    ("attention", (BF16, 64, 64, True, "causal+s2", (64, 32, 8))),
    ("attention", (BF16, 192, 128, False, "causal+doc+lse+offset", None)),
    ("kda", (BF16, 128, 128, 64, True, False, False)),
    ("kda", (BF16, 64, 64, 32, True, True, True)),
    ("selective_scan", (BF16, 16, True, True, False, True, 64)),
    ("rms_norm", (BF16, 2048)),
    ("rms_norm", (torch.float32, 128)),
    ("swiglu", (BF16,)),
])
def test_self_check_passes_on_cuda(op, sig):
    assert self_check._run(op, sig, CUDA) is None


def test_hybrid_model_bf16_on_cuda_matches_cpu_fp32():
    self_check.reset()
    torch.manual_seed(0)
    cfg = tiny_model_config(pattern="AGFKH", d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=512)
    cfg.kda.chunk_size = 16
    model = HybridLM(cfg)
    ids = torch.randint(0, 512, (2, 96))
    labels = torch.roll(ids, -1, 1)
    doc = (torch.arange(96) >= 40).long().expand(2, 96)
    ref = model(ids, labels=labels, doc_ids=doc)
    ref.mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.to(CUDA)
    with torch.autocast("cuda", dtype=BF16):
        loss = model(ids.to(CUDA), labels=labels.to(CUDA), doc_ids=doc.to(CUDA))
    loss.mean().backward()
    assert not self_check.failed_ops(), self_check.failed_ops()
    assert rel_rms(loss.cpu(), ref) < 2e-2
    for name, g in ref_grads.items():
        got = dict(model.named_parameters())[name].grad
        assert got is not None and torch.isfinite(got).all(), name
        assert rel_rms(got.cpu(), g) < 0.1, (name, rel_rms(got.cpu(), g))


def test_chunked_loss_on_cuda_large_vocab():
    gen = torch.Generator(device=CUDA).manual_seed(0)
    h = torch.randn(3000, 512, device=CUDA, generator=gen, dtype=BF16)
    w = (torch.randn(160_000, 512, device=CUDA, generator=gen) * 0.02).to(BF16)
    labels = torch.randint(0, 160_000, (3000,), device=CUDA, generator=gen)
    labels[::7] = -100
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = lm_head_cross_entropy(hs, ws, labels)  # auto on CUDA: chunked
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 3000 * 160_000 * 4 / 2, f"{peak / 2**20:.0f} MiB: the full fp32 logits were made"
    loss.sum().backward()
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = cross_entropy_reference(hr, wr, labels)
    ref.sum().backward()
    assert rel_rms(loss, ref) < 1e-2 and rel_rms(hs.grad, hr.grad) < 2e-2 and rel_rms(ws.grad, wr.grad) < 2e-2
