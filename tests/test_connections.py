"""Hyper-connections (model.connection=hc): static, dynamic (DHC) and mHC (Sinkhorn) variants.

The spec: at init an hc model is the pre-norm residual model (same weights, same logits); its
connection parameters learn; the formulas match a naive per-token reference; Sinkhorn output is
doubly stochastic; gradients are right (fp64 gradcheck); the model stays causal.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from braid.config import HyperConnectionConfig, load_config
from braid.models.connections import (
    MHC_OFFDIAG_LOGIT,
    HyperConnection,
    PreNormResidual,
    expand_streams,
    merge_streams,
    sinkhorn,
)
from braid.models.hybrid import HybridLM
from braid.models.layers import RMSNorm
from braid.models.stats import model_stats
from braid.trainer.optim import param_groups
from braid.trainer.trainer import Trainer
from conftest import tiny_overrides
from helpers import rel_rms, tiny_model_config

V = 64  # vocab of tiny_model_config
VARIANTS = {
    "static": dict(),
    "dynamic": dict(dynamic=True),
    "mhc": dict(sinkhorn_iters=20),
    "dynamic_mhc": dict(dynamic=True, sinkhorn_iters=20),
}
# Three layers, the middle one without FFN: five sublayers, so stream reads wrap around for n = 2, 4.
SHAPE = dict(pattern="AAA", ffn_pattern="S-S")


def hc_config(variant: str, rate: int, **overrides):
    return tiny_model_config(connection="hc", hc=HyperConnectionConfig(rate=rate, **VARIANTS[variant]),
                             **SHAPE, **overrides)


def residual_and_hc(variant: str, rate: int, **overrides) -> tuple[HybridLM, HybridLM]:
    """A residual model and an hc model sharing every non-connection weight."""
    torch.manual_seed(0)
    residual = HybridLM(tiny_model_config(**SHAPE, **overrides))
    torch.manual_seed(1)  # different seed: only the copied weights may make them agree
    hc = HybridLM(hc_config(variant, rate, **overrides))
    missing, unexpected = hc.load_state_dict(residual.state_dict(), strict=False)
    assert not unexpected
    # Only the connections' own parameters are new (their pre-norms share PreNormResidual's names).
    assert missing and all("_conn." in k and not k.endswith("_conn.norm.weight") for k in missing), missing
    return residual, hc


def connection_params(model: HybridLM) -> dict[str, torch.nn.Parameter]:
    return {k: p for k, p in model.named_parameters() if "_conn." in k and not k.endswith("_conn.norm.weight")}


def random_ids(b=2, t=12, seed=0):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Move every connection parameter (norms included) away from its init: non-trivial mixing."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "_conn." in name or isinstance(module, HyperConnection):
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


# ----------------------------------------------------------------------------- init = residual network


@pytest.mark.parametrize("meta_tokens", [0, 2], ids=["nometa", "meta2"])
@pytest.mark.parametrize("rate", [1, 2, 3, 4])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_init_equals_residual_network(variant, rate, meta_tokens):
    residual, hc = residual_and_hc(variant, rate, meta_tokens=meta_tokens)
    ids = random_ids()
    with torch.no_grad():
        expected, got = residual(ids), hc(ids)
    if VARIANTS[variant].get("sinkhorn_iters") or rate == 3:
        # A_r is only close to I (mHC) / the mean of 3 equal streams rounds: agreement up to rounding.
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    else:
        assert torch.equal(got, expected)


def test_init_reads_stream_k_mod_n():
    """Sublayers are numbered over the model (layers without FFN have one); sublayer k reads e_{k mod n}."""
    model = HybridLM(hc_config("static", 4))
    conns = [c for layer in model.layers for c in (layer.mixer_conn, layer.ffn_conn) if c is not None]
    assert [c.sublayer_idx for c in conns] == [0, 1, 2, 3, 4]
    for k, c in enumerate(conns):
        assert torch.equal(c.alpha_in, torch.eye(4)[k % 4])
        assert torch.equal(c.alpha_res, torch.eye(4)) and torch.equal(c.beta, torch.ones(4))


def test_reset_parameters_restores_init():
    residual, hc = residual_and_hc("dynamic_mhc", 4)
    fresh = {k: p.clone() for k, p in connection_params(hc).items()}
    perturb(hc, seed=3)
    hc.reset_parameters()
    for k, p in connection_params(hc).items():
        assert torch.equal(p, fresh[k]), k


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("variant,rate,meta_tokens", [
    ("static", 4, 0), ("dynamic", 2, 2), ("mhc", 4, 2), ("dynamic_mhc", 4, 0), ("dynamic_mhc", 1, 0),
])
def test_hc_learns_and_diverges_from_residual(variant, rate, meta_tokens):
    residual, hc = residual_and_hc(variant, rate, meta_tokens=meta_tokens)
    ids, labels = random_ids(seed=1), random_ids(seed=2)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0) for m in (residual, hc)]
    for _ in range(3):
        for model, opt in zip((residual, hc), opts):
            opt.zero_grad()
            loss = model(ids, labels=labels).mean()
            assert torch.isfinite(loss)
            loss.backward()
            opt.step()
    # The last step's gradients reach every connection parameter (the dynamic scales get none at
    # step 1, when tanh(norm(H)·0) = 0, but do once W has moved).
    for name, p in connection_params(hc).items():
        if rate == 1 and "mhc" in variant and name.endswith("alpha_res"):
            continue  # Sinkhorn of a 1×1 matrix is the constant 1: no gradient, by construction
        assert p.grad is not None and p.grad.abs().max() > 0, name
    with torch.no_grad():
        diff = (hc(ids) - residual(ids)).abs().max()
    assert diff > 1e-4


# ----------------------------------------------------------------------------- formulas


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _sinkhorn_uv(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp in its scaling-vector form: diag(u)·K·diag(v), u = 1/(K v), v = 1/(Kᵀ u)."""
    k = torch.exp(logits)
    v = torch.ones(k.shape[-1], dtype=k.dtype)
    for _ in range(iters):
        u = 1.0 / (k @ v)
        v = 1.0 / (k.T @ u)
    return u[:, None] * k * v[None, :]


