"""The Megatron-style console line, ``metrics.jsonl``, wandb, and what a step is made of: phase timings,
loss spikes, profiler traces and CUDA memory snapshots."""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import secrets
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

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
        """On resume, drop lines of steps past the checkpoint (they will be trained again) and lines cut
        by a crash; replaced atomically, so a kill while resuming loses nothing."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:  # scalars only: a spike's sample index list stays in metrics.jsonl
            self.wandb_run.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                               step=record["step"])

    def console(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stdout, flush=True)

    def train_line(self, r: dict, total_steps: int, mem_kind: str) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        return (
            f"[{stamp}] iteration {r['step']:>8}/{total_steps:<8} | consumed samples: {r['consumed_samples']:>10} | "
            f"consumed tokens: {r['consumed_tokens']:>12} | "
            f"elapsed time per iteration (ms): {r['step_time_s'] * 1e3:.1f} | "
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


PHASES = ("data", "forward", "backward", "optimizer", "comm")


class StepTimer:
    """Wall seconds per phase of the training steps since the last ``averages()`` call.

    Without ``sync`` a CUDA phase measures the host's launch time and the next blocking call (a
    ``.item()``, usually in ``comm``) absorbs the queued GPU work; ``sync`` makes each phase exact at
    the cost of a device synchronization around it. While ``label`` is set (profiling), each phase is
    also a named range in the trace.
    """

    def __init__(self, device: torch.device, sync: bool):
        self.sync = sync and device.type == "cuda"
        self.label = False
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.steps = 0

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.profiler.record_function(f"braid.{phase}") if self.label else contextlib.nullcontext():
            yield
        if self.sync:
            torch.cuda.synchronize()
        self.totals[phase] += time.perf_counter() - start

    def averages(self) -> dict:
        """``time_<phase>_s`` per step, averaged over the steps since the last call; resets."""
        n = max(self.steps, 1)
        out = {f"time_{phase}_s": total / n for phase, total in self.totals.items()}
        self.totals, self.steps = dict.fromkeys(PHASES, 0.0), 0
        return out


class LossSpikeDetector:
    """z-score of each finite loss against the ``window`` losses before it (once that many are seen).

    The history is not checkpointed: after a resume the detector warms up again for ``window`` steps.
    """

    def __init__(self, window: int, threshold: float):
        self.window, self.threshold = window, threshold
        self.history: deque = deque(maxlen=window)

    def check(self, loss: float) -> Optional[dict]:
        """``{"zscore", "window_mean", "window_std"}`` when ``loss`` is a spike, else None."""
        if not math.isfinite(loss):
            return None  # non-finite steps are the NaN counters' business, and would poison the window
        spike = None
        if len(self.history) == self.window:
            mean = sum(self.history) / self.window
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (self.window - 1))
            if std > 0 and (loss - mean) / std > self.threshold:
                spike = {"zscore": (loss - mean) / std, "window_mean": mean, "window_std": std}
        self.history.append(loss)
        return spike

    def warning(self, r: dict) -> str:
        """The console line for a spike record (step, spike_loss, zscore, global_samples, dataset_indices)."""
        first, end = r["global_samples"]
        indices = r["dataset_indices"]
        shown = ", ".join(map(str, indices[:8]))
        if len(indices) > 8:
            shown += f", ... ({len(indices)} in metrics.jsonl)"
        return (f"braid: warning: loss spike at iteration {r['step']}: lm loss {r['spike_loss']:.4f} is "
                f"{r['zscore']:.1f} standard deviations above the mean {r['window_mean']:.4f} of the previous "
                f"{self.window} iterations | global samples {first}..{end - 1} | dataset indices {shown}")


class StepProfiler:
    """torch.profiler over iterations ``[first, last]`` and a CUDA memory snapshot after one iteration.

    Traces go to ``<run.dir>/profile/trace_iter<first>-<last>_rank<r>.json`` (chrome://tracing,
    Perfetto), snapshots to ``<run.dir>/memory/snapshot_iter<N>_rank<r>.pickle``
    (https://pytorch.org/memory_viz).
    """

    def __init__(self, run_dir: Path, rank: int, device: torch.device, profile_steps: list[int],
                 snapshot_step: int, timer: StepTimer, console: Callable[[str], None]):
        self.run_dir, self.rank, self.device, self.timer, self.console = Path(run_dir), rank, device, timer, console
        self.range = tuple(profile_steps) if profile_steps else None
        self.snapshot_step = snapshot_step
        self.prof: Optional[torch.profiler.profile] = None
        self.recording = False

    def start(self, step: int) -> None:
        """Called once before training, at iteration ``step`` (0, or the resumed one)."""
        if not self.snapshot_step or self.snapshot_step <= step:
            return
        if self.device.type != "cuda":
            self.console(f"braid: train.memory_snapshot_step={self.snapshot_step} ignored: memory snapshots "
                         f"need CUDA, this run is on {self.device.type}")
            return
        torch.cuda.memory._record_memory_history(max_entries=200_000)
        self.recording = True

    def before_step(self, step: int) -> None:
        """``step`` is the iteration about to run (1-based)."""
        if self.range and self.prof is None and self.range[0] <= step <= self.range[1]:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self.prof.__enter__()
            self.timer.label = True
            self._first = step

    def after_step(self, step: int) -> None:
        if self.prof is not None and step >= self.range[1]:
            self._export(step)
        if self.recording and step == self.snapshot_step:
            path = self.run_dir / "memory" / f"snapshot_iter{step}_rank{self.rank}.pickle"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(path))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.recording = False
            self.console(f"braid: CUDA memory snapshot of iteration {step} written to {path}")

    def close(self, step: int) -> None:
        """The run ends (done, stopped or failed): write what was recorded so far."""
        if self.prof is not None:
            self._export(step)
        if self.recording:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.recording = False

    def _export(self, step: int) -> None:
        self.prof.__exit__(None, None, None)
        self.timer.label = False
        path = self.run_dir / "profile" / f"trace_iter{self._first}-{step}_rank{self.rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(path))
        self.prof, self.range = None, None
        self.console(f"braid: profiler trace of iterations {self._first}-{step} written to {path}")
