"""Self-contained Hugging Face modeling code for braid models no stock class matches.

The generated ``modeling_braid.py`` carries braid's own model source as embedded module texts,
served to Python by a small import hook under a private package name (``_braid_<hash>``), so the
exported model runs exactly braid's forward — every mixer, connection and kernel — without importing
(or needing) braid. Generating it from the source, rather than keeping a second hand-written
implementation, is what makes parity exact and keeps new mixers exportable.

The bundle holds every braid module the model can import, unmodified (a reduced copy drifts from
what the modules import): static imports anywhere in a module (also inside functions), braid module
paths named in strings (the registry's ``"braid.models.x:Cls"``) and, where a module imports by a
computed name (the Triton kernel loader's ``import_module(f"{__name__}.{name}")``), every module of
the package the name is built in. The third-party packages the bundle needs at load time (omegaconf
for ``braid.config``) are imported at the top of the generated file, so that transformers names any
that is missing before it loads the model.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
from pathlib import Path
from typing import NamedTuple

import braid

BRAID_ROOT = Path(braid.__file__).resolve().parent
ROOTS = ("braid.config", "braid.models.hybrid")  # what the generated wrapper imports (see _TEMPLATE)
# Imported by the wrapper itself, or installed with transformers (PyYAML is one of its requirements and
# transformers imports it before any remote code runs), so never missing where the export loads.
_WRAPPER_IMPORTS = {"torch", "transformers", "yaml"}
_MODULE_STRING = re.compile(r"(braid(?:\.\w+)+)(?::[\w.]+)?")


class _Imports(NamedTuple):
    modules: set[str]  # braid modules this one can import
    eager: set[str]  # of them, those imported when this one is
    external: set[str]  # top-level packages other than braid imported when this one is


def _module_file(name: str) -> Path | None:
    parts = name.split(".")[1:]
    if not parts:
        return BRAID_ROOT / "__init__.py"
    rel = Path(*parts)
    for cand in (BRAID_ROOT / rel.with_suffix(".py"), BRAID_ROOT / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _package_modules(package: str) -> set[str]:
    """Every module in ``package`` and its subpackages."""
    init = _module_file(package)
    if init is None or init.name != "__init__.py":
        return set()
    found = set()
    for path in init.parent.rglob("*.py"):
        parts = path.relative_to(BRAID_ROOT).with_suffix("").parts
        found.add(".".join(("braid",) + (parts[:-1] if parts[-1] == "__init__" else parts)))
    return found


def _is_braid(name: str) -> bool:
    return name == "braid" or name.startswith("braid.")


def _dynamic_target(call: ast.Call, package: str) -> set[str]:
    """Modules an ``importlib.import_module``/``__import__`` call can import."""
    arg = call.args[0] if call.args else None
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        name = arg.value
        if name.startswith("."):  # relative to the caller's package (import_module(".x", __package__))
            name = package + name
        return {name} if _is_braid(name) else set()
    # A computed name (f"{__name__}.{x}" in the Triton loader, the registry's entries): braid builds
    # such names in the caller's own package; a full name written elsewhere is caught as a string.
    return _package_modules(package)


def _imports(source: str, name: str, is_pkg: bool) -> _Imports:
    tree = ast.parse(source)
    package = name if is_pkg else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    modules, eager, external = set(), set(), set()
    for node in ast.walk(tree):
        names: set[str] = set()
        if isinstance(node, ast.Import):
            names = {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            names = {mod} if mod != "__future__" else set()
            # `from braid.kernels import attention_blocked` imports a submodule
            names |= {f"{mod}.{a.name}" for a in node.names if _is_braid(mod) and _module_file(f"{mod}.{a.name}")}
        elif isinstance(node, ast.Call) and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))):
            modules |= _dynamic_target(node, package)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _MODULE_STRING.fullmatch(node.value)
            if match and _module_file(match.group(1)):
                modules.add(match.group(1))
        braid_names = {n for n in names if _is_braid(n)}
        modules |= braid_names
        if id(node) in top_level:  # imports inside functions, `if` or `try` are lazy or optional
            eager |= braid_names
            external |= {n.split(".")[0] for n in names - braid_names}
    return _Imports(modules, eager, external)


def _bundle() -> tuple[dict[str, tuple[str, bool]], set[str]]:
    """``({module name: (source, is_package)}, third-party packages imported at load time)``."""
    done: dict[str, tuple[str, bool]] = {}
    imports: dict[str, _Imports] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name in done:
            continue
        path = _module_file(name)
        if path is None:  # not a module of this tree: braid cannot import it either
            continue
        source = path.read_text()
        done[name] = (source, path.name == "__init__.py")
        # Importing a module imports its parent packages first.
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        imports[name] = _imports(source, name, done[name][1])
        imports[name].eager.update(parents)
        todo += sorted(imports[name].modules | parents - set(done))
    eager, todo = set(), list(ROOTS)
    while todo:
        name = todo.pop()
        if name in eager or name not in imports:
            continue
        eager.add(name)
        todo += sorted(imports[name].eager)
    external = set().union(*(imports[n].external for n in eager))
    return done, external - set(sys.stdlib_module_names) - _WRAPPER_IMPORTS


def requirements() -> set[str]:
    """Third-party packages (besides torch and transformers) the bundle imports at load time."""
    return _bundle()[1]


def model_sources() -> dict[str, tuple[str, bool]]:
    """``{module name: (source, is_package)}`` of every braid module a HybridLM can import."""
    return _bundle()[0]


def _rename(source: str, package: str) -> str:
    # Every reference to the braid package (imports, the registry's "braid.models.x:Cls" entries).
    return re.sub(r"\bbraid(?=[.\s:])", package, source)


_TEMPLATE = '''"""Hugging Face modeling code for a braid model (generated by `python -m braid.convert to-hf`).

