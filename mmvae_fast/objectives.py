r"""The objectives of the MMVAE paper, drop-in for its research code, built only from `ops`.

Drop-in signature: ``objective(model, x, K) -> scalar`` (to *maximise*; train on ``-objective``).
``model(x, K)`` returns ``(qz_xs, px_zs, zss)`` of torch.distributions (multimodal) or
``(qz_x, px_z, zs)`` (single modality), with ``model.pz``, ``model.pz_params`` and per
modality ``llik_scaling`` -- the protocol of the paper's code. Normal/Laplace posteriors and
priors and Laplace/Normal/Bernoulli/Categorical likelihoods run on the fused ops; any other
distribution falls back to ``log_prob`` with a one-time warning.

With M modalities, K samples per expert, batch B (notation of DESIGN.md section 2):
    lw[r, k, b] = log p(z) + sum_d llik_scale[d] log p(x_d | z) - log (1/M) sum_m q_m(z),
    z = z[r, k, b] ~ q_r
    m_iwae         = sum_b logmeanexp_{r,k} lw[:, :, b]                 (eq. 5, stratified)
    m_iwae_looser  = sum_b mean_r logmeanexp_k lw[r, :, b]              (eq. 3, the paper's default)
    m_dreg(_looser): the same values with a doubly-reparameterised gradient (see `grad`)

DReG gradient choices (``grad=``):
    "eq8"      eq. 8 as written: encoder parameters detached inside log q, the z path weighted
               by wbar**2, the decoder by wbar. Unbiased for one modality; biased for a mixture.
    "mixture"  the default: the unbiased mixture DReG of DESIGN.md 2a (equals "eq8" when M = 1);
               see `mixture_dreg_estimator` for the maths. Proven exact by quadrature
               (tests/test_quadrature.py). Chosen by the estimator study (README): on the
               offline digits data, 3 seeds, both bounds, it trained as well as "eq8" within the
               seed spread (looser bound, 10 epochs: test log p(x) -2149 ± 24 vs -2151 ± 16 nats,
               joint coherence 23.9 ± 2.9% vs 24.0 ± 2.4%).
    "mixture-centred"  the same with its score terms centred by a zero-mean control variate:
               unbiased, lower variance, and zero encoder gradient at the exact posterior.
    "released" what the paper's released code computes: its wbar-rescaling hook never fires, so
               the z path is weighted by wbar (biased, kept to reproduce published numbers).

Large K (``k_chunk=``, for iwae, dreg, m_iwae, m_iwae_looser, m_dreg, m_dreg_looser): the value
of the same bound, and a ``backward()`` that recomputes the K samples in chunks of ``k_chunk``
with the same noise, so memory does not grow with K; gradients equal the unchunked ones. See
`mmvae_fast.large_k`.
"""
import math
import warnings

import torch
import torch.distributions as D

from . import ops

GRADS = ("eq8", "mixture", "mixture-centred", "released")
# The default of m_dreg / m_dreg_looser: unbiased (quadrature, tests/test_quadrature.py), and it
# trained no worse than eq. 8 in the estimator study (README, "Unbiased DReG for the mixture posterior").
DEFAULT_GRAD = "mixture"
_WARNED: set = set()


def _warn_once(kind: str, dist) -> None:
    key = (kind, type(dist).__name__)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"mmvae_fast: {kind} {type(dist).__name__} has no fused op; using its log_prob "
            "(correct but slower)",
            stacklevel=3,
        )


def _family(dist):
    if type(dist) is D.Normal:
        return "normal"
    if type(dist) is D.Laplace:
        return "laplace"
    return None


def _check_K(K) -> int:
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"argument 'K' must be an integer >= 1 (samples per expert), got {K!r}")
    return K


def _chunked(name, model, x, K, k_chunk, **kw):
    from . import large_k  # large_k builds on this module's helpers

    return large_k.chunked_objective(name, model, x, K, k_chunk, **kw)


def _check_grad(grad) -> str:
    if grad not in GRADS:
        raise ValueError(f"argument 'grad' must be one of {GRADS}, got {grad!r}")
    return grad


def _compact(t):
    """Undo expand(): dims of stride 0 become size 1, so a broadcast scale costs nothing."""
    idx = tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for st, n in zip(t.stride(), t.shape))
    return t[idx]


