"""A mixer added from a test file only (docs/adding_a_mixer.md walks through this same code): registered
here under a fresh letter, it trains, shards over tp 2 and over cp 2 (ring) with the single-process
result, and decodes with its cache as full forwards do. Nothing in braid names it.

Ranks are spawned processes: ``spawn_group.run_group`` imports this module in each rank by the target
name ``test_adding_a_mixer.<function>``, which runs the ``@register_mixer`` below there too.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from braid.config import ModelConfig
from braid.models.caches import KVCache
from braid.models.hybrid import HybridLM
from braid.models.layers import SeqInfo, mark_output_projection
from braid.models.registry import register_mixer
from braid.models.tp_plan import Heads, Rows, Split, TPPlan
from braid.models.visible_keys import mean_visible_keys
from helpers import rel_rms, tiny_model_config
from spawn_group import run_group

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "adding_a_mixer.md"

# --- docs/adding_a_mixer.md: begin
def token_shift(x: torch.Tensor, doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """Row t of the result is row t−1 of ``x [B, T, C]`` (zeros for t = 0 and at document starts)."""
    prev = F.pad(x[:, :-1], (0, 0, 1, 0))
    if doc_ids is None:
        return prev
    same_doc = F.pad(doc_ids[:, :-1], (1, 0), value=-1) == doc_ids
    return prev * same_doc[..., None].to(x.dtype)


class ShiftCache(KVCache):
    """The layer's keys and values, plus the last input row (the next token's shifted row)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.last: Optional[torch.Tensor] = None


@register_mixer("Z")
class ShiftAttention(nn.Module):
    """Causal softmax attention whose keys and values read a learned per-channel mix of the current
    and the previous token (an RWKV-style token shift)."""

    cp_ops = ("attention", "local_mix")  # the seq.ops methods forward calls

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = d // cfg.n_heads
        hd = self.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.o_proj = mark_output_projection(nn.Linear(self.n_heads * hd, d, bias=False))
        self.mix_k = nn.Parameter(torch.full((d,), 0.5))
        self.mix_v = nn.Parameter(torch.full((d,), 0.5))

    def new_cache(self, stream) -> ShiftCache:
        return ShiftCache(stream)

    def forward(self, x: torch.Tensor, seq: SeqInfo, cache: Optional[ShiftCache] = None) -> torch.Tensor:
        """x ``[B, T, d]`` → ``[B, T, d]``; ``cache``: decoding, continued from the cached keys and row."""
        if cache is None:  # the shift reads one row back: under cp, local_mix supplies it from the neighbour
            prev = seq.ops.local_mix(token_shift, 1, x, seq.doc_ids)
        else:
            first = x.new_zeros(x[:, :1].shape) if cache.last is None else cache.last
            prev = torch.cat([first, x[:, :-1]], 1)
            cache.last = x[:, -1:]
        xk, xv = torch.lerp(x, prev, self.mix_k), torch.lerp(x, prev, self.mix_v)
        q = self.q_proj(x).unflatten(-1, (-1, self.head_dim))  # local heads under tp: from the shape
        k = self.k_proj(xk).unflatten(-1, (-1, self.head_dim))
        v = self.v_proj(xv).unflatten(-1, (-1, self.head_dim))
        if cache is None:
            o = seq.ops.attention(q, k, v, causal=True, sink=seq.meta_tokens, doc_ids=seq.doc_ids)
        else:
            o = cache.attend(q, k, v, window=None, sink=seq.meta_tokens)
        return self.o_proj(o.flatten(2))

    def flops_per_token(self, seq_len: int) -> float:
        """Forward matmul FLOPs per token: the four projections, then QKᵀ and PV over the visible keys."""
        d, hd = self.q_proj.in_features, self.head_dim
        proj = 2 * d * (2 * self.n_heads + 2 * self.n_kv_heads) * hd
        return proj + 4 * self.n_heads * hd * mean_visible_keys(seq_len, None)

    def tp_plan(self, tp: int) -> TPPlan:
        """Query and KV heads split over tp (KV heads replicated when fewer than tp), ``o_proj`` by
        input columns; the shift mixes (over the full model width) replicate."""
        kv = Rows((Heads(self.n_kv_heads, self.head_dim, "model.n_kv_heads", shared=True),))
        return TPPlan(params={"q_proj.weight": Rows((Heads(self.n_heads, self.head_dim, "model.n_heads"),)),
                              "k_proj.weight": kv, "v_proj.weight": kv, "o_proj.weight": Split(1)})
