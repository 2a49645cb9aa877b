"""Kernel benchmarks on CUDA: braid's Triton kernels side by side with public implementations.

A registry of benchmark sections: each ``@section("name")`` function returns a list of ``Case``s (one
shape × option), each with the implementations to compare (``impls``: name → a zero-argument builder
returning ``(fwd, fwd_bwd)`` callables, or None when that implementation is not installed). The runner
times every implementation's forward and forward+backward with ``triton.testing.do_bench`` (median,
ms), turns the case's FLOPs into TFLOP/s, prints one table and writes JSON to ``bench/results/``.

    python bench/kernels.py --dry-run                 # list the cases (no GPU needed)
    python bench/kernels.py                           # every section (H100: a few minutes)
    python bench/kernels.py --sections attention --max-t 8192 --json bench/results/attn.json

New sections (KDA, selective scan, fused ops) are one decorated function each at the end of this file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECTIONS: dict[str, Callable[[argparse.Namespace], list["Case"]]] = {}


def section(name: str):
    """Register a benchmark section: ``fn(args) -> list[Case]``."""

    def deco(fn):
        if name in SECTIONS:
            raise ValueError(f"bench section {name!r} registered twice")
        SECTIONS[name] = fn
        return fn

    return deco


@dataclass
class Case:
    """One benchmark row. flops_fwd: useful forward FLOPs (visible pairs only); backward counts 2.5×."""

    section: str
    label: str
    params: dict
    flops_fwd: float
    impls: dict[str, Callable[[], Optional[tuple[Callable, Callable]]]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- attention

ATTN_TOKENS = 16384  # B·T per case (B = 16k / T), as in the FlashAttention benchmarks
ATTN_HIDDEN = 2048  # H·D


def _attn_inputs(b, t, hq, hkv, d, fox: bool, dtype_name: str = "bfloat16"):
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, t, hq, d, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    k = torch.randn(b, t, hkv, d, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    v = torch.randn(b, t, hkv, d, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    lf = None
    if fox:
        lf = F.logsigmoid(torch.randn(b, t, hq, device="cuda", generator=gen) + 4.0).requires_grad_()
    return q, k, v, lf


def _fwd_bwd(fwd, inputs):
    """(fwd, fwd+bwd) callables from a forward closure returning the output tensor."""
    import torch

    def fb():
        out = fwd()
        torch.autograd.grad(out, [x for x in inputs if x is not None and x.requires_grad], torch.ones_like(out))

    return fwd, fb


def _braid(b, t, hq, hkv, d, *, fox=False, window=None, s2=None):
    def build():
        from braid.kernels import attention

        q, k, v, lf = _attn_inputs(b, t, hq, hkv, d, fox)
        return _fwd_bwd(lambda: attention(q, k, v, log_forget=lf, window=window, s2=s2, backend="triton"),
                        (q, k, v, lf))

    return build


def _sdpa_flash(b, t, hq, hkv, d):
    def build():
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v, _ = _attn_inputs(b, t, hq, hkv, d, False)
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))

        def fwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=hq != hkv)

        return _fwd_bwd(fwd, (qt, kt, vt))

    return build


def _flash_attn(b, t, hq, hkv, d, window=None):
    def build():
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            return None
        q, k, v, _ = _attn_inputs(b, t, hq, hkv, d, False)
        ws = (-1, -1) if window is None else (window - 1, 0)
        return _fwd_bwd(lambda: flash_attn_func(q, k, v, causal=True, window_size=ws), (q, k, v))

    return build


def _fla_fox(b, t, hq, hkv, d):
    def build():
        try:
            from fla.ops.forgetting_attn import parallel_forgetting_attn
        except ImportError:
            return None
        q, k, v, lf = _attn_inputs(b, t, hq, hkv, d, True)
        return _fwd_bwd(lambda: parallel_forgetting_attn(q, k, v, lf), (q, k, v, lf))

    return build


def _causal_pairs(t: int, window: Optional[int] = None) -> float:
    w = t if window is None else min(window, t)
    return w * (w + 1) / 2 + (t - w) * w  # Σ_i min(i + 1, w)


def _attn_flops(b, t, hq, d, pairs) -> float:
    return 4.0 * b * hq * d * pairs  # QKᵀ and PV, 2 FLOPs per multiply-add


@section("attention")
def attention_cases(args) -> list[Case]:
    """Causal attention (T 1k–32k, D 64/128), GQA, FoX, sliding window and S2 at density ~1/8."""
    from braid.kernels.s2 import S2Pattern

    cases = []
    ts = [t for t in (1024, 2048, 4096, 8192, 16384, 32768) if t <= args.max_t]
    for d in (64, 128):
        for t in ts:
            b, h = max(1, ATTN_TOKENS // t), ATTN_HIDDEN // d
            cases.append(Case("attention", f"causal T{t} D{d}", dict(B=b, T=t, H=h, D=d),
                              _attn_flops(b, t, h, d, _causal_pairs(t)),
                              {"braid": _braid(b, t, h, h, d), "sdpa_flash": _sdpa_flash(b, t, h, h, d),
                               "flash_attn": _flash_attn(b, t, h, h, d)}))
    for t in [t for t in (8192,) if t <= args.max_t]:
        b, d = ATTN_TOKENS // t, 128
        cases.append(Case("attention", f"gqa 16/4 T{t} D{d}", dict(B=b, T=t, Hq=16, Hkv=4, D=d),
                          _attn_flops(b, t, 16, d, _causal_pairs(t)),
                          {"braid": _braid(b, t, 16, 4, d), "sdpa_flash": _sdpa_flash(b, t, 16, 4, d),
                           "flash_attn": _flash_attn(b, t, 16, 4, d)}))
    for t in [t for t in (2048, 8192) if t <= args.max_t]:
        b, d, h = ATTN_TOKENS // t, 128, 16
        cases.append(Case("attention", f"fox T{t} D{d}", dict(B=b, T=t, H=h, D=d, fox=True),
                          _attn_flops(b, t, h, d, _causal_pairs(t)),
                          {"braid_fox": _braid(b, t, h, h, d, fox=True), "braid_plain": _braid(b, t, h, h, d),
                           "fla_fox": _fla_fox(b, t, h, h, d)}))
    for t in [t for t in (32768,) if t <= args.max_t]:
        b, d, h, w = 1, 128, 16, 4096
        cases.append(Case("attention", f"window {w} T{t} D{d}", dict(B=b, T=t, H=h, D=d, window=w),
                          _attn_flops(b, t, h, d, _causal_pairs(t, w)),
                          {"braid": _braid(b, t, h, h, d, window=w), "flash_attn": _flash_attn(b, t, h, h, d, w)}))
    for t in [t for t in (8192, 32768) if t <= args.max_t]:
        b, d, h = max(1, ATTN_TOKENS // t), 128, 16
        pat = S2Pattern(block=64, local_blocks=4, vert_stride=8)
        dens = pat.density(math.ceil(t / 64), h)
        cases.append(Case("attention", f"s2 1/8 T{t} D{d}", dict(B=b, T=t, H=h, D=d, density=round(dens, 4)),
                          _attn_flops(b, t, h, d, _causal_pairs(t) * dens),
                          {"braid_s2": _braid(b, t, h, h, d, s2=pat), "braid_dense": _braid(b, t, h, h, d)}))
    return cases


# ----------------------------------------------------------------------------- runner


def run(cases: list[Case], args) -> list[dict]:
    import torch
    from triton.testing import do_bench

    rows = []
    for case in cases:
        for name, build in case.impls.items():
            row = dict(section=case.section, case=case.label, impl=name, **case.params)
            try:
                fns = build()
                if fns is None:
                    row["status"] = "not installed"
                else:
                    fwd, fb = fns
                    ms_f = do_bench(fwd, warmup=args.warmup, rep=args.rep, return_mode="median")
                    ms_fb = do_bench(fb, warmup=args.warmup, rep=args.rep, return_mode="median")
                    row.update(status="ok", fwd_ms=ms_f, fwd_bwd_ms=ms_fb,
                               fwd_tflops=case.flops_fwd / ms_f / 1e9,
                               fwd_bwd_tflops=3.5 * case.flops_fwd / ms_fb / 1e9)
            except Exception as e:  # one failing implementation must not hide the others' numbers
                row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            finally:
                torch.cuda.empty_cache()
            rows.append(row)
            print(_fmt(row), flush=True)
    return rows


def _fmt(row: dict) -> str:
    if row.get("status") != "ok":
        return f"{row['case']:<26} {row['impl']:<12} {row['status']}"
    return (f"{row['case']:<26} {row['impl']:<12} fwd {row['fwd_ms']:8.3f} ms {row['fwd_tflops']:7.1f} TF/s   "
            f"fwd+bwd {row['fwd_bwd_ms']:8.3f} ms {row['fwd_bwd_tflops']:7.1f} TF/s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="*", default=None, help=f"subset of {sorted(SECTIONS)}")
    p.add_argument("--max-t", type=int, default=32768, help="largest sequence length")
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--rep", type=int, default=100)
    p.add_argument("--dry-run", action="store_true", help="list the cases and exit (no GPU needed)")
    p.add_argument("--json", default=None, help="output path (default bench/results/kernels-<date>-<gpu>.json)")
    args = p.parse_args(argv)
    names = args.sections or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        p.error(f"--sections: unknown {unknown} (allowed: {sorted(SECTIONS)})")
    cases = [c for n in names for c in SECTIONS[n](args)]
    if args.dry_run:
        for c in cases:
            print(f"{c.section:<10} {c.label:<26} {c.flops_fwd / 1e12:8.2f} TFLOP fwd  impls: {', '.join(c.impls)}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU (use --dry-run to list the cases)", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    rows = run(cases, args)
    out = Path(args.json or f"bench/results/kernels-{datetime.date.today()}-{gpu}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(gpu=gpu, torch=torch.__version__, rows=rows), indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
