"""moe_estimator in Triton, with the schemas of the C++ ops (csrc/ops.cpp):

    moe_estimator(z, loc, scale, prior_loc, prior_scale, lpx, family, prior_family, bound, estimator,
                  mask?, lse?, num_samples?) -> (bound [B], lw, z_weight ([0] for iwae/released), lq, stats)
    moe_estimator_backward(grad, z, loc, scale, prior_loc, prior_scale, mask?, lw, lq, stats, family,
                           prior_family, bound, estimator, num_samples?) -> (dz, dloc, dscale, dprior_loc,
                           dprior_scale, dlpx)

The maths: mmvae_fast/reference/moe_estimator.py; the contract (every output, masks, -inf, NaN, lse
given): the CPU kernel, csrc/cpu/moe_estimator.cpp, which these kernels mirror. Layout as in
kernels/_mixture_rows.py: z[r, k, b, :], loc/scale[m, b, :], the whole latent vector in one tile.

Forward, two kernels:
  _fwd_samples   one program per (group r, chunk of samples, tile of items): for each sample the
                 pairwise log-densities a[r, m] over the present experts, folded into an online
                 log-sum-exp in registers, the prior's log-density, lq and lw (and, for the mixture
                 estimators, pi_r(z), the own expert's responsibility, in a scratch [M, K, B]).
  _fwd_stats     one program per tile of items: each softmax's (max, log-sum) of lw (two passes, as
                 the CPU kernel), the bound, and z_weight. Reads O(M K B) numbers.
Backward, one kernel, one program per (tile of samples k, tile of items), looping over r and m:
  phase A  per sample: pi_m = exp(a_m - max) / sum (two passes over the experts: exact at any |a|)
           and sum_m pi_m dlog q_m/dz, the gradients of z, lpx and the prior, and the alias term
           -pi_r(z) of expert r (mixture*); each sample's (max, 1 / sum) into a scratch [M, K, B, 2];
  phase B  expert by expert (iwae, mixture*): the score terms -pi_m dlog q_m/d(loc_m, scale_m).
Each program writes partial sums of the loc/scale/prior gradients for its tile of samples
([n_tiles, M, B, L] and [n_tiles, B, L]), summed afterwards: deterministic, no atomics, and a
fraction of z's size (tiles of K_TILE samples). Nothing of size M*M*K*B*L exists; every output is
written before it is read, so a relaunch (autotuning) on the same buffers gives the same results.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import acc_dtype, interpreting, log_density_terms, sample_tile, weighted

MAX_L = 8192  # the whole latent vector lives in one tile
K_CHUNK_FWD = 2 if interpreting() else 4  # samples per forward program (under the interpreter: cross chunks)
_TILE = 4096  # max elements of a [BLOCK_B, BLOCK_L] tile
_BOUND = {"looser": 0, "stratified": 1}
_EST = {"iwae": 0, "eq8": 1, "mixture": 2, "mixture-centred": 3, "released": 4}  # moe_estimator.h's codes


def _prune(configs, named_args, **kwargs):
    bl = kwargs.get("BLOCK_L", named_args.get("BLOCK_L"))
    kept = [c for c in configs if c.kwargs["BLOCK_B"] * bl <= _TILE]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_B"])]


_ROW_CONFIGS = [triton.Config({"BLOCK_B": bb}, num_warps=nw) for bb, nw in [(1, 2), (2, 4), (4, 4), (8, 4), (16, 4), (32, 8)]]


def _rows_tuned(fn):
    if interpreting():  # small tiles on purpose: the tests cross tile boundaries
        return triton.autotune(configs=[triton.Config({"BLOCK_B": 2})], key=["L"])(fn)
    return triton.autotune(configs=_ROW_CONFIGS, key=["M", "B", "L"], prune_configs_by={"early_config_prune": _prune})(fn)


def _stats_tuned(fn):
    if interpreting():
        return triton.autotune(configs=[triton.Config({"BLOCK_B": 2, "BLOCK_K": 2})], key=["M"])(fn)
    configs = [triton.Config({"BLOCK_B": bb, "BLOCK_K": bk}, num_warps=4) for bb, bk in [(16, 32), (32, 32), (64, 16)]]
    return triton.autotune(configs=configs, key=["M", "K", "B"])(fn)


@triton.jit
def _present(mask_ptr, m, B, offs_b, bmask, HAS_MASK: tl.constexpr):
    """Whether expert m is present in each item of the tile."""
    if HAS_MASK:
        p = tl.load(mask_ptr + m * B + offs_b, mask=bmask, other=0) != 0
    else:
        p = offs_b >= 0
    return p


@triton.jit
def _n_present(mask_ptr, M, B, offs_b, bmask, acc: tl.constexpr, HAS_MASK: tl.constexpr):
    """n_b, the number of present experts of each item (float)."""
    n = tl.zeros(offs_b.shape, acc)
    for m in range(0, M):
        n += _present(mask_ptr, m, B, offs_b, bmask, HAS_MASK).to(acc)
    return n


@triton.jit
def _load_expert(loc_ptr, scale_ptr, off, tmask, present, acc: tl.constexpr):
    """Expert m's (loc, scale) tile at offset off; an absent expert's parameters are replaced
    before any maths, so a NaN there reaches nothing."""
    lo = tl.load(loc_ptr + off, mask=tmask, other=0.0).to(acc)
    sc = tl.load(scale_ptr + off, mask=tmask, other=1.0).to(acc)
    pm = present[:, None]
    return tl.where(pm, lo, 0.0), tl.where(pm, sc, 1.0)


@triton.jit
def _wbar(lw, mx, ls):
    """moe_wbar: the weight of lw in its softmax from the slice's (max, log-sum); 0 for an all -inf
    slice, NaN propagates."""
    return tl.where(mx == float("-inf"), 0.0, tl.exp((lw - mx) - ls))


@triton.jit
def _fwd_samples_kernel(
    z_ptr, loc_ptr, scale_ptr, ploc_ptr, pscale_ptr, lpx_ptr, mask_ptr, lw_ptr, lq_ptr, pi_ptr, M, K, B, L,
    NORMAL: tl.constexpr, PNORMAL: tl.constexpr, HAS_MASK: tl.constexpr, WRITE_PI: tl.constexpr,
    K_CHUNK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_B: tl.constexpr,
):
    acc = lw_ptr.dtype.element_ty
    r, k0, offs_b, bmask, tmask, bl = sample_tile(K, B, L, K_CHUNK, BLOCK_L, BLOCK_B)
    log_n = tl.log(tl.maximum(_n_present(mask_ptr, M, B, offs_b, bmask, acc, HAS_MASK), 1.0))
    live = _present(mask_ptr, r, B, offs_b, bmask, HAS_MASK)  # expert r present: its samples count
    zmask = tmask & live[:, None]
    plo = tl.load(ploc_ptr + bl, mask=tmask, other=0.0).to(acc)
    psc = tl.load(pscale_ptr + bl, mask=tmask, other=1.0).to(acc)
    for k in range(k0, tl.minimum(k0 + K_CHUNK, K)):
        rk = (r * K + k).to(tl.int64)
        zz = tl.load(z_ptr + rk * B * L + bl, mask=zmask, other=0.0).to(acc)
        m_run = tl.full([BLOCK_B], float("-inf"), acc)
        s = tl.zeros([BLOCK_B], acc)
        own = tl.zeros([BLOCK_B], acc)
        for mm in range(0, M):
            pm = _present(mask_ptr, mm, B, offs_b, bmask, HAS_MASK)
            lo, sc = _load_expert(loc_ptr, scale_ptr, mm * B * L + bl, tmask, pm, acc)
            lp, _dl, _ds = log_density_terms(zz, lo, sc, NORMAL)
            a = tl.where(pm, tl.sum(tl.where(tmask, lp, 0.0), 1), float("-inf"))
            own = tl.where(mm == r, a, own)
            # online log-sum-exp over the present experts; shift by 0 while only -inf has been seen
            m_new = tl.maximum(m_run, a)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m_run - m_safe) + tl.exp(a - m_safe)  # NaN sticks in s
            m_run = m_new
        lse = tl.where(s == 0.0, float("-inf"), m_run + tl.log(tl.where(s == 0.0, 1.0, s)))
        plp, _pdl, _pds = log_density_terms(zz, plo, psc, PNORMAL)
        lpz = tl.sum(tl.where(tmask, plp, 0.0), 1)
        lpx = tl.load(lpx_ptr + rk * B + offs_b, mask=bmask & live, other=0.0).to(acc)
        lq = lse - log_n
        # the samples of an absent expert: lw = -inf, lq = 0 (and pi = 0), as the CPU kernel
        tl.store(lw_ptr + rk * B + offs_b, tl.where(live, lpz + lpx - lq, float("-inf")), mask=bmask)
        tl.store(lq_ptr + rk * B + offs_b, tl.where(live, lq, 0.0), mask=bmask)
        if WRITE_PI:  # pi_r = exp(a_r - max) / sum: exact at any |a| (exp(a_r - lse) is not: a float32
            # lse ~ -5e7 cannot hold max + log 2), as the CPU kernel
            pi = tl.where(m_run - m_run == 0.0, tl.exp(own - m_run) / s, tl.exp(own - lse))
            tl.store(pi_ptr + rk * B + offs_b, tl.where(live, pi, 0.0), mask=bmask)


@triton.jit
def _lw_block(lw_ptr, mask_ptr, r, k0, K, B, offs_b, bmask, HAS_MASK: tl.constexpr, BLOCK_K: tl.constexpr):
    """lw[r, k0:k0+BLOCK_K, offs_b] as [BLOCK_K, BLOCK_B] (-inf outside, and for absent experts),
    and its mask."""
    ks = k0 + tl.arange(0, BLOCK_K)
    live = _present(mask_ptr, r, B, offs_b, bmask, HAS_MASK)
    m2 = (ks < K)[:, None] & (bmask & live)[None, :]
    v = tl.load(lw_ptr + (r * K + ks).to(tl.int64)[:, None] * B + offs_b[None, :], mask=m2, other=float("-inf"))
    return v, m2


@triton.jit
def _slice_stats(lw_ptr, mask_ptr, r_lo, r_hi, K, B, offs_b, bmask,
                 acc: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    """(max, log-sum) of lw over the samples of the present groups r_lo..r_hi-1 of each item: two
    passes, as the CPU kernel; an infinite max gives (max, 0) (all -inf: weights 0; +inf: the
    bound +inf, NaN weights), a NaN gives NaN."""
    mx = tl.full([BLOCK_B], float("-inf"), acc)
    nan = tl.zeros([BLOCK_B], tl.int32)
    for r in range(r_lo, r_hi):
        for k0 in range(0, K, BLOCK_K):
            v, _m2 = _lw_block(lw_ptr, mask_ptr, r, k0, K, B, offs_b, bmask, HAS_MASK, BLOCK_K)
            mx = tl.maximum(mx, tl.max(tl.where(v != v, float("-inf"), v), 0))
            nan = tl.maximum(nan, tl.max((v != v).to(tl.int32), 0))
    mx = tl.where(nan > 0, float("nan"), mx)
    inf_max = (mx == float("-inf")) | (mx == float("inf"))
    shift = tl.where(inf_max, 0.0, mx)
    s = tl.zeros([BLOCK_B], acc)
    for r in range(r_lo, r_hi):
        for k0 in range(0, K, BLOCK_K):
            v, m2 = _lw_block(lw_ptr, mask_ptr, r, k0, K, B, offs_b, bmask, HAS_MASK, BLOCK_K)
            s += tl.sum(tl.where(m2, tl.exp(v - shift[None, :]), 0.0), 0)
    ls = tl.where(inf_max, 0.0, tl.log(s))
    return mx, ls


@triton.jit
def _z_weight(lw_ptr, pi_ptr, zw_ptr, mask_ptr, r, K, B, offs_b, bmask, mx, ls,
              EST: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_K: tl.constexpr):
    """z_weight of group r's samples: wbar (eq8), 1 - pi_r (1 - wbar) (mixture*; pi_r from
    _fwd_samples, never read back from zw: the autotuner relaunches on the same buffers), 0 for an
    absent expert."""
    live = _present(mask_ptr, r, B, offs_b, bmask, HAS_MASK)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        m2 = (ks < K)[:, None] & bmask[None, :]
        off = (r * K + ks).to(tl.int64)[:, None] * B + offs_b[None, :]
        w = _wbar(tl.load(lw_ptr + off, mask=m2, other=float("-inf")), mx[None, :], ls[None, :])
        if EST == 1:
            zw = w
        else:
            zw = 1.0 - tl.load(pi_ptr + off, mask=m2, other=0.0) * (1.0 - w)
        tl.store(zw_ptr + off, tl.where(live[None, :], zw, 0.0), mask=m2)


@triton.jit
def _fwd_stats_kernel(
    lw_ptr, pi_ptr, mask_ptr, lse_ptr, bound_ptr, zw_ptr, stats_ptr, M, K, B, Kc,
    LOOSER: tl.constexpr, EST: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LSE: tl.constexpr, WRITE_ZW: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    acc = lw_ptr.dtype.element_ty
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = offs_b < B
    n = _n_present(mask_ptr, M, B, offs_b, bmask, acc, HAS_MASK)
    log_kc = tl.log(tl.zeros([BLOCK_B], acc) + Kc)
    if LOOSER:
        value = tl.zeros([BLOCK_B], acc)
        for r in range(0, M):
            if HAS_LSE:  # the chunked path's (max, log-sum) pairs
                mx = tl.load(lse_ptr + (r * B + offs_b).to(tl.int64) * 2, mask=bmask, other=0.0).to(acc)
                ls = tl.load(lse_ptr + (r * B + offs_b).to(tl.int64) * 2 + 1, mask=bmask, other=0.0).to(acc)
            else:
                mx, ls = _slice_stats(lw_ptr, mask_ptr, r, r + 1, K, B, offs_b, bmask, acc, HAS_MASK, BLOCK_K, BLOCK_B)
            st = stats_ptr + (r * B + offs_b).to(tl.int64) * 2
            tl.store(st, mx, mask=bmask)
            tl.store(st + 1, ls, mask=bmask)
            # a sum of quotients: near -3e38 a sum of log-normalisers would overflow
            value += tl.where(_present(mask_ptr, r, B, offs_b, bmask, HAS_MASK), (mx + ls) / tl.maximum(n, 1.0), 0.0)
            if WRITE_ZW:
                _z_weight(lw_ptr, pi_ptr, zw_ptr, mask_ptr, r, K, B, offs_b, bmask, mx, ls, EST, HAS_MASK, BLOCK_K)
        value = value - log_kc
    else:
        if HAS_LSE:
            mx = tl.load(lse_ptr + offs_b.to(tl.int64) * 2, mask=bmask, other=0.0).to(acc)
            ls = tl.load(lse_ptr + offs_b.to(tl.int64) * 2 + 1, mask=bmask, other=0.0).to(acc)
        else:
            mx, ls = _slice_stats(lw_ptr, mask_ptr, 0, M, K, B, offs_b, bmask, acc, HAS_MASK, BLOCK_K, BLOCK_B)
        st = stats_ptr + offs_b.to(tl.int64) * 2
        tl.store(st, mx, mask=bmask)
        tl.store(st + 1, ls, mask=bmask)
        value = mx + ls - (tl.log(tl.maximum(n, 1.0)) + log_kc)
        if WRITE_ZW:
            for r in range(0, M):
                _z_weight(lw_ptr, pi_ptr, zw_ptr, mask_ptr, r, K, B, offs_b, bmask, mx, ls, EST, HAS_MASK, BLOCK_K)
    tl.store(bound_ptr + offs_b, tl.where(n > 0, value, 0.0), mask=bmask)  # no expert present: 0


@triton.jit
def _coef(EST: tl.constexpr, s, w, c):
    """moe_coef: (omega, score_own, score_other, alias) per item of the tile (moe_estimator.h)."""
    om = s * w
    zero = tl.zeros(om.shape, om.dtype)
    if EST == 0:  # iwae
        cf = (om, om, om, zero)
    elif EST == 2:  # mixture
        cf = (om, zero, om, om)
    elif EST == 3:  # mixture-centred
        cf = (om, zero, s * (w - c), s * (w - c))
    else:  # eq8, released
        cf = (om, zero, zero, zero)
    return cf


@triton.jit
def _bwd_kernel(
    g_ptr, z_ptr, loc_ptr, scale_ptr, ploc_ptr, pscale_ptr, mask_ptr, lw_ptr, nrm_ptr, stats_ptr,
    gz_ptr, glpx_ptr, gl_ptr, gs_ptr, gpl_ptr, gps_ptr, M, K, B, L, Kc, K_TILE,
    NORMAL: tl.constexpr, PNORMAL: tl.constexpr, HAS_MASK: tl.constexpr, LOOSER: tl.constexpr, EST: tl.constexpr,
    ALIAS: tl.constexpr, SCORE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_B: tl.constexpr,
):
    acc = lw_ptr.dtype.element_ty
    kt = tl.program_id(0)
    k0 = kt * K_TILE
    k1 = tl.minimum(k0 + K_TILE, K)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_l = tl.arange(0, BLOCK_L)
    bmask = offs_b < B
    tmask = bmask[:, None] & (offs_l < L)[None, :]
    bl = offs_b.to(tl.int64)[:, None] * L + offs_l[None, :]
    n = tl.maximum(_n_present(mask_ptr, M, B, offs_b, bmask, acc, HAS_MASK), 1.0)
    g = tl.load(g_ptr + offs_b, mask=bmask, other=0.0).to(acc)
    kc = tl.zeros([BLOCK_B], acc) + Kc
    if LOOSER:  # s: the upstream gradient of the bound per sample's softmax; c: the centring constant
        s = g / n
        c = 1.0 / kc
    else:
        s = g
        c = 1.0 / (kc * n)
        mx = tl.load(stats_ptr + offs_b.to(tl.int64) * 2, mask=bmask, other=0.0)
        ls = tl.load(stats_ptr + offs_b.to(tl.int64) * 2 + 1, mask=bmask, other=0.0)
    plo = tl.load(ploc_ptr + bl, mask=tmask, other=0.0).to(acc)
    psc = tl.load(pscale_ptr + bl, mask=tmask, other=1.0).to(acc)
    gpl = tl.zeros([BLOCK_B, BLOCK_L], acc)
    gps = tl.zeros([BLOCK_B, BLOCK_L], acc)
    # phase A: sample by sample, dz, dlpx, the prior's gradients and the alias term of expert r
    for r in range(0, M):
        live = _present(mask_ptr, r, B, offs_b, bmask, HAS_MASK)
        zmask = tmask & live[:, None]
        if LOOSER:
            mx = tl.load(stats_ptr + (r * B + offs_b).to(tl.int64) * 2, mask=bmask, other=0.0)
            ls = tl.load(stats_ptr + (r * B + offs_b).to(tl.int64) * 2 + 1, mask=bmask, other=0.0)
        al_l = tl.zeros([BLOCK_B, BLOCK_L], acc)
        al_s = tl.zeros([BLOCK_B, BLOCK_L], acc)
        for k in range(k0, k1):
            rk = (r * K + k).to(tl.int64)
            zz = tl.load(z_ptr + rk * B * L + bl, mask=zmask, other=0.0).to(acc)
            w = _wbar(tl.load(lw_ptr + rk * B + offs_b, mask=bmask & live, other=float("-inf")), mx, ls)
            om, _so, _sx, alias = _coef(EST, s, w, c)
            om = tl.where(live, om, 0.0)
            tl.store(glpx_ptr + rk * B + offs_b, om, mask=bmask)
            # pi_m = exp(a_m - max) / sum_m' exp(a_m' - max) over the present experts, in two passes
            # over them: exact at any |a|. exp(a_m - lse) from the saved float32 lq is not (at |a| ~ 5e7
            # lq cannot hold a + log 2: two tied experts got pi 1 each), as the CPU kernel.
            a_max = tl.full([BLOCK_B], float("-inf"), acc)
            for mm in range(0, M):
                pm = _present(mask_ptr, mm, B, offs_b, bmask, HAS_MASK)
                lo, sc = _load_expert(loc_ptr, scale_ptr, mm * B * L + bl, tmask, pm, acc)
                lp, _dl, _ds = log_density_terms(zz, lo, sc, NORMAL)
                a = tl.sum(tl.where(tmask, lp, 0.0), 1)
                a_max = tl.where(pm & ((a > a_max) | (a != a)), a, a_max)  # NaN-propagating max
            e_sum = tl.zeros([BLOCK_B], acc)
            sum_da = tl.zeros([BLOCK_B, BLOCK_L], acc)  # sum_m pi_m dlog q_m / dz, unnormalised here
            da_own = tl.zeros([BLOCK_B, BLOCK_L], acc)
            u_own = tl.zeros([BLOCK_B, BLOCK_L], acc)
            pi_own = tl.zeros([BLOCK_B], acc)
            for mm in range(0, M):
                pm = _present(mask_ptr, mm, B, offs_b, bmask, HAS_MASK)
                lo, sc = _load_expert(loc_ptr, scale_ptr, mm * B * L + bl, tmask, pm, acc)
                lp, dl, _ds = log_density_terms(zz, lo, sc, NORMAL)
                e = tl.where(pm, tl.exp(tl.sum(tl.where(tmask, lp, 0.0), 1) - a_max), 0.0)
                e_sum += e
                sum_da -= weighted(e[:, None], dl)  # dlog q_m / dz = -dlog q_m / dloc
                if ALIAS:
                    da_own = tl.where(mm == r, -dl, da_own)
                    u_own = tl.where(mm == r, (zz - lo) / sc, u_own)
                    pi_own = tl.where(mm == r, e, pi_own)
            inv_sum = tl.where((a_max - a_max == 0.0) & (e_sum > 0.0), 1.0 / e_sum, 1.0)
            sum_da = sum_da * inv_sum[:, None]
            pi_own = pi_own * inv_sum
            if SCORE:  # phase B's responsibilities of this sample
                tl.store(nrm_ptr + (rk * B + offs_b) * 2, a_max, mask=bmask)
                tl.store(nrm_ptr + (rk * B + offs_b) * 2 + 1, inv_sum, mask=bmask)
            _plp, pdl, pds = log_density_terms(zz, plo, psc, PNORMAL)
            om2 = om[:, None]
            tl.store(gz_ptr + rk * B * L + bl, tl.where(live[:, None], weighted(om2, -pdl - sum_da), 0.0), mask=tmask)
            gpl += tl.where(zmask, weighted(om2, pdl), 0.0)
            gps += tl.where(zmask, weighted(om2, pds), 0.0)
            if ALIAS:  # -alias pi_r (dA_r - sum_m pi_m dA_m), through z = loc_r + scale_r eps
                beta = tl.where(live, -alias * pi_own, 0.0)[:, None]
                ga = tl.where(zmask, weighted(beta, da_own - sum_da), 0.0)
                al_l += ga
                al_s += weighted(ga, u_own)
        out = ((kt * M + r) * B).to(tl.int64) * L + bl
        tl.store(gl_ptr + out, al_l, mask=tmask)
        tl.store(gs_ptr + out, al_s, mask=tmask)
    pout = (kt * B).to(tl.int64) * L + bl
    tl.store(gpl_ptr + pout, gpl, mask=tmask)
    tl.store(gps_ptr + pout, gps, mask=tmask)
    # phase B: expert by expert, the score terms -coef pi_m dlog q_m / d(loc_m, scale_m)
    if SCORE:
        tl.debug_barrier()  # phase A's partials of this program are stored
        for mm in range(0, M):
            pm = _present(mask_ptr, mm, B, offs_b, bmask, HAS_MASK)
            lo, sc = _load_expert(loc_ptr, scale_ptr, mm * B * L + bl, tmask, pm, acc)
            out = ((kt * M + mm) * B).to(tl.int64) * L + bl
            acc_l = tl.load(gl_ptr + out, mask=tmask, other=0.0)
            acc_s = tl.load(gs_ptr + out, mask=tmask, other=0.0)
            for r in range(0, M):
                live = _present(mask_ptr, r, B, offs_b, bmask, HAS_MASK)
                zmask = tmask & live[:, None]
                if LOOSER:
                    mx = tl.load(stats_ptr + (r * B + offs_b).to(tl.int64) * 2, mask=bmask, other=0.0)
                    ls = tl.load(stats_ptr + (r * B + offs_b).to(tl.int64) * 2 + 1, mask=bmask, other=0.0)
                for k in range(k0, k1):
                    rk = (r * K + k).to(tl.int64)
                    zz = tl.load(z_ptr + rk * B * L + bl, mask=zmask, other=0.0).to(acc)
                    w = _wbar(tl.load(lw_ptr + rk * B + offs_b, mask=bmask & live, other=float("-inf")), mx, ls)
                    _om, s_own, s_other, _al = _coef(EST, s, w, c)
                    a_max = tl.load(nrm_ptr + (rk * B + offs_b) * 2, mask=bmask & live, other=0.0)
                    inv_sum = tl.load(nrm_ptr + (rk * B + offs_b) * 2 + 1, mask=bmask & live, other=0.0)
                    lp, dl, ds = log_density_terms(zz, lo, sc, NORMAL)
                    pi = tl.exp(tl.sum(tl.where(tmask, lp, 0.0), 1) - a_max) * inv_sum
                    coef = tl.where(pm & live, -tl.where(mm == r, s_own, s_other) * pi, 0.0)[:, None]
                    acc_l += tl.where(zmask, weighted(coef, dl), 0.0)
                    acc_s += tl.where(zmask, weighted(coef, ds), 0.0)
            tl.store(gl_ptr + out, acc_l, mask=tmask)
            tl.store(gs_ptr + out, acc_s, mask=tmask)


fwd_samples = _rows_tuned(_fwd_samples_kernel)
fwd_stats = _stats_tuned(_fwd_stats_kernel)
bwd = _rows_tuned(_bwd_kernel)


def _shape(z):
    M, K, B, L = z.shape
    if L > MAX_L:
        raise ValueError(f"argument 'z': the Triton backend supports latent dims L <= {MAX_L}, got L = {L}")
    return M, K, B, L, triton.next_power_of_2(L)


def k_tile(K: int) -> int:
    """Samples per backward program: at most ~32 tiles along K, so that the partial gradients
    [n_tiles, M, B, L] stay a small fraction of z (at most a quarter, and 1/32 for large K)."""
    if interpreting():
        return 2  # the tests cross tiles
    return min(64, max(4, triton.next_power_of_2(triton.cdiv(K, 32))))


def _mask8(mask):
    return None if mask is None else mask.to(torch.int8).contiguous()


@triton_op("mmvae_fast_triton::moe_estimator", mutates_args=())
def moe_estimator(
    z: list[torch.Tensor], loc: torch.Tensor, scale: torch.Tensor, prior_loc: torch.Tensor, prior_scale: torch.Tensor,
    lpx: torch.Tensor, family: str, prior_family: str, bound: str, estimator: str, mask: torch.Tensor | None,
    lse: torch.Tensor | None, num_samples: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    z = torch.stack(z)  # the kernels read one [M, K, B, L] tensor (the C++ kernels read the list in place)
    M, K, B, L, BL = _shape(z)
    dt = acc_dtype(z.dtype)
    looser = _BOUND[bound] == 0
    est = _EST[estimator]
    want_zw = estimator in ("eq8", "mixture", "mixture-centred")
    out_bound = torch.empty(B, dtype=dt, device=z.device)
    lw = torch.empty(M, K, B, dtype=dt, device=z.device)
    lq = torch.empty(M, K, B, dtype=dt, device=z.device)
    zw = torch.empty((M, K, B) if want_zw else (0,), dtype=dt, device=z.device)
    stats = torch.empty(M * B if looser else B, 2, dtype=dt, device=z.device)
    pi = torch.empty(M, K, B, dtype=dt, device=z.device) if est in (2, 3) else None  # pi_r(z), for z_weight
    m8 = _mask8(mask)
    z = z.contiguous()
    n_kc = triton.cdiv(K, K_CHUNK_FWD)
    wrap_triton(fwd_samples)[lambda meta: (M * n_kc, triton.cdiv(B, meta["BLOCK_B"]))](
        z, loc.contiguous(), scale.contiguous(), prior_loc.contiguous(), prior_scale.contiguous(), lpx.contiguous(),
        z if m8 is None else m8, lw, lq, lq if pi is None else pi, M, K, B, L,
        NORMAL=family == "normal", PNORMAL=prior_family == "normal", HAS_MASK=m8 is not None,
        WRITE_PI=est in (2, 3), K_CHUNK=K_CHUNK_FWD, BLOCK_L=BL,
    )
    lse_ = None if lse is None else lse.to(dt).contiguous()
    wrap_triton(fwd_stats)[lambda meta: (triton.cdiv(B, meta["BLOCK_B"]),)](
        lw, lw if pi is None else pi, lw if m8 is None else m8, lw if lse_ is None else lse_, out_bound, zw if want_zw else lw, stats,
        M, K, B, num_samples or K,
        LOOSER=looser, EST=est, HAS_MASK=m8 is not None, HAS_LSE=lse_ is not None, WRITE_ZW=want_zw,
    )
    return out_bound, lw, zw, lq, stats


@triton_op("mmvae_fast_triton::moe_estimator_backward", mutates_args=())
def moe_estimator_backward(
    grad: torch.Tensor, z: list[torch.Tensor], loc: torch.Tensor, scale: torch.Tensor, prior_loc: torch.Tensor,
    prior_scale: torch.Tensor, mask: torch.Tensor | None, lw: torch.Tensor, lq: torch.Tensor, stats: torch.Tensor,
    family: str, prior_family: str, bound: str, estimator: str, num_samples: int | None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    z = torch.stack(z)
    M, K, B, L, BL = _shape(z)
    dt = acc_dtype(z.dtype)
    kt = k_tile(K)
    n_kt = triton.cdiv(K, kt)
    gz = torch.empty(M, K, B, L, dtype=dt, device=z.device)
    glpx = torch.empty(M, K, B, dtype=dt, device=z.device)
    gl = torch.empty(n_kt, M, B, L, dtype=dt, device=z.device)  # per-program partial sums
    gs = torch.empty_like(gl)
    gpl = torch.empty(n_kt, B, L, dtype=dt, device=z.device)
    gps = torch.empty_like(gpl)
    m8 = _mask8(mask)
    score = estimator in ("iwae", "mixture", "mixture-centred")
    # each sample's (max, 1 / sum) over its experts, from phase A to phase B (O(M K B); lq is not read)
    nrm = torch.empty(M, K, B, 2, dtype=dt, device=z.device) if score else gz
    wrap_triton(bwd)[lambda meta: (n_kt, triton.cdiv(B, meta["BLOCK_B"]))](
        grad.to(dt).contiguous(), z.contiguous(), loc.contiguous(), scale.contiguous(), prior_loc.contiguous(),
        prior_scale.contiguous(), z if m8 is None else m8, lw.contiguous(), nrm, stats.contiguous(),
        gz, glpx, gl, gs, gpl, gps, M, K, B, L, num_samples or K, kt,
        NORMAL=family == "normal", PNORMAL=prior_family == "normal", HAS_MASK=m8 is not None,
        LOOSER=_BOUND[bound] == 0, EST=_EST[estimator], ALIAS=estimator in ("mixture", "mixture-centred"),
        SCORE=score, BLOCK_L=BL,
    )
    # one tensor per expert, as the C++ op returns them (an op's outputs may not alias each other)
    return ([g.to(z.dtype, copy=True) for g in gz.unbind(0)], gl.sum(0).to(loc.dtype), gs.sum(0).to(scale.dtype),
            gpl.sum(0).to(prior_loc.dtype).reshape(prior_loc.shape), gps.sum(0).to(prior_scale.dtype).reshape(prior_scale.shape),
            glpx)
