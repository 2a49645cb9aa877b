"""Config and CLI mistakes a user types: one ``braid: error:`` line naming the key or file, exit 2, no
traceback, and the existing run directory the command points at byte-identical afterwards."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from mistakes import Mistake, finished_run, run_mistake

TINY = str(ROOT / "configs" / "tiny.yaml")
BAD_YAML = "train:\n  steps: 3\n   lr: 1e-3\n"  # lr indented deeper than steps
DUPLICATE_YAML = "train:\n  steps: 3\n  steps: 4\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 2-step run (config, metrics, a checkpoint): what a mistaken command must not touch."""
    return finished_run(tmp_path_factory.mktemp("mistakes"))


def train(*overrides: str) -> list[str]:
    return ["-m", "braid.train", "--config", TINY, *overrides]


# (name, overrides after `--config configs/tiny.yaml run.dir=<run_dir>`, what the line must name)
CONFIG_MISTAKES = [
    ("rope_theta<0", ["model.rope_theta=-5"], "'model.rope_theta' = -5.0 is invalid: must be > 0"),
    ("rope_theta inf", ["model.rope_theta=.inf"], "model.rope_theta"),
    ("norm_eps<0", ["model.norm_eps=-1"], "'model.norm_eps' = -1.0 is invalid: must be in (0, 1)"),
    ("routed_scaling<0", ["model.moe.routed_scaling=-2"], "model.moe.routed_scaling"),
    ("eps<0", ["train.eps=-1"], "'train.eps' = -1.0 is invalid: must be > 0"),
    ("beta1>1", ["train.beta1=1.5"], "'train.beta1' = 1.5 is invalid: must be in [0, 1)"),
    ("beta2<0", ["train.beta2=-0.5"], "'train.beta2' = -0.5 is invalid: must be in [0, 1)"),
    ("seed<0", ["train.seed=-1"], "train.seed"),
    ("kda chunk 24", ["model.kda.chunk_size=24"], "'model.kda.chunk_size' = 24 is invalid: 16 | 32 | 64"),
    ("kda chunk 128", ["model.kda.chunk_size=128"], "model.kda.chunk_size"),
    ("wandb maybe", ["logging.wandb=maybe"], "off | offline | online"),
    ("s2 on MLA", ["model.preset=kimi-linear-tiny", "model.s2.enabled=true"], "'model.s2.enabled' = True"),
    ("s2 on hymba", ["model.preset=hymba-tiny", "model.s2.enabled=on"], "has H layers"),
    ("s2 without attention", ["model.pattern=KK", "model.ffn_pattern=S", "model.s2.enabled=yes"],
     "model.s2.enabled"),
    ("cp_kind s2 without S2", ["parallel.cp_kind=s2"], "'parallel.cp_kind' = 's2'"),
    ("malformed list", ["train.profile_steps=[1,"], "override 'train.profile_steps=[1,'"),
    ("bool word in int key", ["train.steps=off"], "train.steps"),
]


@pytest.mark.parametrize("name,overrides,names", CONFIG_MISTAKES, ids=[c[0] for c in CONFIG_MISTAKES])
def test_config_mistakes_cost_one_line(run_dir, name, overrides, names):
    run_mistake(Mistake(name, train(f"run.dir={run_dir}", *overrides), names), guard=run_dir)


def test_yaml_errors_name_file_line_and_column(run_dir, tmp_path):
    bad, dup = tmp_path / "bad.yaml", tmp_path / "dup.yaml"
    bad.write_text(BAD_YAML)
    dup.write_text(DUPLICATE_YAML)
    for m in (Mistake("yaml syntax", ["-m", "braid.train", "--config", str(bad), f"run.dir={run_dir}"],
                      f"config file '{bad}' is not valid YAML: line 3, column 6: mapping values"),
              Mistake("yaml duplicate", ["-m", "braid.train", "--config", str(dup), f"run.dir={run_dir}"],
                      f"config file '{dup}' is not valid YAML: line 3, column 3: duplicate key 'steps'")):
        run_mistake(m, guard=run_dir)


def test_no_config_is_refused_naming_it(run_dir):
    run_mistake(Mistake("no --config", ["-m", "braid.train", f"run.dir={run_dir}", "model.preset=tiny"],
                        "--config"), guard=run_dir)


@pytest.mark.skipif(torch.cuda.is_available(), reason="train.device=cuda is valid on this machine")
def test_cuda_device_without_cuda_is_refused_before_writing(run_dir):
    run_mistake(Mistake("device cuda", train(f"run.dir={run_dir}", "train.device=cuda"),
                        "'train.device' = 'cuda' is invalid here"), guard=run_dir)


@pytest.mark.slow  # ~11 s, most of it importing lm-eval in a fresh process
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs the [eval] extra (lm-eval)")
def test_eval_task_that_needs_a_download_offline(run_dir, tmp_path):
    # Offline mode fails at once (without it the Hub client retries for ~30 s before the same error);
    # an empty cache, so a dataset downloaded on this machine before does not make it pass.
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    line = run_mistake(Mistake("eval hellaswag offline", ["-m", "braid.eval", "--model",
                                                          str(run_dir / "checkpoints" / "latest"),
                                                          "--tasks", "hellaswag", "--limit", "2"],
                               "--tasks hellaswag", env=offline), guard=run_dir)
    assert "--include-path" in line and "download" in line
