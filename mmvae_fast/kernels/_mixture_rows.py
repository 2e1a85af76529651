"""The pairwise-table tiles shared by the Triton mixture_log_density and importance_ratios.

Layout (docs/design.md section 2): z[r, k, b, l] sample k of group r; loc, scale[m, b, l] expert m;
a[r, m, k, b] = sum_l log f(z[r, k, b, l]; loc[m, b, l], scale[m, b, l]).

Each program owns one group r, a chunk of K_CHUNK samples (K_CHUNK_FWD / _BWD) and a tile of BLOCK_B batch entries,
with the whole latent vector in the tile (BLOCK_L = next power of two >= L). The pairwise
values are formed in registers, one expert at a time, and folded into an online log-sum-exp:
nothing of size M*M*K*B*L exists, and a[M, M, K, B] only when asked for.

Backward recomputes a from z and the saved statistic (lse for the mixture, the ratios themselves
for the ratios) and writes per-program partial sums of the loc/scale gradients,
[M * n_chunks, M, B, L], summed afterwards: deterministic, no atomics.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import acc_dtype, interpreting, log_density_terms, sample_tile

MAX_L = 8192  # the whole latent vector lives in one tile
# Samples per program. Forward: few, for parallelism (a GPU wants thousands of programs). Backward:
# more, since each program writes a partial loc/scale gradient [M, BLOCK_B, L] per chunk.
# Under the interpreter 2, so that the tests cross chunks.
K_CHUNK_FWD = 2 if interpreting() else 4
K_CHUNK_BWD = 2 if interpreting() else 8
_TILE = 4096  # max elements of a [BLOCK_B, BLOCK_L] tile


def _prune(configs, named_args, **kwargs):
    bl = kwargs.get("BLOCK_L", named_args.get("BLOCK_L"))
    kept = [c for c in configs if c.kwargs["BLOCK_B"] * bl <= _TILE]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_B"])]


_CONFIGS = [triton.Config({"BLOCK_B": bb}, num_warps=nw) for bb, nw in [(1, 2), (2, 4), (4, 4), (8, 4), (16, 4), (32, 8), (64, 8)]]


def _tuned(fn):
    if interpreting():
        return triton.autotune(configs=[triton.Config({"BLOCK_B": 2})], key=["L"])(fn)
    return triton.autotune(configs=_CONFIGS, key=["M", "B", "L"], prune_configs_by={"early_config_prune": _prune})(fn)


@triton.jit
def _logf(zz, lo, sc, lmask, NORMAL: tl.constexpr):
    """sum_l log f(z; loc, scale) over a [BLOCK_B, BLOCK_L] tile, and the elementwise d/dloc, d/dscale."""
    lp, dloc, dscale = log_density_terms(zz, lo, sc, NORMAL)
    return tl.sum(tl.where(lmask, lp, 0.0), 1), dloc, dscale


@triton.jit
def _mixture_fwd_kernel(
    z_ptr, loc_ptr, scale_ptr, mask_ptr, lq_ptr, a_ptr, sum_ptr, M, K, B, L,
    NORMAL: tl.constexpr, HAS_MASK: tl.constexpr, WRITE_A: tl.constexpr, STATS: tl.constexpr,
    K_CHUNK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """lq per sample (and the pairwise table a if WRITE_A); STATS: instead of lq, the log-sum-exp's
    running max (into lq_ptr) and its sum of exp(a - max) (into sum_ptr), for the backward's
    responsibilities exp(a - max) / sum, exact at any |a| (exp(a - lse) is not: lse is rounded)."""
    acc = lq_ptr.dtype.element_ty
    r, k0, offs_b, bmask, tmask, bl = sample_tile(K, B, L, K_CHUNK, BLOCK_L, BLOCK_B)
    for k in range(k0, tl.minimum(k0 + K_CHUNK, K)):
        rk = r * K + k
        zz = tl.load(z_ptr + rk.to(tl.int64) * B * L + bl, mask=tmask, other=0.0).to(acc)
        m_run = tl.full([BLOCK_B], float("-inf"), acc)
        s = tl.zeros([BLOCK_B], acc)
        n = tl.zeros([BLOCK_B], acc)
        for mm in range(0, M):
            lo = tl.load(loc_ptr + mm * B * L + bl, mask=tmask, other=0.0).to(acc)
            sc = tl.load(scale_ptr + mm * B * L + bl, mask=tmask, other=1.0).to(acc)
            a, _dl, _ds = _logf(zz, lo, sc, tmask, NORMAL)
            if WRITE_A:
                tl.store(a_ptr + ((r * M + mm) * K + k).to(tl.int64) * B + offs_b, a, mask=bmask)
            if HAS_MASK:
                present = tl.load(mask_ptr + mm * B + offs_b, mask=bmask, other=0) != 0
                a = tl.where(present, a, float("-inf"))
                n += present.to(acc)
            else:
                n += 1.0
            # online log-sum-exp over experts; shift by 0 while only -inf has been seen
            m_new = tl.maximum(m_run, a)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m_run - m_safe) + tl.exp(a - m_safe)  # NaN sticks in s
            m_run = m_new
        if STATS:
            tl.store(lq_ptr + rk.to(tl.int64) * B + offs_b, m_run, mask=bmask)
            tl.store(sum_ptr + rk.to(tl.int64) * B + offs_b, s, mask=bmask)
        else:
            lse = tl.where(s == 0.0, float("-inf"), m_run + tl.log(tl.where(s == 0.0, 1.0, s)))
            lq = lse - tl.log(tl.where(n > 0, n, 1.0))  # no expert present: lq = lse = -inf
            tl.store(lq_ptr + rk.to(tl.int64) * B + offs_b, lq, mask=bmask)


@triton.jit
def _ratios_fwd_kernel(
    z_ptr, loc_ptr, scale_ptr, ratio_ptr, M, K, B, L,
    NORMAL: tl.constexpr, K_CHUNK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_B: tl.constexpr,
):
    acc = ratio_ptr.dtype.element_ty
    d, k0, offs_b, bmask, tmask, bl = sample_tile(K, B, L, K_CHUNK, BLOCK_L, BLOCK_B)  # z_d ~ q_d
    lo_d = tl.load(loc_ptr + d * B * L + bl, mask=tmask, other=0.0).to(acc)
    sc_d = tl.load(scale_ptr + d * B * L + bl, mask=tmask, other=1.0).to(acc)
    for k in range(k0, tl.minimum(k0 + K_CHUNK, K)):
        dk = d * K + k
        zz = tl.load(z_ptr + dk.to(tl.int64) * B * L + bl, mask=tmask, other=0.0).to(acc)
        own, _dl, _ds = _logf(zz, lo_d, sc_d, tmask, NORMAL)
        for r in range(0, M):
            lo = tl.load(loc_ptr + r * B * L + bl, mask=tmask, other=0.0).to(acc)
            sc = tl.load(scale_ptr + r * B * L + bl, mask=tmask, other=1.0).to(acc)
            a, _dl, _ds = _logf(zz, lo, sc, tmask, NORMAL)
            ratio = tl.where(r == d, 1.0, tl.exp(a - own))
            tl.store(ratio_ptr + ((r * M + d) * K + k).to(tl.int64) * B + offs_b, ratio, mask=bmask)


@triton.jit
def _pairwise_bwd_kernel(
    z_ptr, loc_ptr, scale_ptr, mask_ptr, stat_ptr, sum_ptr, g_ptr, ga_ptr, dz_ptr, ploc_ptr, pscale_ptr, M, K, B, L,
    RATIOS: tl.constexpr, NORMAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_G: tl.constexpr, HAS_GA: tl.constexpr,
    K_CHUNK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Cotangent G[r, m, k, b] of the pairwise table, then the chain rule through log f:
    mixture: G = g_lq[r,k,b] pi[r,m,k,b] + g_a[r,m,k,b], pi = exp(a - max) / sum over present
             experts (stat = max, sum_ptr = sum [M, K, B]: _mixture_fwd_kernel's STATS);
             dz[r,k,b,:] = sum_m G dlogf/dz (written here), dloc/dscale partials per program.
    ratios:  G = g_ratio[m,r,k,b] ratio[m,r,k,b] for m != r, 0 on the diagonal (stat = the ratios
             [M, M, K, B]: d ratio / d a = ratio); no dz.
    """
    acc = stat_ptr.dtype.element_ty
    r, k0, offs_b, bmask, tmask, bl = sample_tile(K, B, L, K_CHUNK, BLOCK_L, BLOCK_B)
    for mm in range(0, M):
        lo = tl.load(loc_ptr + mm * B * L + bl, mask=tmask, other=0.0).to(acc)
        sc = tl.load(scale_ptr + mm * B * L + bl, mask=tmask, other=1.0).to(acc)
        if HAS_MASK:
            present = tl.load(mask_ptr + mm * B + offs_b, mask=bmask, other=0) != 0
        dloc = tl.zeros([BLOCK_B, BLOCK_L], acc)
        dscale = tl.zeros([BLOCK_B, BLOCK_L], acc)
        for k in range(k0, tl.minimum(k0 + K_CHUNK, K)):
            rk = (r * K + k).to(tl.int64)
            zz = tl.load(z_ptr + rk * B * L + bl, mask=tmask, other=0.0).to(acc)
            a, dl, ds = _logf(zz, lo, sc, tmask, NORMAL)
            G = tl.zeros([BLOCK_B], acc)
            if RATIOS:
                if HAS_G:
                    mr = ((mm * M + r) * K + k).to(tl.int64) * B + offs_b
                    g = tl.load(g_ptr + mr, mask=bmask, other=0.0).to(acc)
                    G = tl.where(mm == r, 0.0, g * tl.load(stat_ptr + mr, mask=bmask, other=0.0))
            else:
                stat = tl.load(stat_ptr + rk * B + offs_b, mask=bmask, other=0.0)
                if HAS_G:
                    live = stat != float("-inf")  # max = -inf: no expert present (or all -inf), pi = 0
                    if HAS_MASK:
                        live = live & present
                    total = tl.load(sum_ptr + rk * B + offs_b, mask=bmask, other=1.0)
                    g = tl.load(g_ptr + rk * B + offs_b, mask=bmask, other=0.0).to(acc)
                    G = tl.where(live, g * (tl.exp(a - tl.where(live, stat, 0.0)) / total), 0.0)
                if HAS_GA:
                    G += tl.load(ga_ptr + ((r * M + mm) * K + k).to(tl.int64) * B + offs_b, mask=bmask, other=0.0).to(acc)
            G2 = G[:, None]
            zero = G2 == 0.0  # a term of zero weight contributes 0, not 0 * inf = NaN (docs/design.md section 2)
            dl = tl.where(zero, 0.0, G2 * dl)
            ds = tl.where(zero, 0.0, G2 * ds)
            dloc += dl
            dscale += ds
            if not RATIOS:
                # this program alone writes dz[r, k, tile]: the first expert stores, the rest add, so
                # a relaunch on the same buffer (autotuning, inductor's benchmarking) gives the same dz
                dzp = dz_ptr + rk * B * L + bl
                tl.store(dzp, tl.load(dzp, mask=tmask & (mm > 0), other=0.0) - dl, mask=tmask)
        out = ((tl.program_id(0) * M + mm) * B).to(tl.int64) * L + bl
        tl.store(ploc_ptr + out, dloc, mask=tmask)
        tl.store(pscale_ptr + out, dscale, mask=tmask)


