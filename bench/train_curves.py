"""Short training runs of every ``-tiny`` preset, and their loss curves compared with the CPU fp32 ones.

    python bench/train_curves.py --device cpu --precision fp32 --write bench/results/train_curves_cpu_fp32.json
    python bench/train_curves.py --device cuda --precision bf16 --json $OUT/train.json    # the GPU check
    python bench/train_curves.py --device cpu --precision bf16 --presets tiny             # bf16 on CPU

Every run: a synthetic corpus made here from a seeded generator (``corpus``: the same bytes on any
machine and Python; the embedded one is the running Python's own stdlib and takes a minute to
tokenize), byte tokenizer, ``STEPS`` steps of the same small batches and seed. A run
passes when its curve is finite and stays within ``MEAN_TOL`` (mean |Δloss| over the steps) and
``TAIL_TOL`` (|Δ| of the mean loss of the last ``TAIL`` steps) of the reference. On CPU, bf16 autocast
moved these 30-step curves by 0.001–0.035 on average and by under 0.04 at the end; a single step can
differ by up to ~0.2 where one run has a loss spike the other has not, so the largest per-step |Δ| is
reported but not judged. The LR (2e-3) is below the one where the fp32 runs themselves spike: at 3e-3
``tiny-swa`` in fp32 left its plateau through a spike at step 14 and the bf16 run 6 steps later, which
is training dynamics, not precision. A dtype bug (a softmax or an accumulation in
bf16) shows as a curve that stays higher, which the tail mean catches. Results are written
after each preset, so a run cut off by a timeout keeps the presets it finished.

Needs no omegaconf (the GPU image has none): the run's config is built from the preset YAML and the
dataclasses directly, then checked by ``braid.config.validate`` as ``load_config`` would.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEPS = 30
MEAN_TOL, TAIL_TOL, TAIL = 0.08, 0.08, 10
SETTINGS = {  # small enough for 2 CPU cores: ~0.1-0.5 s a step
    "data.seq_len": 64, "train.steps": STEPS, "train.micro_batch_size": 4, "train.global_batch_size": 4,
    "train.lr": 2e-3, "train.warmup_steps": 5, "train.eval_interval": 10**6, "train.seed": 1234,
    "checkpoint.interval": 10**6, "logging.interval": 10**6, "logging.wandb": "off",
}


def corpus(path: Path, n_bytes: int = 96_000) -> Path:
    """A made-up language: 300 words of 1-3 syllables, sentences from a random bigram table (learnable
    structure at the character and the word level). ``random.Random.random`` is stable across Pythons."""
    rng = random.Random(0)
    syll = [a + b for a in "bdfgklmnprstvz" for b in "aeiou"]
    words = ["".join(syll[int(rng.random() * len(syll))] for _ in range(1 + int(rng.random() * 3)))
             for _ in range(300)]
    follow = [[int(rng.random() * 300) for _ in range(4)] for _ in range(300)]
    out, w = [], 0
    while sum(map(len, out)) < n_bytes:
        sentence = []
        for _ in range(4 + int(rng.random() * 8)):
            w = follow[w][int(rng.random() * 4)] if rng.random() < 0.9 else int(rng.random() * 300)
            sentence.append(words[w])
        out.append(" ".join(sentence).capitalize() + ".\n")
    path.write_text("".join(out))
    return path


def tiny_presets() -> list[str]:
    from braid.models.presets import preset_names

    return [p for p in preset_names() if p.endswith("-tiny") or p in ("tiny", "tiny-swa")]


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """The typed value of a YAML scalar (the project's YAML loader keeps true/false as words)."""
    from braid.config_yaml import BOOL_WORDS
    from braid.errors import ConfigError

    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if isinstance(value, str) and value.lower() in BOOL_WORDS:
            return BOOL_WORDS[value.lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': {value!r} is not a boolean")
        return value
    if hint is int:
        return int(value)
    if hint is float:
        return float(value)
    if typing.get_origin(hint) in (list, typing.List):
        return list(value)
    return value


def _fill(obj: Any, tree: dict, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in tree.items():
        name = f"{where}.{key}" if where else key
        if key not in hints:
            from braid.errors import ConfigError

            raise ConfigError(f"unknown config key '{name}'")
        if dataclasses.is_dataclass(hints[key]):
            _fill(getattr(obj, key), value, name)
        else:
            setattr(obj, key, _coerce(hints[key], value, name))


def preset_config(preset: str, settings: dict):
    """``load_config(None, [f"model.preset={preset}", *(f"{k}={v}" for k, v in settings.items())])``,
    built without omegaconf: the preset's model section, then the dotted ``settings``, then validated."""
    from braid.config import Config, validate
    from braid.config_yaml import load_yaml_file
    from braid.models.presets import _DIR

    cfg = Config()
    _fill(cfg.model, load_yaml_file(_DIR / f"{preset}.yaml") or {}, "model")
    cfg.model.preset = preset
    tree: dict = {}
    for key, value in settings.items():
        *sections, leaf = key.split(".")
        node = tree
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = value
    _fill(cfg, tree, "")
    validate(cfg)
    return cfg


def build_config(preset: str, device: str, precision: str, run_dir: str, steps: int = STEPS):
    """The config of one curve's run (the corpus is written into ``run_dir``)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    extra = {"train.threads": 1} if device == "cpu" else {}  # 2 shared cores: one thread per run is fastest
    return preset_config(preset, {**SETTINGS, **extra, "train.steps": steps, "train.device": device,
                                  "train.precision": precision, "run.dir": f"{run_dir}/run", "run.name": preset,
                                  "data.source": str(corpus(Path(run_dir) / "corpus.txt"))})


def run_curve(preset: str, device: str, precision: str, steps: int = STEPS) -> list[float]:
    """Per-step training losses of one short run (in a temporary run dir)."""
    from braid.trainer.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        return [float(x) for x in Trainer(build_config(preset, device, precision, tmp, steps)).train()]


def compare(curve: list[float], ref: list[float]) -> dict:
    n = min(len(curve), len(ref))
    diffs = [abs(a - b) for a, b in zip(curve[:n], ref[:n])]
    finite = all(math.isfinite(x) for x in curve)
    mean, worst = (sum(diffs) / n, max(diffs)) if n and finite else (math.inf, math.inf)
    k = min(TAIL, n)
    tail = abs(sum(curve[n - k:n]) - sum(ref[n - k:n])) / k if k and finite else math.inf
    ok = finite and n == len(ref) and mean <= MEAN_TOL and tail <= TAIL_TOL
    return dict(mean_abs_diff=mean, tail_mean_diff=tail, max_abs_diff=worst, steps=len(curve), passed=ok,
                first=curve[0] if curve else None, last=curve[-1] if curve else None,
                ref_first=ref[0] if ref else None, ref_last=ref[-1] if ref else None)


REFERENCE = Path(__file__).resolve().parent / "results" / "train_curves_cpu_fp32.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--presets", nargs="*", default=None, help="default: every tiny preset")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--reference", default=str(REFERENCE))
    p.add_argument("--write", default=None, help="write the curves as a new reference file instead of comparing")
    p.add_argument("--json", default=None, help="where to write the comparison (after every preset)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(min(torch.get_num_threads(), 8))
    ref = {} if args.write else json.loads(Path(args.reference).read_text())["curves"]
    out: dict = dict(device=args.device, precision=args.precision, steps=args.steps,
                     tolerance=dict(mean_abs_diff=MEAN_TOL, tail_mean_diff=TAIL_TOL, tail_steps=TAIL),
                     torch=torch.__version__,
                     results={}, curves={})
    status = 0
    for preset in args.presets or tiny_presets():
        t0 = time.time()
        try:
            curve = run_curve(preset, args.device, args.precision, args.steps)
            row = {"seconds": round(time.time() - t0, 1)}
            if not args.write:
                row.update(compare(curve, ref[preset]))
        except Exception as exc:  # one preset's failure must not hide the others
            curve, row = [], dict(passed=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        out["curves"][preset] = curve
        out["results"][preset] = row
        status |= 0 if args.write or row.get("passed") else 1
        print(f"{preset:22s} {'' if args.write else ('PASS' if row.get('passed') else 'FAIL')} "
              + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                         if k != "passed"), flush=True)
        for path in filter(None, (args.json, args.write)):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(out, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
