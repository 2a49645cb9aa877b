"""MoE (FFN letter E) and the grouped GEMM: routing, dispatch against a per-token loop reference,
capacity drops, auxiliary losses, aux-loss-free balancing, gradients, init and a HybridLM step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from braid.config import ModelConfig, MoEConfig
from braid.errors import ConfigError
from braid.kernels.grouped_gemm import grouped_mm, grouped_mm_loop, grouped_mm_native
from braid.models.hybrid import HybridLM, aux_loss
from braid.models.moe import MoE, moe_step
from braid.models.stats import model_stats
from helpers import rel_rms, tiny_model_config


def moe_cfg(d=16, pattern="AA", expert_hidden=8, **moe) -> ModelConfig:
    fields = dict(n_experts=6, top_k=2, expert_hidden=expert_hidden)
    fields.update(moe)
    return ModelConfig(pattern=pattern, d_model=d, n_heads=2, ffn_multiple=16, moe=MoEConfig(**fields))


def build(seed=0, dtype=torch.float64, bias_std=0.0, **kw) -> MoE:
    torch.manual_seed(seed)
    m = MoE(moe_cfg(**kw), layer_idx=0).to(dtype)
    with torch.no_grad():  # larger weights than the 0.02 init, so routing and outputs are not tiny
        m.router.weight.normal_(0.0, 1.0)
        m.gate_up.normal_(0.0, 0.5)
        m.down.normal_(0.0, 0.5)
        m.expert_bias.normal_(0.0, bias_std)
        if m.shared_gate is not None:  # gates spread over (0, 1), not all near 0.5
            m.shared_gate.weight.normal_(0.0, 1.0)
    return m


def rand_x(b=3, t=7, d=16, seed=1, dtype=torch.float64):
    return torch.randn(b, t, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference_moe(m: MoE, x: torch.Tensor, keep=None) -> torch.Tensor:
    """A per-token loop written from the routing definition; ``keep(b, t, expert)`` filters pairs."""
    b_, t_, _ = x.shape
    e, k, h = m.n_experts, m.top_k, m.hidden
    out = torch.zeros_like(x)
    for bi in range(b_):
        for ti in range(t_):
            xt = x[bi, ti]
            logits = m.router.weight.to(xt.dtype) @ xt
            s = logits.softmax(-1) if m.router_kind == "softmax" else logits.sigmoid()
            choice = (s + m.expert_bias.to(s.dtype)).tolist()
            allowed = set(range(e))
            if m.n_groups > 1:
                size = e // m.n_groups
                group_score = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:2])
                               for g in range(m.n_groups)]
                best = sorted(range(m.n_groups), key=lambda g: -group_score[g])[:m.topk_groups]
                allowed = {g * size + j for g in best for j in range(size)}
            chosen = sorted(allowed, key=lambda i: -choice[i])[:k]
            w = s[chosen]
            if m.renormalize:
                w = w / w.sum()
            w = w * m.routed_scaling
            for i, wi in zip(chosen, w):
                if keep is not None and not keep(bi, ti, i):
                    continue
                gu = xt @ m.gate_up[i].to(xt.dtype)
                out[bi, ti] += wi.to(xt.dtype) * ((F.silu(gu[:h]) * gu[h:]) @ m.down[i].to(xt.dtype))
            if m.shared is not None:
                gate = torch.sigmoid(m.shared_gate.weight[0] @ xt) if m.shared_gate is not None else 1.0
                out[bi, ti] += gate * m.shared(xt)
    return out


# ----------------------------------------------------------------------------- grouped GEMM


def _per_group(x, w, sizes):
    outs, start = [], 0
    for g, n in enumerate(sizes):
        outs.append(x[start:start + n] @ w[g])
        start += n
    return torch.cat(outs)


def test_grouped_mm_fallback_equals_per_group_matmul():
    g = torch.Generator().manual_seed(0)
    sizes = [3, 0, 5, 1, 0]  # empty groups included
    x = torch.randn(sum(sizes), 12, generator=g, requires_grad=True)
    w = torch.randn(5, 12, 7, generator=g, requires_grad=True)
    out = grouped_mm(x, w, torch.tensor(sizes))
    assert out.shape == (9, 7)
    assert rel_rms(out, _per_group(x, w, sizes)) < 1e-6
    out.backward(torch.randn(out.shape, generator=g))
    assert torch.all(w.grad[1] == 0) and torch.all(w.grad[4] == 0)  # empty groups: zero gradient
    assert w.grad[0].abs().sum() > 0


def test_grouped_mm_gradcheck_fp64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    sizes = torch.tensor([2, 0, 4])
    assert torch.autograd.gradcheck(lambda a, b: grouped_mm(a, b, sizes), (x, w))


def _native_runs_here() -> bool:
    try:
        grouped_mm_native(torch.zeros(8, 8, dtype=torch.bfloat16), torch.zeros(1, 8, 8, dtype=torch.bfloat16),
                          torch.tensor([8]))
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@pytest.mark.skipif(not _native_runs_here(), reason="this torch has no torch._grouped_mm for CPU tensors")
def test_grouped_mm_native_matches_loop_and_backward_takes_any_grad():
    g = torch.Generator().manual_seed(2)
    sizes = torch.tensor([5, 0, 11])
    x = torch.randn(16, 16, generator=g).bfloat16().requires_grad_()
    w = torch.randn(3, 16, 8, generator=g).bfloat16().requires_grad_()
    out = grouped_mm_native(x, w, sizes)
    assert rel_rms(out, grouped_mm_loop(x.float(), w.float(), sizes)) < 1e-2
    out.sum().backward()  # an expanded (stride-0) gradient: the native backward needs contiguity
    x_ref, w_ref = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    grouped_mm_loop(x_ref, w_ref, sizes).sum().backward()
    assert rel_rms(x.grad, x_ref.grad) < 1e-2 and rel_rms(w.grad, w_ref.grad) < 1e-2


# ----------------------------------------------------------------------------- routing and outputs


CONFIGS = {
    "softmax_renorm": dict(router="softmax"),
    "softmax_no_renorm_scaled": dict(router="softmax", renormalize=False, routed_scaling=2.5),
    "sigmoid_renorm_scaled": dict(router="sigmoid", routed_scaling=1.7),
    "sigmoid_no_renorm": dict(router="sigmoid", renormalize=False),
    "sigmoid_group_limited": dict(router="sigmoid", n_groups=3, topk_groups=2, top_k=3),
    "softmax_group_limited_shared": dict(router="softmax", n_groups=2, topk_groups=1, n_shared_experts=2),
    "sigmoid_shared_hidden": dict(router="sigmoid", n_shared_experts=1, shared_hidden=12, top_k=1),
    "softmax_gated_shared": dict(router="softmax", n_shared_experts=1, shared_gate=True),  # Qwen3-Next's
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_per_token_reference_fp64(name):
    m = build(bias_std=0.3, **CONFIGS[name])  # a non-zero bias: it must change selection, not weights
    x = rand_x()
    assert rel_rms(m(x), reference_moe(m, x)) < 1e-10


def test_shared_gate_needs_shared_experts():
    from braid.config import load_config

    with pytest.raises(ConfigError, match=r"model\.moe\.shared_gate.*n_shared_experts"):
        load_config(None, ["model.preset=moe-tiny", "model.moe.n_shared_experts=0", "model.moe.shared_gate=true"])


def test_matches_reference_fp32():
    m = build(dtype=torch.float32, bias_std=0.3, router="sigmoid", n_groups=2, topk_groups=1,
              n_shared_experts=1)
    x = rand_x(dtype=torch.float32)
    with torch.no_grad():
        assert rel_rms(m(x), reference_moe(m.double(), x.double())) < 1e-5


def test_every_token_gets_exactly_k_distinct_experts_when_dropless():
    for kw in (dict(router="softmax", top_k=3), dict(router="sigmoid", n_groups=3, topk_groups=2, top_k=4)):
        m = build(bias_std=0.5, **kw).train()
        x = rand_x(b=4, t=9)
        experts, weights, _, _ = m.route(x.view(-1, 16))
        assert experts.shape == weights.shape == (36, m.top_k)
        assert all(len(set(row)) == m.top_k for row in experts.tolist())
        m(x)
        assert m.load_counts.sum().item() == 36 * m.top_k
        assert m.drop_counts.sum().item() == 0


def test_bias_selects_but_does_not_weight():
    m = build(router="sigmoid", renormalize=False)
    with torch.no_grad():
        m.expert_bias[4] = 100.0  # forces expert 4 into every token's top-k
    x = rand_x()
    experts, weights, scores, _ = m.route(x.view(-1, 16))
    assert torch.all((experts == 4).any(-1))
    pos = (experts == 4).int().argmax(-1)
    assert torch.allclose(weights.gather(1, pos[:, None])[:, 0], scores[:, 4])  # s, not s + b


@pytest.mark.parametrize("capacity_factor", [None, 0.6])
def test_causal(capacity_factor):
    m = build(router="sigmoid", capacity_factor=capacity_factor, n_shared_experts=1).eval()
    x = rand_x(b=2, t=10)
    with torch.no_grad():
        y = m(x)
        for t in (0, 4, 9):
            x2 = x.clone()
            x2[1, t] += torch.randn(16, dtype=x.dtype)
            y2 = m(x2)
            assert torch.equal(y2[:, :t], y[:, :t]), f"position {t} changed an earlier output"
            assert (y2[1, t] - y[1, t]).abs().max() > 1e-6


# ----------------------------------------------------------------------------- capacity


def test_capacity_drops_latest_positions_with_the_right_count():
    m = build(router="softmax", n_experts=4, top_k=2, capacity_factor=0.75).train()
    with torch.no_grad():  # skew: experts 0 and 1 get most tokens
        m.router.weight[:2] += 2.0 * torch.ones(16, dtype=m.router.weight.dtype)
    b, t = 3, 8
    x = rand_x(b=b, t=t) + 1.0
    experts, *_ = m.route(x.view(-1, 16))
    counts = torch.bincount(experts.flatten(), minlength=4)
    capacity = math.ceil(0.75 * b * t * 2 / 4)
    expected_dropped = (counts - capacity).clamp(min=0)
    assert expected_dropped.sum() > 0, "the test needs an overloaded expert"
    y = m(x)
    assert torch.equal(m.drop_counts, expected_dropped)
    assert torch.equal(m.load_counts, counts)
    # Reference keep set: per expert, the first `capacity` pairs in (position, row) order.
    kept = set()
    for e in range(4):
        pairs = sorted((ti, bi) for bi in range(b) for ti in range(t) if e in experts[bi * t + ti].tolist())
        kept |= {(bi, ti, e) for ti, bi in pairs[:capacity]}
    ref = reference_moe(m, x, keep=lambda bi, ti, e: (bi, ti, e) in kept)
    assert rel_rms(y, ref) < 1e-10
    metrics = moe_step(m)
    assert metrics["moe/layer0/drop_rate"] == pytest.approx(expected_dropped.sum().item() / (b * t * 2))


# ----------------------------------------------------------------------------- balancing


def test_bias_update_moves_load_toward_balance():
    torch.manual_seed(0)
    m = build(dtype=torch.float32, router="sigmoid", n_experts=8, top_k=2, bias_update_rate=0.02).train()
    with torch.no_grad():  # skewed router: expert i's score grows with i for every token
        m.router.weight.normal_(0.0, 0.25)
        m.router.weight += torch.linspace(-2.0, 2.0, 8)[:, None] * torch.ones(16) / 16
    x = rand_x(b=4, t=32, dtype=torch.float32) + 1.0
    ratios = []
    with torch.no_grad():
        for _ in range(30):
            m(x)
            ratios.append(moe_step(m)["moe/layer0/load_max_over_mean"])
    assert ratios[0] > 2.5
    assert max(ratios[-5:]) < 1.5
    assert torch.all(m.load_counts == 0)
    assert m.expert_bias[7] < 0 < m.expert_bias[0]  # the favoured expert was pushed down


def test_moe_step_sums_over_ranks_in_one_call_and_skips_zero_rate():
    m = build(router="sigmoid", bias_update_rate=0.0).train()
    m(rand_x())
    local = m.load_counts.clone()
    calls = []

    def fake_all_reduce(t):  # two identical ranks, in place like torch.distributed.all_reduce
        calls.append(t.shape)
        t.mul_(2)
        return t

    metrics = moe_step(m, all_reduce=fake_all_reduce)
    assert len(calls) == 1
    assert metrics["moe/layer0/load_max_over_mean"] == pytest.approx((local.max() / local.double().mean()).item())
    assert torch.all(m.expert_bias == 0)
    assert torch.all(m.load_counts == 0) and torch.all(m.drop_counts == 0)


def test_eval_forward_does_not_count_load():
    m = build().eval()
    m(rand_x())
    assert m.load_counts.sum() == 0


# ----------------------------------------------------------------------------- auxiliary losses


def test_aux_loss_softmax_hand_computed():
    # d 2, router = identity: logits = x. Token 0: softmax(ln 3, 0) = (3/4, 1/4) -> expert 0;
    # token 1: softmax(ln 2, 0) = (2/3, 1/3) -> expert 0. count = (2, 0), P = (17/12, 7/12).
    # balance = α · E/(k·T²) · Σ count·P = α · 2/4 · 2 · 17/12; z = mean((ln 4)², (ln 3)²).
    alpha, z = 0.1, 0.01
    cfg = ModelConfig(pattern="A", d_model=2, n_heads=1, moe=MoEConfig(
        n_experts=2, top_k=1, expert_hidden=4, aux_loss_coef=alpha, z_loss_coef=z))
    m = MoE(cfg, 0).double()
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(2))
    m(torch.tensor([[[math.log(3), 0.0], [math.log(2), 0.0]]], dtype=torch.float64))
    expected = alpha * 2 / 4 * 2 * 17 / 12 + z * (math.log(4) ** 2 + math.log(3) ** 2) / 2
    assert m.aux_loss.item() == pytest.approx(expected, rel=1e-12)


def test_aux_loss_sigmoid_normalises_scores_and_averages_sequences():
    # Two sequences of one token. Row 0: s = sigmoid(0, ln 3) = (1/2, 3/4), s' = (0.4, 0.6), expert 1
    # -> α·2·0.6. Row 1: s = sigmoid(ln 4, 0) = (0.8, 0.5), expert 0 -> α·2·0.8/1.3. Mean of the rows.
    alpha = 0.1
    cfg = ModelConfig(pattern="A", d_model=2, n_heads=1, moe=MoEConfig(
        n_experts=2, top_k=1, router="sigmoid", expert_hidden=4, aux_loss_coef=alpha))
    m = MoE(cfg, 0).double()
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(2))
    m(torch.tensor([[[0.0, math.log(3)]], [[math.log(4), 0.0]]], dtype=torch.float64))
    expected = alpha * (2 * 0.6 + 2 * 0.8 / 1.3) / 2
    assert m.aux_loss.item() == pytest.approx(expected, rel=1e-12)


def test_aux_loss_is_none_when_coefficients_are_zero():
    m = build()
    m(rand_x())
    assert m.aux_loss is None


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_gradcheck_fp64(router):
    m = build(d=4, n_experts=4, top_k=2, expert_hidden=3, router=router, n_shared_experts=1,
              aux_loss_coef=0.1, z_loss_coef=0.01, bias_std=0.2)
    x = rand_x(b=2, t=3, d=4).requires_grad_()
    names = ["router.weight", "gate_up", "down"]
    params = [dict(m.named_parameters())[n].detach().clone().requires_grad_() for n in names]

    def f(x, *ps):
        y = torch.func.functional_call(m, dict(zip(names, ps)), (x,))
        return y, m.aux_loss

    assert torch.autograd.gradcheck(f, (x, *params))
    # The router learns through the routing weights alone (no aux loss).
    m.aux_loss_coef = m.z_loss_coef = 0.0
    m(x).square().sum().backward()
    assert m.router.weight.grad.abs().max() > 1e-8


# ----------------------------------------------------------------------------- module contract


def test_expert_bias_in_state_dict_not_parameters():
    m = build(bias_std=0.1)
    state = m.state_dict()
    assert "expert_bias" in state
    assert "load_counts" not in state and "drop_counts" not in state
    assert all(p is not m.expert_bias for p in m.parameters())
    other = build(seed=5)
    other.load_state_dict(state)
    assert torch.equal(other.expert_bias, m.expert_bias)


def test_init_std_standalone_and_in_hybrid():
    std = 0.02
    cfg = moe_cfg(d=64, pattern="AAAA", expert_hidden=128, n_experts=8, n_shared_experts=1)
    cfg.init_std, cfg.vocab_size, cfg.ffn_pattern = std, 64, "E"
    torch.manual_seed(0)
    for m in (MoE(cfg, 0), HybridLM(cfg).layers[1].ffn):
        out_std = std / math.sqrt(2 * 4)
        for w, target in ((m.router.weight, std), (m.gate_up, std), (m.down, out_std),
                          (m.shared.gate_proj.weight, std), (m.shared.down_proj.weight, out_std)):
            assert abs(w.std().item() - target) < 0.1 * target
        assert torch.all(m.expert_bias == 0)


def test_flops_and_params_count_active_experts():
    cfg = tiny_model_config(ffn_pattern="SE", moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=24,
                                                            n_shared_experts=1))
    d = cfg.d_model
    m = MoE(cfg, 1)
    expected = 2 * d * 4 + 2 * (2 * 3 * d * 24) + 2 * 3 * d * 24
    assert m.flops_per_token(16) == expected
    stats = model_stats(cfg, seq_len=16)  # builds on the meta device
    torch.manual_seed(0)
    assert stats.params == sum(p.numel() for p in HybridLM(cfg).parameters())


def test_invalid_config_names_the_key():
    for bad, key in ((dict(router="topk"), "router"), (dict(n_groups=4), "n_groups"),
                     (dict(n_groups=3, topk_groups=1, top_k=3), "top_k"), (dict(capacity_factor=0.0), "capacity")):
        with pytest.raises(ConfigError, match=key):
            MoE(moe_cfg(**bad), 0)


def test_autocast_bf16_keeps_router_fp32_and_input_dtype():
    m = build(dtype=torch.float32, router="sigmoid", n_shared_experts=1)
    x = rand_x(dtype=torch.float32)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
            _, weights, _, logits = m.route(x.view(-1, 16))
    assert y.dtype == torch.float32 and logits.dtype == torch.float32 and weights.dtype == torch.float32
    assert rel_rms(y, ref) < 3e-2


# ----------------------------------------------------------------------------- in a model


def test_hybrid_lm_with_moe_trains_a_step():
    cfg = tiny_model_config(ffn_pattern="SE", moe=MoEConfig(
        n_experts=4, top_k=2, router="sigmoid", n_shared_experts=1, aux_loss_coef=1e-2, z_loss_coef=1e-3,
        bias_update_rate=1e-3))
    torch.manual_seed(0)
    model = HybridLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 64, (2, 12), generator=g), torch.randint(0, 64, (2, 12), generator=g)
    losses = []
    for _ in range(3):
        loss = model(ids, labels=labels).mean()
        aux = aux_loss(model)
        assert aux is not None and torch.isfinite(aux)
        (loss + aux).backward()
        moe = model.layers[1].ffn
        assert moe.router.weight.grad.abs().max() > 0 and torch.isfinite(moe.gate_up.grad).all()
        opt.step()
        opt.zero_grad()
        metrics = moe_step(model)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert set(metrics) == {"moe/layer1/load_max_over_mean", "moe/layer1/aux_loss"}
    assert moe.expert_bias.abs().max() > 0
