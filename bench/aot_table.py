"""Ahead-of-time compile of every Triton kernel and configuration ``backend="auto"`` uses, for a GPU that
is not here (default sm_90, the H100/H200), with the Triton installed: shared memory, registers and
local memory (spills) per kernel, as a JSON file and a Markdown table.

    python bench/aot_table.py [--capability 90] [--out bench/results/aot_sm90_triton<version>]

The variants are the head sizes, chunk sizes and dtypes the presets give the kernels (attention head
dims 32-192 with the MLA 192/128 split, KDA 64/128 heads at chunks 16/32/64, the Hymba scan, the norms
and SwiGLU at the presets' widths); attention is compiled with every mask option on (the largest
specialisation) and with none (plain causal). Needs a process without ``TRITON_INTERPRET=1``.
Exit code 1 when a kernel fails to compile or does not fit (shared memory over the block limit, or
local memory in use: register spills).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NO_MASKS = dict(CAUSAL=True, HAS_WINDOW=False, HAS_DOC=False, HAS_S2=False, HAS_C=False)
VARIANTS = [
    *[("attention", dict(dtype="bf16", d=d)) for d in (32, 64, 128)],
    *[("attention", dict(dtype="bf16", d=d, **NO_MASKS)) for d in (64, 128)],
    ("attention", dict(dtype="bf16", d=192, dv=128)),
    ("attention", dict(dtype="fp32", d=128)),
    ("attention", dict(dtype="fp16", d=128)),
    *[("kda_intra", dict(k=k, v=k, c=c)) for k, c in ((128, 64), (128, 32), (128, 16), (64, 64), (32, 16))],
    *[("kda_state", dict(k=k, v=k, c=c)) for k, c in ((128, 64), (128, 32), (128, 16), (64, 64), (32, 16))],
    ("scan", dict(channels=3200, d_state=16, chunk=64, dtype="bf16")),
    ("scan", dict(channels=256, d_state=16, chunk=64, dtype="fp32")),
    *[("fused_norm", dict(dim=d, dtype="bf16")) for d in (64, 128, 512, 2048, 4096, 8192)],
    ("fused_norm", dict(dim=2048, dtype="fp32")),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--capability", type=int, default=90)
    p.add_argument("--out", default=None, help="path without suffix (.json and .md are written)")
    p.add_argument("--modules", nargs="*", default=None, help="only these kernel modules (attention, kda_intra, ...)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot_table: unset TRITON_INTERPRET (compiling needs Triton in compiled mode)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import importlib

    import torch
    import triton

    out = Path(args.out or f"bench/results/aot_sm{args.capability}_triton{triton.__version__}")
    rows, failed = [], 0
    for module, kw in VARIANTS:
        if args.modules and module not in args.modules:
            continue
        t0 = time.time()
        try:
            stats = importlib.import_module(f"braid.kernels.triton.{module}").compile_for_gpu(
                capability=args.capability, **kw)
        except Exception as exc:  # a compile error is a finding: report it, go on with the others
            stats = {"(all)": dict(error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}")}
        for kernel, s in stats.items():
            ok = "error" not in s and s["fits"] and not s.get("local_bytes") and not s["local"]
            failed += not ok
            rows.append(dict(module=module, variant=kw, kernel=kernel, ok=ok, seconds=round(time.time() - t0, 1), **s))
            print(f"{'OK  ' if ok else 'FAIL'} {module:10s} {kernel:22s} {json.dumps(kw):60s} "
                  + " ".join(f"{k}={v}" for k, v in s.items()), flush=True)
        write(out, rows, dict(triton=triton.__version__, torch=torch.__version__, python=sys.version.split()[0],
                              capability=args.capability, failed=failed, done=f"{len(rows)} kernels so far"))
    write(out, rows, dict(triton=triton.__version__, torch=torch.__version__, python=sys.version.split()[0],
                          capability=args.capability, failed=failed, done="all variants"))
    print(f"{len(rows) - failed}/{len(rows)} kernels ok; wrote {out}.json and {out}.md")
    return 1 if failed else 0


def write(out: Path, rows: list, meta: dict) -> None:
    """The JSON and the Markdown table, rewritten after every variant (a cut-off run keeps what it did)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(dict(meta, rows=rows), indent=1) + "\n")
    lines = [f"# Triton {meta['triton']} ahead-of-time compile for sm_{meta['capability']} (torch {meta['torch']}, "
             f"Python {meta['python']}): {meta['done']}, {meta['failed']} failed", "",
             "Written by `bench/aot_table.py`. shared: bytes per block (limit 232448 on sm_90); regs: per "
             "thread; local: local-memory bytes per thread (spills/stack, want 0); wgmma/mma: tensor-core "
             "instructions in the PTX.", "",
             "| module | variant | kernel | ok | threads | shared | regs | local | wgmma | mma |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        variant = ", ".join(f"{k}={v}" for k, v in r["variant"].items())
        if "error" in r:
            lines.append(f"| {r['module']} | {variant} | {r['kernel']} | **FAIL** {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['module']} | {variant} | {r['kernel']} | {'yes' if r['ok'] else '**no**'} | "
                     f"{r['threads']} | {r['shared']} | {r['regs']} | {r['local_bytes']} | {r['wgmma']} | {r['mma']} |")
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
