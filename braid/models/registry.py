"""Pattern letters → mixer and FFN classes, and the option sections they declare.

A mixer declares everything about itself in its own module, next to its class::

    @register_options("kda")        # the config section model.kda
    @dataclass
    class KDAConfig: ...

    @register_mixer("K")            # the letter of model.pattern
    class KDA(nn.Module):
        cp_ops = ("kda", "local_mix")   # the seq.ops methods it calls (context parallelism reads this)
        s2_capable = False              # whether it applies model.s2 to its attention

An FFN is registered the same way with ``@register_ffn`` (letters of ``model.ffn_pattern``).

The built-in modules (``BUILTIN_MODULES``) are read from their source text (``ast``) without being
imported, because they import torch and the config (validation, the launcher's layout check) must not:
the letter, ``cp_ops``, ``s2_capable`` (literals in the registered class's own body) and the options
dataclasses (executed alone, so they may use only the names of ``_OPTION_NAMES``). Importing the module
later registers the real classes; an options class then resolves to the one already read, so both are the
same object. A module registered at run time (a test's mixer) is read from its class, and cannot add an
options section once ``braid.config`` has built ``ModelConfig``.

A mixer class is constructed as ``cls(cfg: ModelConfig, layer_idx: int)`` and called as
``mixer(x [B,T,d], seq: SeqInfo) -> [B,T,d]``; an FFN as ``cls(cfg, layer_idx)`` and ``ffn(x)``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import typing
from typing import Any, Callable, Union

# Imported only to build a model; read for their declarations (in this order: it is the order of the
# option sections in ModelConfig and in --print-config).
BUILTIN_MODULES = (
    "braid.models.attention",  # A softmax attention (GQA, RoPE, QK-norm, window)
    "braid.models.gated_attention",  # G + sigmoid output gate (Qiu et al.)
    "braid.models.fox",  # F Forgetting Transformer
    "braid.models.kda",  # K Kimi Delta Attention
    "braid.models.mla",  # M multi-head latent attention
    "braid.models.hymba",  # H Hymba hybrid attention + SSM heads
    "braid.models.ffn",  # S SwiGLU, - no FFN
    "braid.models.moe",  # E mixture of experts
    "braid.models.gated_deltanet",  # D Gated DeltaNet; after the FFNs so the older sections keep their order
)
# Declarations a mixer class may make, with the value a class that makes none has.
MIXER_DECLARATIONS: dict[str, Any] = {"cp_ops": (), "s2_capable": False}
# What an options dataclass may use: it is executed without its module.
_OPTION_NAMES = {"dataclass": dataclasses.dataclass, "field": dataclasses.field,
                 **{name: getattr(typing, name) for name in ("Any", "Dict", "List", "Optional", "Tuple", "Union")}}

_Entry = Union[str, type]  # "module:Class" until the class is imported
_MIXERS: dict[str, _Entry] = {}
_FFNS: dict[str, _Entry] = {}
_DECLARED: dict[str, dict[str, Any]] = {}  # "module:Class" → its declarations read from the source
_OPTIONS: dict[str, type] = {}  # config section name → options dataclass, in registration order
_frozen = False  # braid.config has built ModelConfig from _OPTIONS


def _register(table: dict[str, _Entry], other: dict[str, _Entry], kind: str, letter: str) -> Callable[[type], type]:
    if len(letter) != 1:
        raise ValueError(f"{kind} letter must be a single character, got {letter!r}")
    if letter in "*|" or letter in other:  # '*' and '|' are Megatron pattern letters; see hybrid_pattern.py
        raise ValueError(f"{kind} letter {letter!r} is taken by the pattern syntax or the other table")

    def deco(cls: type) -> type:
        if letter in table and table[letter] is not cls and not _same(table[letter], cls):
            raise ValueError(f"{kind} letter {letter!r} is already registered to {table[letter]}")
        table[letter] = cls
        return cls

    return deco


def _same(entry: _Entry, cls: type) -> bool:
    return isinstance(entry, str) and entry == f"{cls.__module__}:{cls.__qualname__}"


def _resolve(table: dict[str, _Entry], kind: str, letter: str) -> type:
    if letter not in table:
        raise KeyError(f"unknown {kind} letter {letter!r} (known: {''.join(sorted(table))})")
    entry = table[letter]
    if isinstance(entry, str):
        module, name = entry.split(":")
        entry = getattr(importlib.import_module(module), name)
        table[letter] = entry
    return entry


def register_mixer(letter: str) -> Callable[[type], type]:
    """Class decorator: make ``letter`` in ``model.pattern`` build this mixer."""
    return _register(_MIXERS, _FFNS, "mixer", letter)


def register_ffn(letter: str) -> Callable[[type], type]:
    """Class decorator: make ``letter`` in ``model.ffn_pattern`` build this FFN."""
    return _register(_FFNS, _MIXERS, "ffn", letter)


def register_options(section: str) -> Callable[[type], type]:
    """Class decorator on a dataclass: the config section ``model.<section>`` of the mixer in its module."""

    def deco(cls: type) -> type:
        known = _OPTIONS.get(section)
        if known is not None:
            if (known.__module__, known.__qualname__) == (cls.__module__, cls.__qualname__):
                return known  # the class read from this module's source: keep one class object
            raise ValueError(f"options section {section!r} is already registered to {known.__module__}")
        if _frozen:
            raise ValueError(f"options section {section!r} registered after braid.config built ModelConfig")
        _OPTIONS[section] = cls
        return cls

    return deco


def mixer_class(letter: str) -> type:
    return _resolve(_MIXERS, "mixer", letter)


def ffn_class(letter: str) -> type:
    return _resolve(_FFNS, "ffn", letter)


def mixer_letters() -> typing.KeysView[str]:
    """The registered letters (a set-like view), in registration order."""
    return dict.fromkeys(_MIXERS).keys()


def ffn_letters() -> typing.KeysView[str]:
    return dict.fromkeys(_FFNS).keys()


def mixer_declaration(letter: str, name: str) -> Any:
    """What the mixer of ``letter`` declares as ``name`` (see MIXER_DECLARATIONS), without importing it."""
    entry = _MIXERS[letter]
    if isinstance(entry, str):
        return _DECLARED.get(entry, {}).get(name, MIXER_DECLARATIONS[name])
    return getattr(entry, name, MIXER_DECLARATIONS[name])


def option_sections() -> dict[str, type]:
    """``{section: options dataclass}`` of every registered mixer/FFN, in registration order."""
    return dict(_OPTIONS)


def freeze_options() -> dict[str, type]:
    """Called by braid.config when it builds ModelConfig: later sections would not be in it."""
    global _frozen
    _frozen = True
    return option_sections()


def section_layers(section: str, pattern: str, ffn_pattern: str) -> list[int]:
    """Indices of the layers whose mixer or FFN is declared in the module of options ``section``."""
    module = _OPTIONS[section].__module__
    ffn = ffn_pattern * len(pattern) if len(ffn_pattern) == 1 else ffn_pattern

    def owner(entry: _Entry) -> str:
        return entry.split(":")[0] if isinstance(entry, str) else entry.__module__

    return [i for i, (mix, f) in enumerate(zip(pattern, ffn))
            if (mix in _MIXERS and owner(_MIXERS[mix]) == module) or (f in _FFNS and owner(_FFNS[f]) == module)]


# ----------------------------------------------------------------------------- reading the built-in modules


def _call_name(node: ast.expr) -> str:
    func = node.func if isinstance(node, ast.Call) else node
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _literal_arg(node: ast.expr, module: str, cls: str) -> str:
    if not (isinstance(node, ast.Call) and len(node.args) == 1 and isinstance(node.args[0], ast.Constant)):
        raise ValueError(f"{module}.{cls}: {_call_name(node)}(...) takes one literal string")
    return node.args[0].value


def _read_module(module: str) -> None:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.loader is None:
        raise ImportError(f"built-in mixer module {module} is missing")
    tree = ast.parse(spec.loader.get_source(module), module)
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for deco in node.decorator_list:
            kind = _call_name(deco)
            if kind in ("register_mixer", "register_ffn"):
                letter = _literal_arg(deco, module, node.name)
                target = f"{module}:{node.name}"
                table, other = (_MIXERS, _FFNS) if kind == "register_mixer" else (_FFNS, _MIXERS)
                _register(table, other, kind[len("register_"):], letter)(target)  # type: ignore[arg-type]
                _DECLARED[target] = _class_literals(node, module)
            elif kind == "register_options":
                _OPTIONS.setdefault(_literal_arg(deco, module, node.name),
                                    _options_class(node, module, spec.origin or module))


def _class_literals(node: ast.ClassDef, module: str) -> dict[str, Any]:
    found = {}
    for stmt in node.body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(
            stmt, ast.AnnAssign) and stmt.value is not None else []
        for target in targets:
            if isinstance(target, ast.Name) and target.id in MIXER_DECLARATIONS:
                try:
                    found[target.id] = ast.literal_eval(stmt.value)
                except ValueError:
                    raise ValueError(f"{module}.{node.name}.{target.id} must be a literal (it is read without "
                                     "importing the module)") from None
    return found


def _options_class(node: ast.ClassDef, module: str, filename: str) -> type:
    """Execute the dataclass definition alone (decorators other than @dataclass dropped); its line numbers
    and ``filename`` are the module's, so tracebacks show its source."""
    node = ast.ClassDef(**{**node.__dict__, "decorator_list": [d for d in node.decorator_list
                                                               if _call_name(d) == "dataclass"]})
    code = compile(ast.fix_missing_locations(ast.Module(body=[node], type_ignores=[])), filename, "exec",
                   dont_inherit=True)  # annotations evaluated here: the module's globals are not there
    namespace = {"__name__": module, **_OPTION_NAMES}
    exec(code, namespace)
    return namespace[node.name]


for _module in BUILTIN_MODULES:
    _read_module(_module)
