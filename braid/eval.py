"""Evaluation: ``python -m braid.eval --model <checkpoint or HF dir> --tasks <t1,t2> [--perplexity]``.

* lm-evaluation-harness tasks (``lm-eval``) run on the braid model through :class:`BraidLM`, an
  ``lm_eval`` model adapter that scores with braid's own tokenizer (byte level included) and
  generates with incremental decoding. ``--include-path`` adds local task YAMLs (offline use).
* ``--perplexity``: loss and perplexity on the held-out split of the run's data config (for a
  Hugging Face dir: ``--data-source`` / ``--seq-len``, the tokenizer saved with the model).
* Results go to ``--output`` (JSON; default ``<run.dir>/eval/<step>.json`` for a checkpoint,
  ``<model dir>/eval_results.json`` otherwise) and to the run's wandb run when it has one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from braid.errors import BraidError


class _Scorer:
    """Token-level scoring and generation with a braid model and tokenizer (no lm_eval import)."""

    def __init__(self, model, tokenizer, max_length: int):
        self.model, self.tok, self.max_length = model, tokenizer, max_length

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tok.encode_batch([text])[0]] if text else []

    @torch.no_grad()
    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum of log p(continuation | context) and whether it is the greedy continuation.

        An empty context starts from EOS (the document separator braid trains with); the input is cut
        on the left to ``max_length``.
        """
        context = context or [self.tok.eos_id]
        ids = (context + continuation)[-(self.max_length + 1):]
        n = len(continuation)
        x = torch.tensor([ids[:-1]], dtype=torch.int64)
        logp = F.log_softmax(self.model(x)[0, -n:].double(), dim=-1)
        target = torch.tensor(ids[-n:])
        total = logp.gather(-1, target[:, None]).sum().item()
        return total, bool(torch.equal(logp.argmax(-1), target))

    @torch.no_grad()
    def rolling(self, ids: list[int]) -> float:
        """log p of a whole text after EOS, in disjoint windows of ``max_length`` predicted tokens
        (each window sees the token before it as context, as lm-eval's rolling windows do)."""
        total = 0.0
        for start in range(0, len(ids), self.max_length):
            context = [ids[start - 1]] if start else [self.tok.eos_id]
            total += self.score(context, ids[start:start + self.max_length])[0]
        return total

    def generate(self, context: str, until: list[str], max_new: int) -> str:
        from braid.generate import generate

        ids = (self.encode(context) or [self.tok.eos_id])[-self.max_length:]
        out = generate(self.model, torch.tensor([ids]), max_new, eos_id=self.tok.eos_id)[0, len(ids):].tolist()
        if self.tok.eos_id in out:
            out = out[: out.index(self.tok.eos_id)]
        text = self.tok.decode(out)
        for stop in until:
            if stop and stop in text:
                text = text[: text.index(stop)]
        return text


