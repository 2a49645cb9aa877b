"""Start-up self-check of the Triton kernels that ``backend="auto"`` picks.

Before a Triton kernel serves a call signature (op, dtype, head dim, mask kind, ...) for the first time
in a process, it runs once on a small random case with the same signature and is compared, forward
and every gradient, with the torch path in fp32 on the same inputs. A relative RMS error above the
dtype's tolerance, a non-finite value or an exception (a launch failure: out of shared memory, a
compile error) sends that op to torch for the rest of the process, with one warning line naming it.
Explicit ``backend="triton"`` is never checked (tests and benchmarks ask for the kernel itself).

``configure(enabled=False)`` (config key ``kernels.self_check=false``) turns the check off.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

log = logging.getLogger("braid")

# Relative RMS error allowed against the fp32 torch path: a few rounding steps of the dtype (fp32
# leaves room for TF32 tensor-core matmuls inside the kernels).
TOLERANCE = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}

_enabled = True
_passed: set = set()  # signatures checked and found good
_failed: dict[str, str] = {}  # op -> why it runs on torch for this process
CASES: dict[str, Callable[[tuple, torch.device], list[tuple[str, torch.Tensor, torch.Tensor]]]] = {}


def configure(enabled: bool = True) -> None:
    """Turn the self-check on or off for this process (``kernels.self_check``)."""
    global _enabled
    _enabled = bool(enabled)


def reset() -> None:
    """Forget every verdict (tests)."""
    _passed.clear()
    _failed.clear()


def failed_ops() -> dict[str, str]:
    """Ops sent back to torch in this process, with the reason."""
    return dict(_failed)


def case(op: str):
    """Register the small-case runner of ``op``: ``fn(signature, device)`` returns ``[(name, triton
    tensor, fp32 torch tensor), ...]`` (outputs and gradients)."""
    def wrap(fn):
        CASES[op] = fn
        return fn
    return wrap


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    den = float(torch.linalg.vector_norm(b))
    num = float(torch.linalg.vector_norm(a - b))
    return num / den if den > 0 else num


def triton_ok(op: str, signature: tuple, device: torch.device) -> bool:
    """Whether ``op``'s Triton kernel may serve ``signature`` (``signature[0]`` is the dtype)."""
    if not _enabled:
        return True
    if op in _failed:
        return False
    key = (op, signature)
    if key in _passed:
        return True
    why = _run(op, signature, device)
    if why is None:
        _passed.add(key)
        return True
    _failed[op] = why
    log.warning("braid: Triton %s failed its start-up self-check (%s, signature %s); %s runs on torch in this "
                "process (kernels.self_check=false skips the check)", op, why, _describe(signature), op)
    return False


@torch.compiler.disable
def _run(op: str, signature: tuple, device: torch.device) -> Optional[str]:
    """None when the kernel agrees with torch, else a short reason."""
    tol = TOLERANCE.get(signature[0], TOLERANCE[torch.float32])
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            pairs = CASES[op](signature, device)
    except Exception as exc:  # a launch or compile failure is what this check is for
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0][:160] if text else ''}"
    for name, got, ref in pairs:
        if not torch.isfinite(got).all():
            return f"{name} is not finite"
        err = rel_rms(got, ref)
        if not err <= tol:
            return f"{name} relative RMS error {err:.2e} > {tol:.0e}"
    return None


def _describe(signature: tuple) -> str:
    return "(" + ", ".join(str(s).replace("torch.", "") for s in signature) + ")"


def _gen(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)  # its own stream: the run's RNG is untouched


