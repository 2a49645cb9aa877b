"""Pattern letters: Megatron-style ``model.pattern`` strings translated to braid's pattern + ffn_pattern +
stage_layers (and every ambiguous or unknown one refused in one line), and the declarations each mixer
makes in its own module (letter, options section, CP ops) read without importing it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from braid.config import ModelConfig, load_config, to_yaml
from braid.errors import ConfigError
from braid.models import registry
from braid.models.hybrid_pattern import translate
from braid.parallel.mesh import resolve_layout

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("megatron, pattern, ffn, stages", [
    ("*-*-", "AA", "SS", []),  # attention + MLP, twice
    ("*E*-", "AA", "ES", []),  # E: MoE
    ("**-", "AA", "-S", []),  # an attention layer with no MLP after it: no FFN
    ("K-*E|K-*-", "KAKA", "SESS", [2]),  # braid mixer letters mix with Megatron's; | starts a stage
    ("*|*|*-", "AAA", "--S", [1, 2]),
    ("G-F", "GF", "S-", []),
])
def test_megatron_pattern_translates(megatron, pattern, ffn, stages):
    assert translate(megatron, "S", registry.mixer_letters()) == (pattern, ffn, stages)
    cfg = load_config(None, [f"model.pattern={megatron}"])  # on the command line, unquoted
    assert (cfg.model.pattern, cfg.model.ffn_pattern, cfg.model.stage_layers) == (pattern, ffn, stages)


def test_braid_patterns_are_untouched():
    cfg = load_config(None, ["model.pattern=AKMH", "model.ffn_pattern=E"])
    assert (cfg.model.pattern, cfg.model.ffn_pattern, cfg.model.stage_layers) == ("AKMH", "E", [])


def test_megatron_pattern_in_yaml_and_print_config(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text('model:\n  pattern: "*-K-|*E"\n')  # YAML needs the quotes: * is an alias, | a block
    cfg = load_config(path)
    assert (cfg.model.pattern, cfg.model.ffn_pattern, cfg.model.stage_layers) == ("AKA", "SSE", [2])
    printed = to_yaml(cfg)
    assert "pattern: AKA" in printed and "ffn_pattern: SSE" in printed
    (tmp_path / "again.yaml").write_text(printed)  # the resolved config loads back to itself
    again = load_config(tmp_path / "again.yaml")
    assert (again.model.pattern, again.model.ffn_pattern, again.model.stage_layers) == ("AKA", "SSE", [2])


@pytest.mark.parametrize("overrides, key, words", [
    (["model.pattern=-*"], "model.pattern", "no mixer layer right before it"),
    (["model.pattern=*--"], "model.pattern", "position 2"),  # two FFN layers in a row
    (["model.pattern=*|-"], "model.pattern", "no mixer layer right before it in its stage"),  # layer split
    (["model.pattern=|*"], "model.pattern", "two non-empty pipeline stages"),
    (["model.pattern=*|"], "model.pattern", "two non-empty pipeline stages"),
    (["model.pattern=*||*"], "model.pattern", "two non-empty pipeline stages"),
    (["model.pattern=M*-"], "model.pattern", "Mamba"),  # M means Mamba there, MLA here
    (["model.pattern=*Q-"], "model.pattern", "unknown layer 'Q'"),
    (["model.pattern=E"], "model.pattern", "no mixer layer"),
    (["model.pattern=*-", "model.ffn_pattern=E"], "model.ffn_pattern", "Megatron-style"),
    (["model.pattern=*|*", "model.stage_layers=[1]"], "model.stage_layers", "'|' give the stages"),
    (["model.pattern=AAA", "model.stage_layers=[0]"], "model.stage_layers", "[1, 3)"),
    (["model.pattern=AAA", "model.stage_layers=[2,1]"], "model.stage_layers", "ascending"),
])
def test_bad_patterns_fail_in_one_line_naming_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message and f"'{key}'" in message and words in message, message


def test_a_preset_ffn_pattern_is_not_silently_replaced():
    with pytest.raises(ConfigError, match="model.ffn_pattern"):
        load_config(ROOT / "configs" / "tiny.yaml", ["model.pattern=*-*-"])  # hybrid-tiny sets ffn_pattern
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.pattern=*-*E", "model.ffn_pattern=S"])
    assert (cfg.model.pattern, cfg.model.ffn_pattern) == ("AA", "SE")


# ----------------------------------------------------------------------------- declarations


# The built-in mixers: a mixer registered at run time (tests/test_adding_a_mixer.py's Z) has no source declarations.
BUILTIN = sorted(x for x in registry.mixer_letters() if registry.mixer_class(x).__module__.startswith("braid."))


@pytest.mark.parametrize("letter", BUILTIN)
def test_declarations_read_from_source_match_the_class(letter):
    """What config validation reads without importing the module is what the imported class says."""
    cls = registry.mixer_class(letter)
    entry = f"{cls.__module__}:{cls.__qualname__}"
    declared = registry._DECLARED[entry]
    assert set(declared) == set(registry.MIXER_DECLARATIONS), f"{entry} must declare each of them in its own body"
    for name, value in declared.items():
        assert getattr(cls, name) == value
        assert registry.mixer_declaration(letter, name) == value
    assert cls.cp_ops and all(isinstance(op, str) for op in cls.cp_ops)


def test_options_sections_are_the_classes_of_their_modules():
    import braid.config
    import braid.models.hymba
    import braid.models.kda
    import braid.models.moe

    sections = registry.option_sections()
    assert list(sections)[:5] == ["fox", "kda", "mla", "hymba", "moe"]  # the --print-config order
    assert braid.config.KDAConfig is braid.models.kda.KDAConfig is sections["kda"]
    assert braid.config.HymbaConfig is braid.models.hymba.HymbaConfig
    assert braid.config.MoEConfig is braid.models.moe.MoEConfig
    assert isinstance(ModelConfig().kda, braid.models.kda.KDAConfig)


def test_reading_the_config_imports_no_mixer_module():
    code = ("import sys; from braid.config import load_config; "
            "from braid.models.registry import BUILTIN_MODULES; "
            "load_config(None, ['model.pattern=AKMHFG', 'model.kda.conv_size=3']); "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m in BUILTIN_MODULES); assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_cp_layout_auto_reads_the_declared_ops():
    assert resolve_layout("auto", "KK") == "contiguous"  # no mixer calls attention
    assert resolve_layout("auto", "KA") == "zigzag"
    assert resolve_layout("auto", "HH") == "zigzag"
    assert resolve_layout("contiguous", "AA") == "contiguous"


@pytest.fixture
def y_mixer():
    """A mixer registered at run time: softmax attention without S2, state-only otherwise."""
    import torch.nn as nn

    @registry.register_mixer("Y")
    class DenseSoftmax(nn.Module):
        cp_ops = ("attention",)
        s2_capable = False

    try:
        yield DenseSoftmax
    finally:
        del registry._MIXERS["Y"]


def test_runtime_mixer_declarations_drive_the_checks(y_mixer):
    assert resolve_layout("auto", "KY") == "zigzag"
    with pytest.raises(ConfigError, match="Y layers, whose attention would stay dense"):
        load_config(None, ["model.pattern=AY", "model.s2.enabled=true"])
    assert load_config(None, ["model.pattern=*-Y"]).model.pattern == "AY"


def test_megatron_letters_cannot_be_registered():
    for letter in "*|E-":
        with pytest.raises(ValueError):
            registry.register_mixer(letter)