def reference_hc(conn: HyperConnection, H: torch.Tensor, f) -> torch.Tensor:
    """The paper's equations token by token, with explicit stream loops."""
    n = conn.rate
    out = torch.empty_like(H)
    for bt in range(H.shape[0] * H.shape[1]):
        b, t = divmod(bt, H.shape[1])
        Hs = H[b, t]  # [n, d]
        a_m, a_r, beta = conn.alpha_in.clone(), conn.alpha_res.clone(), conn.beta.clone()
        if conn.dynamic:
            hbar = _rms(Hs, conn.stream_norm.weight, conn.stream_norm.eps)
            w = conn.dyn_proj
            for i in range(n):
                a_m[i] = a_m[i] + conn.dyn_scale_alpha * torch.tanh(hbar[i] @ w[:, 0])
                beta[i] = beta[i] + conn.dyn_scale_beta * torch.tanh(hbar[i] @ w[:, n + 1])
                for j in range(n):
                    a_r[i, j] = a_r[i, j] + conn.dyn_scale_alpha * torch.tanh(hbar[i] @ w[:, 1 + j])
        if conn.sinkhorn_iters:
            a_r = _sinkhorn_uv(a_r, conn.sinkhorn_iters)
        h = sum(a_m[i] * Hs[i] for i in range(n))
        y = f(_rms(h, conn.norm.weight, conn.norm.eps)[None, None])[0, 0]
        for j in range(n):
            out[b, t, j] = beta[j] * y + sum(a_r[i, j] * Hs[i] for i in range(n))
    return out