def run_both(fn_triton, fn_torch, inputs: list, dtype: torch.dtype, grad: list[bool], gen: torch.Generator):
    """Forward and backward of both paths; the torch one on fp32 copies of the same inputs.

    ``fn_*`` return a tuple of tensors; every output gets a random upstream gradient.
    """
    pairs = []
    results = []
    for fn, to_dtype in ((fn_triton, dtype), (fn_torch, torch.float32)):
        xs = [None if x is None else (x.to(to_dtype) if x.is_floating_point() and g != "keep" else x)
              .detach().requires_grad_(g is True) for x, g in zip(inputs, grad)]
        results.append((xs, fn(*xs)))
    outs_t, outs_r = results[0][1], results[1][1]
    ups = [torch.randn(o.shape, generator=gen, device=o.device) for o in outs_r]
    for fn_i, (xs, outs) in enumerate(results):
        live = [(o, u) for o, u in zip(outs, ups) if o.requires_grad]
        wrt = [x for x in xs if x is not None and x.requires_grad]
        if live and wrt:
            torch.autograd.backward([o for o, _ in live], [torch.where(torch.isfinite(o), u, 0).to(o.dtype)
                                                           for o, u in live])
    for i, (a, b) in enumerate(zip(outs_t, outs_r)):
        fin = torch.isfinite(b)  # lse of a row with no visible key is −inf on both paths
        pairs.append((f"output {i}", torch.where(fin, a.float(), 0), torch.where(fin, b, 0)))
    for j, (a, b) in enumerate(zip(results[0][0], results[1][0])):
        if a is not None and a.requires_grad:
            pairs.append((f"gradient {j}", a.grad if a.grad is not None else torch.zeros_like(a),
                          b.grad if b.grad is not None else torch.zeros_like(b)))
    return pairs


# ------------------------------------------------------------------ the cases, one per op

@case("rms_norm")
def _rms_norm_case(sig, device):
    from braid.kernels.fused import rms_norm

    dtype, dim = sig
    g = _gen(device)
    x = torch.randn(3, 5, dim, generator=g, device=device) * 2
    w = 1 + 0.3 * torch.randn(dim, generator=g, device=device)
    return run_both(lambda a, b: (rms_norm(a, b, 1e-5, backend="triton"),),
                    lambda a, b: (rms_norm(a, b, 1e-5, backend="torch"),), [x, w], dtype, [True, True], g)


@case("swiglu")
def _swiglu_case(sig, device):
    from braid.kernels.fused import swiglu

    dtype, = sig
    g = _gen(device)
    a, b = (torch.randn(3, 5, 200, generator=g, device=device) * 2 for _ in range(2))
    return run_both(lambda x, y: (swiglu(x, y, backend="triton"),), lambda x, y: (swiglu(x, y, backend="torch"),),
                    [a, b], dtype, [True, True], g)


def attention_signature(q, k, v, *, causal, window, sink, doc_ids, log_forget, s2, return_lse) -> tuple:
    """(dtype, head dim, value head dim, GQA, mask kind) of an attention call."""
    kind = "+".join(name for name, on in (
        ("causal", causal), ("window", window is not None), ("sink", bool(sink)), ("doc", doc_ids is not None),
        ("forget", log_forget is not None), ("s2", s2 is not None), ("lse", return_lse),
        ("offset", q.shape[1] != k.shape[1])) if on) or "full"
    s2_key = None if s2 is None else (s2.block, s2.local_blocks, s2.vert_stride)
    return (q.dtype, q.shape[-1], v.shape[-1], q.shape[2] != k.shape[2], kind, s2_key)


