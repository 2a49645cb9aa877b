"""Evaluation: scoring against the model's own loss, perplexity of a uniform model, offline lm-eval."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from braid.config import load_config
from braid.convert.braid_checkpoint import save_braid_checkpoint
from braid.data.tokenizer import ByteTokenizer
from braid.eval import _Scorer, perplexity
from braid.models.hybrid import HybridLM

TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"
VOCAB = 320


def _model(uniform: bool = False) -> tuple[HybridLM, object]:
    cfg = load_config(None, ["model.preset=tiny", "model.d_model=32", "model.pattern=AK", f"model.vocab_size={VOCAB}",
                             "data.seq_len=64", "train.seed=3"])
    torch.manual_seed(0)
    model = HybridLM(cfg.model).eval()
    if uniform:  # every logit 0: p = 1/V for every token, whatever the input
        with torch.no_grad():
            model.lm_head.weight.zero_()
    return model, cfg


def test_scores_equal_the_models_own_loss():
    """score/rolling (log_softmax + gather, windows) = −(sum of HybridLM's per-token cross-entropy)."""
    model, _ = _model()
    tok = ByteTokenizer()
    scorer = _Scorer(model, tok, max_length=16)
    ctx, cont = scorer.encode("def f(x):"), scorer.encode(" return x")
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        loss = model(ids[:, :-1], labels=ids[:, 1:])[0, -len(cont):]
    got, _ = _Scorer(model, tok, max_length=64).score(ctx, cont)
    assert abs(got + loss.double().sum().item()) < 1e-4
    # Rolling over 40 tokens in windows of 16 (each conditioned on the token before it).
    text = scorer.encode("import os\nimport sys\nprint(os.getcwd(), sys.argv)")[:40]
    full = [tok.eos_id] + text
    expected = 0.0
    for start in range(0, 40, 16):
        x = torch.tensor([full[start:start + 17]])  # full[start] is the token before text[start]
        with torch.no_grad():
            per_tok = model(x[:, :-1], labels=x[:, 1:])[0]
        expected -= per_tok[-len(text[start:start + 16]):].double().sum().item()
    assert abs(scorer.rolling(text) - expected) < 1e-4


def test_perplexity_of_a_uniform_model_is_the_vocab_size():
    model, cfg = _model(uniform=True)
    res = perplexity(model, cfg.data, ByteTokenizer(), max_samples=3, batch_size=2)
    assert res["sequences"] == 3 and res["tokens"] == 3 * 64
    assert abs(res["ppl"] - VOCAB) / VOCAB < 1e-5


@pytest.mark.slow  # importing lm-eval (datasets, evaluate, sklearn) alone costs ~10 s of CPU
def test_lm_eval_offline_on_local_tasks():
    """lm-evaluation-harness on the shipped tiny tasks: with uniform logits every byte costs log V."""
    pytest.importorskip("lm_eval")
    from braid.eval import run_lm_eval

    model, _ = _model(uniform=True)
    res = run_lm_eval(model, ByteTokenizer(), ["braid_tiny_mc", "braid_tiny_text"], include_path=str(TASKS),
                      max_length=64)
    assert abs(res["braid_tiny_text"]["byte_perplexity,none"] - VOCAB) / VOCAB < 1e-6
    assert abs(res["braid_tiny_text"]["bits_per_byte,none"] - math.log2(VOCAB)) < 1e-6
    # Every byte scores −log V. A choice is scored with lm-eval's " " delimiter in front, so its
    # log-likelihood is −(n + 1)·log V for n bytes: acc picks the shorter choice, and acc_norm (divided
    # by n characters) the longer one.
    docs = [json.loads(line) for line in (TASKS / "braid_tiny_mc.jsonl").read_text().splitlines()]
    lengths = [[len(c.encode()) for c in d["choices"]] for d in docs]
    shorter = [min(range(2), key=lambda i: n[i]) == d["answer"] for n, d in zip(lengths, docs)]
    longer = [max(range(2), key=lambda i: n[i]) == d["answer"] for n, d in zip(lengths, docs)]
    assert res["braid_tiny_mc"]["acc,none"] == pytest.approx(sum(shorter) / len(docs))
    assert res["braid_tiny_mc"]["acc_norm,none"] == pytest.approx(sum(longer) / len(docs))


@pytest.mark.slow
def test_eval_cli_writes_results(tmp_path):
    """The CLI on a checkpoint: lm-eval tasks + held-out perplexity → <run>/eval/step_N.json."""
    pytest.importorskip("lm_eval")
    model, cfg = _model()
    save_braid_checkpoint(model, cfg, tmp_path / "run", step=5)
    cmd = [sys.executable, "-m", "braid.eval", "--model", str(tmp_path / "run" / "checkpoints" / "latest"),
           "--tasks", "braid_tiny_mc", "--include-path", str(TASKS), "--perplexity", "--ppl-samples", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads((tmp_path / "run" / "eval" / "step_5.json").read_text())
    assert doc["step"] == 5 and 0 <= doc["results"]["braid_tiny_mc"]["acc,none"] <= 1
    assert doc["results"]["perplexity"]["tokens"] == 2 * 64
    bad = subprocess.run(cmd[:5] + ["--tasks", "no_such_task", "--include-path", str(TASKS)],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "no_such_task" in bad.stderr


@pytest.mark.slow
def test_results_logged_to_the_runs_wandb_run(tmp_path, monkeypatch):
    """With a stored wandb id, results go to that run (offline here: no account, no network)."""
    pytest.importorskip("wandb")
    from braid.eval import log_to_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "wandb_id").write_text("braidevaltest\n")
    cfg = load_config(None, ["model.preset=tiny", "logging.wandb=offline"])
    assert log_to_wandb(tmp_path, cfg, {"perplexity": {"ppl": 12.5}}, step=5)
    runs = list((tmp_path / "wandb").glob("offline-run-*-braidevaltest"))
    assert len(runs) == 1
    cfg.logging.wandb = "off"
    assert not log_to_wandb(tmp_path, cfg, {"perplexity": {"ppl": 12.5}}, step=5)
