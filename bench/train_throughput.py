"""Training throughput of a model preset: tokens/s, TFLOP/s and MFU per device.

    python bench/train_throughput.py --preset gpt-125m --seq-len 2048 --micro-batch 8 --steps 20

Random tokens, AdamW, bf16 autocast on CUDA (fp32 on CPU); the first `--warmup` steps are not timed.
Prints a table and writes JSON (default bench/results/train_throughput.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from train_curves import preset_config  # noqa: E402

from braid.models.hybrid import HybridLM  # noqa: E402
from braid.models.stats import model_stats, resolve_vocab  # noqa: E402
from braid.trainer.metrics import peak_flops  # noqa: E402
from braid.trainer.optim import build_optimizer  # noqa: E402


def bench(preset: str, seq_len: int, micro_batch: int, steps: int, warmup: int, device: torch.device,
          vocab: int, overrides: list[str]) -> dict:
    cfg = preset_config(preset, dict(o.split("=", 1) for o in overrides))  # no omegaconf on the GPU image
    model_cfg = resolve_vocab(cfg.model, vocab)
    stats = model_stats(model_cfg, seq_len)
    torch.manual_seed(0)
    model = HybridLM(model_cfg).to(device)
    opt = build_optimizer(model, cfg.train)
    tokens = torch.randint(0, vocab, (micro_batch, seq_len + 1), device=device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))

    def step() -> float:
        with autocast:
            loss = model(tokens[:, :-1], labels=tokens[:, 1:]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    tokens_per_s = micro_batch * seq_len / elapsed
    tflops = stats.flops_per_token * tokens_per_s / 1e12
    peak = peak_flops(device)
    return {
        "preset": preset,
        "overrides": overrides,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "params_m": stats.params / 1e6,
        "step_ms": elapsed * 1e3,
        "tokens_per_s": tokens_per_s,
        "tflops": tflops,
        "mfu": tflops * 1e12 / peak if peak else None,
        "max_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", help="model preset(s); default: tiny")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="bench/results/train_throughput.json")
    parser.add_argument("overrides", nargs="*", help="model.* overrides applied to every preset")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [bench(p, args.seq_len, args.micro_batch, args.steps, args.warmup, device, args.vocab, args.overrides)
            for p in (args.preset or ["tiny"])]
    print(f"{'preset':<12} {'params M':>9} {'step ms':>9} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>6}  device")
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{r['preset']:<12} {r['params_m']:>9.1f} {r['step_ms']:>9.1f} {r['tokens_per_s']:>11.0f} "
              f"{r['tflops']:>8.2f} {mfu:>6}  {r['device']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
