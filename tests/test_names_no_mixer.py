"""Nothing outside a mixer's own file names it (issue 17.1): the code of ``braid/parallel``,
``braid/trainer`` and ``braid/models/decoding.py`` holds no registered mixer's class name and no
string of pattern letters (``"E" in ffn_pattern``, ``set("K")``): they ask the modules and their
declarations instead. Docstrings and comments may explain with names; code (identifiers, imports,
string literals, messages) may not.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from braid.models.registry import ffn_letters, mixer_class, mixer_letters

ROOT = Path(__file__).resolve().parents[1]
PATHS = [*sorted((ROOT / "braid/parallel").rglob("*.py")), *sorted((ROOT / "braid/trainer").rglob("*.py")),
         ROOT / "braid/models/decoding.py"]


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are whole statements (docstrings, string comments)."""
    return {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}


def code_names(source: str) -> list[tuple[int, str, bool]]:
    """``(line, text, is_string)`` of every identifier and every non-docstring string literal of ``source``."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    out = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Name):
            out.append((line, node.id, False))
        elif isinstance(node, ast.Attribute):
            out.append((line, node.attr, False))
        elif isinstance(node, ast.alias):
            out += [(line, name, False) for name in (*node.name.split("."), node.asname) if name]
        elif isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef, ast.arg)):
            out.append((line, getattr(node, "name", None) or node.arg, False))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            out.append((line, node.value, True))
    return out


def offences(source: str, class_names: set[str], letters: set[str]) -> list[str]:
    found = []
    words = re.compile(r"\b(" + "|".join(sorted(map(re.escape, class_names))) + r")\b")
    for line, text, is_string in sorted(code_names(source)):
        if words.search(text):
            found.append(f"line {line}: {text!r} names a mixer class")
        elif is_string and re.fullmatch(r"[A-Z]+", text) and set(text) <= letters:
            found.append(f"line {line}: {text!r} is a set of pattern letters")
    return found


def _registered() -> tuple[set[str], set[str]]:
    names = {mixer_class(letter).__name__ for letter in mixer_letters()}
    letters = {ch for ch in [*mixer_letters(), *ffn_letters()] if ch.isalpha()}
    return names, letters


def test_parallel_trainer_and_decoding_code_name_no_mixer():
    names, letters = _registered()
    assert {"Attention", "KDA", "Hymba"} <= names and {"A", "K", "E"} <= letters  # the registry is read
    problems = {}
    for path in PATHS:
        found = offences(path.read_text(), names, letters)
        if found:
            problems[str(path.relative_to(ROOT))] = found
    assert not problems, "\n".join(f"{path}: {found}" for path, found in problems.items())


def test_the_check_catches_names_and_letter_sets():
    names, letters = _registered()
    code = '''"""Attention and KDA explained in a docstring are fine."""
from braid.models.attention import Attention
# a comment naming Hymba is fine
x = isinstance(m, Attention)
y = "E" in cfg.ffn_pattern
z = set("KH")
w = f"{n} Hymba layers"
ok = "attention" + "seq.ops" + "EP"
'''
    found = offences(code, names, letters)
    assert [f.split(":")[0] for f in found] == ["line 2", "line 4", "line 5", "line 6", "line 7"], found


def test_the_trainer_asks_the_modules():
    """What the trainer used to read from letters, the modules now declare: MoE layers their per-step
    statistics, the softmax attention mixers (without QK-norm) their max-logit tracking."""
    from braid.models.hybrid import HybridLM
    from braid.trainer.qk_clip import clipped_modules
    from helpers import tiny_model_config

    def declares(model):
        return any(getattr(m, "step_statistics", False) for m in model.modules())

    assert declares(HybridLM(tiny_model_config(pattern="AK", ffn_pattern="SE")))
    assert not declares(HybridLM(tiny_model_config(pattern="AK", ffn_pattern="S-")))
    model = HybridLM(tiny_model_config(pattern="AGFKMH"))
    assert [type(m).__name__ for m in clipped_modules(model)] == ["Attention", "GatedAttention", "FoX"]
