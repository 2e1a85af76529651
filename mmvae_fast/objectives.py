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
    "mixture"  the unbiased mixture DReG of DESIGN.md 2a (equals "eq8" when M = 1).
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

GRADS = ("eq8", "mixture", "released")
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
        a = self._fallback_pairwise(z.detach(), False)
        own = torch.diagonal(a, 0, 0, 1).permute(2, 0, 1)
        ratio = torch.exp(a.transpose(0, 1) - own.detach()[None])
        eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)[:, :, None, None]
        return torch.where(eye, torch.ones_like(ratio), ratio)


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
    chunked path (`large_k`) passes the weights of all K samples, sliced to this chunk's lw.
    """
    iw = ops.importance_weights(lw.detach(), dim, backend=backend) if weights is None else weights
    w = iw.wbar
    if isinstance(z_weight, torch.Tensor):
        zw = z_weight.detach()
    elif z_weight == "wbar":
        zw = w
    elif z_weight == "one":
        zw = None
    else:
        raise ValueError(f"argument 'z_weight' must be 'wbar', 'one' or a tensor, got {z_weight!r}")
    if zw is not None:
        groups = [zs] if isinstance(zs, torch.Tensor) else list(zs)
        weights = [zw] if isinstance(zs, torch.Tensor) else list(zw)
        for z, wz in zip(groups, weights):
            if z.requires_grad:
                z.register_hook(_rescale_hook(wz))
    dims = tuple(sorted(d % lw.dim() for d in ((dim,) if isinstance(dim, int) else dim)))
    surrogate = torch.where(w == 0, 0.0, w * lw).sum(dims)  # a zero weight on lw = -inf adds 0, not NaN
    return iw.bound + (surrogate - surrogate.detach())


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


def _m_dreg(model, x, K, grad, looser, backend, weights=None):
    # weights: see dreg_estimator (given by the chunked path, computed here otherwise)
    _check_grad(grad)
    qz_xs, _, zss, z, lpz, lpx = _mm_forward(model, x, _check_K(K), backend)
    experts = _mm_experts(model, qz_xs, backend)
    M = len(zss)
    dims = 1 if looser else (0, 1)
    if grad != "mixture" or M == 1:
        lw = lpz + lpx - experts.log_density(z, detach=True)
        est = dreg_estimator(
            lw, zss, dims, z_weight="one" if grad == "released" else "wbar", weights=weights, backend=backend
        )
        return est.mean(0).sum() if looser else est.sum()
    if experts.family is None:
        raise ValueError("grad='mixture' needs Normal or Laplace posteriors (it re-reparameterises z = loc + scale * eps)")
    # Mixture DReG (DESIGN.md 2a). In lq the own expert's parameters are detached and the other
    # experts' are live: lq = lq_det + sum_{m != r} sg(pi_rm) (a_live - sg a_live) has lq_det's
    # value and z-gradient and exactly the direct gradient of the other experts.
    lq_det, a_det = experts.log_density(z, detach=True, return_pairwise=True)
    _, a_live = experts.log_density(z.detach(), return_pairwise=True)
    log_pi = (a_det - (lq_det + math.log(M))[:, None]).detach()  # responsibilities pi[r, m, k, b]
    off = ~torch.eye(M, dtype=torch.bool, device=z.device)[:, :, None, None]
    lq = lq_det + (log_pi.exp() * off * (a_live - a_live.detach())).sum(1)
    lw = lpz + lpx - lq
    iw = ops.importance_weights(lw.detach(), dims, backend=backend) if weights is None else weights
    pi_own = torch.diagonal(log_pi, 0, 0, 1).permute(2, 0, 1).exp()  # pi_r(z) [M, K, B]
    # z path of sg(wbar) lw rescaled per sample by (1 - pi_r (1 - wbar)).
    est = dreg_estimator(lw, zss, dims, z_weight=1 - pi_own * (1 - iw.wbar), weights=iw, backend=backend)
    # - sg(wbar) pi_r(z): all parameters detached, z live through its own alias (not hooked).
    loc, scale = experts.params()
    eps = ((z - loc[:, None]) / scale[:, None]).detach()
    z_path = loc[:, None] + scale[:, None] * eps
    z_alias = z.detach() + (z_path - z_path.detach())
    lq_a, a_a = experts.log_density(z_alias, detach=True, return_pairwise=True)
    pi_alias = torch.exp(torch.diagonal(a_a, 0, 0, 1).permute(2, 0, 1) - lq_a - math.log(M))
    resp = (iw.wbar * pi_alias).sum(1 if looser else (0, 1))
    est = est - (resp - resp.detach())
    return est.mean(0).sum() if looser else est.sum()


def m_dreg(model, x, K=1, *, grad="eq8", k_chunk=None, backend=None):
    """Stratified MoE bound (eq. 5) with a DReG gradient; returns the bound's value.

    grad: "eq8" (default for now), "mixture" (unbiased), "released" (see module docstring).
    k_chunk: see `mmvae_fast.large_k`."""
    if k_chunk is not None:
        return _chunked("m_dreg", model, x, K, k_chunk, grad=_check_grad(grad), backend=backend)
    return _m_dreg(model, x, K, grad, False, backend)


def m_dreg_looser(model, x, K=1, *, grad="eq8", k_chunk=None, backend=None):
    """Looser MoE bound (eq. 3) with a DReG gradient; returns the bound's value.

    grad: "eq8" (default for now), "mixture" (unbiased), "released" (see module docstring).
    k_chunk: see `mmvae_fast.large_k`."""
    if k_chunk is not None:
        return _chunked("m_dreg_looser", model, x, K, k_chunk, grad=_check_grad(grad), backend=backend)
    return _m_dreg(model, x, K, grad, True, backend)


__all__ = [
    "GRADS",
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
    "log_likelihood",
    "log_prior",
    "kl",
]