@case("attention")
def _attention_case(sig, device):
    from braid.kernels.attention import attention
    from braid.kernels.s2 import S2Pattern

    dtype, d, dv, gqa, kind, s2_key = sig
    flags = set(kind.split("+"))
    g = _gen(device)
    s2 = None
    if s2_key is not None:
        # The call's block size (the kernel's tiles follow it), few blocks: 4 of them, 1 local, stride 2.
        s2 = S2Pattern(block=s2_key[0], local_blocks=1, vert_stride=2)
        s = 4 * s2_key[0]
    else:
        s = 80
    t = s // 2 if "offset" in flags else s
    hq, hkv = (4, 2) if gqa else (2, 2)
    q = torch.randn(1, t, hq, d, generator=g, device=device)
    k = torch.randn(1, s, hkv, d, generator=g, device=device)
    v = torch.randn(1, s, hkv, dv, generator=g, device=device)
    doc = torch.cat([torch.zeros(1, s // 3, dtype=torch.long), torch.ones(1, s - s // 3, dtype=torch.long)], 1) \
        .to(device) if "doc" in flags else None
    lf = torch.nn.functional.logsigmoid(3 + torch.randn(1, s, hq, generator=g, device=device)) \
        if "forget" in flags else None
    kw = dict(causal="causal" in flags, window=24 if "window" in flags else None, sink=4 if "sink" in flags else 0,
              doc_ids=doc, s2=s2, return_lse="lse" in flags)

    def run(backend):
        def fn(q_, k_, v_, lf_):
            out = attention(q_, k_, v_, log_forget=lf_, backend=backend, **kw)
            return out if isinstance(out, tuple) else (out,)
        return fn

    return run_both(run("triton"), run("torch"), [q, k, v, lf], dtype, [True, True, True, "keep"], g)


def kda_signature(q, v, *, chunk_size, doc_ids, initial_state, restart_state) -> tuple:
    return (q.dtype, q.shape[-1], v.shape[-1], chunk_size, doc_ids is not None, initial_state is not None,
            restart_state is not None)


@case("kda")
def _kda_case(sig, device):
    from braid.kernels.kda import kda

    dtype, dk, dv, chunk, has_doc, has_init, has_restart = sig
    g = _gen(device)
    b, t, h = 1, 2 * chunk + 7, 2
    q, k = (torch.nn.functional.normalize(torch.randn(b, t, h, dk, generator=g, device=device), dim=-1)
            for _ in range(2))
    v = torch.randn(b, t, h, dv, generator=g, device=device)
    gate = -torch.nn.functional.softplus(torch.randn(b, t, h, dk, generator=g, device=device) - 2)
    beta = torch.sigmoid(torch.randn(b, t, h, generator=g, device=device))
    s0 = 0.1 * torch.randn(b, h, dk, dv, generator=g, device=device) if has_init else None
    sr = 0.1 * torch.randn(b, h, dk, dv, generator=g, device=device) if has_restart else None
    doc = (torch.arange(t, device=device) >= t // 2).long()[None] if has_doc else None

    def run(backend):
        def fn(q_, k_, v_, g_, beta_, s0_, sr_):
            o, s = kda(q_, k_, v_, g_, beta_, initial_state=s0_, output_final_state=True, chunk_size=chunk,
                       doc_ids=doc, restart_state=sr_, backend=backend)
            return o, s
        return fn

    return run_both(run("triton"), run("torch"), [q, k, v, gate, beta, s0, sr], dtype,
                    [True, True, True, True, True, "keep", "keep"], g)


def scan_signature(u, A, *, D, z, initial_state, reset, chunk_size) -> tuple:
    return (u.dtype, A.shape[-1], D is not None, z is not None, initial_state is not None, reset is not None,
            chunk_size)


@case("selective_scan")
def _scan_case(sig, device):
    from braid.kernels.ssm import selective_scan

    dtype, n, has_d, has_z, has_init, has_reset, chunk = sig
    g = _gen(device)
    b, t, c = 1, 40, 16
    u = torch.randn(b, t, c, generator=g, device=device)
    dt = torch.nn.functional.softplus(torch.randn(b, t, c, generator=g, device=device) - 1)
    a = -torch.exp(0.5 * torch.randn(c, n, generator=g, device=device))
    bm, cm = (torch.randn(b, t, n, generator=g, device=device) for _ in range(2))
    d = torch.randn(c, generator=g, device=device) if has_d else None
    z = torch.randn(b, t, c, generator=g, device=device) if has_z else None
    s0 = 0.1 * torch.randn(b, c, n, generator=g, device=device) if has_init else None
    reset = (torch.arange(t, device=device) == t // 2)[None] if has_reset else None

    def run(backend):
        def fn(u_, dt_, a_, b_, c_, d_, z_, s0_):
            return selective_scan(u_, dt_, a_, b_, c_, d_, z_, initial_state=s0_, reset=reset,
                                  output_final_state=True, chunk_size=chunk, backend=backend)
        return fn

    return run_both(run("triton"), run("torch"), [u, dt, a, bm, cm, d, z, s0], dtype,
                    [True, True, True, True, True, True, True, "keep"], g)


def cp_attention_signature(q, k, v, window, doc_ids, log_forget, s2) -> tuple:
    """The signature a context-parallel attention call (causal pairs of chunks, lse kept) checks."""
    return attention_signature(q, k, v, causal=True, window=window, sink=0, doc_ids=doc_ids, log_forget=log_forget,
                               s2=s2, return_lse=True)
