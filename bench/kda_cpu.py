"""CPU benchmark of the torch KDA op: braid's chunked `kda` against a straightforward chunked baseline.

The baseline is the pure-torch fallback of Hugging Face transformers' Kimi Linear model
(`chunk_kimi_delta_attention`, which inverts the within-chunk triangular system row by row in a Python
loop and builds a [C, C, K] decay tensor for every chunk). When the installed transformers lacks
Kimi Linear, `naive_chunk_kda` below (the same algorithm, written here from the math) stands in.

    .venv/bin/python bench/kda_cpu.py            # B 1, T 2048, H 4, K = V = 64, 2 threads
    .venv/bin/python bench/kda_cpu.py --threads 4 --seq-len 4096

Prints a table (impl, fwd ms, fwd+bwd ms, speedup) and writes bench/results/kda_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# On a shared machine spinning OpenMP threads stall each other for whole time slices (timings swing
# 10×); passive waiting keeps both implementations measurable. Set before torch loads its OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from braid.kernels import kda  # noqa: E402


def naive_chunk_kda(q, k, v, g, beta, chunk_size=64):
    """Chunked KDA with a row-by-row within-chunk inverse (the straightforward formulation).

    q, k, g ``[B, T, H, K]``, v ``[B, T, H, V]``, beta ``[B, T, H]``; T a multiple of chunk_size.
    Returns o ``[B, T, H, V]`` (fp32).
    """
    b, t, h, dk = k.shape
    c, n = chunk_size, t // chunk_size
    q, k, v, g = (x.float().transpose(1, 2).reshape(b, h, n, c, -1) for x in (q, k, v, g))
    beta = beta.float().transpose(1, 2).reshape(b, h, n, c, 1)
    q = q * dk ** -0.5
    gam = g.cumsum(-2)
    upper = torch.ones(c, c, dtype=torch.bool).triu(1)  # j > i
    decay = (gam[..., :, None, :] - gam[..., None, :, :]).masked_fill(upper[..., None], float("-inf")).exp()
    a = -((k * beta)[..., :, None, :] * k[..., None, :, :] * decay).sum(-1).masked_fill(~upper.T, 0)  # −A
    for i in range(1, c):  # (I + A)^{-1} by forward substitution, one row at a time
        a[..., i, :i] = a[..., i, :i].clone() + (a[..., i, :i, None].clone() * a[..., :i, :i].clone()).sum(-2)
    inv = a + torch.eye(c)
    u, w = inv @ (v * beta), inv @ (k * beta * gam.exp())
    s = torch.zeros(b, h, dk, v.shape[-1])
    outs = []
    causal = torch.ones(c, c, dtype=torch.bool).tril()
    for i in range(n):
        gi = gam[:, :, i]
        p = (q[:, :, i, :, None, :] * k[:, :, i, None, :, :] * decay[:, :, i]).sum(-1) * causal
        v_new = u[:, :, i] - w[:, :, i] @ s
        outs.append((q[:, :, i] * gi.exp()) @ s + p @ v_new)
        s = s * gi[..., -1, :, None].exp() + (k[:, :, i] * (gi[..., -1:, :] - gi).exp()).transpose(-1, -2) @ v_new
    return torch.stack(outs, 2).reshape(b, h, t, -1).transpose(1, 2)


def baseline():
    """(name, fn(q, k, v, g, beta) -> o): the transformers torch fallback if installed, else ours."""
    try:
        import transformers
        from transformers.models.kimi_linear import modeling_kimi_linear as kl
    except ImportError:
        return "naive_chunk_kda (bench file)", naive_chunk_kda
    fn = kl.chunk_kimi_delta_attention
    fn = getattr(fn, "__wrapped__", fn)  # the torch path, never a hub/fla kernel
    return f"transformers {transformers.__version__} chunk_kimi_delta_attention", \
        lambda q, k, v, g, beta: fn(q, k, v, g, beta, chunk_size=64)[0]


def inputs(b, t, h, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, t, h, d, generator=gen), dim=-1)
    k = F.normalize(torch.randn(b, t, h, d, generator=gen), dim=-1)
    v = torch.randn(b, t, h, d, generator=gen)
    # Decays as the layer makes them: −exp(A_log) · softplus(·), A in [1, 16].
    a = torch.empty(h).uniform_(1, 16, generator=gen)
    g = -a[:, None] * F.softplus(torch.randn(b, t, h, d, generator=gen) - 4)
    beta = torch.sigmoid(torch.randn(b, t, h, generator=gen))
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def sample(fn, args, backward: bool) -> tuple[float, float]:
    """One timed call: (wall ms, process CPU ms). CPU time is less disturbed by other jobs."""
    for x in args:
        x.grad = None
    wall, cpu = time.perf_counter(), time.process_time()
    o = fn(*args)
    if backward:
        o.float().square().sum().backward()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kda_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    x = inputs(args.batch, args.seq_len, args.heads, args.head_dim)
    base_name, base_fn = baseline()
    impls = [("braid kda (torch, chunk 64)", lambda *a: kda(*a, chunk_size=64)[0]), (base_name, base_fn)]

    with torch.no_grad():
        ours, ref = impls[0][1](*x), impls[1][1](*x)
    agree = float((ours - ref).norm() / ref.norm())

    # Interleave the implementations, so that load from other jobs hits both alike; first call warms up.
    samples = {(name, bwd): [] for name, _ in impls for bwd in (False, True)}
    for rep in range(args.repeats + 1):
        for name, fn in impls:
            for bwd in (False, True):
                result = sample(fn, x, bwd)
                if rep:
                    samples[name, bwd].append(result)
    rows = []
    for name, _ in impls:
        fwd, both = (tuple(statistics.median(z) for z in zip(*samples[name, bwd])) for bwd in (False, True))
        rows.append({"impl": name, "fwd_ms": round(fwd[0], 1), "fwd_bwd_ms": round(both[0], 1),
                     "fwd_cpu_ms": round(fwd[1], 1), "fwd_bwd_cpu_ms": round(both[1], 1)})
    for r in rows:
        r["speedup_fwd_bwd"] = round(rows[1]["fwd_bwd_ms"] / r["fwd_bwd_ms"], 2)
        r["speedup_fwd_bwd_cpu"] = round(rows[1]["fwd_bwd_cpu_ms"] / r["fwd_bwd_cpu_ms"], 2)

    shape = f"B {args.batch}, T {args.seq_len}, H {args.heads}, K = V = {args.head_dim}"
    print(f"KDA on CPU, {shape}, {args.threads} threads, fp32, median of {args.repeats} (wall; CPU time in [])")
    print(f"{'impl':50s} {'fwd ms':>14s} {'fwd+bwd ms':>16s} {'speedup':>15s}")
    for r in rows:
        print(f"{r['impl']:50s} {r['fwd_ms']:7.1f} [{r['fwd_cpu_ms']:6.1f}] {r['fwd_bwd_ms']:8.1f} "
              f"[{r['fwd_bwd_cpu_ms']:6.1f}] {r['speedup_fwd_bwd']:6.2f}x [{r['speedup_fwd_bwd_cpu']:5.2f}x]")
    print(f"outputs agree: relative RMS difference {agree:.1e}")

    result = {
        "shape": {"B": args.batch, "T": args.seq_len, "H": args.heads, "K": args.head_dim, "V": args.head_dim},
        "threads": args.threads, "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "dtype": "float32",
        "repeats": args.repeats,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__},
        "command": "python bench/kda_cpu.py " + " ".join(sys.argv[1:]),
        "rel_rms_ours_vs_baseline": agree, "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
