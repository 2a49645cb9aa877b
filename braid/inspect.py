"""``python -m braid.inspect <run.dir>``: what a run did — config, progress, checkpoints, losses.

Reads only files (no torch import), so it is instant and safe to point at a live run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from braid.trainer.checkpoint_config import checkpoint_info, config_path
from braid.trainer.checkpoint_layout import MARKER, checkpoint_dirs, checkpoint_problem

EXIT_BAD_INPUT = 2
SET_ASIDE_RE = re.compile(r"^step_(\d+)\.damaged$")


def _records(run_dir: Path) -> tuple[list[dict], int]:
    """Parsed metrics.jsonl lines and the count of unreadable ones (a line cut by a crash)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return [], 0
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return records, bad


def summarize(run_dir: Path) -> dict:
    """A JSON-able summary of the run directory."""
    records, bad_lines = _records(run_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    checkpoints = []
    for step, path in checkpoint_dirs(run_dir / "checkpoints"):
        complete = (path / MARKER).is_file()
        entry = {"step": step, "path": str(path), "complete": complete,
                 "problem": checkpoint_problem(path) if complete else None}
        if complete and entry["problem"] is None:
            meta = json.loads((path / MARKER).read_text())
            entry.update({k: v for k, v in meta.items() if k not in ("files", "step")})
            entry.update({k: v for k, v in checkpoint_info(path).items() if k != "step"})
        checkpoints.append(entry)
    ckpt_root = run_dir / "checkpoints"
    set_aside = sorted((int(m.group(1)), str(p)) for p in (ckpt_root.iterdir() if ckpt_root.is_dir() else [])
                       if p.is_dir() and (m := SET_ASIDE_RE.match(p.name)))
    spikes = [r for r in records if "spike_loss" in r]
    latest_file = run_dir / "checkpoints" / "latest"
    # What resume=auto would continue: the newest sound checkpoint's own config (older ones: the run dir's).
    sound = [Path(c["path"]) for c in checkpoints if c["complete"] and c["problem"] is None]
    config = config_path(sound[-1]) if sound else None
    config = config or (run_dir / "config.yaml" if (run_dir / "config.yaml").is_file() else None)
    summary = {
        "run_dir": str(run_dir),
        "config": config.read_text() if config is not None else None,
        "config_file": str(config) if config is not None else None,
        "last_step": train[-1]["step"] if train else None,
        "consumed_tokens": train[-1].get("consumed_tokens") if train else None,
        "first_loss": train[0]["loss"] if train else None,
        "last_loss": train[-1]["loss"] if train else None,
        "best_eval_loss": min((r["eval_loss"] for r in evals), default=None),
        "last_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "skipped_iterations": train[-1].get("skipped_iterations", 0) if train else 0,
        "nan_iterations": train[-1].get("nan_iterations", 0) if train else 0,
        "checkpoints": checkpoints,
        "set_aside_checkpoints": [{"step": s, "path": p} for s, p in set_aside],
        "loss_spikes": [{k: r[k] for k in ("step", "spike_loss", "zscore", "global_samples")} for r in spikes],
        "latest_pointer": latest_file.read_text().strip() if latest_file.is_file() else None,
        "unreadable_metric_lines": bad_lines,
        "wandb_id": (run_dir / "wandb_id").read_text().strip() if (run_dir / "wandb_id").is_file() else None,
    }
    return summary


def _fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def render(s: dict) -> str:
    lines = [f"run dir        {s['run_dir']}",
             f"last step      {_fmt(s['last_step'])}   consumed tokens {_fmt(s['consumed_tokens'])}",
             f"train loss     {_fmt(s['first_loss'], '.4f')} → {_fmt(s['last_loss'], '.4f')}",
             f"eval loss      last {_fmt(s['last_eval_loss'], '.4f')}   best {_fmt(s['best_eval_loss'], '.4f')}",
             f"skipped steps  {s['skipped_iterations']} (NaN: {s['nan_iterations']})",
             f"wandb run id   {_fmt(s['wandb_id'])}",
             f"checkpoints    latest → {_fmt(s['latest_pointer'])}"]
    for c in s["checkpoints"]:
        state = "complete" if c["complete"] else "INCOMPLETE (ignored by resume)"
        if c.get("problem"):
            state = f"DAMAGED: {c['problem']} (resume=auto falls back past it)"
        lines.append(f"  step {c['step']:>8}  {state}  {c['path']}")
    for c in s["set_aside_checkpoints"]:
        lines.append(f"  step {c['step']:>8}  DAMAGED, set aside by resume  {c['path']}")
    for r in s["loss_spikes"]:
        lines.append(f"loss spike     iteration {r['step']}: {r['spike_loss']:.4f} (z {r['zscore']:.1f}), "
                     f"global samples {r['global_samples'][0]}..{r['global_samples'][1] - 1}")
    if s["unreadable_metric_lines"]:
        lines.append(f"metrics.jsonl  {s['unreadable_metric_lines']} unreadable line(s) (cut by a crash?)")
    if s["config"]:
        lines += [f"config         {s['config_file']}", *("  " + ln for ln in s["config"].splitlines())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="braid.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"braid: error: run dir '{args.run_dir}' does not exist", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    summary = summarize(args.run_dir)
    print(json.dumps(summary, indent=2) if args.json else render(summary))


if __name__ == "__main__":
    main()