def make_lm(model, tokenizer, max_length: int):
    """An ``lm_eval.api.model.LM`` over a braid model (imports lm_eval lazily)."""
    from lm_eval.api.model import LM

    scorer = _Scorer(model, tokenizer, max_length)

    class BraidLM(LM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            out = []
            for req in requests:
                context, continuation = req.args
                out.append(scorer.score(scorer.encode(context), scorer.encode(continuation)))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return [scorer.rolling(scorer.encode(req.args[0])) for req in requests]

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for req in requests:
                context, kwargs = req.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                out.append(scorer.generate(context, until, int(kwargs.get("max_gen_toks", 64))))
            return out

    return BraidLM()


def run_lm_eval(model, tokenizer, tasks: list[str], *, include_path: Optional[str] = None,
                limit: Optional[float] = None, max_length: int = 2048, num_fewshot: Optional[int] = None) -> dict:
    """``{task: {metric: value}}`` from lm-evaluation-harness on a braid model."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise BraidError("lm-eval is not installed: pip install lm-eval") from None
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise BraidError(f"--tasks: unknown lm-eval task(s) {', '.join(unknown)} (add --include-path for local ones)")
    try:
        res = lm_eval.simple_evaluate(model=make_lm(model, tokenizer, max_length), tasks=tasks, task_manager=manager,
                                      limit=limit, num_fewshot=num_fewshot, log_samples=False,
                                      bootstrap_iters=0)
    except ConnectionError as exc:  # the model is local: only a task's dataset download reaches the network
        raise BraidError(f"--tasks {','.join(tasks)}: a task's dataset must be downloaded from the Hugging Face Hub "
                         f"and could not be ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                         "run once with network access (it is cached), or give a local task with --include-path"
                         ) from None
    out = {}
    for task, metrics in res["results"].items():
        out[task] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                     and not (isinstance(v, float) and math.isnan(v))}
    return out


@torch.no_grad()
def perplexity(model, data_cfg, tokenizer, max_samples: int = 64, batch_size: int = 4) -> dict:
    """Mean next-token loss and perplexity over (up to ``max_samples``) held-out sequences."""
    import numpy as np

    from braid.data.packing import build_datasets

    valid = build_datasets(data_cfg, tokenizer)[1]
    n = min(len(valid), max_samples)
    if n == 0:
        raise BraidError("the held-out split is empty (config key 'data.valid_fraction' too small?)")
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        batch = [valid[i] for i in range(start, min(n, start + batch_size))]

        def get(key: str) -> torch.Tensor:
            return torch.from_numpy(np.stack([s[key] for s in batch])).long()

        labels = get("labels")
        doc = get("doc_ids") if data_cfg.document_mask else None
        loss = model(get("input_ids"), labels=labels, position_ids=get("position_ids"), doc_ids=doc)
        keep = labels != -100
        total += loss[keep].double().sum().item()
        count += int(keep.sum())
    mean = total / max(count, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 700.0)), "tokens": count, "sequences": n}


def log_to_wandb(run_dir: Path, cfg, results: dict, step: Optional[int]) -> bool:
    """Log ``eval/<task>/<metric>`` to the run's wandb run (resumed by its stored id); False if none."""
    id_file = run_dir / "wandb_id"
    if cfg is None or cfg.logging.wandb == "off" or not id_file.is_file():
        return False
    import wandb

    flat = {f"eval/{task}/{k}": v for task, metrics in results.items() for k, v in metrics.items()}
    run = wandb.init(project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity, id=id_file.read_text().strip(),
                     resume="allow", dir=str(run_dir), mode=cfg.logging.wandb)
    run.log(flat | ({} if step is None else {"eval/step": step}))
    run.finish()
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m braid.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint dir (or latest), or a Hugging Face dir")
    parser.add_argument("--tasks", default="", help="comma-separated lm-eval task names")
    parser.add_argument("--include-path", default=None, help="directory of extra lm-eval task YAMLs")
    parser.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (or fraction)")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=None, help="context tokens (default: data.seq_len)")
    parser.add_argument("--perplexity", action="store_true", help="also evaluate the held-out split")
    parser.add_argument("--ppl-samples", type=int, default=64)
    parser.add_argument("--data-source", default=None, help="data.source for --perplexity (default: the run's)")
    parser.add_argument("--output", default=None, help="results JSON path")
    parser.add_argument("--no-wandb", action="store_true")
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks and not args.perplexity:
        print("braid: error: nothing to do: give --tasks and/or --perplexity", file=sys.stderr)
        return 2
    try:
        results, info = _evaluate(args, tasks)
    except (BraidError, ValueError, KeyError, FileNotFoundError) as exc:
        print(f"braid: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    out = Path(args.output) if args.output else info["default_output"]
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"model": str(args.model), "step": info["step"], "time": time.time(), "results": results}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    if not args.no_wandb and info["run_dir"] is not None:
        log_to_wandb(info["run_dir"], info["cfg"], results, info["step"])
    for task, metrics in results.items():
        print(f"{task}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    print(f"braid: results written to {out}")
    return 0


def _evaluate(args, tasks: list[str]) -> tuple[dict, dict]:
    from braid.config import Config
    from braid.convert import load
    from braid.convert.braid_checkpoint import resolve_checkpoint_dir, run_config
    from braid.data.tokenizer import load_tokenizer

    loaded = load(args.model)
    tok = load_tokenizer(loaded.tokenizer)
    cfg, step = None, None
    if loaded.run_dir is not None:
        ckpt = resolve_checkpoint_dir(args.model)
        cfg = run_config(ckpt)
        step = int(ckpt.name.split("_")[-1]) if ckpt.name.startswith("step_") else None
        default_output = loaded.run_dir / "eval" / f"{ckpt.name}.json"
    else:
        default_output = Path(args.model) / "eval_results.json"
    max_length = args.max_length or loaded.seq_len or 2048
    results = {}
    if tasks:
        results.update(run_lm_eval(loaded.model, tok, tasks, include_path=args.include_path, limit=args.limit,
                                   max_length=max_length, num_fewshot=args.num_fewshot))
    if args.perplexity:
        data_cfg = (cfg or Config()).data
        data_cfg.tokenizer = loaded.tokenizer
        if args.data_source:
            data_cfg.source = args.data_source
        if cfg is None and loaded.seq_len:
            data_cfg.seq_len = loaded.seq_len
        results["perplexity"] = perplexity(loaded.model, data_cfg, tok, args.ppl_samples)
    return results, {"run_dir": loaded.run_dir, "cfg": cfg, "step": step, "default_output": default_output}


if __name__ == "__main__":
    sys.exit(main())
