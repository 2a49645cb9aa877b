"""Hugging Face exports loaded where braid cannot be imported: every tiny preset's export (and the
remote code of the stock ones) gives braid's logits, every module of the embedded bundle imports, and
the bundle's Triton kernels run (interpreter) like its torch paths. In-process loads would not notice
a module missing from the bundle: the real braid would serve it."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest
import torch

import braid.kernels.triton
from braid.convert.hf_export import export_hf
from braid.convert.remote_code import model_sources, requirements
from test_convert import STOCK, TINY, VOCAB, random_model

# Runs first in every child: imports of braid fail (the editable install would serve it otherwise).
NO_BRAID = textwrap.dedent("""
    import importlib, json, sys

    class NoBraid:
        def find_spec(self, name, path=None, target=None):
            if name == "braid" or name.startswith("braid."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)")

    sys.meta_path.insert(0, NoBraid())
    try:
        import braid
    except ImportError:
        pass
    else:
        raise SystemExit(f"braid imports from {braid.__file__}")
    import torch
    """)

LOAD_ALL = NO_BRAID + textwrap.dedent("""
    from transformers import AutoModelForCausalLM

    cases, device, needs = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    result, bundles = {}, {}

    class Without:  # the bundle's third-party requirements uninstalled: transformers names them
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in needs:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)")

    remote = next(path for path in cases.values() if json.load(open(path + "/config.json"))["model_type"] == "braid")
    assert not set(needs) & set(sys.modules), "imported before the check"
    sys.meta_path.insert(0, Without())
    try:
        AutoModelForCausalLM.from_pretrained(remote, trust_remote_code=True)
    except ImportError as e:
        result["without requirements"] = str(e)
    sys.meta_path.pop(0)

    for name, path in cases.items():
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
        x, ref = torch.load(f"{path}/ref-{device}.pt", map_location=device)
        with torch.no_grad():
            logits = model.to(device).eval()(input_ids=x).logits
        result[name] = {"class": type(model).__name__, "err": (logits - ref).abs().max().item()}
        bundle = sys.modules[type(model).__module__]
        if hasattr(bundle, "_SOURCES"):
            bundles[bundle._PACKAGE] = sorted(bundle._SOURCES)
    (package, modules), = bundles.items()  # one bundle for one braid source tree
    ran = sorted(n for n in sys.modules if n.startswith(package + ".kernels.triton."))
    for module in modules:  # in compiled Triton mode: @jit reads each kernel's source
        importlib.import_module(module)
    result["bundle"] = {"package": package, "modules": modules, "ran": ran}
    print(json.dumps(result))
    """)

TRITON_PATHS = NO_BRAID + textwrap.dedent("""
    import importlib.util
    import torch.nn.functional as F

    spec = importlib.util.spec_from_file_location("modeling_braid", sys.argv[1])
    bundle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bundle)
    kernels = importlib.import_module(bundle._PACKAGE + ".kernels")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 21, h, 16, generator=g) for h in (4, 2, 2))
    args = {
        "attention": ((q, k, v), dict(log_forget=-torch.rand(1, 21, 4, generator=g), window=9)),
        "kda": ((F.normalize(q, dim=-1), F.normalize(torch.randn(1, 21, 4, 16, generator=g), dim=-1),
                 torch.randn(1, 21, 4, 8, generator=g), -0.5 * torch.rand(1, 21, 4, 16, generator=g),
                 torch.rand(1, 21, 4, generator=g)), dict(chunk_size=16)),
        "selective_scan": ((), dict(u=torch.randn(1, 21, 6, generator=g), dt=torch.rand(1, 21, 6, generator=g) + 0.01,
                                    A=-torch.rand(6, 3, generator=g) - 0.1, B=torch.randn(1, 21, 3, generator=g),
                                    C=torch.randn(1, 21, 3, generator=g), chunk_size=8)),
    }
    result = {}
    for op, (a, kw) in args.items():
        outs = [getattr(kernels, op)(*a, **kw, backend=b) for b in ("triton", "torch")]
        tri, ref = (o[0] if isinstance(o, tuple) else o for o in outs)
        result[op] = ((tri - ref).norm() / ref.norm()).item()
    result["loaded"] = sorted(n for n in sys.modules if n.startswith(bundle._PACKAGE + ".kernels.triton."))
    print(json.dumps(result))
    """)


def child(script: str, *argv: str, cwd, **env) -> dict:
    """``script`` in ``python -I`` (no PYTHONPATH, no user site, no script dir on sys.path) from ``cwd``."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-I", "-c", script, *argv], capture_output=True, text=True,
                         timeout=280, cwd=str(cwd), env={**environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def triton_modules() -> set[str]:
    """braid.kernels.triton's modules, listed by the import system (not by the bundler's rules)."""
    pkg = braid.kernels.triton
    return {pkg.__name__} | {m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")}


def export_all(root, presets, device: str, remote_only: bool = False) -> dict:
    """{case: HF dir} for each preset's export (``remote_only``: those written as remote code) and the
    stock presets' forced remote code, each with (X, braid's logits on ``device``) in ref-<device>.pt."""
    x = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1)).to(device)
    cases = {}
    for preset in presets:
        model, cfg = random_model(preset)
        with torch.no_grad():
            ref = model.to(device)(x)
        exports = [(preset + ":remote", True)] if preset in STOCK else []
        if not (remote_only and preset in STOCK):
            exports.insert(0, (preset, False))
        for name, force in exports:
            export_hf(model, cfg, root / name, force_remote_code=force)
            torch.save((x, ref), root / name / f"ref-{device}.pt")
            cases[name] = str(root / name)
    return cases


