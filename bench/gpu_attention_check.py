"""GPU check of the Triton attention kernels: every option in bf16 (and a few in fp16/fp32) against the
fp32 torch blocked path on the same GPU — o, lse and the gradients of q, k, v and the FoX gates —
printing PASS/FAIL per case with the relative RMS errors. Exit code 1 if any case fails.

    python bench/gpu_attention_check.py [--json bench/results/gpu_attention_check.json]

Shapes are moderate (T ~ 1–2k) and not multiples of the tiles, so the run takes well under a minute
after compilation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from braid.kernels.attention_blocked import partial_attention  # noqa: E402
from braid.kernels.s2 import S2Pattern  # noqa: E402

# Relative RMS tolerances against fp32: bf16 inputs, P/dS rounded to bf16 before the tensor-core dots.
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}

CASES = {
    "causal": dict(),
    "causal_d64": dict(d=64),
    "non_causal_t_lt_s": dict(causal=False, t=700),
    "gqa2": dict(hkv=4),
    "gqa4": dict(hkv=2),
    "window_small_sink": dict(window=100, sink=4),
    "window_gt_t": dict(window=5000),
    "docs": dict(docs=True),
    "fox": dict(fox=True),
    "fox_docs_window_sink_gqa4": dict(fox=True, docs=True, window=257, sink=2, hkv=2),
    "s2": dict(s2=S2Pattern(block=64, local_blocks=2, vert_stride=8)),
    "s2_fox_gqa2_offset": dict(s2=S2Pattern(block=64, local_blocks=1, vert_stride=4, offset=3), fox=True, hkv=4),
    "s2_non_causal_window": dict(s2=S2Pattern(block=32, local_blocks=2, vert_stride=8), causal=False, window=300),
    "q_offset_negative": dict(q_offset=-50, t=600, docs=True),
    "odd_head_dims": dict(d=80, dv=48),
}
DEVICE = "cuda"  # a CPU smoke run of this script's logic sets "cpu" (Triton interpreter, tiny shapes)
EXTRA_DTYPES = {"causal": (torch.float16, torch.float32), "fox_docs_window_sink_gqa4": (torch.float16,),
                "s2_fox_gqa2_offset": (torch.float32,)}


def run_case(name, dtype, *, b=2, t=1100, s=1100, hq=8, hkv=8, d=128, dv=None, fox=False, docs=False,
             q_offset=None, **kw) -> dict:
    dev = DEVICE
    gen = torch.Generator(device=dev).manual_seed(len(name))
    q = torch.randn(b, t, hq, d, device=dev, generator=gen)
    k = torch.randn(b, s, hkv, d, device=dev, generator=gen)
    v = torch.randn(b, s, hkv, dv or d, device=dev, generator=gen)
    q_offset = s - t if q_offset is None else q_offset
    pos = (q_offset + torch.arange(t, device=dev)).clamp(0, s - 1)
    c = F.logsigmoid(torch.randn(b, s, hq, device=dev, generator=gen) + 3.0).cumsum(1) if fox else None
    k_doc = torch.randint(0, 4, (b, s), device=dev, generator=gen).sort(1).values if docs else None
    extra = dict(q_offset=q_offset, q_doc=None if k_doc is None else k_doc[:, pos], k_doc=k_doc,
                 c_q=None if c is None else c[:, pos], c_k=c, **kw)
    do = torch.randn(b, t, hq, dv or d, device=dev, generator=gen)
    dl = torch.randn(b, hq, t, device=dev, generator=gen)

    def grads(backend, x_dtype):
        xs = [x.to(x_dtype).requires_grad_() for x in (q, k, v)]
        cs = [x.clone().requires_grad_() for x in (extra["c_q"], extra["c_k"])] if fox else [None, None]
        o, lse = partial_attention(*xs, backend=backend, **dict(extra, c_q=cs[0], c_k=cs[1]))
        fin = lse.isfinite()
        loss = (o.float() * do).sum() + (lse.float()[fin] * dl[fin]).sum()
        leaves = xs + ([cs[0], cs[1]] if fox else [])
        return [o, lse] + list(torch.autograd.grad(loss, leaves))

    got = grads("triton", dtype)
    want = grads("torch", torch.float32)
    names = ["o", "lse", "dq", "dk", "dv", "dc_q", "dc_k"]
    errs = {}
    for n, a, w in zip(names, got, want):
        a, w = a.double(), w.double()
        fin = w.isfinite()
        bad = not torch.equal(a.isfinite(), fin) or torch.isnan(a).any()
        norm = torch.linalg.vector_norm
        errs[n] = float("inf") if bad else float(norm(a[fin] - w[fin]) / norm(w[fin]).clamp_min(1e-30))
    ok = all(e < TOL[dtype] * (1 if n in ("o", "lse") else 2) for n, e in errs.items())
    return dict(case=name, dtype=str(dtype).replace("torch.", ""), ok=ok, errors=errs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="bench/results/gpu_attention_check.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_attention_check: needs a CUDA GPU", file=sys.stderr)
        return 2
    rows, t0 = [], time.time()
    for name, kw in CASES.items():
        for dtype in (torch.bfloat16,) + EXTRA_DTYPES.get(name, ()):
            try:
                row = run_case(name, dtype, **kw)
            except Exception as e:  # report and go on: one compile error must not hide the other cases
                row = dict(case=name, dtype=str(dtype), ok=False, errors={}, error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            errs = " ".join(f"{n} {e:.1e}" for n, e in row["errors"].items())
            print(f"{'PASS' if row['ok'] else 'FAIL'} {name:<28} {row['dtype']:<9} {errs} {row.get('error', '')}",
                  flush=True)
    n_fail = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - n_fail}/{len(rows)} passed in {time.time() - t0:.0f} s on {torch.cuda.get_device_name()}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), rows=rows), indent=1))
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
