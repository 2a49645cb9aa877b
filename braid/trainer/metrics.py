"""The Megatron-style console line, ``metrics.jsonl`` and wandb."""

from __future__ import annotations

import json
import math
import resource
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

# Dense bf16 tensor-core peak FLOP/s per device, matched against torch.cuda.get_device_name().
# More specific names first: "H100 PCIe" must win over "H100".
PEAK_FLOPS = [
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("B100", 1.75e15),
    ("H200", 989.4e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),
    ("H800", 989.4e12),
    ("H20", 148e12),
    ("GH200", 989.4e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
]


def peak_flops(device: torch.device) -> Optional[float]:
    """Peak FLOP/s of one device, or None (CPU, unknown GPU): MFU is then reported as n/a."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS:
        if key in name:
            return value
    return None


def memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "max alloc"
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "max rss"


def _fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


class MetricsLogger:
    """Rank 0 writes; other ranks hold a disabled logger so callers need no rank checks."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_run: Any = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = wandb_run

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps past the checkpoint (they will be trained again)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def console(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stdout, flush=True)

    def train_line(self, r: dict, total_steps: int, mem_kind: str) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        return (
            f"[{stamp}] iteration {r['step']:>8}/{total_steps:<8} | consumed samples: {r['consumed_samples']:>10} | "
            f"consumed tokens: {r['consumed_tokens']:>12} | elapsed time per iteration (ms): {r['step_time_s'] * 1e3:.1f} | "
            f"learning rate: {r['lr']:.3E} | global batch size: {r['global_batch_size']:>5} | "
            f"lm loss: {r['loss']:.6E} | grad norm: {_fmt(r['grad_norm'], '.3f')} | "
            f"skipped iterations: {r['skipped_iterations']} | nan iterations: {r['nan_iterations']} | "
            f"tokens/s: {r['tokens_per_s']:.0f} | TFLOP/s/GPU: {_fmt(r['tflops'], '.1f')} | "
            f"MFU: {_fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f')}{'' if r['mfu'] is None else '%'} | "
            f"mem ({mem_kind}): {r['memory_gib']:.2f} GiB"
        )

    def eval_line(self, step: int, loss: float) -> str:
        ppl = math.exp(min(loss, 50.0))
        return f" validation at iteration {step} | lm loss: {loss:.6E} | lm loss PPL: {ppl:.4E}"


def init_wandb(run_dir: Path, mode: str, project: str, entity: Optional[str], name: str, config: dict) -> Any:
    """Start or continue the run's wandb run; its id lives in ``<run.dir>/wandb_id`` across resumes."""
    import wandb  # heavy and optional at run time: only imported when enabled

    id_file = Path(run_dir) / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id + "\n")
    return wandb.init(
        project=project,
        entity=entity,
        name=name,
        id=run_id,
        resume="allow",
        mode=mode,
        dir=str(run_dir),
        config=config,
    )