# ----------------------------------------------------------------------------------------------
# Terms of the log weights
# ----------------------------------------------------------------------------------------------


def log_likelihood(px_z, x, llik_scaling=1.0, backend=None):
    """llik_scaling * sum over event dims of log p(x | z): [K, B] for px_z of batch shape [K, B, ...]."""
    fam = {D.Laplace: "laplace", D.Normal: "normal"}.get(type(px_z))
    if fam is not None:
        lp = ops.likelihood_sum(x, px_z.loc, family=fam, scale=_compact(px_z.scale), backend=backend)
    elif type(px_z) is D.Bernoulli:
        lp = ops.likelihood_sum(x, px_z.logits, family="bernoulli", backend=backend)
    elif type(px_z) is D.Categorical:
        lp = ops.likelihood_sum(x, px_z.logits, family="categorical", backend=backend)
    else:
        _warn_once("likelihood", px_z)
        lp = px_z.log_prob(x)
        lp = lp.reshape(*px_z.batch_shape[:2], -1).sum(-1).to(ops.acc_dtype(lp.dtype))
    return lp * llik_scaling


def log_prior(pz, z):
    """sum_l log p(z_l): [*z.shape[:-1]]."""
    fam = _family(pz)
    if fam is None:
        _warn_once("prior", pz)
        return pz.log_prob(z).sum(-1)
    return ops.log_density_sum(z, pz.loc, pz.scale, fam)


def kl(qz_x, pz):
    """Closed-form KL(q || p) summed over the latent dim: [B]."""
    fam = _family(qz_x)
    if fam is not None and _family(pz) == fam:
        return ops.kl_divergence(qz_x.loc, qz_x.scale, pz.loc, pz.scale, fam).sum(-1)
    return D.kl_divergence(qz_x, pz).sum(-1)


class _Experts:
    """The M posteriors as stacked tensors loc, scale [M, B, L] (or their log_prob fallback)."""

    def __init__(self, qz_xs, backend, detached=None):
        # detached: () -> the posteriors rebuilt from detached parameters (log_prob fallback only)
        self.qz_xs, self.backend, self.detached = list(qz_xs), backend, detached
        fams = {_family(q) for q in self.qz_xs}
        self.family = fams.pop() if len(fams) == 1 else None
        if self.family is None:
            _warn_once("posterior", self.qz_xs[0])
        else:
            self.loc = torch.stack([q.loc for q in self.qz_xs])
            self.scale = torch.stack([q.scale for q in self.qz_xs])

    def params(self, detach=False):
        return (self.loc.detach(), self.scale.detach()) if detach else (self.loc, self.scale)

    def _fallback_pairwise(self, z, detach):
        qs = self.detached() if detach else self.qz_xs
        a = torch.stack([torch.stack([q.log_prob(z[r]).sum(-1) for q in qs]) for r in range(z.shape[0])])
        return a.to(ops.acc_dtype(a.dtype))

    def log_density(self, z, detach=False, return_pairwise=False):
        """lq [M, K, B] (and the pairwise table a [M, M, K, B])."""
        if self.family is not None:
            loc, scale = self.params(detach)
            return ops.mixture_log_density(
                z, loc, scale, family=self.family, return_pairwise=return_pairwise, backend=self.backend
            )
        a = self._fallback_pairwise(z, detach)
        lq = torch.logsumexp(a, 1) - math.log(a.shape[1])
        return (lq, a) if return_pairwise else lq

    def ratios(self, z):
        if self.family is not None:
            return ops.importance_ratios(z, self.loc, self.scale, family=self.family, backend=self.backend)
        return ops.ratios_from_pairwise(self._fallback_pairwise(z.detach(), False))


def _mm_experts(model, qz_xs, backend):
    detached = lambda: [v.qz_x(*[p.detach() for p in v.qz_x_params]) for v in model.vaes]  # noqa: E731
    return _Experts(qz_xs, backend, detached)


def _mm_forward(model, x, K, backend):
    """Run the model once; return its outputs and the stacked terms lpz, lpx [M, K, B]."""
    qz_xs, px_zs, zss = model(x, K)
    z = torch.stack(list(zss))  # [M, K, B, L]
    lpz = log_prior(model.pz(*model.pz_params), z)
    lpx = torch.stack([
        sum(log_likelihood(px_zs[r][d], x[d], model.vaes[d].llik_scaling, backend) for d in range(len(px_zs[r])))
        for r in range(len(zss))
    ])
    return qz_xs, px_zs, zss, z, lpz, lpx


