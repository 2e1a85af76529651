r"""The tensor-level bounds and gradient estimators, for people who compute their own log weights.

    bound = m_iwae_looser_bound(lw)                      # lw: [M, K, B]
    est = dreg_estimator(lw_detached_q, zs, dim=0)       # value: the bound; gradient: DReG (eq. 8)
    est = mixture_dreg_estimator(log_joint, zs, loc, scale, dim=1)   # unbiased mixture DReG

Built from the ops alone (`importance_weights`, `mixture_log_density`); the drop-in objectives run
on the fused `ops.moe_estimator` instead and are tested against these.
"""
import math

import torch

from . import ops


def iwae_bound(lw, dim=0, *, backend=None):
    """logmeanexp of the log weights over `dim` (int or tuple): the IWAE bound of each slice."""
    return ops.importance_weights(lw, dim, backend=backend).bound


def m_iwae_bound(lw, *, backend=None):
    """Stratified MoE bound (eq. 5) from lw [M, K, B]: sum_b logmeanexp_{r,k} lw[:, :, b]."""
    return iwae_bound(lw, (0, 1), backend=backend).sum()


def m_iwae_looser_bound(lw, *, backend=None):
    """Looser MoE bound (eq. 3) from lw [M, K, B]: sum_b mean_r logmeanexp_k lw[r, :, b]."""
    return iwae_bound(lw, 1, backend=backend).mean(0).sum()


def _rescale_hook(weight):
    w = weight.unsqueeze(-1)
    return lambda g: g * w.to(g.dtype)


def _reduce_dims(dim, ndim):
    return tuple(sorted(d % ndim for d in ((dim,) if isinstance(dim, int) else dim)))


def _dreg_surrogate(lw, iw, zs, zw, dims):
    """iw.bound with gradient sum sg(wbar) lw, the z path of sample k rescaled by zw_k (a hook)."""
    if zw is not None:
        groups = [zs] if isinstance(zs, torch.Tensor) else list(zs)
        weights = [zw] if isinstance(zs, torch.Tensor) else list(zw)
        for z, wz in zip(groups, weights):
            if z.requires_grad:
                z.register_hook(_rescale_hook(wz.detach()))
    w = iw.wbar
    surrogate = torch.where(w == 0, 0.0, w * lw).sum(dims)  # a zero weight on lw = -inf adds 0, not NaN
    return iw.bound + (surrogate - surrogate.detach())


def dreg_estimator(lw, zs, dim=0, *, z_weight="wbar", weights=None, backend=None):
    r"""Per-slice IWAE bound whose gradient is DReG's (eq. 8).

    lw: log weights computed with the encoder parameters *detached* inside log q (z live).
    zs: the reparameterised samples through which the encoder reaches lw: one tensor of shape
        lw.shape + [L], or a sequence (one per index of lw's first dim) of lw.shape[1:] + [L].
    Returns a tensor of lw's shape without `dim`: its value is the bound, its gradient is
        decoder / prior:  sum_k wbar_k d lw_k / d theta
        encoder:          sum_k wbar_k * z_weight_k * d lw_k / d z_k * d z_k / d phi
    with z_weight "wbar" (eq. 8), "one" (the released code), or a tensor of lw's shape. Reduce
    it linearly as you like (sum, mean over groups). A gradient hook on zs does the z-path
    rescaling, so zs must reach the loss only through lw.
    weights: precomputed ``ops.importance_weights`` (bound, wbar) to use instead of lw's own; the
    chunked large-K path passes the weights of all K samples, sliced to this chunk's lw.
    """
    iw = ops.importance_weights(lw.detach(), dim, backend=backend) if weights is None else weights
    if isinstance(z_weight, torch.Tensor):
        zw = z_weight
    elif z_weight == "wbar":
        zw = iw.wbar
    elif z_weight == "one":
        zw = None
    else:
        raise ValueError(f"argument 'z_weight' must be 'wbar', 'one' or a tensor, got {z_weight!r}")
    return _dreg_surrogate(lw, iw, zs, zw, _reduce_dims(dim, lw.dim()))