Self-contained: needs torch, transformers and the packages imported below only. braid's model
source is embedded below and served by an import hook under the private package name {package!r};
the classes at the end wrap its HybridLM as a transformers causal LM (load with trust_remote_code=True).
"""

import dataclasses
import importlib
import importlib.abc
import importlib.util
import os
import sys

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
{requirements}
_PACKAGE = {package!r}
_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = {sources}


class _BundleImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the embedded modules (and only them) to the import system."""

    def find_spec(self, name, path=None, target=None):
        if name in _SOURCES:
            return importlib.util.spec_from_loader(name, self, is_package=_SOURCES[name][1])
        return None

    def create_module(self, spec):
        return None

    def get_source(self, name):
        # What inspect and linecache read: Triton compiles its kernels from their source text.
        return _SOURCES[name][0]

    def exec_module(self, module):
        # A path where the module would lie (none does): code that locates files next to itself
        # finds none, and tracebacks and inspect get the source through get_source.
        parts = module.__name__.split(".")
        rel = parts + ["__init__.py"] if _SOURCES[module.__name__][1] else parts[:-1] + [parts[-1] + ".py"]
        module.__file__ = os.path.join(_HERE, *rel)
        exec(compile(_SOURCES[module.__name__][0], module.__file__, "exec"), module.__dict__)


if not any(getattr(f, "braid_package", None) == _PACKAGE for f in sys.meta_path):
    _importer = _BundleImporter()
    _importer.braid_package = _PACKAGE
    sys.meta_path.insert(0, _importer)

_config_mod = importlib.import_module(_PACKAGE + ".config")
_hybrid = importlib.import_module(_PACKAGE + ".models.hybrid")


def _model_config(d):
    """The nested dict of config.json's ``braid_model`` → braid's ModelConfig dataclass."""
    kwargs = {{}}
    for f in dataclasses.fields(_config_mod.ModelConfig):
        if f.name not in d:
            continue
        value = d[f.name]
        if isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
            value = type(f.default_factory())(**value)
        kwargs[f.name] = value
    return _config_mod.ModelConfig(**kwargs)


class BraidConfig(PretrainedConfig):
    model_type = "braid"

    def __init__(self, braid_model=None, **kwargs):
        self.braid_model = dict(braid_model or {{}})
        kwargs.setdefault("tie_word_embeddings", False)  # braid ties inside its own module
        super().__init__(**kwargs)


class BraidForCausalLM(PreTrainedModel, GenerationMixin):
    """braid's HybridLM; ``forward(input_ids [B, T])`` → ``.logits [B, T, V]`` (no KV cache: every
    call runs the whole sequence; braid.generate decodes incrementally)."""

    config_class = BraidConfig
    base_model_prefix = "braid"
    _supports_cache_class = False
    _no_split_modules = []

    def __init__(self, config):
        super().__init__(config)
        self.braid = _hybrid.HybridLM(_model_config(config.braid_model))
        self.post_init()

    def _init_weights(self, module):
        # Weights come from the checkpoint; only buffers outside the state dict (rotary
        # frequencies) must be recomputed after a meta-device build.
        if hasattr(module, "inv_freq") and hasattr(module, "reset_parameters"):
            module.reset_parameters()

    def get_input_embeddings(self):
        return self.braid.embed

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if attention_mask is not None and attention_mask.shape == input_ids.shape:
            # Right padding is harmless for a causal model; left padding would shift positions.
            if bool(((attention_mask[:, 1:] > attention_mask[:, :-1])).any()):
                raise ValueError("braid models do not support left padding; pad on the right")
        logits = self.braid(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {{"input_ids": input_ids, "attention_mask": attention_mask}}
'''


def modeling_source() -> str:
    """The text of ``modeling_braid.py`` for the current braid source tree."""
    sources, external = _bundle()
    digest = hashlib.sha256(repr(sorted(sources.items())).encode()).hexdigest()[:12]
    package = f"_braid_{digest}"
    renamed = {package + name[len("braid"):]: (_rename(src, package), is_pkg)
               for name, (src, is_pkg) in sources.items()}
    body = "{\n" + "".join(f"    {name!r}: ({src!r}, {is_pkg!r}),\n"
                           for name, (src, is_pkg) in sorted(renamed.items())) + "}"
    # Plain top-level imports: transformers checks them before loading and names a missing one.
    requirements = "".join(f"import {name}  # noqa: F401\n" for name in sorted(external))
    if requirements:
        requirements = "\n# Imported by the embedded braid modules as they load.\n" + requirements
    return _TEMPLATE.format(package=package, sources=body, requirements=requirements)