mixture_fwd = _tuned(_mixture_fwd_kernel)
ratios_fwd = _tuned(_ratios_fwd_kernel)
pairwise_bwd = _tuned(_pairwise_bwd_kernel)


def shape(z, k_chunk):
    M, K, B, L = z.shape
    if L > MAX_L:
        raise ValueError(f"argument 'z': the Triton backend supports latent dims L <= {MAX_L}, got L = {L}")
    return M, K, B, L, triton.cdiv(K, k_chunk), triton.next_power_of_2(L)


def grid(M, n_kc, B):
    return lambda meta: (M * n_kc, triton.cdiv(B, meta["BLOCK_B"]))


def pairwise_backward(
    z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None, stat: torch.Tensor,
    g: torch.Tensor | None, ga: torch.Tensor | None, normal: bool, ratios: bool, total: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz, dloc, dscale) of the pairwise table's cotangent; see _pairwise_bwd_kernel (total: the
    mixture's sums, with stat its maxima)."""
    M, K, B, L, n_kc, BL = shape(z, K_CHUNK_BWD)
    dt = acc_dtype(z.dtype)
    dz = torch.empty((M, K, B, L) if not ratios else (0,), dtype=dt, device=z.device)
    ploc = torch.empty(M * n_kc, M, B, L, dtype=dt, device=z.device)
    pscale = torch.empty_like(ploc)
    wrap_triton(pairwise_bwd)[grid(M, n_kc, B)](
        z, loc, scale, z if mask is None else mask, stat, stat if total is None else total, stat if g is None else g,
        stat if ga is None else ga,
        dz if not ratios else ploc, ploc, pscale, M, K, B, L,
        RATIOS=ratios, NORMAL=normal, HAS_MASK=mask is not None, HAS_G=g is not None, HAS_GA=ga is not None,
        K_CHUNK=K_CHUNK_BWD, BLOCK_L=BL,
    )
    return dz.to(z.dtype), ploc.sum(0).to(loc.dtype), pscale.sum(0).to(scale.dtype)
