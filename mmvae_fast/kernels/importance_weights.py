"""Importance weights in Triton: bound = logmeanexp, wbar = softmax, wbar**2 over the rows of a
[R, N] matrix (the adapter `importance_weights` moves the reduced dims last).

Forward: one online log-sum-exp sweep per row (running max, rescaled sum), then the weights
from the row's lse. Only lse [R] is saved; backward recomputes wbar = exp(lw - lse).
    d/dlw_i [gb bound + sum_j gw_j wbar_j + sum_j gw2_j wbar_j^2] = wbar_i (gb + c_i - sum_j wbar_j c_j),
    c_j = gw_j + 2 gw2_j wbar_j.
"""
import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import acc_dtype, autotune

_CONFIGS = [
    triton.Config({"BLOCK_R": br, "BLOCK_N": bn}, num_warps=nw)
    for br, bn, nw in [(1, 1024, 4), (1, 4096, 8), (4, 256, 4), (16, 64, 4), (64, 32, 4)]
]
_INTERPRET = triton.Config({"BLOCK_R": 4, "BLOCK_N": 16})


@autotune(_CONFIGS, key=["N"], interpret_config=_INTERPRET)
@triton.jit
def _iw_fwd_kernel(x_ptr, bound_ptr, w_ptr, w2_ptr, lse_ptr, R, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    acc = lse_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    base = rows.to(tl.int64)[:, None] * N
    cols = tl.arange(0, BLOCK_N)
    m = tl.full([BLOCK_R], float("-inf"), acc)
    s = tl.zeros([BLOCK_R], acc)
    for n0 in range(0, N, BLOCK_N):
        c = n0 + cols
        msk = rmask[:, None] & (c < N)[None, :]
        x = tl.load(x_ptr + base + c[None, :], mask=msk, other=float("-inf")).to(acc)
        m_new = tl.maximum(m, tl.max(x, 1))
        # a row that has seen only -inf keeps s = 0: shift by 0 instead of -inf - -inf = NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)  # NaN sticks in s
        m = m_new
    lse = tl.where(s == 0.0, float("-inf"), m + tl.log(tl.where(s == 0.0, 1.0, s)))
    n = tl.zeros([BLOCK_R], acc) + N
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(bound_ptr + rows, lse - tl.log(n), mask=rmask)
    shift = tl.where(lse == float("-inf"), 0.0, lse)  # all -inf row: weights exp(-inf) = 0
    for n0 in range(0, N, BLOCK_N):
        c = n0 + cols
        msk = rmask[:, None] & (c < N)[None, :]
        x = tl.load(x_ptr + base + c[None, :], mask=msk, other=float("-inf")).to(acc)
        w = tl.exp(x - shift[:, None])
        tl.store(w_ptr + base + c[None, :], w, mask=msk)
        tl.store(w2_ptr + base + c[None, :], w * w, mask=msk)


@triton.jit
def _wbar_and_cotangent(x_ptr, gw_ptr, gw2_ptr, offs, msk, shift, HAS_GW: tl.constexpr, HAS_GW2: tl.constexpr):
    """wbar = exp(x - lse) over a tile, and its total cotangent c = g_wbar + 2 wbar g_wbar_sq."""
    w = tl.exp(tl.load(x_ptr + offs, mask=msk, other=float("-inf")).to(shift.dtype) - shift[:, None])
    c = tl.zeros_like(w)
    if HAS_GW:
        c += tl.load(gw_ptr + offs, mask=msk, other=0.0).to(shift.dtype)
    if HAS_GW2:
        c += 2.0 * w * tl.load(gw2_ptr + offs, mask=msk, other=0.0).to(shift.dtype)
    return w, c


@autotune(_CONFIGS, key=["N"], interpret_config=_INTERPRET)
@triton.jit
def _iw_bwd_kernel(
    x_ptr, lse_ptr, gb_ptr, gw_ptr, gw2_ptr, gx_ptr, R, N,
    HAS_GB: tl.constexpr, HAS_GW: tl.constexpr, HAS_GW2: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    acc = lse_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    base = rows.to(tl.int64)[:, None] * N
    cols = tl.arange(0, BLOCK_N)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    shift = tl.where(lse == float("-inf"), 0.0, lse)
    gb = tl.zeros([BLOCK_R], acc)
    if HAS_GB:
        gb += tl.load(gb_ptr + rows, mask=rmask, other=0.0).to(acc)
    # pass 1: S = sum_j wbar_j c_j
    S = tl.zeros([BLOCK_R], acc)
    for n0 in range(0, N, BLOCK_N):
        c = n0 + cols
        msk = rmask[:, None] & (c < N)[None, :]
        w, cj = _wbar_and_cotangent(x_ptr, gw_ptr, gw2_ptr, base + c[None, :], msk, shift, HAS_GW, HAS_GW2)
        S += tl.sum(w * cj, 1)
    # pass 2: g_i = wbar_i (gb + c_i - S)
    for n0 in range(0, N, BLOCK_N):
        c = n0 + cols
        msk = rmask[:, None] & (c < N)[None, :]
        w, cj = _wbar_and_cotangent(x_ptr, gw_ptr, gw2_ptr, base + c[None, :], msk, shift, HAS_GW, HAS_GW2)
        g = w * (gb[:, None] + cj - S[:, None])
        tl.store(gx_ptr + base + c[None, :], g.to(gx_ptr.dtype.element_ty), mask=msk)


def _grid(R):
    return lambda meta: (triton.cdiv(R, meta["BLOCK_R"]),)


@triton_op("mmvae_fast_triton::importance_weights", mutates_args=())
def importance_weights_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bound [R], wbar [R, N], wbar**2 [R, N], lse [R]) over the rows of a contiguous x [R, N]."""
    R, N = x.shape
    dt = acc_dtype(x.dtype)
    bound = torch.empty(R, dtype=dt, device=x.device)
    lse = torch.empty(R, dtype=dt, device=x.device)
    w = torch.empty(R, N, dtype=dt, device=x.device)
    w2 = torch.empty(R, N, dtype=dt, device=x.device)
    if R > 0:
        wrap_triton(_iw_fwd_kernel)[_grid(R)](x, bound, w, w2, lse, R, N)
    return bound, w, w2, lse


@triton_op("mmvae_fast_triton::importance_weights_backward", mutates_args=())
def importance_weights_rows_backward(
    x: torch.Tensor, lse: torch.Tensor, gb: torch.Tensor | None, gw: torch.Tensor | None, gw2: torch.Tensor | None
) -> torch.Tensor:
    R, N = x.shape
    gx = torch.empty_like(x)
    if R > 0:
        wrap_triton(_iw_bwd_kernel)[_grid(R)](
            x, lse, x if gb is None else gb, x if gw is None else gw, x if gw2 is None else gw2, gx, R, N,
            HAS_GB=gb is not None, HAS_GW=gw is not None, HAS_GW2=gw2 is not None,
        )
    return gx


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[3])


def _backward(ctx, gb, gw, gw2, _glse):
    x, lse = ctx.saved_tensors
    c = lambda g: None if g is None else g.contiguous()  # noqa: E731
    return importance_weights_rows_backward(x, lse, c(gb), c(gw), c(gw2))


importance_weights_rows.register_autograd(_backward, setup_context=_setup)


def importance_weights(lw: torch.Tensor, dims: tuple):
    """The backend entry of ops.importance_weights: (bound, wbar, wbar_sq), reducing over dims."""
    keep = [d for d in range(lw.dim()) if d not in dims]
    perm = keep + list(dims)
    xp = lw.permute(perm)
    kept_shape, red_shape = xp.shape[: len(keep)], xp.shape[len(keep):]
    x2 = xp.reshape(math.prod(kept_shape), math.prod(red_shape)).contiguous()
    bound, w, w2, _ = importance_weights_rows(x2)
    inv = [perm.index(d) for d in range(lw.dim())]
    back = lambda t: t.reshape(*kept_shape, *red_shape).permute(inv)  # noqa: E731
    return bound.reshape(kept_shape), back(w), back(w2)
