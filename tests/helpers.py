"""Small shared helpers for the unit tests."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from braid.config import ModelConfig

# conftest.py selects Triton's interpreter on machines without CUDA; where Triton runs compiled, the
# CPU-interpreter kernel tests cannot run in the same process (their GPU counterparts are
# bench/gpu_attention_check.py and bench/gpu_linear_check.py).
interpreter_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                      reason="Triton runs compiled in this process (CUDA present); the GPU "
                                             "checks are bench/gpu_*_check.py")


def compile_in_subprocess(module: str, variants: list[dict]) -> list[dict]:
    """``braid.kernels.triton.<module>.compile_for_gpu(**v)`` for each variant, in a fresh process
    without the interpreter (compiling for a GPU needs Triton in compiled mode)."""
    code = (f"import json, sys; from braid.kernels.triton.{module} import compile_for_gpu; "
            "print(json.dumps([compile_for_gpu(**v) for v in json.loads(sys.argv[1])]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's own default; set to silence its warning
    r = subprocess.run([sys.executable, "-c", code, json.dumps(variants)], env=env,
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error ``||a - b|| / ||b||`` (computed in fp64; ``b`` is the reference)."""
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def tiny_model_config(**overrides) -> ModelConfig:
    """A resolved, very small model config (2 layers, d_model 32, GQA 4/2, vocab 64)."""
    fields = dict(pattern="AA", d_model=32, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_multiple=16)
    fields.update(overrides)
    return ModelConfig(**fields)


def cp_local(x, lay, m: int):
    """This rank's part of a global ``[B, M+T, ...]`` tensor under context parallelism: the M meta rows
    (every rank has them) then its segments of layout ``lay``; None stays None."""
    return None if x is None else torch.cat([x[:, :m], lay.shard(x[:, m:], 1)], 1)


def cp_gather(x, lay, m: int, group):
    """The global tensor from every rank's local part; meta rows summed over ranks (each has a copy)."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    meta = sum(p[:, :m] for p in parts)
    return torch.cat([meta, lay.unshard([p[:, m:] for p in parts], 1)], 1)


# Memory of this process, for the tests that bound what a build or a load holds.
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> None:
    """Start the peak-RSS counter (VmHWM) from the current RSS, so the peak is the build's and not an
    earlier moment's (imports, the process group's set-up); older kernels keep the lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_bench(name: str):
    """Import ``bench/<name>.py`` without putting ``bench/`` on ``sys.path``, where its ``kernels.py`` would
    shadow the ``kernels`` package that transformers probes for when a model module is first imported."""
    import importlib.util
    import sys
    from pathlib import Path

    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module
