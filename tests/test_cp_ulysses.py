"""Ulysses context parallelism (``cp_kind=ulysses``): the head-divisibility error and the bytes moved.
Its outputs and gradients against the one-process op run with every other kind in test_cp_attention.py.
"""

from __future__ import annotations

import pytest
import torch


class _FakeSeq:
    """Just enough of a CPSeq for the argument check (no process group is touched before it)."""

    size, rank, meta = 4, 0, 0


def test_heads_not_divisible_by_cp_names_the_keys():
    from braid.parallel.context.ulysses import ulysses_attention

    q = torch.randn(1, 8, 6, 4)
    k = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match=r"model\.n_heads \(6\).*parallel\.cp \(4\)"):
        ulysses_attention(_FakeSeq(), q, k, k)


def run_bytes() -> dict:
    """Bytes COUNTER saw for one Ulysses layer (forward + backward) next to ``ulysses_comm_bytes``."""
    import torch.distributed as dist

    from braid.parallel.context import ContextParallel
    from braid.parallel.context.comm import COUNTER
    from braid.parallel.context.ulysses import ulysses_comm_bytes
    from helpers import cp_local
    from test_cp_attention import B, T, _inputs

    cp = ContextParallel(dist.group.WORLD, "ulysses", "zigzag")
    out = {}
    for fox, hkv in ((False, 2), (True, 1)):
        case = dict(meta=2, docs=True, fox=fox, hkv=hkv)
        q, k, v, lf, doc, _ = _inputs(case)
        cps = cp.bind(T // cp.size, 2)
        loc = [None if x is None else cp_local(x, cps.layout, 2).requires_grad_() for x in (q, k, v, lf)]
        with COUNTER.counting() as got:
            cps.attention(*loc[:3], sink=2, doc_ids=cp_local(doc, cps.layout, 2), log_forget=loc[3],
                          backend="torch").sum().backward()
        want = ulysses_comm_bytes(cp.size, B, T // cp.size, hkv, 8, 8, 4, 4, fox=fox, docs=True)
        out[f"fox={fox}"] = [dict(got), want]
    return out


@pytest.mark.parametrize("cp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ulysses_bytes_equal_the_formula(cp):
    from spawn_group import run_group

    for name, (got, want) in run_group(cp, "test_cp_ulysses.run_bytes").items():
        assert got == want, name
