"""Benchmark of braid's linear-time and fused kernels against torch and the public implementations.

Cases (each forward and forward+backward, median time; TFLOP/s where a FLOP count is meaningful):
  kda      braid Triton (inter-chunk recurrence) vs braid torch vs fla ``chunk_kda`` (when installed)
  scan     braid Triton selective scan vs braid torch (vs mamba_ssm ``selective_scan_fn`` when installed)
  rmsnorm  braid Triton vs torch vs liger ``LigerRMSNormFunction`` (when installed)
  swiglu   braid Triton vs torch vs liger ``LigerSiLUMulFunction`` (when installed)
  ce       braid ``cross_entropy_chunked`` vs full-logits torch vs liger fused linear CE (when installed);
           also reports peak memory

    python bench/kernels_linear.py --dry-run          # list the cases, run nothing
    python bench/kernels_linear.py                    # on a GPU: all cases, bf16
    python bench/kernels_linear.py --only kda --json out.json

On CUDA the timings use ``triton.testing.do_bench`` (median); on CPU a tiny smoke size runs with
wall-clock medians (the numbers mean nothing there). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from braid.kernels import kda, selective_scan  # noqa: E402
from braid.kernels.fused import cross_entropy_chunked, cross_entropy_reference, rms_norm, swiglu  # noqa: E402

GPU_SHAPES = {
    "kda": [dict(b=2, t=t, h=16, d=128) for t in (1024, 4096, 8192, 16384)],
    "scan": [dict(b=2, t=t, c=1600, n=16) for t in (2048, 8192)],
    "rmsnorm": [dict(n=16384, d=d) for d in (2048, 4096)],
    "swiglu": [dict(n=16384, f=f) for f in (5504, 14336)],
    "ce": [dict(n=8192, d=2048, v=v) for v in (32000, 128256)],
}
CPU_SHAPES = {
    "kda": [dict(b=1, t=256, h=2, d=32)],
    "scan": [dict(b=1, t=128, c=64, n=16)],
    "rmsnorm": [dict(n=256, d=256)],
    "swiglu": [dict(n=256, f=512)],
    "ce": [dict(n=256, d=64, v=1000)],
}


def _optional(name: str):
    try:
        return __import__(name, fromlist=["_"])
    except Exception:  # not installed, or installed but broken for this torch: skip its rows
        return None


def bench_ms(fn, cuda: bool) -> float:
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fwd_bwd(fn, inputs):
    """(forward-only callable, forward+backward callable) for ``fn(*inputs)`` with a random output grad."""
    leaves = [x.requires_grad_() for x in inputs if x.is_floating_point()]

    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    out = fn(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    grad = torch.randn_like(out)

    def both():
        o = fn(*inputs)
        o = o[0] if isinstance(o, tuple) else o
        torch.autograd.grad(o, leaves, grad, allow_unused=True)

    return fwd, both


def kda_cases(s, dev, dt):
    b, t, h, d = s["b"], s["t"], s["h"], s["d"]
    q, k = (F.normalize(torch.randn(b, t, h, d, device=dev), dim=-1).to(dt) for _ in range(2))
    v = torch.randn(b, t, h, d, device=dev, dtype=dt)
    g = -F.softplus(torch.randn(b, t, h, d, device=dev))  # fp32 log decay
    beta = torch.rand(b, t, h, device=dev).to(dt)
    inputs = [q, k, v, g, beta]
    flops = 4 * b * h * t * d * d * 3  # rough: state read/write and intra-chunk products, fwd
    impls = {"braid-triton": lambda *x: kda(*x, backend="triton")[0],
             "braid-torch": lambda *x: kda(*x, backend="torch")[0]}
    fla = _optional("fla.ops.kda")
    if fla is not None:
        impls["fla-chunk_kda"] = lambda *x: fla.chunk_kda(q=x[0], k=x[1], v=x[2], g=x[3], beta=x[4])[0]
    return impls, inputs, flops


def scan_cases(s, dev, dt):
    b, t, c, n = s["b"], s["t"], s["c"], s["n"]
    u, z = (torch.randn(b, t, c, device=dev, dtype=dt) for _ in range(2))
    dtv = (torch.rand(b, t, c, device=dev) * 0.1 + 1e-3).to(dt)
    A = -torch.rand(c, n, device=dev) - 0.1
    Bm, Cm = (torch.randn(b, t, n, device=dev, dtype=dt) for _ in range(2))
    D = torch.ones(c, device=dev)
    impls = {"braid-triton": lambda *x: selective_scan(*x, backend="triton"),
             "braid-torch": lambda *x: selective_scan(*x, backend="torch")}
    mamba = _optional("mamba_ssm.ops.selective_scan_interface")
    if mamba is not None:  # channel-major layout [B, C, T] / [B, N, T]
        impls["mamba_ssm"] = lambda u_, d_, a_, b_, c_, D_, z_: mamba.selective_scan_fn(
            u_.transpose(1, 2), d_.transpose(1, 2), a_, b_.transpose(1, 2), c_.transpose(1, 2), D_,
            z_.transpose(1, 2)).transpose(1, 2)
    return impls, [u, dtv, A, Bm, Cm, D, z], None


def rmsnorm_cases(s, dev, dt):
    x = torch.randn(s["n"], s["d"], device=dev, dtype=dt)
    w = torch.ones(s["d"], device=dev, dtype=dt)
    impls = {"braid-triton": lambda a, b: rms_norm(a, b, backend="triton"),
             "torch": lambda a, b: rms_norm(a, b, backend="torch")}
    liger = _optional("liger_kernel.ops.rms_norm")
    if liger is not None:
        impls["liger"] = lambda a, b: liger.LigerRMSNormFunction.apply(a, b, 1e-5)
    return impls, [x, w], None


def swiglu_cases(s, dev, dt):
    gate, up = (torch.randn(s["n"], s["f"], device=dev, dtype=dt) for _ in range(2))
    impls = {"braid-triton": lambda a, b: swiglu(a, b, backend="triton"),
             "torch": lambda a, b: swiglu(a, b, backend="torch")}
    liger = _optional("liger_kernel.ops.swiglu")
    if liger is not None:
        impls["liger"] = lambda a, b: liger.LigerSiLUMulFunction.apply(a, b)
    return impls, [gate, up], None


def ce_cases(s, dev, dt):
    n, d, v = s["n"], s["d"], s["v"]
    h = torch.randn(n, d, device=dev, dtype=dt)
    w = (torch.randn(v, d, device=dev) * d ** -0.5).to(dt)
    labels = torch.randint(0, v, (n,), device=dev)
    impls = {"braid-chunked": lambda a, b: cross_entropy_chunked(a, b, labels, reduction="sum"),
             "torch-full": lambda a, b: cross_entropy_reference(a, b, labels).sum()}
    liger = _optional("liger_kernel.ops.fused_linear_cross_entropy")
    if liger is not None:
        impls["liger"] = lambda a, b: liger.LigerFusedLinearCrossEntropyFunction.apply(a, b, labels)[0]
    return impls, [h, w], 6 * n * d * v


CASES = {"kda": kda_cases, "scan": scan_cases, "rmsnorm": rmsnorm_cases, "swiglu": swiglu_cases, "ce": ce_cases}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=sorted(CASES), action="append", help="run only these ops (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="list the cases and exit")
    p.add_argument("--json", default=None, help="output path (default bench/results/kernels_linear-<device>.json)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    ops = args.only or list(CASES)
    if args.dry_run:  # the GPU sweep, whatever this machine has
        for op in ops:
            for s in GPU_SHAPES[op]:
                print(op, " ".join(f"{k}={v}" for k, v in s.items()), "bfloat16")
        return 0
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    rows = []
    print(f"{'op':8} {'shape':34} {'impl':15} {'fwd ms':>9} {'fwd+bwd ms':>11} {'TFLOP/s':>8} {'peak GiB':>9}")
    for op in ops:
        for s in shapes[op]:
            impls, inputs, flops = CASES[op](s, dev, dt)
            for name, fn in impls.items():
                xs = [x.detach().clone() for x in inputs]
                try:
                    fwd, both = fwd_bwd(fn, xs)
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    t_f, t_fb = bench_ms(fwd, cuda), bench_ms(both, cuda)
                    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
                    err = None
                except Exception as e:  # one failing implementation must not hide the others
                    t_f = t_fb = peak = float("nan")
                    err = f"{type(e).__name__}: {e}"[:200]
                tflops = flops / (t_f * 1e-3) / 1e12 if flops and t_f == t_f else float("nan")
                shape = " ".join(f"{k}={v}" for k, v in s.items())
                print(f"{op:8} {shape:34} {name:15} {t_f:9.3f} {t_fb:11.3f} {tflops:8.1f} {peak:9.2f}"
                      + (f"  ERROR {err}" if err else ""))
                rows.append(dict(op=op, shape=s, impl=name, fwd_ms=t_f, fwd_bwd_ms=t_fb, tflops_fwd=tflops,
                                 peak_gib=peak, error=err))
    out = Path(args.json or f"bench/results/kernels_linear-{device_name.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=device_name, dtype=str(dt), torch=torch.__version__, rows=rows),
                              indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