# --- docs/adding_a_mixer.md: end

TOL = 1e-5
B, T = 2, 16


def _config(**overrides) -> ModelConfig:
    return tiny_model_config(**{"pattern": "ZA", **overrides})


def _model(cfg: ModelConfig) -> HybridLM:
    torch.manual_seed(0)
    model = HybridLM(cfg)
    with torch.no_grad():  # larger weights than the 0.02 init so that every path carries signal
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _batch(vocab: int):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = torch.randint(0, vocab, (B, T), generator=g)
    labels[0, :3] = -100
    starts = torch.rand(B, T, generator=g) < 0.15
    starts[:, T // 4] = True  # a document starting exactly at a cp segment start
    doc_ids = starts.long().cumsum(1)
    weights = torch.rand(B, T, generator=g)  # every token's loss matters differently
    return ids, labels, doc_ids, weights


def _scores(grads: dict, ref: dict, ref64: dict) -> dict:
    """Per entry: error against the fp32 reference / allowed (TOL, or 4× the fp32 reference's own
    error against fp64 where that is larger)."""
    out = {}
    for name, g_ref in ref.items():
        g = grads[name]
        if g is None or g_ref is None:
            out[name] = 0.0 if g is None and g_ref is None else float("inf")
            continue
        assert float(g_ref.norm()) > 0, f"{name}: zero reference gradient"
        out[name] = rel_rms(g, g_ref) / max(TOL, 4 * rel_rms(g_ref, ref64[name]))
    return out


def _references(cfg, ids, labels, doc_ids, w):
    """The unsharded model (fp32 and fp64): per-token losses and gradients, and an untouched copy."""
    ref = _model(cfg)
    fresh, ref64 = copy.deepcopy(ref), copy.deepcopy(ref).double()
    out = []
    for m, weights in ((ref, w), (ref64, w.double())):
        loss = m(ids, labels, doc_ids=doc_ids)
        (loss * weights).sum().backward()
        out.append({"loss": loss.detach(), **{n: p.grad for n, p in m.named_parameters()}})
    return fresh, out[0], out[1]


def run_tp() -> dict:
    """In each of 2 ranks: the model sharded over tp (with sequence parallelism) against one process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from braid.parallel.tensor_parallel import apply_tp

    cfg = _config()
    ids, labels, doc_ids, w = _batch(cfg.vocab_size)
    model, ref, ref64 = _references(cfg, ids, labels, doc_ids, w)
    apply_tp(model, init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",)),
             sequence_parallel=True)
    loss = model(ids, labels, doc_ids=doc_ids)
    (loss * w).sum().backward()
    grads = {"loss": loss.detach()}
    for n, p in model.named_parameters():
        grads[n] = None if p.grad is None else p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
    sharded = [n for n, p in model.named_parameters() if n.startswith("layers.0.mixer.") and isinstance(p, DTensor)
               and p.placements[0].is_shard()]
    return {"scores": _scores(grads, ref, ref64), "sharded": sharded}


def run_cp() -> dict:
    """In each of 2 ranks: the model on its zigzag shard of the sequence (ring attention, packed
    documents) against the model on the whole sequence; gradients summed over ranks."""
    from braid.parallel.context import apply_cp

    group = dist.group.WORLD
    cfg = _config()
    ids, labels, doc_ids, w = _batch(cfg.vocab_size)
    model, ref, ref64 = _references(cfg, ids, labels, doc_ids, w)
    cp = apply_cp(model, group, "ring", "zigzag")
    local = cp.shard_batch(dict(input_ids=ids, labels=labels, doc_ids=doc_ids, weights=w))
    lw = local.pop("weights")
    loss = model(**local)
    (loss * lw).sum().backward()
    parts = [torch.empty_like(loss) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, loss.detach().contiguous(), group=group)
    grads = {"loss": cp.layout(T).unshard(parts, 1)}
    for n, p in model.named_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)  # replicated parameters: the data-parallel gradient sum
        grads[n] = p.grad
    return {"scores": _scores(grads, ref, ref64)}


def _check(scores: dict) -> None:
    assert len(scores) > 8
    worst = max(scores, key=scores.get)
    assert scores[worst] <= 1.0, f"{worst}: error {scores[worst]:.2f}× the allowed"


# ---------------------------------------------------------------------------- single process


def test_config_accepts_the_new_letter_and_the_model_builds_it():
    from braid.config import load_config
    from braid.errors import ConfigError
    from braid.models.registry import mixer_class, mixer_declaration, mixer_letters

    assert "Z" in mixer_letters() and mixer_class("Z") is ShiftAttention
    assert mixer_declaration("Z", "cp_ops") == ("attention", "local_mix")
    cfg = load_config(None, ["model.pattern=ZAZ"])  # validated like a built-in letter
    assert cfg.model.pattern == "ZAZ"
    with pytest.raises(ConfigError, match="model.pattern"):
        load_config(None, ["model.pattern=ZY"])  # an unregistered letter still fails
    model = HybridLM(_config())
    assert isinstance(model.layers[0].mixer, ShiftAttention)


def test_trains_a_few_steps():
    cfg = _config()
    model = _model(cfg)
    ids, labels, doc_ids, _ = _batch(cfg.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels, doc_ids=doc_ids)
        loss = loss[labels != -100].mean()
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
    assert model.layers[0].mixer.mix_k.grad.abs().sum() > 0  # the shift path carries gradient


def test_causal_and_documents_isolated():
    cfg = _config()
    model = _model(cfg).eval()
    ids, _, doc_ids, _ = _batch(cfg.vocab_size)
    with torch.no_grad():
        base = model(ids, doc_ids=doc_ids)
        changed = ids.clone()
        changed[:, T // 2] = (changed[:, T // 2] + 1) % cfg.vocab_size
        after = model(changed, doc_ids=doc_ids)
    assert torch.equal(base[:, : T // 2], after[:, : T // 2])  # no position reads a later one
    same_doc = doc_ids == doc_ids[:, T // 2: T // 2 + 1]
    later = torch.arange(T) >= T // 2
    other = ~same_doc & later  # later positions of other documents do not see the change either
    assert torch.equal(base[other], after[other])


def test_cached_decoding_equals_full_forwards():
    from braid.generate import generate
    from braid.models.decoding import DecodeCache, decode_step, supports_incremental

    cfg = _config(pattern="ZAZ", meta_tokens=2)
    model = _model(cfg).eval()
    assert supports_incremental(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=g)
    with torch.no_grad():
        full = model(ids)
    cache, pieces = DecodeCache(), []
    for lo, hi in ((0, 5), (5, 6), (6, 9), (9, 10), (10, 11)):  # prefill, then one or several tokens
        pieces.append(decode_step(model, ids[:, lo:hi], cache))
    assert rel_rms(torch.cat(pieces, 1), full) < 1e-5
    out = generate(model, ids[:, :4], 6)
    expected = ids[:, :4]
    with torch.no_grad():
        for _ in range(6):  # greedy by full forwards
            expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, expected)


def test_flops_in_the_model_stats():
    from braid.models.stats import model_stats

    with_z, plain = model_stats(_config(), T), model_stats(_config(pattern="AA"), T)
    # ShiftAttention has attention's matmuls exactly (the shift's lerps are no matmuls)
    assert with_z.flops_per_token == plain.flops_per_token > 0


def test_doc_block_is_this_files_mixer():
    """docs/adding_a_mixer.md's first python block is this file's mixer: its imports (each one this file
    makes too), then the code between this file's doc markers, character for character; it compiles."""
    source = Path(__file__).read_text()
    mixer = source.split("# --- docs/adding_a_mixer.md: begin\n")[1].split("# --- docs/adding_a_mixer.md: end\n")[0]
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/adding_a_mixer.md has no python block"
    head, sep, body = blocks[0].partition(mixer.split("\n", 1)[0] + "\n")
    assert sep and sep + body == mixer, "docs/adding_a_mixer.md's mixer block differs from this test's mixer"
    ours = {line for line in source.splitlines() if line.startswith(("import ", "from "))}
    theirs = [line for line in head.splitlines() if line.strip()]
    assert theirs and all(line in ours for line in theirs), "the doc's imports are not this file's"
    compile(blocks[0], str(DOC), "exec")


# ---------------------------------------------------------------------------- 2 ranks

_CACHE: dict = {}


def _group(target: str) -> dict:
    if target not in _CACHE:
        _CACHE[target] = run_group(2, f"test_adding_a_mixer.{target}")
    return _CACHE[target]


def test_tp2_matches_one_process():
    result = _group("run_tp")
    assert sorted(result["sharded"]) == ["layers.0.mixer.k_proj.weight", "layers.0.mixer.o_proj.weight",
                                         "layers.0.mixer.q_proj.weight", "layers.0.mixer.v_proj.weight"]
    _check(result["scores"])


def test_cp2_ring_matches_one_process():
    _check(_group("run_cp")["scores"])
