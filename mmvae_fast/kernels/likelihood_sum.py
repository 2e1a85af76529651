"""likelihood_sum in Triton, with the schemas of the C++ ops (csrc/ops.cpp):

    likelihood_sum(x [B, E], params [S, B, E(, V)], scale? [S|1, B|1, E|1], int family) -> [S, B]
    likelihood_sum_backward(grad, x, params, scale?, family, params_grad, scale_grad)
        -> (dparams, dscale)

out[s, b] = sum_e log p(x[b, e] | params[s, b, e]). Each program reads x[b, :] for its rows
directly, so x is never expanded over the S samples, and the per-element log-probabilities are summed in registers (never stored).
Families: 0 normal, 1 laplace (params = location, fixed scale), 2 bernoulli (logits),
3 categorical (logits; online log-sum-exp over the vocabulary; backward recomputes it).
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import acc_dtype, autotune, log_density_terms


_DENSE = [triton.Config({"BLOCK_R": br, "BLOCK_E": be}, num_warps=nw) for br, be, nw in [(1, 1024, 4), (4, 256, 4), (16, 128, 4), (64, 32, 4)]]
_DENSE_I = triton.Config({"BLOCK_R": 4, "BLOCK_E": 8})
_CAT = [triton.Config({"BLOCK_R": br, "BLOCK_V": bv}, num_warps=nw) for br, bv, nw in [(1, 1024, 4), (1, 4096, 8), (4, 256, 4), (16, 64, 4)]]
_CAT_I = triton.Config({"BLOCK_R": 4, "BLOCK_V": 128})


@triton.jit
def _dense_terms(x, p, sc, FAM: tl.constexpr):
    """(log p, d/dparam, d/dscale) elementwise for the dense families (one return: the compiler
    wants a single exit)."""
    if FAM == 2:  # bernoulli logits: -(1 - x) softplus(l) - x softplus(-l), a 0-weight term dropped (l = +-inf)
        lp1 = tl.log(1.0 + tl.exp(-tl.abs(p)))
        lp = -(tl.where(x != 1.0, (1.0 - x) * (tl.maximum(p, 0.0) + lp1), 0.0)  # NaN x: NaN
               + tl.where(x != 0.0, x * (tl.maximum(-p, 0.0) + lp1), 0.0))
        dp = x - 1.0 / (1.0 + tl.exp(-p))
        ds = tl.zeros_like(p)
    else:  # normal (0) / laplace (1), params = location
        lp, dp, ds = log_density_terms(x, p, sc, FAM == 0)
    return lp, dp, ds


@autotune(_DENSE, key=["E", "FAM"], interpret_config=_DENSE_I)
@triton.jit
def _dense_fwd_kernel(
    x_ptr, p_ptr, sc_ptr, out_ptr, R, B, E, ss_s, ss_b, ss_e,
    FAM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    acc = out_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    s_idx = (rows // B).to(tl.int64)
    b_idx = (rows % B).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    total = tl.zeros([BLOCK_R], acc)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + cols
        msk = rmask[:, None] & (e < E)[None, :]
        x = tl.load(x_ptr + b_idx[:, None] * E + e[None, :], mask=msk, other=0.0).to(acc)
        p = tl.load(p_ptr + rows.to(tl.int64)[:, None] * E + e[None, :], mask=msk, other=0.0).to(acc)
        sc = tl.full([BLOCK_R, BLOCK_E], 1.0, acc)
        if FAM < 2:
            sc = tl.load(sc_ptr + s_idx[:, None] * ss_s + b_idx[:, None] * ss_b + e[None, :] * ss_e, mask=msk, other=1.0).to(acc)
        lp, _dp, _ds = _dense_terms(x, p, sc, FAM)
        total += tl.sum(tl.where(msk, lp, 0.0), 1)
    tl.store(out_ptr + rows, total, mask=rmask)


@autotune(_DENSE, key=["E", "FAM"], interpret_config=_DENSE_I)
@triton.jit
def _dense_bwd_kernel(
    x_ptr, p_ptr, sc_ptr, g_ptr, dp_ptr, dsc_ptr, R, B, E, ss_s, ss_b, ss_e,
    FAM: tl.constexpr, SCALE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    acc = g_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    s_idx = (rows // B).to(tl.int64)
    b_idx = (rows % B).to(tl.int64)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)[:, None]
    cols = tl.arange(0, BLOCK_E)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + cols
        msk = rmask[:, None] & (e < E)[None, :]
        off = rows.to(tl.int64)[:, None] * E + e[None, :]
        x = tl.load(x_ptr + b_idx[:, None] * E + e[None, :], mask=msk, other=0.0).to(acc)
        p = tl.load(p_ptr + off, mask=msk, other=0.0).to(acc)
        sc = tl.full([BLOCK_R, BLOCK_E], 1.0, acc)
        if FAM < 2:
            sc = tl.load(sc_ptr + s_idx[:, None] * ss_s + b_idx[:, None] * ss_b + e[None, :] * ss_e, mask=msk, other=1.0).to(acc)
        _lp, dp, ds = _dense_terms(x, p, sc, FAM)
        # a zero cotangent contributes 0, not 0 * inf = NaN (a log density that overflowed to -inf)
        tl.store(dp_ptr + off, tl.where(g == 0.0, 0.0, g * dp).to(dp_ptr.dtype.element_ty), mask=msk)
        if SCALE_GRAD:
            tl.store(dsc_ptr + off, tl.where(g == 0.0, 0.0, g * ds), mask=msk)


@autotune(_CAT, key=["V"], interpret_config=_CAT_I)
@triton.jit
def _cat_fwd_kernel(x_ptr, p_ptr, out_ptr, lse_ptr, R, B, E, V, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    acc = out_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    b_idx = (rows % B).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    total = tl.zeros([BLOCK_R], acc)
    for e in range(0, E):
        base = (rows.to(tl.int64) * E + e) * V  # logits of (s, b, e)
        m = tl.full([BLOCK_R], float("-inf"), acc)
        s = tl.zeros([BLOCK_R], acc)
        for v0 in range(0, V, BLOCK_V):
            v = v0 + cols
            msk = rmask[:, None] & (v < V)[None, :]
            lg = tl.load(p_ptr + base[:, None] + v[None, :], mask=msk, other=float("-inf")).to(acc)
            m_new = tl.maximum(m, tl.max(lg, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(lg - m_safe[:, None]), 1)
            m = m_new
        lse = tl.where(s == 0.0, float("-inf"), m + tl.log(tl.where(s == 0.0, 1.0, s)))
        xi = tl.load(x_ptr + b_idx * E + e, mask=rmask, other=0).to(tl.int64)
        ok = (xi >= 0) & (xi < V)
        lx = tl.load(p_ptr + base + tl.where(ok, xi, 0), mask=rmask, other=0.0).to(acc)
        total += tl.where(ok, lx - lse, float("nan"))  # an index outside [0, V) gives NaN, not a number
        tl.store(lse_ptr + rows.to(tl.int64) * E + e, lse, mask=rmask)
    tl.store(out_ptr + rows, total, mask=rmask)


@autotune(_CAT, key=["V"], interpret_config=_CAT_I)
@triton.jit
def _cat_bwd_kernel(x_ptr, p_ptr, lse_ptr, g_ptr, dp_ptr, RE, B, E, V, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """dlogits[s, b, e, v] = g[s, b] (1[v == x[b, e]] - softmax_v); rows are (s, b, e)."""
    acc = lse_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < RE
    sb = rows // E
    b_idx = (sb % B).to(tl.int64)
    e_idx = (rows % E).to(tl.int64)
    g = tl.load(g_ptr + sb, mask=rmask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    xi = tl.load(x_ptr + b_idx * E + e_idx, mask=rmask, other=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    base = rows.to(tl.int64) * V
    for v0 in range(0, V, BLOCK_V):
        v = v0 + cols
        msk = rmask[:, None] & (v < V)[None, :]
        lg = tl.load(p_ptr + base[:, None] + v[None, :], mask=msk, other=0.0).to(acc)
        d = tl.where(v[None, :] == xi[:, None], 1.0, 0.0) - tl.exp(lg - lse[:, None])
        tl.store(dp_ptr + base[:, None] + v[None, :], (g[:, None] * d).to(dp_ptr.dtype.element_ty), mask=msk)


def _grid(R):
    return lambda meta: (triton.cdiv(R, meta["BLOCK_R"]),)


def _scale3(scale, S, B, E):
    """The compacted scale [S|1, B|1, E|1] as a stride-0 view [S, B, E], and its strides."""
    sc = scale.expand(S, B, E)
    return sc, sc.stride()


def _categorical(x, params):
    """(out [S * B], lse [S, B, E]) of the categorical forward kernel."""
    S, B, E, V = params.shape
    dt = acc_dtype(params.dtype)
    out = torch.empty(S * B, dtype=dt, device=params.device)
    lse = torch.empty(S, B, E, dtype=dt, device=params.device)
    if S * B > 0:
        wrap_triton(_cat_fwd_kernel)[_grid(S * B)](x, params, out, lse, S * B, B, E, V)
    return out, lse


@triton_op("mmvae_fast_triton::likelihood_sum", mutates_args=())
def likelihood_sum(x: torch.Tensor, params: torch.Tensor, scale: torch.Tensor | None, family: int) -> torch.Tensor:
    x, params = x.contiguous(), params.contiguous()
    S, B, E = params.shape[:3]
    if family == 3:
        return _categorical(x, params)[0].view(S, B)
    out = torch.empty(S * B, dtype=acc_dtype(params.dtype), device=params.device)
    sc, ss = (params, (0, 0, 0)) if scale is None else _scale3(scale, S, B, E)
    if S * B > 0:
        wrap_triton(_dense_fwd_kernel)[_grid(S * B)](x, params, sc, out, S * B, B, E, ss[0], ss[1], ss[2], FAM=family)
    return out.view(S, B)


@triton_op("mmvae_fast_triton::likelihood_sum_backward", mutates_args=())
def likelihood_sum_backward(
    grad: torch.Tensor, x: torch.Tensor, params: torch.Tensor, scale: torch.Tensor | None, family: int,
    params_grad: bool, scale_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d params or empty, d scale in the scale's compacted shape or empty)."""
    x, params, g = x.contiguous(), params.contiguous(), grad.contiguous()
    S, B, E = params.shape[:3]
    dt = acc_dtype(params.dtype)
    none = torch.empty(0, dtype=dt, device=params.device)
    if family == 3:
        if not params_grad:
            return params.new_empty(0), none
        _, lse = _categorical(x, params)
        dp = torch.empty_like(params)
        if S * B * E > 0:
            wrap_triton(_cat_bwd_kernel)[_grid(S * B * E)](x, params, lse, g, dp, S * B * E, B, E, params.shape[3])
        return dp, none
    scale_grad = scale_grad and scale is not None
    dp = torch.empty_like(params)  # written in the same pass as d scale
    dsc = torch.empty(S, B, E, dtype=dt, device=params.device) if scale_grad else none
    sc, ss = (params, (0, 0, 0)) if scale is None else _scale3(scale, S, B, E)
    if S * B > 0:
        wrap_triton(_dense_bwd_kernel)[_grid(S * B)](
            x, params, sc, g, dp, dsc, S * B, B, E, ss[0], ss[1], ss[2], FAM=family, SCALE_GRAD=scale_grad
        )
    if scale_grad:  # summed over the dims the compacted scale broadcasts along
        dims = [d for d in range(3) if scale.shape[d] == 1]
        dsc = dsc.sum(dims, keepdim=True) if dims else dsc
    return (dp if params_grad else params.new_empty(0)), dsc
