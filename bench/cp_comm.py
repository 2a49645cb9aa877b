"""Context-parallel communication and load balance, per cp_kind and mixer.

For every (cp_kind, mixer) it runs the mixer's sequence-mixing ops once forward and backward on
``--cp`` gloo ranks (CPU), counts the bytes each rank sends (``braid.parallel.context.comm.COUNTER``,
by label) and prints them next to the analytic formula of each scheme; then the per-rank attention
work (visible query·key pairs) of the zigzag and contiguous layouts.

    .venv/bin/python bench/cp_comm.py                      # cp 4, 1 × 1024 tokens
    .venv/bin/python bench/cp_comm.py --cp 2 --seq-len 4096

Writes bench/results/cp_comm.json. Shapes per mixer (one layer): see ``MIXERS``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from braid.kernels.s2 import S2Pattern  # noqa: E402

# One layer's attention-like op per mixer: query heads, kv heads, q/k dim, v dim, FoX gates, meta.
MIXERS = {
    "A (GQA 8/2)": dict(hq=8, hkv=2, d=64, dv=64),
    "A+S2": dict(hq=8, hkv=2, d=64, dv=64, s2=dict(block=64, local_blocks=2, vert_stride=4)),
    "G (gate outside attention)": dict(hq=8, hkv=2, d=64, dv=64),
    "F (FoX)": dict(hq=8, hkv=8, d=64, dv=64, fox=True),
    "M (MLA 8 heads, qk 96, v 64)": dict(hq=8, hkv=8, d=96, dv=64),
    "H attention (16 meta)": dict(hq=8, hkv=2, d=64, dv=64, meta=16),
}
KINDS = ("ring", "s2", "tree", "ulysses")
# State passing and halos are the same under every kind: KDA heads × key dim × value dim, Hymba's SSM
# channels × state, and the short convolutions' halo (kernel − 1 rows of q, k, v channels).
RECURRENT = {
    "K state (8 heads, 64×64)": dict(op="kda", h=8, k=64, v=64),
    "H SSM state (512 ch, 16 state)": dict(op="scan", c=512, n=16),
    "K short-conv halo (3 rows, 3×512 ch)": dict(op="halo", rows=3, ch=3 * 512),
}
DTYPE_BYTES = 4  # fp32 on CPU; on GPU bf16 K/V halve the K/V terms (accumulators stay fp32)


def _inputs(spec: dict, batch: int, local: int, g: torch.Generator):
    m = spec.get("meta", 0)
    rows = m + local
    q = torch.randn(batch, rows, spec["hq"], spec["d"], generator=g)
    k = torch.randn(batch, rows, spec["hkv"], spec["d"], generator=g)
    v = torch.randn(batch, rows, spec["hkv"], spec["dv"], generator=g)
    lf = torch.nn.functional.logsigmoid(torch.randn(batch, rows, spec["hq"], generator=g) + 2) \
        if spec.get("fox") else None
    doc = torch.zeros(batch, rows, dtype=torch.long)
    doc[:, :m] = -1
    return q, k, v, lf, doc


def analytic(kind: str, spec: dict, cp, batch: int, local: int) -> dict:
    """Bytes per label this rank sends, by the scheme's formula."""
    from braid.parallel.context.ring import ring_comm_bytes
    from braid.parallel.context.s2_shard import s2_fetch_bytes
    from braid.parallel.context.tree import tree_comm_bytes
    from braid.parallel.context.ulysses import ulysses_comm_bytes

    common = dict(fox=bool(spec.get("fox")), docs=True)
    nseg = len(cp.layout.local)
    if kind == "s2" and spec.get("s2"):
        s2 = S2Pattern(**spec["s2"], n_heads=spec["hq"])
        per = s2_fetch_bytes(cp.layout, s2, batch=batch, n_heads=spec["hq"], n_kv_heads=spec["hkv"],
                             head_dim=spec["d"], v_head_dim=spec["dv"], dtype_bytes=DTYPE_BYTES,
                             meta=spec.get("meta", 0), fox=common["fox"], doc_bytes=8)[cp.rank]
        return {"fwd": per["fwd_send"], "bwd": per["bwd_send"]}
    if kind in ("ring", "s2"):
        return ring_comm_bytes(cp.size, batch, local, spec["hkv"], spec["d"], spec["dv"], spec["hq"], DTYPE_BYTES,
                               n_segments=nseg, **common)
    if kind == "tree":
        return tree_comm_bytes(cp.size, batch, local, spec["d"], spec["dv"], spec["hq"], DTYPE_BYTES,
                               node_size=cp.cp.node_size, n_segments=nseg, **common)
    return ulysses_comm_bytes(cp.size, batch, local, spec["hkv"], spec["d"], spec["dv"], spec["hq"], DTYPE_BYTES,
                              **common)


