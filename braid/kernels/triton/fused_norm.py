"""Triton RMSNorm and SwiGLU, forward and backward (one program per block of rows / elements).

Import this module only when Triton should run: on CUDA tensors, or on CPU with ``TRITON_INTERPRET=1``
set before the import (``triton.jit`` picks the interpreter when the kernel is decorated).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, dim, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < dim)
    x = tl.load(x_ptr + rows[:, None] * dim + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / dim + eps)  # the statistic in fp32
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows[:, None] * dim + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)


@triton.jit
def _rms_norm_bwd(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_part_ptr, n_rows, dim,
                  ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # dx = rstd · (dy·w − x̂ · mean(dy·w·x̂)); dw = Σ_rows dy·x̂, written as one partial row per program.
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < dim)
    offs = rows[:, None] * dim + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)
    xhat = x * rstd[:, None]
    dyw = dy * w[None, :]
    dx = rstd[:, None] * (dyw - xhat * (tl.sum(dyw * xhat, axis=1) / dim)[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid * dim + cols, tl.sum(dy * xhat, axis=0), mask=cols < dim)


def _row_blocks(dim: int) -> tuple[int, int]:
    block = triton.next_power_of_2(dim)
    return max(1, min(16, 4096 // block)), block  # rows per program: ~4k elements in registers


class RMSNormTriton(torch.autograd.Function):
    """``y = x · rsqrt(mean(x²) + eps) · w`` over the last dim; fp32 statistics, y in x's dtype."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        shape, dim = x.shape, x.shape[-1]
        x2 = x.reshape(-1, dim).contiguous()
        n = x2.shape[0]
        y = torch.empty_like(x2)
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
        rows, block = _row_blocks(dim)
        _rms_norm_fwd[(triton.cdiv(n, rows),)](x2, weight.contiguous(), y, rstd, n, dim, eps,
                                               ROWS=rows, BLOCK=block)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n, dim = x2.shape
        rows, block = _row_blocks(dim)
        grid = triton.cdiv(n, rows)
        dx = torch.empty_like(x2)
        dw_part = torch.empty(grid, dim, dtype=torch.float32, device=x2.device)
        _rms_norm_bwd[(grid,)](x2, weight.contiguous(), dy.reshape(-1, dim).contiguous(), rstd, dx, dw_part,
                               n, dim, ROWS=rows, BLOCK=block)
        return dx.view(ctx.shape), dw_part.sum(0).to(weight.dtype), None


@triton.jit
def _swiglu_fwd(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (g * tl.sigmoid(g) * u).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd(g_ptr, u_ptr, dy_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    # silu'(g) = σ(g)·(1 + g·(1 − σ(g))); the activation is recomputed instead of stored.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(dg_ptr + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=m)
    tl.store(du_ptr + offs, (dy * g * sig).to(du_ptr.dtype.element_ty), mask=m)


_SWIGLU_BLOCK = 1024


class SwiGLUTriton(torch.autograd.Function):
    """``silu(gate) · up`` elementwise (fp32 arithmetic, output in gate's dtype)."""

    @staticmethod
    def forward(ctx, gate, up):
        g, u = gate.contiguous(), up.contiguous()
        y = torch.empty_like(g)
        n = g.numel()
        _swiglu_fwd[(triton.cdiv(n, _SWIGLU_BLOCK),)](g, u, y, n, BLOCK=_SWIGLU_BLOCK)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        _swiglu_bwd[(triton.cdiv(n, _SWIGLU_BLOCK),)](g, u, dy.contiguous(), dg, du, n, BLOCK=_SWIGLU_BLOCK)
        return dg, du


def compile_for_gpu(dim: int = 4096, dtype: str = "bf16", capability: int = 90) -> dict[str, dict]:
    """The four kernels compiled ahead of time with the launch sizes ``dim`` gets (see ``triton.aot``);
    needs a process without ``TRITON_INTERPRET=1``."""
    from braid.kernels.triton.aot import compile_stats

    rows, block = _row_blocks(dim)
    fp32 = {"rstd_ptr", "dw_part_ptr"}

    def arg_type(name: str) -> str:
        if name.endswith("_ptr"):
            return "*fp32" if name in fp32 else f"*{dtype}"
        return "fp32" if name == "eps" else "i32"

    out = {fn.__name__: compile_stats(fn, dict(ROWS=rows, BLOCK=block), arg_type, {}, capability)
           for fn in (_rms_norm_fwd, _rms_norm_bwd)}
    out.update({fn.__name__: compile_stats(fn, dict(BLOCK=_SWIGLU_BLOCK), arg_type, {}, capability)
                for fn in (_swiglu_fwd, _swiglu_bwd)})
    return out