# ----------------------------------------------------------------------------------------------
# Tensor-level API
# ----------------------------------------------------------------------------------------------


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
    r"""Per-slice MoE IWAE bound whose gradient is the unbiased mixture DReG (DESIGN.md 2a).

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


# ----------------------------------------------------------------------------------------------
# Single-modality objectives
# ----------------------------------------------------------------------------------------------


def _single_lw(model, x, K, detach_encoder, backend):
    qz_x, px_z, zs = model(x, K)
    lpz = log_prior(model.pz(*model.pz_params), zs)
    lpx = log_likelihood(px_z, x, model.llik_scaling, backend)
    detached = lambda: [model.qz_x(*[p.detach() for p in model.qz_x_params])]  # noqa: E731
    lq = _Experts([qz_x], backend, detached).log_density(zs[None], detach=detach_encoder)[0]
    return lpz + lpx - lq, zs


def elbo(model, x, K=1, *, backend=None):
    """ELBO: sum_b [mean_k llik_scale log p(x|z_k) - KL(q(z|x) || p(z))]."""
    _check_K(K)
    qz_x, px_z, _ = model(x, K)
    lpx = log_likelihood(px_z, x, model.llik_scaling, backend)
    return lpx.mean(0).sum() - kl(qz_x, model.pz(*model.pz_params)).sum()


def iwae(model, x, K, *, k_chunk=None, backend=None):
    """IWAE bound: sum_b logmeanexp_k lw[k, b]. k_chunk: see `mmvae_fast.large_k`."""
    if k_chunk is not None:
        return _chunked("iwae", model, x, K, k_chunk, backend=backend)
    lw, _ = _single_lw(model, x, _check_K(K), False, backend)
    return iwae_bound(lw, 0, backend=backend).sum()


def dreg(model, x, K, *, grad="eq8", k_chunk=None, backend=None):
    """IWAE bound with the DReG gradient (eq. 8; unbiased for one modality).

    grad="mixture" is the same estimator here (M = 1); grad="released" weights the z path by
    wbar instead of wbar**2, as the paper's released code does. k_chunk: see `mmvae_fast.large_k`."""
    _check_grad(grad)
    if k_chunk is not None:
        return _chunked("dreg", model, x, K, k_chunk, grad=grad, backend=backend)
    lw, zs = _single_lw(model, x, _check_K(K), True, backend)
    return dreg_estimator(lw, zs, 0, z_weight="one" if grad == "released" else "wbar", backend=backend).sum()


# ----------------------------------------------------------------------------------------------
# Multimodal objectives
# ----------------------------------------------------------------------------------------------


def m_elbo_naive(model, x, K=1, *, backend=None):
    """(1/M) sum_r [sum_d llik_scale_d log p(x_d | z_r) - KL(q_r || p)], mean over k, sum over b."""
    _check_K(K)
    qz_xs, _, _, _, _, lpx = _mm_forward(model, x, K, backend)
    pz = model.pz(*model.pz_params)
    klds = torch.stack([kl(q, pz) for q in qz_xs]).sum(0)  # [B]
    return ((lpx.sum(0) - klds) / len(qz_xs)).mean(0).sum()


def m_elbo(model, x, K=1, *, backend=None):
    """Appendix B: cross terms importance-weighted with the target modality's own samples,

        (1/M) sum_r [sum_d exp(log q_r(z_d) - sg log q_d(z_d)) llik_d(z_d) - KL(q_r || p)],
    z_d detached (ratio 1 on the diagonal); mean over k, sum over b."""
    _check_K(K)
    qz_xs, px_zs, zss = model(x, K)
    M = len(qz_xs)
    z = torch.stack(list(zss))
    own = torch.stack([log_likelihood(px_zs[d][d], x[d], model.vaes[d].llik_scaling, backend) for d in range(M)])
    ratio = _mm_experts(model, qz_xs, backend).ratios(z)  # [r, d, K, B]
    pz = model.pz(*model.pz_params)
    klds = torch.stack([kl(q, pz) for q in qz_xs]).sum(0)
    return (((ratio * own[None]).sum((0, 1)) - klds) / M).mean(0).sum()


