"""Config loading, presets and every error path (one line, exit 2, nothing written)."""

from __future__ import annotations

import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from braid.config import leaf_fields, load_config, to_yaml
from braid.config_rules import CHOICES, RANGES, Range
from braid.config_yaml import BOOL_WORDS
from braid.errors import ConfigError
from braid.models.presets import load_preset, preset_names

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def test_defaults_and_tiny_yaml_load():
    cfg = load_config(TINY)
    assert cfg.model.preset == "hybrid-tiny"
    assert cfg.data.source == "embedded" and cfg.data.tokenizer == "bytes"
    assert cfg.run_dir == Path("runs") / cfg.run.name
    assert load_config(None).run_dir == Path("runs/braid")


def test_overrides_are_typed_and_win_over_file():
    cfg = load_config(TINY, ["train.steps=7", "train.lr=1e-4", "model.qk_norm=true", "run.dir=/tmp/x"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.qk_norm is True
    assert cfg.run_dir == Path("/tmp/x")


def test_tiny_yaml_chooses_its_model_only_through_the_preset():
    text = TINY.read_text()
    model_lines = text.split("model:")[1].split("\ndata:")[0].strip().splitlines()
    assert [ln.strip() for ln in model_lines] == ["preset: hybrid-tiny"]


def test_preset_on_command_line_switches_architecture_completely():
    other = load_preset("tiny-swa")
    cfg = load_config(TINY, ["model.preset=tiny-swa"])
    for key, value in other.items():
        assert getattr(cfg.model, key) == value, key
    assert cfg.model.preset == "tiny-swa"
    # ... and model keys given alongside still adjust the chosen preset.
    cfg = load_config(TINY, ["model.preset=tiny-swa", "model.window=16"])
    assert cfg.model.window == 16 and cfg.model.pattern == other["pattern"]


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_is_a_complete_valid_model_section(name):
    cfg = load_config(None, [f"model.preset={name}"])
    assert set(load_preset(name)) >= {"pattern", "d_model", "n_heads"}
    assert cfg.model.pattern


ERRORS = [
    (["bogus.key=1"], "bogus"),
    (["train.bogus=1"], "train.bogus"),
    (["train.steps=abc"], "train.steps"),
    (["train.steps=0"], "train.steps"),
    (["train.lr=-1"], "train.lr"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size"),
    (["train.schedule=linear"], "train.schedule"),
    (["train.warmup_steps=-1"], "train.warmup_steps"),
    (["train.device=tpu"], "train.device"),
    (["logging.wandb=maybe"], "logging.wandb"),
    (["logging.interval=0"], "logging.interval"),
    (["checkpoint.resume=/does/not/exist"], "checkpoint.resume"),
    (["checkpoint.keep=0"], "checkpoint.keep"),
    (["model.preset=nope"], "model.preset"),
    (["model.pattern=AQ"], "model.pattern"),
    (["model.ffn_pattern=SSX"], "model.ffn_pattern"),
    (["model.n_kv_heads=3"], "model.n_kv_heads"),
    (["model.pos_emb=alibi"], "model.pos_emb"),
    (["model.d_model=notanint"], "model.d_model"),
    (["data.seq_len=-5"], "data.seq_len"),
    (["data.tokenizer=/no/such/tokenizer"], "data.tokenizer"),
    (["data.valid_fraction=1.5"], "data.valid_fraction"),
    (["parallel.dp=0"], "parallel.dp"),
    (["run.name=a/b"], "run.name"),
    (["model.global_layers=[7]"], "model.global_layers"),
    (["model.attn_gate=channel"], "model.attn_gate"),
    (["model.connection=highway"], "model.connection"),
    (["model.meta_tokens=-1"], "model.meta_tokens"),
    (["model.ffn_pattern=E", "model.moe.top_k=9"], "model.moe.top_k"),
    (["model.ffn_pattern=E", "model.moe.router=relu"], "model.moe.router"),
    (["model.ffn_pattern=E", "model.moe.n_groups=3"], "model.moe.n_groups"),
    (["model.ffn_pattern=E", "model.moe.capacity_factor=0"], "model.moe.capacity_factor"),
    (["model.pattern=HHA", "model.ffn_pattern=S", "model.hymba.kv_share_groups=[[1,2]]"],
     "model.hymba.kv_share_groups"),
    (["model.pattern=MA", "model.ffn_pattern=S", "model.mla.qk_rope_head_dim=3"], "model.mla.qk_rope_head_dim"),
    (["model.pattern=KA", "model.ffn_pattern=S", "model.kda.conv_size=0"], "model.kda.conv_size"),
    (["model.moe.bogus=1"], "model.moe.bogus"),
    (["train"], "train"),
    (["=3"], "=3"),
    (["train=3"], "train"),
]


@pytest.mark.parametrize("overrides,key", ERRORS, ids=[" ".join(o) for o, _ in ERRORS])
def test_config_errors_name_the_key_in_one_line(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, overrides)
    message = str(info.value)
    assert key in message
    assert "\n" not in message


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(unknown)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="'train' is a section"):
        load_config(scalar)


CLI_ERRORS = [
    (["--config", str(TINY), "train.steps=abc"], "train.steps"),
    (["--config", str(TINY), "nosuch.key=1"], "'nosuch'"),
    (["--config", str(TINY), "logging.wandb=on"], "logging.wandb"),
    (["--config", "missing.yaml"], "missing.yaml"),
    (["--config", str(TINY), "model.preset=nope"], "model.preset"),
    (["--config", str(TINY), "data.source=./no_such_corpus.txt"], "no_such_corpus.txt"),
    (["--config", str(TINY), "data.seq_len=100000"], "data.seq_len"),
    (["--config", str(TINY), "parallel.dp=2"], "parallel.dp"),
]


@pytest.mark.parametrize("args,key", CLI_ERRORS, ids=[a[-1] for a, _ in CLI_ERRORS])
def test_cli_errors_exit_2_with_one_line_and_write_nothing(tmp_path, args, key):
    proc = subprocess.run([sys.executable, "-m", "braid.train", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("braid: error:") and key in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert list(tmp_path.iterdir()) == [], "a failed start must not write files"


# ---------------------------------------------------------------- value tables (braid/config_rules.py)

def _numeric(hint) -> bool:
    """int or float, or Optional of one (lists are checked per element in validate)."""
    if typing.get_origin(hint) not in (None, typing.Union):
        return False
    base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return len(base) == 1 and base[0] in (int, float)


def test_every_numeric_key_has_a_range_or_choices():
    fields = leaf_fields()
    numeric = {k for k, hint in fields.items() if _numeric(hint)}
    missing = sorted(numeric - set(RANGES) - set(CHOICES))
    assert not missing, f"numeric keys without a range in braid/config_rules.py: {missing}"
    assert set(RANGES) | set(CHOICES) <= set(fields), "a table names a key the config does not have"


def _out_of_range(key: str, rule: Range) -> list:
    """Values just outside ``rule``, of the key's type, plus NaN and infinities for float keys."""
    hint = leaf_fields()[key]
    is_float = hint is float or float in typing.get_args(hint)
    step = 0.5 if is_float else 1
    bad = list(rule.excluded)
    if rule.lo is not None:
        bad.append(rule.lo if rule.lo_open else rule.lo - step)
    if rule.hi is not None:
        bad.append(rule.hi if rule.hi_open else rule.hi + step)
    if rule.even:
        bad.append(max(rule.lo or 0, 0) + 3)
    if is_float:
        bad += [".nan", ".inf", "-.inf"]
    return [int(v) if not is_float and not isinstance(v, str) else v for v in bad]


@pytest.mark.parametrize("key", sorted(RANGES))
def test_every_numeric_key_refuses_values_out_of_its_range(key):
    rule = RANGES[key]
    values = _out_of_range(key, rule)
    assert values, f"{key}: no value outside {rule}"
    for value in values:
        with pytest.raises(ConfigError) as info:
            load_config(TINY, [f"{key}={value}"])
        message = str(info.value)
        assert f"'{key}'" in message and str(rule) in message and "\n" not in message, (value, message)


@pytest.mark.parametrize("key", sorted(k for k, c in CHOICES.items() if not c.other))
def test_every_enum_key_refuses_an_undocumented_value(key):
    choice = CHOICES[key]
    bogus = 999 if isinstance(choice.values[0], int) else "bogus"
    with pytest.raises(ConfigError, match=re.escape(f"'{key}' = {bogus!r} is invalid: {choice}")):
        load_config(TINY, [f"{key}={bogus}"])


# Round r types every enum key's value r (cycling) and every bool key as SPELLINGS[r]. The rounds where
# parallel.cp_kind is s2 (1 and 5) spell booleans truthy, so model.s2.enabled is on as s2 needs.
SPELLINGS = ["false", "on", "no", "true", "off", "yes"]
# true / muon in even rounds: odd ones use parallel.engine=deepspeed, which refuses both
SHIFT = {"checkpoint.export_hf": 1, "train.optimizer": 1}


def _round(r: int) -> tuple[dict[str, str], dict]:
    """(key -> text typed unquoted, key -> value expected) of round ``r``."""
    typed, want = {}, {}
    for key, choice in CHOICES.items():
        value = choice.values[(r + SHIFT.get(key, 0)) % len(choice.values)]
        if isinstance(value, bool):
            text = [w for w, b in BOOL_WORDS.items() if b is value][r % 3]
        else:
            text = str(value)
        typed[key], want[key] = text, value
    if want["model.connection"] == "ngpt":  # nGPT takes no experts and no DeepSpeed (odd rounds)
        if want["parallel.engine"] == "deepspeed":
            typed["model.connection"] = want["model.connection"] = "residual"
        else:
            typed["model.ffn_pattern"] = want["model.ffn_pattern"] = "S"
    for key, hint in leaf_fields().items():
        if hint is bool:
            typed[key], want[key] = SPELLINGS[r], BOOL_WORDS[SPELLINGS[r]]
    return typed, want


def _get(tree, key: str):
    for part in key.split("."):
        tree = tree[part] if isinstance(tree, dict) else getattr(tree, part)
    return tree


def _emit(tree: dict, indent: str = "") -> str:
    """Block YAML of a nested dict whose leaves are the texts to write unquoted."""
    return "".join(f"{indent}{k}:\n{_emit(v, indent + '  ')}" if isinstance(v, dict) else f"{indent}{k}: {v}\n"
                   for k, v in tree.items())


def test_documented_enum_values_and_boolean_spellings_load_unquoted_from_yaml(tmp_path):
    for r in range(len(SPELLINGS)):
        typed, want = _round(r)
        nested: dict = {"model": {"preset": "hybrid-tiny"}}
        for key, text in typed.items():
            *sections, leaf = key.split(".")
            node = nested
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = text
        path = tmp_path / f"round{r}.yaml"
        path.write_text(_emit(nested))
        cfg = load_config(path)
        for key, value in want.items():
            assert _get(cfg, key) == value, (r, key, _get(cfg, key))
        # The saved form of the resolved config loads back to the same values.
        again = tmp_path / f"saved{r}.yaml"
        again.write_text(to_yaml(cfg))
        assert load_config(again) == cfg


def test_documented_enum_values_and_boolean_spellings_are_accepted_as_typed_on_the_cli(tmp_path):
    """What a user types, in a fresh process: ``--print-config`` resolves and writes nothing."""
    for r in range(len(SPELLINGS)):
        typed, want = _round(r)
        proc = subprocess.run([sys.executable, "-m", "braid.train", "--config", str(TINY), "--print-config",
                               *(f"{k}={v}" for k, v in typed.items())],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (r, proc.stderr)
        printed = yaml.safe_load(proc.stdout)
        for key, value in want.items():
            assert _get(printed, key) == value, (r, key, _get(printed, key))
    assert list(tmp_path.iterdir()) == [], "--print-config must not write files"