def check_loads(root, cases, device: str) -> dict:
    """Every case loaded by transformers in a child without braid, on ``device``: class and logits;
    returns the bundle's report (its modules, and the Triton modules the forwards ran)."""
    result = child(LOAD_ALL, json.dumps(cases), device, json.dumps(sorted(requirements())), cwd=root)
    missing = result.get("without requirements")  # transformers' own check, before the bundle runs
    if requirements():
        assert missing and "pip install" in missing and all(name in missing for name in requirements()), missing
    else:
        assert missing is None, missing
    for name in cases:
        preset, remote = name.split(":")[0], name.endswith(":remote")
        want = "BraidForCausalLM" if remote else STOCK.get(preset, "BraidForCausalLM")
        assert result[name]["class"] == want, name
        assert result[name]["err"] <= 1e-4, (name, result[name]["err"])
    bundle = result["bundle"]
    bundled = {"braid" + n[len(bundle["package"]):] for n in bundle["modules"]}
    assert bundled == set(model_sources())  # each of them imported
    assert triton_modules() <= bundled  # loaded by name (braid.kernels.triton.load), not by import
    return bundle


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return root, export_all(root, TINY, "cpu")


def test_every_export_loads_without_braid(exports):
    bundle = check_loads(*exports, "cpu")
    assert bundle["ran"] == []  # CPU tensors take the torch paths


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the exported models' Triton paths)")
def test_every_export_runs_on_cuda(tmp_path):
    """On CUDA, backend="auto" runs the bundle's Triton kernels: the remote-code exports give braid's
    CUDA logits (the same kernels; stock classes run transformers' own code, not this bundle)."""
    bundle = check_loads(tmp_path, export_all(tmp_path, TINY, "cuda", remote_only=True), "cuda")
    assert {n.rsplit(".", 1)[1] for n in bundle["ran"]} >= {"attention_kernels", "kda_intra", "kda_state", "scan"}


def test_bundled_triton_kernels_match_torch(exports):
    """The bundle's attention (FoX gates, window, GQA), KDA and selective scan with backend="triton"
    (Triton's interpreter, fp32) equal their torch paths."""
    root, _ = exports
    result = child(TRITON_PATHS, str(root / "hybrid-tiny" / "modeling_braid.py"), cwd=root, TRITON_INTERPRET="1")
    for op in ("attention", "kda", "selective_scan"):
        assert result[op] < 1e-5, (op, result[op])
    assert {n.rsplit(".", 1)[1] for n in result["loaded"]} >= {"attention_kernels", "kda_intra", "kda_state", "scan"}
