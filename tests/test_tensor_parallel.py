"""Tensor parallelism against one process: for every mixer letter, a HybridLM sharded over tp gloo
ranks gives the same per-token losses and the same gradient for every parameter (fp32, rel RMS ≤ 1e-5)
as the unsharded model with the same weights; plus the vocab-parallel loss and bad-size errors.

All cases of one (tp, sequence_parallel) layout run in one spawned group (process start-up dominates),
recorded per case, and each case is its own test item.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from braid.config import FoxConfig, GatedDeltaNetConfig, HymbaConfig, KDAConfig, MLAConfig, MoEConfig, S2Config
from braid.errors import ConfigError
from braid.models.hybrid import HybridLM, aux_loss
from helpers import rel_rms, tiny_model_config
from spawn_group import join_group, leave_group, rendezvous

TOL = 1e-5
B, T = 2, 16

# name → ModelConfig overrides (tiny_model_config: d_model 32, 4 heads / 2 KV heads, vocab 64).
CASES = {
    "A": dict(pattern="AA", qk_norm=True),
    "A-tied-window": dict(pattern="AA", tie_embeddings=True, window=5, global_layers=[1]),
    "G-headwise": dict(pattern="GG", qk_norm=True, attn_gate="headwise"),
    "G-elementwise-s2": dict(pattern="G", attn_gate="elementwise",
                             s2=S2Config(enabled=True, block=2, local_blocks=1, vert_stride=4)),
    "F-pro": dict(pattern="FF", qk_norm=True, fox=FoxConfig(output_gate=True, output_norm=True, kv_shift=True,
                                                            forget_bias_init=2.0)),
    "K": dict(pattern="KK", kda=KDAConfig(head_dim=8, chunk_size=8)),
    "D": dict(pattern="DD", gdn=GatedDeltaNetConfig(n_k_heads=4, n_v_heads=8, head_k_dim=8, chunk_size=8)),
    "M": dict(pattern="MM", mla=MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)),
    "M-qlora-nope": dict(pattern="M", mla=MLAConfig(q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8,
                                                    qk_rope_head_dim=4, v_head_dim=8, rope=False)),
    "H-meta-kvshare": dict(pattern="HH", qk_norm=True, meta_tokens=4, window=6, global_layers=[0],
                           hymba=HymbaConfig(ssm_inner=32, d_state=4, dt_rank=4, kv_share_groups=[[0, 1]])),
    "AE-moe": dict(pattern="AK", ffn_pattern="E", kda=KDAConfig(head_dim=8, chunk_size=8),
                   moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=16, n_shared_experts=1, shared_gate=True)),
    "AE-moe-sigmoid-aux": dict(pattern="A", ffn_pattern="E", moe=MoEConfig(
        n_experts=4, top_k=2, expert_hidden=8, router="sigmoid", n_groups=2, topk_groups=1, routed_scaling=2.0,
        n_shared_experts=1, shared_hidden=8, aux_loss_coef=0.1, z_loss_coef=0.01, capacity_factor=1.0)),
    "A-hc": dict(pattern="AG", connection="hc", ffn_pattern="S-"),
    # KV heads replicated (tp > n_kv_heads, Megatron-style): n_kv_heads = tp / 2, so tp = 2 has one
    # KV head on both ranks and tp = 4 two KV heads, each on two ranks (see _config).
    "AG-kvrep": dict(pattern="AG", qk_norm=True, attn_gate="elementwise", n_heads=8,
                     s2=S2Config(enabled=True, block=2, local_blocks=1, vert_stride=4)),
    "F-kvrep": dict(pattern="F", n_heads=8, fox=FoxConfig(output_gate=True, output_norm=True, kv_shift=True)),
    # Hymba's packed in_proj: each rank receives its KV head's k/v columns; layer 1 reuses layer 0's.
    "H-kvrep": dict(pattern="HH", n_heads=8, hymba=HymbaConfig(ssm_inner=32, d_state=4, dt_rank=4,
                                                               kv_share_groups=[[0, 1]])),
}
KV_REPLICATED = {"AG-kvrep", "F-kvrep", "H-kvrep"}
# The default run: tp = 2 with sequence parallelism, every case. Slow: tp = 2 without SP, tp = 4 with SP.
FAST_LAYOUT = (2, True)


def _batch(vocab: int):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = torch.randint(0, vocab, (B, T), generator=g)
    labels[0, :3] = -100
    doc_ids = torch.cat([torch.zeros(B, T // 2), torch.ones(B, T - T // 2)], 1).long()
    weights = torch.rand(B, T, generator=g)  # a non-uniform loss weighting: every token matters differently
    return ids, labels, doc_ids, weights


def _grads(model) -> dict:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = None if g is None else (g.full_tensor() if isinstance(g, DTensor) else g)
    return out


def _config(name: str, tp: int):
    overrides = dict(CASES[name])
    if name in KV_REPLICATED:
        overrides["n_kv_heads"] = tp // 2
    elif tp > 2:  # 4 ranks need 4 KV heads to split
        overrides["n_kv_heads"] = 4
    return tiny_model_config(**overrides)


def _run_case(name: str, tp_mesh, sp: bool) -> dict:
    from braid.parallel.tensor_parallel import apply_tp

    cfg = _config(name, tp_mesh.size())
    torch.manual_seed(0)
    ref = HybridLM(cfg)
    with torch.no_grad():  # larger weights than the 0.02 init so that every path carries signal
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model = copy.deepcopy(ref)
    ref64 = copy.deepcopy(ref).double()
    apply_tp(model, tp_mesh, sequence_parallel=sp)
    ids, labels, doc_ids, w = _batch(cfg.vocab_size)
    losses = {}
    for key, m, weights in (("ref", ref, w), ("ref64", ref64, w.double()), ("tp", model, w)):
        losses[key] = m(ids, labels, doc_ids=doc_ids)
        aux = aux_loss(m)  # MoE balance / z-losses: the router's only other gradient
        ((losses[key] * weights).sum() + (0.0 if aux is None else aux)).backward()
    grads = {key: _grads(m) for key, m in (("ref", ref), ("ref64", ref64), ("tp", model))}
    grads["ref"]["loss"], grads["ref64"]["loss"], grads["tp"]["loss"] = losses["ref"], losses["ref64"], losses["tp"]
    # Score = error / allowed. Allowed: TOL, or 4× the fp32 reference's own error against fp64 where
    # that is larger (sums that cancel, e.g. hyper-connection weights of identical streams).
    scores = {"sharded": (_unsharded_packed(model), 0.0)}
    for pname, g_ref in grads["ref"].items():
        g = grads["tp"][pname]
        if g_ref is None or g is None:
            scores[pname] = (0.0 if g is None and g_ref is None else float("inf"), 0.0)
            continue
        assert float(g_ref.norm()) > 0, f"{pname}: zero reference gradient"
        scores[pname] = (rel_rms(g, g_ref), rel_rms(g_ref, grads["ref64"][pname]))
    return scores


def _unsharded_packed(model) -> float:
    """How many packed projections (Hymba's in_proj, the experts' gate_up/down) are not tp-sharded
    DTensors: the packed layouts must be sharded like every other weight, not replicated."""
    from torch.distributed.tensor import DTensor, Shard

    names = [n for n, _ in model.named_parameters()
             if n.endswith(("mixer.in_proj.weight", "ffn.gate_up", "ffn.down"))]
    params = dict(model.named_parameters())
    return float(sum(not (isinstance(params[n], DTensor) and isinstance(params[n].placements[0], Shard))
                     for n in names))


def _meta_init_problems(name: str, tp_mesh, sp: bool) -> list:
    """Build on the meta device, shard, materialise, reset: parameters must look like a fresh init
    (constants exactly equal, random ones with the reference's spread) and train (finite grads)."""
    from torch.distributed.tensor import DTensor

    from braid.parallel.tensor_parallel import apply_tp

    cfg = _config(name, tp_mesh.size())
    torch.manual_seed(0)
    ref = HybridLM(cfg)
    with torch.device("meta"):
        model = HybridLM(cfg)
    apply_tp(model, tp_mesh, sequence_parallel=sp)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.reset_parameters()
    problems = []
    for (pname, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        full = p.full_tensor() if isinstance(p, DTensor) else p
        std_ref, std = float(p_ref.std()), float(full.std())
        if std_ref == 0.0 and not torch.equal(full, p_ref):
            problems.append(f"{pname}: constant init differs")
        elif std_ref > 0 and p_ref.numel() >= 16 and not 0.5 < std / std_ref < 2.0:
            # (fewer values, e.g. KDA's A_log [4]: their spread is noise, ×5 between draws)
            problems.append(f"{pname}: std {std:.3g} vs {std_ref:.3g}")
    ids, labels, doc_ids, _ = _batch(cfg.vocab_size)
    model(ids, labels, doc_ids=doc_ids).sum().backward()
    grads = _grads(model)
    problems += [f"{k}: non-finite grad" for k, g in grads.items() if g is not None and not torch.isfinite(g).all()]
    return problems


def _worker(rank: int, world: int, port: int, sp: bool, out_path: str) -> None:
    torch.set_num_threads(1)
    join_group(rank, world, port)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    results = {}
    for name in CASES:
        try:
            scores = _run_case(name, mesh, sp)
            ratio = {k: err / max(TOL, 4 * floor) for k, (err, floor) in scores.items()}
            worst = max(ratio, key=ratio.get)
            mx = torch.tensor([ratio[worst]], dtype=torch.float64)
            dist.all_reduce(mx, op=dist.ReduceOp.MAX)
            results[name] = {"max": float(mx), "worst": worst, "err": scores[worst][0],
                             "floor": scores[worst][1], "n": len(scores)}
        except Exception as exc:  # recorded per case so the other cases still report
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            results[name]["meta_init"] = _meta_init_problems(name, mesh, sp)
        except Exception as exc:
            results[name]["meta_init"] = [f"{type(exc).__name__}: {exc}"]
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    leave_group()


_CACHE: dict = {}


def run_layout(tp: int, sp: bool) -> dict:
    """Run every case under (tp, sp) once per session; returns ``{case: result}``."""
    key = (tp, sp)
    if key not in _CACHE:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "out.json")
            with rendezvous() as port:
                mp.spawn(_worker, args=(tp, port, sp, path), nprocs=tp, join=True)
            with open(path) as f:
                _CACHE[key] = json.load(f)
    return _CACHE[key]


def _check(result: dict) -> None:
    assert "error" not in result, result.get("error")
    assert result["n"] > 3
    assert result["max"] <= 1.0, (f"worst {result['worst']}: rel RMS {result['err']:.2e} (fp32 reference vs "
                                  f"fp64: {result['floor']:.2e})")


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_sequence_parallel_matches_one_process(case):
    _check(run_layout(*FAST_LAYOUT)[case])


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_meta_device_init_after_sharding(case):
    assert run_layout(*FAST_LAYOUT)[case]["meta_init"] == []


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_tp2_without_sequence_parallel_matches_one_process(case):
    _check(run_layout(2, False)[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_tp4_matches_one_process(case):
    _check(run_layout(4, True)[case])


# ---------------------------------------------------------------------------- single-process checks

def _loss_worker(rank: int, world: int, port: int, out_path: str) -> None:
    join_group(rank, world, port)
    from braid.parallel.tensor_parallel import vocab_parallel_cross_entropy

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(20, 12, generator=g) * 4).requires_grad_()
    labels = torch.randint(0, 12, (20,), generator=g)
    labels[:4] = -100
    ref = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    w = torch.rand(20, generator=g)
    (ref * w).sum().backward()
    local = logits.detach().chunk(world, dim=-1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, labels, rank * (12 // world), dist.group.WORLD)
    (loss * w).sum().backward()
    errs = [rel_rms(loss, ref), rel_rms(local.grad, logits.grad.chunk(world, dim=-1)[rank])]
    t = torch.tensor(errs, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(t.tolist(), f)
    leave_group()


def test_vocab_parallel_cross_entropy_equals_full_loss():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "out.json")
        with rendezvous() as port:
            mp.spawn(_loss_worker, args=(3, port, path), nprocs=3, join=True)
        loss_err, grad_err = json.load(open(path))
    assert loss_err <= 1e-6 and grad_err <= 1e-6


def test_plan_rejects_heads_not_divisible_by_tp():
    from braid.parallel.tp_plans.mixers import mixer_plan

    model = HybridLM(tiny_model_config(pattern="A", n_heads=6, n_kv_heads=3, d_model=24))
    with pytest.raises(ConfigError, match="model.n_kv_heads' = 3 must be divisible by parallel.tp = 2 or divide"):
        mixer_plan(model.layers[0].mixer, 2)  # neither split nor replicated
    model = HybridLM(tiny_model_config(pattern="A", n_heads=2, n_kv_heads=1))
    with pytest.raises(ConfigError, match="model.n_heads"):
        mixer_plan(model.layers[0].mixer, 4)  # KV replicated, but the query heads cannot split
    kda = HybridLM(tiny_model_config(pattern="K", kda=KDAConfig(n_heads=3, head_dim=8)))
    with pytest.raises(ConfigError, match="model.kda.n_heads"):
        mixer_plan(kda.layers[0].mixer, 2)
    gdn = HybridLM(tiny_model_config(pattern="D", gdn=GatedDeltaNetConfig(n_k_heads=3, n_v_heads=6, head_k_dim=8)))
    with pytest.raises(ConfigError, match="model.gdn.n_k_heads"):
        mixer_plan(gdn.layers[0].mixer, 2)  # value heads split with their key head's group, never alone


def _reduce_scatter_paths() -> dict:
    """On 2 gloo ranks: the native reduce-scatter (NCCL's path) and the all-reduce + slice (gloo's)."""
    from braid.parallel.tp_plans.comm import _reduce_scatter_seq

    rank = dist.get_rank()
    x = torch.randn(3, 6, 2, 5, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    total = sum(torch.randn(3, 6, 2, 5, generator=torch.Generator().manual_seed(r), dtype=torch.float64)
                for r in range(2))
    want = total[:, 3 * rank: 3 * rank + 3]
    native, emulated = (_reduce_scatter_seq(x, None, native=flag) for flag in (True, False))
    errors = torch.stack([(native - want).abs().max(), (emulated - want).abs().max()])
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)  # rank 0 reports for both ranks
    return {"native": float(errors[0]), "emulated": float(errors[1]), "shape": list(native.shape)}


def test_sequence_parallel_reduce_scatter_paths_agree():
    from spawn_group import run_group

    got = run_group(2, "test_tensor_parallel._reduce_scatter_paths")
    assert got["shape"] == [3, 3, 2, 5]
    assert got["native"] < 1e-12 and got["emulated"] < 1e-12
