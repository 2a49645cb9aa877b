"""Tensor-parallel plans as data (braid/models/tp_plan.py): the rows each rank computes with for the
packed and replicated layouts, the size errors, and that the generic applier names no mixer.

The sharded numerics are tests/test_tensor_parallel.py's (every mixer against one process)."""

from __future__ import annotations

from pathlib import Path

import pytest

from braid.errors import ConfigError
from braid.models.tp_plan import Heads, Rows, TPPlan, check_plan, rank_rows

ROOT = Path(__file__).resolve().parents[1]


def _rows(ranges):
    return [i for start, n in ranges for i in range(start, start + n)]


def test_gated_q_layout_whole_groups_are_contiguous():
    """[Hkv, G·D | G·E] with whole KV groups per rank: rank r's rows are its contiguous 1/tp."""
    hkv, g, d, e, tp = 4, 2, 3, 1, 2
    spec = Rows((Heads(g, d, "model.n_heads"), Heads(g, e, "model.n_heads")), groups=hkv)
    n = hkv * g * (d + e)
    for r in range(tp):
        assert rank_rows(spec, tp, r) == [(r * n // tp, n // tp)]


def test_gated_q_layout_split_group_takes_its_heads_q_and_gate_rows():
    """tp a multiple of n_kv_heads: each rank takes its query heads' q rows then their gate rows
    inside its KV group (the layout the gated mixer unflattens per local group)."""
    hkv, g, d, e, tp = 2, 4, 3, 2, 4  # 2 ranks per KV group, 2 query heads each
    spec = Rows((Heads(g, d, "model.n_heads"), Heads(g, e, "model.n_heads")), groups=hkv)
    group_rows = g * (d + e)
    for r in range(tp):
        base, g0 = (r // 2) * group_rows, (r % 2) * 2
        q_rows = range(base + g0 * d, base + (g0 + 2) * d)
        gate_rows = range(base + g * d + g0 * e, base + g * d + (g0 + 2) * e)
        want = list(q_rows) + list(gate_rows)
        assert _rows(rank_rows(spec, tp, r)) == want


def test_shared_kv_heads_are_replicated_per_rank_group():
    spec = Rows((Heads(2, 5, "model.n_kv_heads", shared=True),))
    assert [rank_rows(spec, 4, r) for r in range(4)] == [[(0, 5)], [(0, 5)], [(5, 5)], [(5, 5)]]


def test_packed_blocks_give_every_rank_its_part_of_each_block():
    """[q | k | v | x | z]: rank r gets its 1/tp of q, x, z and (KV heads replicated) its KV head."""
    h, hkv, dq, dv, inner, tp = 4, 1, 2, 4, 16, 2
    spec = Rows((Heads(h, dq, "model.n_heads"), Heads(hkv, dq, "model.n_kv_heads", shared=True),
                 Heads(hkv, dv, "model.n_kv_heads", shared=True), Heads(inner, 1, "x"), Heads(inner, 1, "z")),
                packed_output=True, key="rows")
    q, k, v = h * dq, hkv * dq, hkv * dv
    for r in range(tp):
        want = (list(range(r * q // tp, (r + 1) * q // tp)) + list(range(q, q + k)) + list(range(q + k, q + k + v))
                + [q + k + v + i for i in range(r * inner // tp, (r + 1) * inner // tp)]
                + [q + k + v + inner + i for i in range(r * inner // tp, (r + 1) * inner // tp)])
        assert _rows(rank_rows(spec, tp, r)) == want


def test_size_errors_name_the_key():
    with pytest.raises(ConfigError, match="'model.n_kv_heads' = 3 must be divisible by parallel.tp = 2 or divide"):
        check_plan(TPPlan(params={"w": Rows((Heads(3, 4, "model.n_kv_heads", shared=True),))}), 2)
    with pytest.raises(ConfigError, match="'model.n_heads' = 6 must be divisible by parallel.tp = 4"):
        check_plan(TPPlan(params={"w": Rows((Heads(6, 4, "model.n_heads"),))}), 4)
    with pytest.raises(ConfigError, match="'model.kda.n_heads' = 3"):
        check_plan(TPPlan(checks=((3, "model.kda.n_heads"),)), 2)
    with pytest.raises(ConfigError, match="'packed rows' = 6"):
        check_plan(TPPlan(params={"w": Rows((Heads(4, 1, "a"), Heads(2, 1, "b", shared=True)), packed_output=True,
                                            key="packed rows")}), 4)


def test_tensor_parallel_code_names_no_mixer():
    """The applier, the plans' checker and the collectives know plans, not mixer classes."""
    from braid.models.registry import mixer_class

    names = {mixer_class(letter).__name__ for letter in "AGFKMH"}
    files = [ROOT / "braid/parallel/tensor_parallel.py", ROOT / "braid/parallel/collectives.py",
             *sorted((ROOT / "braid/parallel/tp_plans").glob("*.py"))]
    for path in files:
        text = path.read_text()
        assert not [n for n in names if n in text], path
