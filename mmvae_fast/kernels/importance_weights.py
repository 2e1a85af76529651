"""importance_weights in Triton, with the schemas of the C++ ops (csrc/ops.cpp):

    importance_weights(lw [P, N, Q]) -> (lse [P, Q], wbar, wbar_sq [P, N, Q], lse_lo [P, Q])   over the middle dim
    importance_weights_backward(lw, lse, lse_lo, g_lse?, g_wbar?, g_wbar_sq?) -> d lw

The kernels reduce the rows of a contiguous [R, N] matrix: Q = 1 is a view, otherwise the
reduced dim is moved last (one copy) and the outputs are views back.

Forward: one online log-sum-exp sweep per row (running max, rescaled sum), then the weights
exp((lw - lse) - lse_lo) from the row's lse and its rounding residual lse_lo (csrc math.h's
lse_split: a float32 lse near -1e7 is off by up to 0.5, and exp(lw - lse) by that factor). Only
lse and lse_lo are saved; backward recomputes wbar the same way.
    d/dlw_i [gb bound + sum_j gw_j wbar_j + sum_j gw2_j wbar_j^2] = wbar_i (gb + c_i - sum_j wbar_j c_j),
    c_j = gw_j + 2 gw2_j wbar_j.
"""
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


@triton.jit
def _lse_split(m, s):
    """(lse, lse_lo) of a state (max m, sum s of exp(x - m)): lse = m + log s rounded, lse_lo its
    rounding error (TwoSum, exact), 0 where lse is not finite (an empty or NaN row)."""
    ls = tl.log(tl.where(s == 0.0, 1.0, s))
    hi = m + ls
    bb = hi - m
    lo = (m - (hi - bb)) + (ls - bb)
    lse = tl.where(s == 0.0, float("-inf"), hi)
    return lse, tl.where(lse - lse == 0.0, lo, 0.0)


@autotune(_CONFIGS, key=["N"], interpret_config=_INTERPRET)
@triton.jit
def _iw_fwd_kernel(x_ptr, w_ptr, w2_ptr, lse_ptr, lo_ptr, R, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
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
        # an infinite max shifts by 0 (as the reference): a row that has seen only -inf keeps s = 0
        # (not -inf - -inf = NaN), one with a +inf gets s = +inf and the bound +inf (not inf - inf)
        m_safe = tl.where(m_new - m_new == 0.0, m_new, 0.0)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)  # NaN sticks in s
        m = m_new
    lse, lo = _lse_split(m, s)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(lo_ptr + rows, lo, mask=rmask)
    shift = tl.where(lse == float("-inf"), 0.0, lse)  # all -inf row: weights exp(-inf) = 0
    for n0 in range(0, N, BLOCK_N):
        c = n0 + cols
        msk = rmask[:, None] & (c < N)[None, :]
        x = tl.load(x_ptr + base + c[None, :], mask=msk, other=float("-inf")).to(acc)
        w = tl.exp((x - shift[:, None]) - lo[:, None])
        tl.store(w_ptr + base + c[None, :], w, mask=msk)
        tl.store(w2_ptr + base + c[None, :], w * w, mask=msk)


@triton.jit
def _wbar_and_cotangent(x_ptr, gw_ptr, gw2_ptr, offs, msk, shift, lo, HAS_GW: tl.constexpr, HAS_GW2: tl.constexpr):
    """wbar = exp((x - lse) - lse_lo) over a tile, and its total cotangent c = g_wbar + 2 wbar g_wbar_sq."""
    x = tl.load(x_ptr + offs, mask=msk, other=float("-inf")).to(shift.dtype)
    w = tl.exp((x - shift[:, None]) - lo[:, None])
    c = tl.zeros_like(w)
    if HAS_GW:
        c += tl.load(gw_ptr + offs, mask=msk, other=0.0).to(shift.dtype)
    if HAS_GW2:
        c += 2.0 * w * tl.load(gw2_ptr + offs, mask=msk, other=0.0).to(shift.dtype)
    return w, c


