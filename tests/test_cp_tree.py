"""Tree attention (``cp_kind=tree``): training attention against the one-process op for every case of
``test_cp_attention`` (outputs and gradients of q, k, v and the forget gates, fp32 rel. RMS ≤ 1e-5),
with a flat and a topology-aware (two nodes of two ranks) reduction; and decoding with the KV cache
sharded over the ranks, which must produce the same greedy tokens as unsharded decoding.
"""

from __future__ import annotations

import pytest
import torch

from braid.config import FoxConfig, HymbaConfig, MLAConfig
from braid.models.hybrid import HybridLM
from helpers import rel_rms, tiny_model_config
from spawn_group import run_group
from test_cp_attention import CASES, _check, _results


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_tree_cp4_two_nodes(case):
    _check(_results("tree", 4, "zigzag", 2)[case])


# Every attention-cache flavour the decoder has: windowed softmax (A, global layer 0), FoX with its
# Pro options (gates in the cache), Hymba with meta-token sinks and a shared KV cache, MLA.
DECODE_MODEL = dict(
    pattern="AFHHM", n_kv_heads=2, meta_tokens=3, window=5, global_layers=[0], qk_norm=True,
    fox=FoxConfig(output_gate=True, output_norm=True, kv_shift=True, forget_bias_init=1.0),
    hymba=HymbaConfig(ssm_inner=64, v_head_dim=16, d_state=4, dt_rank=4, kv_share_groups=[[2, 3]]),
    mla=MLAConfig(n_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8))


def run_decoding(node_size, block: int, steps: int) -> dict:
    """Greedy decoding with an unsharded and a sharded cache (prompt of 6, then one token at a time):
    the tokens, and the largest rel. RMS between the two caches' logits at any step."""
    import torch.distributed as dist

    from braid.models.decoding import DecodeCache, decode_step
    from braid.parallel.context.comm import COUNTER
    from braid.parallel.context.tree import reduction_levels
    from braid.parallel.context.tree_decode import sharded_decode_cache

    torch.manual_seed(0)  # the same weights and prompt on every rank
    model = HybridLM(tiny_model_config(**DECODE_MODEL)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompt = torch.randint(0, 64, (2, 6))
    runs = {}
    for name, cache in (("full", DecodeCache()), ("sharded", sharded_decode_cache(dist.group.WORLD, block, node_size))):
        ids, new, logits, sent = prompt, prompt, [], []
        with torch.no_grad():
            for _ in range(steps):
                with COUNTER.counting() as counted:
                    out = decode_step(model, new, cache)
                sent.append(sum(counted.values()))
                logits.append(out[:, -1])
                new = out[:, -1].argmax(-1)[:, None]
                ids = torch.cat([ids, new], 1)
        runs[name] = (ids, torch.stack(logits), cache, sent[1:])  # bytes of the one-token steps
    errs = [rel_rms(a, b) for a, b in zip(runs["sharded"][1], runs["full"][1])]
    try:
        reduction_levels(dist.group.WORLD, 3)
        bad_nodes = "no error"
    except ValueError as exc:
        bad_nodes = str(exc)
    shard = runs["sharded"][2].layers[0]["k"].shape[1]  # layer 0 is global: keeps every key
    return {"full": runs["full"][0].tolist(), "sharded": runs["sharded"][0].tolist(), "max_err": max(errs),
            "local_keys": shard, "all_keys": runs["full"][2].layers[0]["k"].shape[1],
            "step_bytes": runs["sharded"][3], "bad_nodes": bad_nodes}


_DECODE: dict = {}


def _decoding(n, node_size=None, block=2, steps=12) -> dict:
    key = (n, node_size, block, steps)
    if key not in _DECODE:
        _DECODE[key] = run_group(n, "test_cp_tree.run_decoding", node_size, block, steps)
    return _DECODE[key]


def test_sharded_cache_greedy_decoding_cp4():
    """4 ranks, KV in round-robin blocks of 2: the same greedy tokens as one cache, logits within 1e-5,
    each rank holds only its share of the keys, and a one-token step sends the same bytes however long
    the context has grown."""
    res = _decoding(4)
    assert res["sharded"] == res["full"]
    assert res["max_err"] <= 1e-5, res["max_err"]
    assert res["local_keys"] < res["all_keys"] / 2, res
    assert res["step_bytes"][0] > 0 and len(set(res["step_bytes"])) == 1, res["step_bytes"]


def test_ranks_per_node_must_divide_cp():
    assert "ranks per node (3" in _decoding(4)["bad_nodes"] and "parallel.cp (4)" in _decoding(4)["bad_nodes"]


@pytest.mark.slow
def test_sharded_cache_greedy_decoding_two_nodes():
    res = _decoding(4, node_size=2, block=3)
    assert res["sharded"] == res["full"]
    assert res["max_err"] <= 1e-5, res["max_err"]


def run_bytes(node_size) -> dict:
    """Bytes COUNTER saw for one tree-attention layer (forward + backward) next to ``tree_comm_bytes``."""
    import torch.distributed as dist

    from braid.parallel.context import ContextParallel
    from braid.parallel.context.comm import COUNTER
    from braid.parallel.context.tree import tree_comm_bytes
    from helpers import cp_local
    from test_cp_attention import B, T, _inputs

    cp = ContextParallel(dist.group.WORLD, "tree", "zigzag", node_size)
    out = {}
    for fox in (False, True):
        case = dict(meta=2, docs=True, fox=fox)
        q, k, v, lf, doc, _ = _inputs(case)
        cps = cp.bind(T // cp.size, 2)
        loc = [None if x is None else cp_local(x, cps.layout, 2).requires_grad_() for x in (q, k, v, lf)]
        with COUNTER.counting() as got:
            cps.attention(*loc[:3], sink=2, doc_ids=cp_local(doc, cps.layout, 2), log_forget=loc[3],
                          backend="torch").sum().backward()
        want = tree_comm_bytes(cp.size, B, T // cp.size, 8, 8, 4, 4, fox=fox, docs=True, node_size=node_size)
        out[f"fox={fox}"] = [dict(got), want]
    return out


@pytest.mark.parametrize("cp, node_size", [(2, None), pytest.param(4, 2, marks=pytest.mark.slow)])
def test_tree_bytes_equal_the_formula(cp, node_size):
    for name, (got, want) in run_group(cp, "test_cp_tree.run_bytes", node_size).items():
        assert got == want, name