def _m_lw(model, x, K, backend):
    qz_xs, _, zss, z, lpz, lpx = _mm_forward(model, x, _check_K(K), backend)
    return lpz + lpx - _mm_experts(model, qz_xs, backend).log_density(z)


def m_iwae(model, x, K=1, *, k_chunk=None, backend=None):
    """Stratified MoE IWAE bound (eq. 5): all M*K samples in one logmeanexp per batch entry.
    k_chunk: see `mmvae_fast.large_k`."""
    if k_chunk is not None:
        return _chunked("m_iwae", model, x, K, k_chunk, backend=backend)
    return m_iwae_bound(_m_lw(model, x, K, backend), backend=backend)


def m_iwae_looser(model, x, K=1, *, k_chunk=None, backend=None):
    """Looser MoE IWAE bound (eq. 3): mean over modalities outside the logmeanexp.
    k_chunk: see `mmvae_fast.large_k`."""
    if k_chunk is not None:
        return _chunked("m_iwae_looser", model, x, K, k_chunk, backend=backend)
    return m_iwae_looser_bound(_m_lw(model, x, K, backend), backend=backend)


def _m_dreg(model, x, K, grad, looser, backend, weights=None, K_total=None):
    # weights: see dreg_estimator (given by the chunked path, computed here otherwise);
    # K_total: the bound's K when this call sees a chunk of it (sets the centring constant)
    _check_grad(grad)
    qz_xs, _, zss, z, lpz, lpx = _mm_forward(model, x, _check_K(K), backend)
    experts = _mm_experts(model, qz_xs, backend)
    dims = 1 if looser else (0, 1)
    if grad in ("eq8", "released") or len(zss) == 1:  # with M = 1 the mixture estimators are eq. 8
        lw = lpz + lpx - experts.log_density(z, detach=True)
        est = dreg_estimator(
            lw, zss, dims, z_weight="one" if grad == "released" else "wbar", weights=weights, backend=backend
        )
    else:
        if experts.family is None:
            raise ValueError(
                f"grad={grad!r}{' (the default)' if grad == DEFAULT_GRAD else ''} needs Normal or Laplace "
                "posteriors: it re-reparameterises z = loc + scale * eps. For another posterior family "
                "pass grad='eq8' (biased for a mixture)"
            )
        loc, scale = experts.params()
        est = mixture_dreg_estimator(
            lpz + lpx, zss, loc, scale, dims, family=experts.family, centred=grad == "mixture-centred",
            weights=weights, num_samples=(K_total or K) * (1 if looser else len(zss)), backend=backend,
        )
    return est.mean(0).sum() if looser else est.sum()


def m_dreg(model, x, K=1, *, grad=DEFAULT_GRAD, k_chunk=None, backend=None):
    """Stratified MoE bound (eq. 5) with a DReG gradient; returns the bound's value.

    grad: "mixture" (the default), "mixture-centred", "eq8" or "released": see the module docstring.
    k_chunk: see `mmvae_fast.large_k`."""
    if k_chunk is not None:
        return _chunked("m_dreg", model, x, K, k_chunk, grad=_check_grad(grad), backend=backend)
    return _m_dreg(model, x, K, grad, False, backend)


def m_dreg_looser(model, x, K=1, *, grad=DEFAULT_GRAD, k_chunk=None, backend=None):
    """Looser MoE bound (eq. 3) with a DReG gradient; returns the bound's value.

    grad: "mixture" (the default), "mixture-centred", "eq8" or "released": see the module docstring.
    k_chunk: see `mmvae_fast.large_k`."""
    if k_chunk is not None:
        return _chunked("m_dreg_looser", model, x, K, k_chunk, grad=_check_grad(grad), backend=backend)
    return _m_dreg(model, x, K, grad, True, backend)


__all__ = [
    "GRADS",
    "DEFAULT_GRAD",
    "elbo",
    "iwae",
    "dreg",
    "m_elbo_naive",
    "m_elbo",
    "m_iwae",
    "m_iwae_looser",
    "m_dreg",
    "m_dreg_looser",
    "iwae_bound",
    "m_iwae_bound",
    "m_iwae_looser_bound",
    "dreg_estimator",
    "mixture_dreg_estimator",
    "log_likelihood",
    "log_prior",
    "kl",
]