@autotune(_CONFIGS, key=["N"], interpret_config=_INTERPRET)
@triton.jit
def _iw_bwd_kernel(
    x_ptr, lse_ptr, lo_ptr, gb_ptr, gw_ptr, gw2_ptr, gx_ptr, R, N,
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
    lo = tl.where(lse == float("-inf"), 0.0, tl.load(lo_ptr + rows, mask=rmask, other=0.0))
    gb = tl.zeros([BLOCK_R], acc)
    if HAS_GB:
        gb += tl.load(gb_ptr + rows, mask=rmask, other=0.0).to(acc)
    # pass 1: S = sum_j wbar_j c_j
    S = tl.zeros([BLOCK_R], acc)
    for n0 in range(0, N, BLOCK_N):
        c = n0 + cols
        msk = rmask[:, None] & (c < N)[None, :]
        w, cj = _wbar_and_cotangent(x_ptr, gw_ptr, gw2_ptr, base + c[None, :], msk, shift, lo, HAS_GW, HAS_GW2)
        S += tl.sum(w * cj, 1)
    # pass 2: g_i = wbar_i (gb + c_i - S)
    for n0 in range(0, N, BLOCK_N):
        c = n0 + cols
        msk = rmask[:, None] & (c < N)[None, :]
        w, cj = _wbar_and_cotangent(x_ptr, gw_ptr, gw2_ptr, base + c[None, :], msk, shift, lo, HAS_GW, HAS_GW2)
        g = w * (gb[:, None] + cj - S[:, None])
        tl.store(gx_ptr + base + c[None, :], g.to(gx_ptr.dtype.element_ty), mask=msk)


def _grid(R):
    return lambda meta: (triton.cdiv(R, meta["BLOCK_R"]),)


def _rows(t, P, N, Q):
    """[P, N, Q] as contiguous rows [P * Q, N]."""
    return (t.reshape(P, N) if Q == 1 else t.transpose(1, 2).reshape(P * Q, N)).contiguous()


def _unrows(t, P, N, Q):
    """Rows [P * Q, N] back to [P, N, Q] (a view)."""
    return t.view(P, N, 1) if Q == 1 else t.view(P, Q, N).transpose(1, 2)


@triton_op("mmvae_fast_triton::importance_weights", mutates_args=())
def importance_weights(lw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    P, N, Q = lw.shape
    x = _rows(lw, P, N, Q)
    dt = acc_dtype(lw.dtype)
    lse = torch.empty(P * Q, dtype=dt, device=lw.device)
    lo = torch.empty(P * Q, dtype=dt, device=lw.device)
    w = torch.empty(P * Q, N, dtype=dt, device=lw.device)
    w2 = torch.empty(P * Q, N, dtype=dt, device=lw.device)
    if P * Q > 0:
        wrap_triton(_iw_fwd_kernel)[_grid(P * Q)](x, w, w2, lse, lo, P * Q, N)
    return lse.view(P, Q), _unrows(w, P, N, Q), _unrows(w2, P, N, Q), lo.view(P, Q)


@triton_op("mmvae_fast_triton::importance_weights_backward", mutates_args=())
def importance_weights_backward(
    lw: torch.Tensor, lse: torch.Tensor, lse_lo: torch.Tensor, g_lse: torch.Tensor | None,
    g_wbar: torch.Tensor | None, g_wbar_sq: torch.Tensor | None,
) -> torch.Tensor:
    """d/dlw of <g_lse, lse> + <g_wbar, wbar> + <g_wbar_sq, wbar**2>."""
    P, N, Q = lw.shape
    x = _rows(lw, P, N, Q)
    rows1 = lambda t: None if t is None else _rows(t.reshape(P, 1, Q), P, 1, Q)  # noqa: E731  [P, Q] -> [P * Q, 1]
    rows = lambda t: None if t is None else _rows(t, P, N, Q)  # noqa: E731
    lse_r, lo_r, gb, gw, gw2 = rows1(lse), rows1(lse_lo), rows1(g_lse), rows(g_wbar), rows(g_wbar_sq)
    gx = torch.empty_like(x)
    if P * Q > 0:
        wrap_triton(_iw_bwd_kernel)[_grid(P * Q)](
            x, lse_r, lo_r, x if gb is None else gb, x if gw is None else gw, x if gw2 is None else gw2, gx, P * Q, N,
            HAS_GB=gb is not None, HAS_GW=gw is not None, HAS_GW2=gw2 is not None,
        )
    return _unrows(gx, P, N, Q)
