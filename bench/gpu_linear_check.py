"""GPU correctness check of braid's KDA, selective-scan and fused kernels: bf16 Triton vs fp32 torch.

Every case runs the Triton path on bf16 CUDA inputs and the torch reference on the same (bf16-rounded)
values upcast to fp32, under random output gradients, and compares the output and every gradient by
relative RMS error. Prints PASS/FAIL per case, writes JSON, exits 1 on any failure.

    python bench/gpu_linear_check.py [--json $OUT/gpu_linear_check.json]

Thresholds: bf16 outputs carry ~2^-9 relative rounding and Triton's fp32 dots use TF32 on tensor
cores (~1e-3); 2e-2 catches wrong indexing or masking (errors of order 1) with a wide margin.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from braid.kernels import kda, selective_scan  # noqa: E402
from braid.kernels.fused import cross_entropy_chunked, cross_entropy_reference, rms_norm, swiglu  # noqa: E402

TOL = 2e-2


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


def outputs_and_grads(fn, inputs, seed=0):
    """Outputs of ``fn`` (a tuple) and the gradients of every floating input under random cotangents."""
    xs = [x.detach().clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, device="cuda", generator=gen)).sum() for o in outs)
    leaves = [x for x in xs if x.is_floating_point()]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o.detach() for o in outs] + [g for g in grads if g is not None]


def case_kda(t, doc=False):
    b, h, d = 2, 4, 128
    q, k = (F.normalize(torch.randn(b, t, h, d, device="cuda"), dim=-1).bfloat16() for _ in range(2))
    v = torch.randn(b, t, h, d, device="cuda").bfloat16()
    g = -F.softplus(torch.randn(b, t, h, d, device="cuda")) * 0.3
    beta = torch.rand(b, t, h, device="cuda").bfloat16()
    s0 = torch.randn(b, h, d, d, device="cuda")
    doc_ids = torch.randint(0, 3, (b, t), device="cuda").sort(-1).values if doc else None

    def run(backend):
        return lambda *x: kda(*x[:5], initial_state=x[5], output_final_state=True, doc_ids=doc_ids,
                              backend=backend)
    return run("triton"), run("torch"), [q, k, v, g, beta, s0]


def case_scan(t, reset=False):
    b, c, n = 2, 256, 16
    u, z = (torch.randn(b, t, c, device="cuda").bfloat16() for _ in range(2))
    dt = (torch.rand(b, t, c, device="cuda") * 0.1 + 1e-3).bfloat16()
    A = -(torch.rand(c, n, device="cuda") * 3 + 0.1)
    Bm, Cm = (torch.randn(b, t, n, device="cuda").bfloat16() for _ in range(2))
    D = torch.randn(c, device="cuda")
    h0 = torch.randn(b, c, n, device="cuda")
    rst = (torch.rand(b, t, device="cuda") < 0.01) if reset else None

    def run(backend):
        return lambda *x: selective_scan(*x[:7], initial_state=x[7], reset=rst, output_final_state=True,
                                         backend=backend)
    return run("triton"), run("torch"), [u, dt, A, Bm, Cm, D, z, h0]


def case_rmsnorm(n, d):
    x = torch.randn(n, d, device="cuda").bfloat16()
    w = (1 + 0.1 * torch.randn(d, device="cuda")).bfloat16()
    return (lambda a, b: rms_norm(a, b, backend="triton")), (lambda a, b: rms_norm(a, b, backend="torch")), [x, w]


def case_swiglu(n, f):
    gate, up = (torch.randn(n, f, device="cuda").bfloat16() for _ in range(2))
    return (lambda a, b: swiglu(a, b, backend="triton")), (lambda a, b: swiglu(a, b, backend="torch")), [gate, up]


def case_ce(n, d, v):
    h = torch.randn(n, d, device="cuda").bfloat16()
    w = (torch.randn(v, d, device="cuda") * d ** -0.5).bfloat16()
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[::7] = -100
    return ((lambda a, b: cross_entropy_chunked(a, b, labels, chunk_size=1000)),
            (lambda a, b: cross_entropy_reference(a, b, labels)), [h, w])


CASES = {
    "kda T=1000": lambda: case_kda(1000),
    "kda T=4096 docs": lambda: case_kda(4096, doc=True),
    "scan T=1000": lambda: case_scan(1000),
    "scan T=4096 resets": lambda: case_scan(4096, reset=True),
    "rmsnorm 4099x2048": lambda: case_rmsnorm(4099, 2048),
    "rmsnorm 1000x1600": lambda: case_rmsnorm(1000, 1600),
    "swiglu 4099x5504": lambda: case_swiglu(4099, 5504),
    "ce 4099x1024 V=32000": lambda: case_ce(4099, 1024, 32000),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default="bench/results/gpu_linear_check.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_linear_check: needs a CUDA device", file=sys.stderr)
        return 2
    results, failed = [], 0
    for name, make in CASES.items():
        torch.manual_seed(0)
        try:
            tri, ref, inputs = make()
            got = outputs_and_grads(tri, inputs)
            want = outputs_and_grads(ref, [x.float() if x.is_floating_point() else x for x in inputs])
            errs = [rel_rms(a, b) for a, b in zip(got, want)]
            finite = all(bool(torch.isfinite(a).all()) for a in got)
            ok = finite and len(got) == len(want) and max(errs) < TOL
            detail = " ".join(f"{e:.1e}" for e in errs)
        except Exception as e:  # report and continue with the other kernels
            ok, errs, detail = False, [], f"{type(e).__name__}: {e}"[:300]
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name:24} rel RMS (outputs, grads): {detail}")
        results.append(dict(case=name, ok=ok, errors=errs, detail=detail))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), tol=TOL, results=results), indent=1))
    print(f"{len(results) - failed}/{len(results)} passed; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