def _measure(kind: str, spec: dict, cp, batch: int, local: int) -> dict:
    from braid.parallel.context.comm import COUNTER

    g = torch.Generator().manual_seed(cp.rank)
    q, k, v, lf, doc = [x if x is None else x.requires_grad_(x.is_floating_point())
                        for x in _inputs(spec, batch, local, g)]
    s2 = S2Pattern(**spec["s2"], n_heads=spec["hq"]) if spec.get("s2") else None
    scale = spec["d"] ** -0.5
    with COUNTER.counting() as counted:
        out = cp.attention(q, k, v, causal=True, scale=scale, sink=spec.get("meta", 0), doc_ids=doc,
                           log_forget=lf, s2=s2, backend="torch")
        out.float().square().sum().backward()
    return dict(counted)


def _group_s2(labels: dict) -> dict:
    """S2's formula counts forward and backward; the counter has one label per tensor kind."""
    fwd = sum(b for k, b in labels.items() if k.startswith("s2.") and k != "s2.dkv")
    return {"fwd": fwd, "bwd": labels.get("s2.dkv", 0)}


def worker(rank: int, world: int, port: int, args, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from braid.parallel.context import ContextParallel

    rows = []
    for kind in KINDS:
        ctx = ContextParallel(dist.group.WORLD, kind, "zigzag")
        for name, spec in MIXERS.items():
            if kind == "s2" and not spec.get("s2"):
                continue
            if kind == "ulysses" and spec["hq"] % world:
                continue
            cp = ctx.bind(args.seq_len // world, spec.get("meta", 0))
            local = args.seq_len // world
            got = _measure(kind, spec, cp, args.batch, local)
            want = analytic(kind, spec, cp, args.batch, local)
            if kind == "s2":
                got = _group_s2(got)
            total_got = torch.tensor([float(sum(got.values()))])
            every = [torch.zeros(1) for _ in range(world)]
            dist.all_gather(every, total_got)
            exact = torch.tensor([float(got == want)])
            dist.all_reduce(exact, op=dist.ReduceOp.MIN)
            rows.append(dict(kind=kind, mixer=name, max_rank_bytes=max(float(e) for e in every),
                             rank0_labels=got, formula_matches=bool(exact.item())))
    for kind_layout in ("zigzag", "contiguous"):
        ctx = ContextParallel(dist.group.WORLD, "ring", kind_layout)
        for name, spec in RECURRENT.items():
            cp = ctx.bind(args.seq_len // world, 0)
            got, want = _recurrent(spec, cp, args.batch, args.seq_len // world)
            every = [torch.zeros(1) for _ in range(world)]
            dist.all_gather(every, torch.tensor([float(sum(got.values()))]))
            exact = torch.tensor([float(got == want)])
            dist.all_reduce(exact, op=dist.ReduceOp.MIN)
            rows.append(dict(kind=f"any ({kind_layout})", mixer=name, max_rank_bytes=max(float(e) for e in every),
                             rank0_labels=got, formula_matches=bool(exact.item())))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def _recurrent(spec: dict, cp, batch: int, local: int) -> tuple[dict, dict]:
    """(counted, formula) bytes of one recurrent op forward + backward on this rank."""
    from braid.parallel.context.comm import COUNTER
    from braid.parallel.context.halo import halo_comm_bytes
    from braid.parallel.context.state import state_comm_bytes

    g = torch.Generator().manual_seed(cp.rank)
    nseg = len(cp.layout.local)
    with COUNTER.counting() as counted:
        if spec["op"] == "kda":
            h, k, v = spec["h"], spec["k"], spec["v"]
            q, kk = (torch.nn.functional.normalize(torch.randn(batch, local, h, k, generator=g), dim=-1)
                     .requires_grad_() for _ in range(2))
            val = torch.randn(batch, local, h, v, generator=g, requires_grad=True)
            gate = (-torch.rand(batch, local, h, k, generator=g)).requires_grad_()
            beta = torch.rand(batch, local, h, generator=g, requires_grad=True)
            cp.kda(q, kk, val, gate, beta, backend="torch").square().sum().backward()
            want = {f"kda.state{s}": b for s, b in state_comm_bytes(cp.size, batch, nseg, h * k * (v + k)).items()}
        elif spec["op"] == "scan":
            c, n = spec["c"], spec["n"]
            u = torch.randn(batch, local, c, generator=g, requires_grad=True)
            dt = torch.rand(batch, local, c, generator=g, requires_grad=True)
            a = -torch.rand(c, n, generator=g)
            b_in, c_out = (torch.randn(batch, local, n, generator=g, requires_grad=True) for _ in range(2))
            cp.selective_scan(u, dt, a.requires_grad_(), b_in, c_out, backend="torch").square().sum().backward()
            want = {f"ssm.state{s}": b for s, b in state_comm_bytes(cp.size, batch, nseg, 2 * c * n).items()}
        else:
            rows, ch = spec["rows"], spec["ch"]
            x = torch.randn(batch, local, ch, generator=g, requires_grad=True)
            w = torch.randn(rows + 1, ch, generator=g)

            def conv(t):  # a depthwise causal conv of rows + 1 taps, no cross-piece reads
                pad = torch.nn.functional.pad(t, (0, 0, rows, 0))
                return sum(pad[:, i: i + t.shape[1]] * w[i] for i in range(rows + 1))

            cp.local_mix(conv, rows, x).square().sum().backward()
            want = halo_comm_bytes(cp.layout, 0, rows, batch, ch, DTYPE_BYTES)
    return {k: v for k, v in counted.items() if v}, {k: v for k, v in want.items() if v}


def pair_balance(seq_len: int, cp: int, window=None, meta: int = 0) -> dict:
    """Visible causal (query, key) pairs per rank for the queries it holds (ring / s2 / ulysses-free
    work split), as max/mean − 1, per layout."""
    from braid.parallel.context.layout import CPLayout

    out = {}
    for kind in ("zigzag", "contiguous"):
        work = []
        for r in range(cp):
            lay = CPLayout(seq_len, cp, r, kind)
            pos = lay.positions()
            keys = pos + 1 if window is None else torch.clamp(pos + 1, max=window)
            work.append(float((keys + meta).sum()))
        mean = sum(work) / cp
        out[kind] = max(work) / mean - 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cp", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cp_comm.json"))
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = Path(args.out).with_suffix(".rows.tmp")
    mp.spawn(worker, args=(args.cp, port, args, str(tmp)), nprocs=args.cp, join=True)
    rows = json.loads(tmp.read_text())
    tmp.unlink()
    print(f"cp {args.cp}, batch {args.batch} × {args.seq_len} tokens, fp32; bytes sent per rank per layer (fwd+bwd)")
    print(f"{'kind':16} {'mixer':38} {'max rank MiB':>12} {'= formula':>9}")
    for r in rows:
        print(f"{r['kind']:16} {r['mixer']:38} {r['max_rank_bytes'] / 2**20:12.3f} {str(r['formula_matches']):>9}")
    balance = {"full causal": pair_balance(args.seq_len, args.cp),
               f"window {args.seq_len // 4}": pair_balance(args.seq_len, args.cp, window=args.seq_len // 4),
               "16 meta tokens": pair_balance(args.seq_len, args.cp, meta=16)}
    print("\nattention work imbalance (max/mean − 1 of visible query·key pairs per rank)")
    for name, b in balance.items():
        print(f"  {name:16} zigzag {b['zigzag'] * 100:6.2f} %   contiguous {b['contiguous'] * 100:6.2f} %")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cp": args.cp, "seq_len": args.seq_len, "batch": args.batch,
                                          "rows": rows, "balance": balance}, indent=1))


if __name__ == "__main__":
    main()
