"""Measure the planner's efficiency factors on this GPU and write them into bench/results/efficiency.json.

    python bench/calibrate_plan.py                                   # GEMM, grouped GEMM, HBM
    python bench/calibrate_plan.py --kernels bench/results/kernels-<date>-<gpu>.json   # + attention classes
    python bench/calibrate_plan.py --kernels-linear bench/results/kernels_linear-<gpu>.json   # + KDA, scan

Each factor is the measured rate over the kind's peak (``braid.plan.hardware``): bf16 GEMMs of training
shapes forward and backward (d 4096, 16k tokens), the routed experts' batched GEMMs, a streaming
multiply-add for the element-wise HBM fraction, and, from a ``bench/kernels.py`` result, braid's attention
kernels' forward+backward TFLOP/s (dense, FoX, windowed/sparse cases) and, from a
``bench/kernels_linear.py`` result, the Triton KDA and selective-scan rates by the planner's FLOP counts.
Factors not measured keep their value; the entry records what was measured, on which device, when.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def attention_rates(kernels_json: dict) -> dict:
    """TFLOP/s of braid's attention kernels by planner class, the median over cases."""
    by_class: dict[str, list[float]] = {}
    for row in kernels_json.get("rows", []):
        if row.get("section") != "attention" or row.get("impl") != "braid" or row.get("status") != "ok":
            continue
        label = row["case"].lower()
        cls = ("attention_fox" if "fox" in label else
               "attention_sparse" if ("s2" in label or "window" in label or "swa" in label) else "attention")
        by_class.setdefault(cls, []).append(row["fwd_bwd_tflops"] * 1e12)
    return {cls: statistics.median(v) for cls, v in by_class.items()}


def kda_flops_per_token(heads: int, head_dim: int, seq_len: int) -> float:
    """Forward FLOPs per token of the KDA class, as the planner counts them (braid's KDA formula less
    its projections)."""
    from braid.config import ModelConfig
    from braid.plan.model_cost import layer_costs

    d = heads * head_dim
    cfg = ModelConfig(pattern="K", ffn_pattern="-", d_model=d, n_heads=heads, vocab_size=64)
    cfg.kda.n_heads, cfg.kda.head_dim = heads, head_dim
    return layer_costs(cfg, seq_len).layers[0].flops["kda"]


def linear_rates(kernels_linear_json: dict) -> dict:
    """FLOP/s of braid's Triton KDA and selective scan (forward + backward = 3 × forward FLOPs, counted by
    the planner's formulas), the median over the ``bench/kernels_linear.py`` cases."""
    from braid.models.hymba import SCAN_FLOPS_PER_STATE

    by_class: dict[str, list[float]] = {}
    for row in kernels_linear_json.get("rows", []):
        if row.get("impl") != "braid-triton" or row.get("error") or not row.get("fwd_bwd_ms"):
            continue
        s = row["shape"]
        if row["op"] == "kda":
            flops, cls = s["b"] * s["t"] * kda_flops_per_token(s["h"], s["d"], s["t"]), "kda"
        elif row["op"] == "scan":
            flops, cls = s["b"] * s["t"] * SCAN_FLOPS_PER_STATE * s["c"] * s["n"], "ssm_scan"
        else:
            continue
        by_class.setdefault(cls, []).append(3 * flops / (row["fwd_bwd_ms"] * 1e-3))
    return {cls: statistics.median(v) for cls, v in by_class.items()}


def merge(doc: dict, kind: str, rates: dict, peak_flops: float, hbm_bw: float, device: str) -> dict:
    """``doc`` with ``kind``'s factors replaced by the measured ``rates`` (FLOP/s, or bytes/s for
    ``elementwise``) over the kind's peak; the other factors stay."""
    entry = dict(doc["gpus"].get(kind, {}))
    for cls, rate in rates.items():
        entry[cls] = round(rate / (hbm_bw if cls == "elementwise" else peak_flops), 4)
    entry["source"] = f"measured {datetime.date.today()} on {device}: {', '.join(sorted(rates))}"
    out = dict(doc)
    out["gpus"] = {**doc["gpus"], kind: entry}
    return out


def _time(fn, reps: int = 20) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def measure_device() -> dict:
    """FLOP/s of bf16 GEMM (forward + both backward products) and batched expert GEMMs; HBM bytes/s."""
    import torch

    t, d, f = 16384, 4096, 14336
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(f, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def gemm():
        torch.nn.functional.linear(x, w).backward(torch.ones(t, f, device="cuda", dtype=torch.bfloat16))

    rates = {"gemm": 3 * 2 * t * d * f / _time(gemm)}
    e, tok, h = 16, 4096, 1536  # experts × tokens each × expert hidden
    a = torch.randn(e, tok, d, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(e, d, h, device="cuda", dtype=torch.bfloat16)
    rates["grouped_gemm"] = 2 * e * tok * d * h / _time(lambda: torch.bmm(a, b))
    big = torch.empty(2**28, device="cuda", dtype=torch.float32)
    rates["elementwise"] = 2 * big.numel() * 4 / _time(lambda: big.mul_(1.0000001))  # read + write
    return rates


def main() -> int:
    from braid.plan.auto import detect_gpu_kind
    from braid.plan.hardware import GPUS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=sorted(GPUS), help="GPU kind to write (default: the device's)")
    parser.add_argument("--kernels", type=Path, help="a bench/kernels.py JSON result for the attention classes")
    parser.add_argument("--kernels-linear", type=Path, help="a bench/kernels_linear.py JSON result (KDA, scan)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "efficiency.json")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench/calibrate_plan.py measures a CUDA GPU; none here", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    kind = args.kind or detect_gpu_kind(device)[0]
    rates = measure_device()
    if args.kernels:
        rates.update(attention_rates(json.loads(args.kernels.read_text())))
    if args.kernels_linear:
        rates.update(linear_rates(json.loads(args.kernels_linear.read_text())))
    gpu = GPUS[kind]
    doc = merge(json.loads(args.out.read_text()), kind, rates, gpu.peak_flops, gpu.hbm_bw,
                torch.cuda.get_device_name(device))
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["gpus"][kind], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