class Fp64RMSNorm(RMSNorm):
    """layers.RMSNorm computes its statistic in fp32 even for fp64 input; fp64 checks of the connection
    itself need norms that keep fp64 (same formula)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms(x, self.weight, self.eps)


def make_conn(variant: str, rate: int, d: int = 8, dtype=torch.float64, sublayer_idx: int = 1, seed: int = 0):
    """A standalone HyperConnection with every parameter moved away from its init."""
    cfg = tiny_model_config(d_model=d, connection="hc", hc=HyperConnectionConfig(rate=rate, **VARIANTS[variant]))
    conn = HyperConnection(cfg, sublayer_idx)
    if dtype == torch.float64:
        conn.norm = Fp64RMSNorm(d, cfg.norm_eps)
        if conn.dynamic:
            conn.stream_norm = Fp64RMSNorm(d, cfg.norm_eps)
    conn = conn.to(dtype)
    perturb(conn, seed)
    return conn


def make_sublayer(d: int, dtype=torch.float64, seed: int = 0):
    w = torch.randn(d, d, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    w = (w / math.sqrt(d)).to(dtype)
    return lambda x: torch.tanh(x @ w)


@pytest.mark.parametrize("rate", [1, 3, 4])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference_equations(variant, rate):
    conn, f = make_conn(variant, rate), make_sublayer(8)
    H = torch.randn(2, 3, rate, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        got, expected = conn(H, f), reference_hc(conn, H, f)
    assert rel_rms(got, expected) < 1e-12


def test_fp32_matches_fp64_and_keeps_dtype():
    conn64, f64 = make_conn("dynamic_mhc", 4), make_sublayer(8)
    conn32, f32 = make_conn("dynamic_mhc", 4, dtype=torch.float32), make_sublayer(8, torch.float32)
    H = torch.randn(2, 5, 4, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    with torch.no_grad():
        out32, out64 = conn32(H.float(), f32), conn64(H, f64)
    assert out32.dtype == torch.float32
    assert rel_rms(out32, out64) < 1e-5


@pytest.mark.parametrize("variant", ["static", "dynamic", "dynamic_mhc"])
def test_gradcheck_fp64(variant):
    conn, f = make_conn(variant, 3, d=6), make_sublayer(6)
    names = [k for k, _ in conn.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in conn.named_parameters())
    H = torch.randn(1, 2, 3, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64,
                    requires_grad=True)

    def fn(H, *ps):
        return functional_call(conn, dict(zip(names, ps)), (H, f))

    assert torch.autograd.gradcheck(fn, (H, *params), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- Sinkhorn (mHC)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_sinkhorn_is_doubly_stochastic(n):
    logits = torch.randn(6, n, n, generator=torch.Generator().manual_seed(n))
    m = sinkhorn(logits, 20)
    assert m.dtype == torch.float32 and torch.all(m >= 0)
    torch.testing.assert_close(m.sum(-1), torch.ones(6, n), rtol=0, atol=1e-5)
    torch.testing.assert_close(m.sum(-2), torch.ones(6, n), rtol=0, atol=1e-5)
    # Same projection as the textbook scaling-vector form.
    expected = torch.stack([_sinkhorn_uv(x.double(), 20) for x in logits])
    assert rel_rms(m, expected) < 1e-5


def test_sinkhorn_survives_large_logits():
    m = sinkhorn(torch.tensor([[200.0, 0.0], [0.0, 200.0]]), 20)  # exp(200) overflows fp32
    assert torch.isfinite(m).all()
    torch.testing.assert_close(m, torch.eye(2))


def test_mhc_mixing_is_doubly_stochastic_per_token():
    """Columns (each output stream is a convex combination of the inputs) sum to 1 exactly: Sinkhorn
    ends on them. Rows converge slowly when A_r is near a permutation (the second singular value of
    the balanced matrix is ~1 − off-diagonal mass), so 20 iterations leave ~1e-3 there; mHC accepts
    the same finite-iteration gap."""
    conn = make_conn("dynamic_mhc", 4, dtype=torch.float32)
    H = torch.randn(2, 5, 4, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, a_res, _ = conn.coefficients(H)
    assert a_res.shape == (2, 5, 4, 4) and torch.all(a_res >= 0)
    assert len({tuple(m.flatten().tolist()) for m in a_res.flatten(0, 1)}) == 10  # per token
    torch.testing.assert_close(a_res.sum(-2), torch.ones(2, 5, 4), rtol=0, atol=1e-5)
    torch.testing.assert_close(a_res.sum(-1), torch.ones(2, 5, 4), rtol=0, atol=1e-2)


def test_mhc_init_is_close_to_identity():
    conn = HyperConnection(hc_config("mhc", 4), 0)
    _, a_res, _ = conn.coefficients(torch.randn(1, 1, 4, 32))
    off = math.exp(MHC_OFFDIAG_LOGIT)
    torch.testing.assert_close(a_res, torch.eye(4) * (1 - 4 * off) + off, rtol=0, atol=1e-5)
    assert a_res.diagonal().min() > 0.998


# ----------------------------------------------------------------------------- the model


def test_whole_model_is_causal():
    torch.manual_seed(0)
    model = HybridLM(hc_config("dynamic_mhc", 4, meta_tokens=2))
    perturb(model, seed=5)  # non-trivial mixing, per-token coefficients
    ids = random_ids(1, 10, seed=6)
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % V
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-6)
    assert (a[:, 5] - b[:, 5]).abs().max() > 1e-4


def test_bf16_forward_backward():
    torch.manual_seed(0)
    model = HybridLM(hc_config("dynamic_mhc", 4, meta_tokens=2)).to(torch.bfloat16)
    perturb(model, seed=2)
    ids = random_ids()
    logits = model(ids)
    assert logits.dtype == torch.bfloat16
    loss = model(ids, labels=random_ids(seed=3)).mean()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_trainer_lowers_the_loss_with_mhc(tmp_path):
    """The whole stack (optimizer groups, DCP checkpoint, eval) runs with dynamic mHC and meta tokens."""
    hc = {"model.connection": "hc", "model.hc.rate": 4, "model.hc.dynamic": True, "model.hc.sinkhorn_iters": 20,
          "model.meta_tokens": 2, "train.steps": 30, "checkpoint.interval": 30}
    losses = Trainer(load_config(None, tiny_overrides(tmp_path / "r", **hc))).train()
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses


def test_expand_and_merge_streams():
    h = torch.randn(2, 3, 8)
    H = expand_streams(h, 4)
    assert H.shape == (2, 3, 4, 8) and torch.equal(H[:, :, 2], h)
    assert torch.equal(merge_streams(H), h)


def test_connection_params_are_exempt_from_weight_decay():
    model = HybridLM(hc_config("dynamic_mhc", 4))
    params = connection_params(model)
    assert params and all(getattr(p, "_no_weight_decay", False) for p in params.values())
    decayed = {id(p) for p in param_groups(model, 0.1)[0]["params"]}
    assert not decayed & {id(p) for p in params.values()}
    assert any(p.ndim == 2 for p in params.values())  # A_r, W: matrices, exempt only by the flag


def test_flops_per_token():
    n, d = 4, 32
    static = HyperConnection(hc_config("static", n), 0)
    dynamic = HyperConnection(hc_config("dynamic_mhc", n), 0)
    assert static.flops_per_token(16) == 2 * n * d * (n + 2)
    assert dynamic.flops_per_token(16) == 4 * n * d * (n + 2)
    assert PreNormResidual(tiny_model_config(d_model=d)).flops_per_token(16) == 0


def test_param_count_on_meta_device():
    """model_stats builds on the meta device; hc adds per connection 2n + n² (+ d(n+2) + 2 + d dynamic)."""
    n, d, conns = 4, 32, 5
    base = model_stats(tiny_model_config(**SHAPE), 16).params
    static = model_stats(hc_config("static", n), 16).params
    dynamic = model_stats(hc_config("dynamic_mhc", n), 16).params
    assert static - base == conns * (2 * n + n * n)
    assert dynamic - base == conns * (2 * n + n * n + d * (n + 2) + 2 + d)


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="connection"):
        HybridLM(tiny_model_config(connection="highway"))
    with pytest.raises(ValueError, match="rate"):
        HybridLM(tiny_model_config(connection="hc", hc=HyperConnectionConfig(rate=0)))
