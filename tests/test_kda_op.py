"""The KDA op: the chunked path against the token-by-token recurrence (outputs, final state and every
gradient), odd lengths, strong decays, continuation from a final state, document resets (to zeros or
to a restart state), decoding steps, gradcheck, dtypes and linear memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from braid.kernels import kda
from braid.kernels.kda import kda_recurrent, kda_recurrent_step
from braid.kernels.kda_chunk import kda_chunk
from helpers import rel_rms

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_inputs(b=2, t=37, h=2, dk=16, dv=12, *, dtype=torch.float64, decay=0.5, seed=0):
    """Random q, k (unit norm, as the layer feeds them), v, g ∈ [−decay, 0), β ∈ (0, 1), state."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, t, h, dk, generator=gen, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(b, t, h, dk, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(b, t, h, dv, generator=gen, dtype=torch.float64)
    g = -decay * torch.rand(b, t, h, dk, generator=gen, dtype=torch.float64).clamp_min(1e-3)
    beta = torch.rand(b, t, h, generator=gen, dtype=torch.float64).clamp(0.01, 0.99)
    s0 = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    return [x.to(dtype) for x in (q, k, v, g, beta)] + [s0.to(torch.float64 if dtype == torch.float64
                                                                else torch.float32)]


def run_with_grads(fn, inputs, seed=1, **kw):
    """(o, final state, grads of q, k, v, g, beta, initial state[, restart state]) under random output
    gradients; a seventh input is passed as ``restart_state``."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    if len(xs) > 6:
        kw["restart_state"] = xs[6]
    o, s = fn(*xs[:5], initial_state=xs[5], output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    ds = torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype)
    grads = torch.autograd.grad((o * do).sum() + (s * ds).sum(), xs)
    return o.detach(), s.detach(), grads


def assert_match(got, ref, tol, what=""):
    names = ["o", "final state", "dq", "dk", "dv", "dg", "dbeta", "dstate", "drestart"]
    o, s, grads = got
    o_ref, s_ref, grads_ref = ref
    for name, a, b in zip(names, [o, s, *grads], [o_ref, s_ref, *grads_ref]):
        assert torch.isfinite(a).all(), f"{what} {name}: not finite"
        err = rel_rms(a, b)
        assert err < tol, f"{what} {name}: rel RMS error {err:.2e} ≥ {tol:.0e}"


# ----------------------------------------------------------------------------- chunked vs recurrent


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("t,chunk", [(37, 16), (64, 64), (130, 64), (130, 16), (37, 12), (5, 64)])
def test_chunked_matches_recurrent(dtype, t, chunk):
    """Forward, final state and the gradients of all six inputs agree with the recurrence."""
    inputs = make_inputs(t=t, dtype=dtype)
    got = run_with_grads(kda, inputs, chunk_size=chunk)
    ref = run_with_grads(kda_recurrent, inputs)
    assert got[0].dtype == dtype and got[0].shape == inputs[2].shape
    assert_match(got, ref, TOL[dtype], f"T={t} chunk={chunk}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_strong_decays_do_not_overflow(dtype):
    """g down to −20 per token (Γ ≈ −1300 over a chunk) and a few −500 channels: finite and exact."""
    inputs = make_inputs(t=100, dtype=dtype, decay=20.0, seed=3)
    inputs[3][:, ::7, :, :3] = -500.0  # decays that underflow exp() entirely
    got = run_with_grads(kda, inputs, chunk_size=64)
    ref = run_with_grads(kda_recurrent, inputs)
    assert_match(got, ref, TOL[dtype] * 10, "strong decay")


def test_sub_chunk_sizes_agree():
    """The within-chunk split (explicit blocks vs reference-point matmuls) does not change results."""
    inputs = make_inputs(t=70, dtype=torch.float64, decay=5.0)
    scale = inputs[0].shape[-1] ** -0.5
    ref = run_with_grads(kda_recurrent, inputs)
    for sub in (1, 2, 8, 32):
        got = run_with_grads(kda_chunk, inputs, scale=scale, chunk_size=32, sub_chunk=sub)
        assert_match(got, ref, TOL[torch.float64], f"sub_chunk={sub}")


def test_defaults_zero_state_and_scale():
    """No initial state = zeros; the default scale is K^-½; no final state unless asked."""
    q, k, v, g, beta, _ = make_inputs(t=20)
    o, s = kda(q, k, v, g, beta, chunk_size=8)
    assert s is None
    o_ref, _ = kda_recurrent(q, k, v, g, beta, scale=q.shape[-1] ** -0.5)
    assert rel_rms(o, o_ref) < TOL[torch.float64]
    o2, _ = kda(q, k, v, g, beta, scale=0.3, initial_state=torch.zeros(2, 2, 16, 12, dtype=torch.float64))
    assert rel_rms(o2, o_ref * 0.3 / q.shape[-1] ** -0.5) < TOL[torch.float64]


@pytest.mark.parametrize("split", [37, 64])
def test_continuation_from_final_state(split):
    """Processing [0, split) then [split, T) from the carried state equals processing [0, T)."""
    q, k, v, g, beta, s0 = make_inputs(t=100, dtype=torch.float32)
    o, s = kda(q, k, v, g, beta, initial_state=s0, output_final_state=True, chunk_size=16)
    parts = [slice(0, split), slice(split, None)]
    o1, s1 = kda(*(x[:, parts[0]] for x in (q, k, v, g, beta)), initial_state=s0, output_final_state=True,
                 chunk_size=16)
    o2, s2 = kda(*(x[:, parts[1]] for x in (q, k, v, g, beta)), initial_state=s1, output_final_state=True,
                 chunk_size=16)
    assert rel_rms(torch.cat([o1, o2], dim=1), o) < TOL[torch.float32]
    assert rel_rms(s2, s) < TOL[torch.float32]


def test_decoding_steps_continue_prefill():
    """Prefill with the chunked op, then decode token by token with kda_recurrent_step."""
    q, k, v, g, beta, s0 = make_inputs(t=30, dtype=torch.float32)
    o, _ = kda(q, k, v, g, beta, initial_state=s0, chunk_size=16)
    _, state = kda(*(x[:, :20] for x in (q, k, v, g, beta)), initial_state=s0, output_final_state=True,
                   chunk_size=16)
    steps = []
    for i in range(20, 30):
        o_i, state = kda_recurrent_step(q[:, i], k[:, i], v[:, i], g[:, i], beta[:, i], state)
        steps.append(o_i)
    assert state.dtype == torch.float32
    assert rel_rms(torch.stack(steps, dim=1), o[:, 20:]) < TOL[torch.float32]


# ----------------------------------------------------------------------------- packed documents


def doc_ids_from_lengths(rows: list[list[int]], ids=None) -> torch.Tensor:
    """``[[3, 1, 4], [8]]`` → per-token document ids 0, 1, 2, ... (or ``ids``) of each row."""
    out = []
    for lengths in rows:
        names = torch.arange(len(lengths)) if ids is None else torch.tensor(ids[: len(lengths)])
        out.append(torch.repeat_interleave(names, torch.tensor(lengths)))
    return torch.stack(out)


ROWS = [[10, 1, 21, 38], [16, 32, 16, 6]]  # boundaries mid-chunk, on chunk edges, a 1-token document


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_doc_ids_reset_state(dtype):
    """With doc_ids the chunked op equals the recurrence that zeroes the state at document starts."""
    inputs = make_inputs(t=70, dtype=dtype)
    doc_ids = doc_ids_from_lengths(ROWS)
    got = run_with_grads(kda, inputs, chunk_size=16, doc_ids=doc_ids)
    ref = run_with_grads(kda_recurrent, inputs, doc_ids=doc_ids)
    assert_match(got, ref, TOL[dtype], "doc_ids")


@pytest.mark.parametrize("dtype,decay", [(torch.float64, 0.5), (torch.float32, 0.5), (torch.float32, 20.0)])
def test_restart_state_matches_recurrent(dtype, decay):
    """With a restart state (meta tokens' state) every document start resets to it instead of zeros:
    outputs, final state and all gradients, the restart state's included, match the recurrence; also
    with strong decays (g down to −20 per token), which must not overflow."""
    inputs = make_inputs(t=70, dtype=dtype, decay=decay, seed=5)
    restart = torch.randn(inputs[5].shape, generator=torch.Generator().manual_seed(9), dtype=inputs[5].dtype)
    doc_ids = doc_ids_from_lengths(ROWS)
    got = run_with_grads(kda, inputs + [restart], chunk_size=16, doc_ids=doc_ids)
    ref = run_with_grads(kda_recurrent, inputs + [restart], doc_ids=doc_ids)
    assert_match(got, ref, TOL[dtype] * (10 if decay > 1 else 1), "restart_state")
    zero = run_with_grads(kda, inputs, chunk_size=16, doc_ids=doc_ids)  # counter-check: it matters
    assert rel_rms(zero[0], got[0]) > 1e-2


@pytest.mark.parametrize("restart", [False, True])
def test_doc_ids_equal_separate_documents(restart):
    """Each document of a packed row gives what it gives alone (the first one from the initial state,
    later ones from zeros, or from the restart state); a repeated id on two separate documents does
    not join them."""
    q, k, v, g, beta, s0 = make_inputs(t=70)
    s_r = torch.randn(s0.shape, generator=torch.Generator().manual_seed(3), dtype=s0.dtype) if restart else None
    doc_ids = doc_ids_from_lengths(ROWS, ids=[5, 7, 5, 9])
    o, s = kda(q, k, v, g, beta, initial_state=s0, output_final_state=True, chunk_size=16, doc_ids=doc_ids,
               restart_state=s_r)
    for row, lengths in enumerate(ROWS):
        start = 0
        for i, n in enumerate(lengths):
            part = slice(start, start + n)
            init = s0[row:row + 1] if i == 0 else None if s_r is None else s_r[row:row + 1]
            o_doc, s_doc = kda_recurrent(*(x[row:row + 1, part] for x in (q, k, v, g, beta)),
                                         initial_state=init, output_final_state=True)
            assert rel_rms(o[row:row + 1, part], o_doc) < TOL[torch.float64], (row, i)
            start += n
        assert rel_rms(s[row:row + 1], s_doc) < TOL[torch.float64]


# ----------------------------------------------------------------------------- gradcheck, dtypes, memory


def test_gradcheck_chunked_fp64():
    """torch.autograd.gradcheck through both within-chunk paths (sub-chunks 4 in chunks of 8)."""
    q, k, v, g, beta, s0 = make_inputs(b=1, t=10, h=1, dk=4, dv=2, decay=2.0)
    xs = [x.requires_grad_() for x in (q, k, v, g, beta, s0)]
    doc_ids = doc_ids_from_lengths([[6, 4]])

    def fn(q, k, v, g, beta, s0):
        return kda_chunk(q, k, v, g, beta, scale=0.5, initial_state=s0, output_final_state=True,
                         chunk_size=8, sub_chunk=4)

    def fn_docs(q, k, v, g, beta, s0):
        return kda(q, k, v, g, beta, initial_state=s0, output_final_state=True, chunk_size=4,
                   doc_ids=doc_ids)

    def fn_restart(q, k, v, g, beta, s0, s_r):  # a restart mid-chunk, and one chunk ending in it
        return kda(q, k, v, g, beta, initial_state=s0, output_final_state=True, chunk_size=4,
                   doc_ids=doc_ids, restart_state=s_r)

    assert torch.autograd.gradcheck(fn, xs)
    assert torch.autograd.gradcheck(fn_docs, xs)
    assert torch.autograd.gradcheck(fn_restart, xs + [torch.randn_like(s0).requires_grad_()])


def test_low_precision_inputs():
    """bf16 q/k/v/g/β: fp32 arithmetic inside, o in bf16, the state in fp32."""
    inputs = make_inputs(t=40, dtype=torch.float32)
    o32, s32 = kda(*inputs[:5], initial_state=inputs[5], output_final_state=True, chunk_size=16)
    o, s = kda(*(x.bfloat16() for x in inputs[:5]), initial_state=inputs[5], output_final_state=True,
               chunk_size=16)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_rms(o, o32) < 3e-2 and rel_rms(s, s32) < 3e-2


def _saved_numel(t: int) -> int:
    """Elements autograd saves for the backward of one chunked call at length T."""
    total = 0

    def pack(x):
        nonlocal total
        total += x.numel()
        return x

    inputs = [x.requires_grad_() for x in make_inputs(b=1, t=t, h=1, dk=16, dv=16, dtype=torch.float32)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        kda(*inputs[:5], initial_state=inputs[5], chunk_size=64)
    return total


def test_memory_is_linear_in_length():
    """Saved activations grow like T (O(T·chunk)), not T²."""
    small, large = _saved_numel(256), _saved_numel(1024)
    assert large < 4.4 * small, f"saved elements {small} → {large} for 4× the length"


def test_argument_errors():
    q, k, v, g, beta, _ = make_inputs(t=8)
    with pytest.raises(ValueError, match="backend"):
        kda(q, k, v, g, beta, backend="triton-nightly")
    with pytest.raises(ValueError, match="beta"):
        kda(q, k, v, g, beta[:, :4])
    with pytest.raises(ValueError, match="doc_ids"):
        kda(q, k, v, g, beta, doc_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="restart_state"):
        kda(q, k, v, g, beta, doc_ids=torch.zeros(2, 8, dtype=torch.long), restart_state=torch.zeros(2, 2, 16, 16))