def mixture_dreg_estimator(
    log_joint, zs, loc, scale, dim=(0, 1), *, family="normal", centred=False, weights=None, num_samples=None, backend=None
):
    r"""Per-slice MoE IWAE bound whose gradient is the unbiased mixture DReG (docs/design.md 2a).

    log_joint [M, K, B]: log p(z) + sum_d llik_scale_d log p(x_d | z) at z = zs[r, k, b], computed
        from zs (z live; decoder and prior parameters live).
    zs:  the reparameterised samples, z[r] = loc[r] + scale[r] * eps[r] ~ q_r: a tensor
        [M, K, B, L] or a sequence of M tensors [K, B, L]; they must reach the loss only
        through log_joint (a gradient hook rescales their z path).
    loc, scale [M, B, L]: the experts (live), diagonal Normal or Laplace (`family`).
    dim: 1 for the looser bound (eq. 3: one logmeanexp per group; reduce the result with a mean
        over groups), (0, 1) for the stratified bound (eq. 5).
    Returns the bound of each slice (lw = log_joint - log q_mix(z)), shape [M, B] or [B].

    Gradient. With wbar the softmax of lw over `dim`, pi_m(z) = q_m(z) / sum_j q_j(z) the
    responsibilities (a softmax over m of the pairwise table a[r, m, k, b] of
    ops.mixture_log_density) and sample k of group r drawn from q_r, the exact gradient of the
    bound is
        sum_k wbar_k [dlw_k/dz_k dz_k/dphi - sum_m pi_m(z_k) d/dphi log q_m(z_k)].
    The m = r score term is the score of the density z_k came from, so it is reparameterised once
    more, E_{q_r}[h d/dphi log q_r] = E[dh/dz dz/dphi] with h = wbar_k pi_r(z_k) (parameters and
    the other samples held fixed, dwbar_k/dlw_k = wbar_k (1 - wbar_k)); the other experts' scores
    stay as they are. Per sample k of group r the encoder gets
        [wbar_k - pi_r wbar_k (1 - wbar_k)] dlw_k/dz_k dz_k/dphi              (z path, hooked)
      - (wbar_k - c) dpi_r(z_k)/dz_k dz_k/dphi                               (z path, own alias)
      - (wbar_k - c) sum_{m != r} pi_m(z_k) d/dphi log q_m(z_k)              (direct)
    and the decoder and prior sum_k wbar_k d lw_k / d theta. c = 0 is the plain mixture DReG;
    `centred` sets c = 1 / (number of samples in the softmax), subtracting c times
        sum_{r,k} [dpi_r(z_rk)/dz dz/dphi + sum_{m != r} pi_m(z_rk) d/dphi log q_m(z_rk)],
    whose expectation is c K sum_m int q_m d/dphi log q_m = 0 (same identity). Both are unbiased;
    the centred one vanishes with eq. 8 at the exact posterior (lw constant: wbar = c and
    dlw/dz = 0). With M = 1 both are eq. 8.

    weights, num_samples: for the chunked large-K path, the importance weights of all the
    bound's samples sliced to this chunk (see `dreg_estimator`) and their number per softmax
    (K looser, M*K stratified; sets c). Default: computed from log_joint.

    Runs on the fused ops: three calls of ops.mixture_log_density (z live with the parameters
    detached; the parameters live at fixed z; the alias below), whose backward passes work on the
    [M, M, K, B] table and never on an M*M*K*B*L tensor.
    """
    z = zs if isinstance(zs, torch.Tensor) else torch.stack(list(zs))
    if log_joint.dim() != 3 or tuple(log_joint.shape) != tuple(z.shape[:3]):
        raise ValueError(
            f"argument 'log_joint' must have shape [M, K, B] = {tuple(z.shape[:3])} (that of zs without L), "
            f"got {tuple(log_joint.shape)}"
        )
    dims = _reduce_dims(dim, 3)
    if dims not in ((1,), (0, 1)):
        raise ValueError(f"argument 'dim' must be 1 (looser bound) or (0, 1) (stratified bound), got {dim!r}")
    M = z.shape[0]
    # In lq the own expert's parameters are detached and the other experts' live:
    #   lq = lq_det + sum_{m != r} sg(pi_rm) (a_live - sg a_live)
    # has lq_det's value and z gradient and exactly the direct gradient of the other experts.
    lq_det, a_det = ops.mixture_log_density(
        z, loc.detach(), scale.detach(), family=family, return_pairwise=True, backend=backend
    )
    log_pi = (a_det - (lq_det + math.log(M))[:, None]).detach()  # log pi[r, m, k, b]
    if M > 1:
        _, a_live = ops.mixture_log_density(z.detach(), loc, scale, family=family, return_pairwise=True, backend=backend)
        off = ~torch.eye(M, dtype=torch.bool, device=z.device)[:, :, None, None]
        direct = (log_pi.exp() * off * (a_live - a_live.detach())).sum(1)  # value 0, direct gradient
    else:
        direct = torch.zeros_like(lq_det)
    lw = log_joint - lq_det - direct
    iw = ops.importance_weights(lw.detach(), dims, backend=backend) if weights is None else weights
    pi_own = torch.diagonal(log_pi, 0, 0, 1).permute(2, 0, 1).exp()  # pi_r(z[r, k, b]) [M, K, B]
    est = _dreg_surrogate(lw, iw, zs, 1 - pi_own * (1 - iw.wbar), dims)
    if M == 1:
        return est
    c = 1.0 / (num_samples or math.prod(z.shape[d] for d in dims)) if centred else 0.0
    if centred:  # the direct term's weight wbar - c: add back c times it
        est = est + (c * direct).sum(dims)
    # - sg(wbar - c) pi_r(z): all parameters detached, z live through an alias off the hooked
    # path, z_alias = sg(z) + (loc + scale * sg(eps)) - sg(...): value z, gradient dz/dphi.
    eps = ((z - loc[:, None]) / scale[:, None]).detach()
    z_path = loc[:, None] + scale[:, None] * eps
    z_alias = z.detach() + (z_path - z_path.detach())
    lq_a, a_a = ops.mixture_log_density(
        z_alias, loc.detach(), scale.detach(), family=family, return_pairwise=True, backend=backend
    )
    pi_alias = torch.exp(torch.diagonal(a_a, 0, 0, 1).permute(2, 0, 1) - lq_a - math.log(M))
    resp = ((iw.wbar - c) * pi_alias).sum(dims)
    return est - (resp - resp.detach())
