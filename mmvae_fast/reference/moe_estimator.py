r"""The MoE bound and every estimator of its gradient, in plain PyTorch: the oracle of `moe_estimator`.

Inputs (notation of docs/design.md section 2): z[r, k, b, :] ~ q_r, the experts' loc, scale [M, B, L],
the prior's loc, scale (broadcast to [B, L]), lpx[r, k, b] = sum_d llik_scale_d log p(x_d | z[r, k, b]),
an optional mask [M, B] of present experts (n_b present in item b). Then

    a[r, m, k, b] = sum_l log q_m(z[r, k, b, l]),   lq = logsumexp_{m present} a - log n_b,
    pi_m          = exp(a[r, m] - lq - log n_b)      (responsibilities)
    lw[r, k, b]   = log p(z) + lpx - lq              (-inf for the samples of absent experts)
    looser (eq. 3):     bound_b = (1/n_b) sum_{r present} logmeanexp_k lw[r, :, b]
    stratified (eq. 5): bound_b = logmeanexp_{r present, k} lw[:, :, b]

The value is the bound; the gradient is the estimator's (`ESTIMATORS`), written as a surrogate with
autograd so that it is independent of the fused kernels' hand-written backward:
    "iwae"      the exact gradient of the bound.
    "eq8", "released"   encoder parameters detached inside lq (eq. 8's lw; no score term).
    "mixture"   the unbiased mixture DReG of docs/design.md 2a: the own expert detached inside lq,
                the other experts' score terms live, and -sg(wbar) pi_r(z) through an alias of z
                that reaches loc and scale directly (z = loc + scale * eps, eps fixed).
    "mixture-centred"  the same with (wbar - c) on the score terms, c = 1 / (samples per softmax).

The z path. The op's gradient with respect to z is sum_k omega_k dlw_k/dz_k (omega the linear
weight of lw_k in the bound: upstream gradient * wbar, divided by n_b for the looser bound). The
z path of the estimators multiplies the *whole* gradient reaching each sample (this one and the
decoders') by `z_weight`: wbar (eq8), 1 - pi_r (1 - wbar) (mixture, mixture-centred), or none
(iwae, released). The caller applies it with a hook on the model's samples (see objectives).

lse: in the chunked large-K path, the log-normaliser of each softmax over all the bound's samples
(from a first pass), as its (max, log-sum) pair (`slice_stats`): wbar = exp((lw - max) - log-sum),
and the value is the bound those normalisers give; `num_samples` is then the bound's K per expert
(it sets c).

Weights at any |lw|: wbar is computed from the slice's max and log-sum, never from one rounded
log-normaliser (in float32, lw - lse would be off by up to |lw| * 6e-8: 0.6 at lw = -1e7).
Infinite slices: all -inf gives weights 0 and bound -inf (looser) ; a +inf gives the bound +inf and
NaN weights (the softmax is undefined there, and a NaN gradient says so); NaN propagates.
"""
import math
from typing import NamedTuple, Optional

import torch

from .._numerics import acc_dtype
from .densities import log_density

BOUNDS = ("looser", "stratified")
ESTIMATORS = ("iwae", "eq8", "mixture", "mixture-centred", "released")


class MoEEstimate(NamedTuple):
    bound: torch.Tensor  # [B]: the bound per item (its gradient is the estimator's)
    lw: torch.Tensor  # [M, K, B] log weights (no gradient), -inf for absent experts' samples
    z_weight: Optional[torch.Tensor]  # [M, K, B] the z path's per-sample weight, or None


def slice_stats(lw, bound):
    """The (max, log-sum) pair of each of the bound's softmaxes over lw [M, K, B]: [M, B, 2] (looser,
    over k) or [B, 2] (stratified, over r and k). Their sum is the log-normaliser. A slice whose
    max is infinite has log-sum 0; NaN propagates."""
    x = lw if bound == "looser" else lw.flatten(0, 1)[None]  # [G, N, B]
    mx = x.amax(1)
    shift = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    ls = torch.log(torch.exp(x - shift[:, None]).sum(1))
    st = torch.stack([mx, torch.where(torch.isinf(mx), torch.zeros_like(ls), ls)], -1)
    return st if bound == "looser" else st[0]


class _GradOnly(torch.autograd.Function):
    """0 in value, x's gradient in backward: adds a surrogate's gradient to the bound without
    touching its value (x - x.detach() would turn the +inf bound of a +inf log weight into NaN)."""

    @staticmethod
    def forward(ctx, x):
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, g):
        return g


def _grad_only(x):
    return _GradOnly.apply(x)


def bound_from_lse(lse, bound, mask, K, M):
    """The bound per item [B] from the log-normalisers of its softmaxes (lse [M, B] looser, [B]
    stratified), K samples per expert and M experts (n_b present): (1/n_b) sum_{r present}
    (lse[r, b] - log K), or lse[b] - log(n_b K)."""
    if bound == "looser":
        present = torch.ones_like(lse, dtype=torch.bool) if mask is None else mask
        count = present.sum(0)
        n = count.clamp_min(1).to(lse.dtype)
        # a sum of quotients: near -3e38 a sum of log-normalisers would overflow
        mean = torch.where(present, lse / n, 0.0).sum(0) - math.log(K)
        return torch.where(count > 0, mean, 0.0)  # an item with no expert: 0
    if mask is None:
        return lse - math.log(M * K)
    n = mask.sum(0).to(lse.dtype)
    return torch.where(n > 0, lse - torch.log(n.clamp_min(1) * K), 0.0)  # an item with no expert: 0


