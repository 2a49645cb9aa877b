"""YAML for config files and ``key=value`` overrides, read so that the typed key decides what a word means.

YAML 1.1 (PyYAML's default) turns unquoted ``off``/``on``/``yes``/``no`` into booleans, so
``logging.wandb=off`` reached a string key as ``'False'``. Here only ``null`` and numbers are resolved
by the parser; every other scalar stays the text the user typed, and the dataclass type of its key
converts it (a bool key takes ``true/false/on/off/yes/no``, a string key keeps the word).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from braid.errors import ConfigError

_BOOL = "tag:yaml.org,2002:bool"
_FLOAT = "tag:yaml.org,2002:float"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"

# YAML 1.2 floats: an exponent needs no dot (1e-5 is a number, as users write learning rates).
_FLOAT_RE = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?
                          |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                          |[-+]?\.(?:inf|Inf|INF)
                          |\.(?:nan|NaN|NAN))$""", re.X)

# Words an untyped key (``checkpoint.export_hf``: a bool or a path) reads as booleans.
BOOL_WORDS = {"true": True, "on": True, "yes": True, "false": False, "off": False, "no": False}


class _Loader(yaml.SafeLoader):
    """SafeLoader without bool and timestamp resolution, with YAML 1.2 floats, refusing duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key_node.value}'",
                                                        key_node.start_mark)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


# The int resolver stays ahead of the float one, so "3" is still an int.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _FLOAT, _TIMESTAMP)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))


def _where(exc: yaml.YAMLError) -> str:
    """``line L, column C: problem`` of a parser error (PyYAML's message spans several lines)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc).splitlines()[0]
    at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return at + problem


def load_yaml_file(path: str | Path) -> Any:
    """The parsed document of ``path``; a syntax error names the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file '{path}' cannot be read: {exc}") from None
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {_where(exc)}") from None


def parse_value(item: str, text: str) -> Any:
    """The value of the override ``item`` (``key=text``); malformed YAML names the override."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': value is not valid YAML ({_where(exc)})") from None