def moe_estimator(
    z, loc, scale, prior_loc, prior_scale, lpx, *, family, prior_family=None, bound="looser",
    estimator="mixture", mask=None, lse=None, num_samples=None,
):
    prior_family = prior_family or family
    M, K, B, L = z.shape
    dt = acc_dtype(z.dtype)
    present = torch.ones(M, B, dtype=torch.bool, device=z.device) if mask is None else mask
    n = present.sum(0).to(dt).clamp_min(1)  # [B]; an item with no expert has bound 0
    log_n = torch.log(n)
    valid = present[:, None, :].expand(M, K, B)
    # absent experts take no part: their parameters (and samples) are replaced before any maths,
    # so a NaN there reaches nothing, not even through a zero gradient
    pm = present[..., None]
    loc = torch.where(pm, loc, torch.zeros((), dtype=loc.dtype, device=loc.device)).to(dt)
    scale = torch.where(pm, scale, torch.ones((), dtype=scale.dtype, device=scale.device)).to(dt)
    z = torch.where(valid[..., None], z, torch.zeros((), dtype=z.dtype, device=z.device)).to(dt)
    lpx = lpx.to(dt)

    def table(zz, lc, sc):  # a[r, m, k, b], absent m at -inf
        a = log_density(zz[:, None], lc[None, :, None], sc[None, :, None], family).sum(-1)
        return a.masked_fill(~present[None, :, None, :], -math.inf)

    def lq_of(a):
        return torch.logsumexp(a, 1) - log_n

    a_det = table(z, loc.detach(), scale.detach())
    lq_det = lq_of(a_det)
    log_pi = (a_det - (lq_det + log_n)[:, None]).detach()  # [r, m, K, B]
    lpz = log_density(z, prior_loc.to(dt), prior_scale.to(dt), prior_family).sum(-1)

    mixture = estimator in ("mixture", "mixture-centred")
    if estimator == "iwae":
        lq = lq_of(table(z, loc, scale))
    elif mixture:  # own expert detached, the other experts' scores live (value of lq_det)
        a_live = table(z.detach(), loc, scale)
        off = ~torch.eye(M, dtype=torch.bool, device=z.device)[:, :, None, None]
        # an expert with no mass at a sample (a = -inf) has no score there: where, not 0 * (-inf - -inf)
        live = off & present[None, :, None, :] & (log_pi > -math.inf)
        score = torch.where(live, log_pi.exp() * (a_live - a_live.detach()), 0).sum(1)
        lq = lq_det + score
    else:
        lq = lq_det
    lw = torch.where(valid, lpz + lpx - lq, -math.inf)

    lw_d = lw.detach()
    st = slice_stats(lw_d, bound) if lse is None else lse.to(dt)
    mx, ls = (t.reshape(M, 1, B) if bound == "looser" else t.reshape(1, 1, B) for t in st.unbind(-1))
    wbar = torch.where(lw_d == -math.inf, 0.0, torch.exp((lw_d - mx) - ls))  # lw - mx: exact near the max
    Kc = num_samples or K
    lse = mx + ls
    value = bound_from_lse(lse[:, 0] if bound == "looser" else lse[0, 0], bound, mask, Kc, M)
    coef = (1.0 / n if bound == "looser" else torch.ones_like(n))[None, None, :]
    c = 1.0 / (Kc * (torch.ones_like(n) if bound == "looser" else n))  # the centring constant: 1 / (samples per softmax)
    surrogate = torch.where(wbar == 0, 0.0, wbar * lw)  # a zero weight on lw = -inf adds 0, not NaN
    value = value + _grad_only((coef * surrogate).sum((0, 1)))

    z_weight = None
    pi_own = torch.diagonal(log_pi, 0, 0, 1).permute(2, 0, 1).exp()  # pi_r(z[r, k, b])
    if estimator == "eq8":
        z_weight = wbar
    elif mixture:
        z_weight = torch.where(valid, 1 - pi_own * (1 - wbar), 0.0)
        cc = c[None, None, :] if estimator == "mixture-centred" else 0.0
        if estimator == "mixture-centred":  # the score terms' weight is wbar - c: add back c times them
            value = value + (coef * cc * torch.where(valid, score, 0.0)).sum((0, 1))
        # - sg(wbar - c) pi_r(z), parameters detached, z live through an alias that reaches only
        # loc and scale: z_alias = sg(z) + (loc + scale * sg(eps)) - sg(...)
        eps = ((z - loc[:, None]) / scale[:, None]).detach()
        z_path = loc[:, None] + scale[:, None] * eps
        z_alias = z.detach() + (z_path - z_path.detach())
        a_al = table(z_alias, loc.detach(), scale.detach())
        pi_al = torch.exp(torch.diagonal(a_al, 0, 0, 1).permute(2, 0, 1) - torch.logsumexp(a_al, 1))
        resp = torch.where(valid, (wbar - cc) * pi_al, 0.0)
        value = value - _grad_only((coef * resp).sum((0, 1)))
    return MoEEstimate(value, lw_d, None if z_weight is None else z_weight.detach())
