r"""The objectives of the MMVAE paper, drop-in for its research code, built only from `ops`.

Drop-in signature: ``objective(model, x, K) -> scalar`` (to *maximise*; train on ``-objective``).
``model(x, K)`` returns ``(qz_xs, px_zs, zss)`` of torch.distributions (multimodal) or
``(qz_x, px_z, zs)`` (single modality), with ``model.pz``, ``model.pz_params`` and per
modality ``llik_scaling`` -- the protocol of the paper's code. Normal/Laplace posteriors and
priors and Laplace/Normal/Bernoulli/Categorical likelihoods run on the fused ops; any other
distribution falls back to ``log_prob`` with a one-time warning.

With M modalities, K samples per expert, batch B (notation of docs/design.md section 2):
    lw[r, k, b] = log p(z) + sum_d llik_scale[d] log p(x_d | z) - log (1/M) sum_m q_m(z),
    z = z[r, k, b] ~ q_r
    m_iwae         = sum_b logmeanexp_{r,k} lw[:, :, b]                 (eq. 5, stratified)
    m_iwae_looser  = sum_b mean_r logmeanexp_k lw[r, :, b]              (eq. 3, the paper's default)
    m_dreg(_looser): the same values with a doubly-reparameterised gradient (see `grad`)

DReG gradient choices (``grad=``):
    "eq8"      eq. 8 as written: encoder parameters detached inside log q, the z path weighted
               by wbar**2, the decoder by wbar. Unbiased for one modality; biased for a mixture.
    "mixture"  the default: the unbiased mixture DReG of docs/design.md 2a (equals "eq8" when M = 1);
               see `mixture_dreg_estimator` for the maths. Proven exact by quadrature
               (tests/test_quadrature.py). Chosen by the estimator study (README): on the
               offline digits data, 3 seeds, both bounds, it trained as well as "eq8" within the
               seed spread (looser bound, 10 epochs: test log p(x) -2149 ± 24 vs -2151 ± 16 nats,
               joint coherence 23.9 ± 2.9% vs 24.0 ± 2.4%).
    "mixture-centred"  the same with its score terms centred by a zero-mean control variate:
               unbiased, lower variance, and zero encoder gradient at the exact posterior.
    "released" what the paper's released code computes: its wbar-rescaling hook never fires, so
               the z path is weighted by wbar (biased, kept to reproduce published numbers).

Every bound and DReG estimator runs on one fused op, `ops.moe_estimator` (one pass over the
K x M samples: mixture and prior densities, lw, the bound, the weights and the responsibilities;
the gradients of z, loc, scale, the prior and the log-likelihoods written by its backward). The
tensor-level versions built from the other ops live in `mmvae_fast.bounds` (and are re-exported
here); the tests hold the two against each other.

Partially observed data: every multimodal objective takes ``mask`` (bool [M, B], True where
modality m of item b is present): the mixture runs over the present experts, the likelihoods sum
over the present modalities, the looser bound averages over the present experts, and every
estimator stays unbiased; an item with one modality gets that expert's single-modality bound.

Large K (``k_chunk=``, for iwae, dreg, m_iwae, m_iwae_looser, m_dreg, m_dreg_looser): the value
of the same bound, and a ``backward()`` that recomputes the K samples in chunks of ``k_chunk``
with the same noise, so memory does not grow with K; gradients equal the unchunked ones. See
`mmvae_fast.large_k`.
"""
import torch

from . import large_k, ops
from .bounds import (  # noqa: F401  (the tensor-level API, re-exported)
    dreg_estimator,
    iwae_bound,
    m_iwae_bound,
    m_iwae_looser_bound,
    mixture_dreg_estimator,
)
from .protocol import (
    check_mask,
    fused_prior,
    kl,
    log_likelihood,
    log_prior,
    multimodal_experts,
    multimodal_terms,
    single_terms,
    stack_samples,
)
from ._args import GRADS, check_grad, check_K
from ._checks import check_modalities, check_single

# The default of m_dreg / m_dreg_looser: unbiased (quadrature, tests/test_quadrature.py), and it
# trained no worse than eq. 8 in the estimator study (README, "Unbiased DReG for the mixture posterior").
DEFAULT_GRAD = "mixture"


def _estimate(t, bound, estimator, mask, backend, *, lse=None, num_samples=None):
    """The bound per item [B] of the terms t, with `estimator`'s gradient: the fused op when the
    posterior and prior are Normal/Laplace, else the tensor-level estimators on log_prob."""
    prior = fused_prior(t.pz)
    if t.experts.family is not None and prior is not None:
        loc, scale = t.experts.params()
        est = ops.moe_estimator(
            t.zs, loc, scale, prior[0], prior[1], t.lpx, family=t.experts.family, prior_family=prior[2],
            bound=bound, estimator=estimator, mask=mask, lse=lse, num_samples=num_samples, backend=backend,
        )
        ops.apply_z_weight(t.zs, est.z_weight)
        return est.bound
    if mask is not None:
        raise ValueError("mask= needs Normal or Laplace posteriors and prior (the fused estimator)")
    if lse is not None:
        raise ValueError("k_chunk needs Normal or Laplace posteriors and prior (the fused estimator)")
    return _estimate_fallback(t, bound, estimator, backend)


def _estimate_fallback(t, bound, estimator, backend):
    dims = 1 if bound == "looser" else (0, 1)
    z = t.z
    lpz = log_prior(t.pz, z)
    if estimator == "iwae":
        est = iwae_bound(lpz + t.lpx - t.experts.log_density(z), dims, backend=backend)
    elif estimator in ("eq8", "released") or len(t.zs) == 1:
        lw = lpz + t.lpx - t.experts.log_density(z, detach=True)
        est = dreg_estimator(lw, t.zs, dims, z_weight="one" if estimator == "released" else "wbar", backend=backend)
    else:
        if t.experts.family is None:
            raise ValueError(
                f"grad={estimator!r}{' (the default)' if estimator == DEFAULT_GRAD else ''} needs Normal or Laplace "
                "posteriors: it re-reparameterises z = loc + scale * eps. For another posterior family "
                "pass grad='eq8' (biased for a mixture)"
            )
        loc, scale = t.experts.params()
        est = mixture_dreg_estimator(lpz + t.lpx, t.zs, loc, scale, dims, family=t.experts.family,
                                     centred=estimator == "mixture-centred", backend=backend)
    return est.mean(0) if bound == "looser" else est


def _multimodal(name, model, x, K, estimator, looser, mask, k_chunk, backend):
    K = check_K(K)
    check_modalities(model, x, mask)  # the mask too, before the model runs
    if k_chunk is not None:
        kw = dict(grad=estimator) if "dreg" in name else {}
        return large_k.chunked_objective(name, model, x, K, k_chunk, mask=mask, backend=backend, **kw)
    t = multimodal_terms(model, x, K, backend, mask)
    mask = check_mask(mask, len(t.zs), t.batch, t.zs[0].device)
    return _estimate(t, "looser" if looser else "stratified", estimator, mask, backend).sum()


# ----------------------------------------------------------------------------------------------
# Single-modality objectives
# ----------------------------------------------------------------------------------------------


def elbo(model, x, K=1, *, backend=None):
    """ELBO: sum_b [mean_k llik_scale log p(x|z_k) - KL(q(z|x) || p(z))]."""
    check_K(K)
    check_single(model, x)
    qz_x, px_z, _ = model(x, K)
    lpx = log_likelihood(px_z, x, model.llik_scaling, backend)
    return lpx.mean(0).sum() - kl(qz_x, model.pz(*model.pz_params)).sum()


def iwae(model, x, K, *, k_chunk=None, backend=None):
    """IWAE bound: sum_b logmeanexp_k lw[k, b]. k_chunk: see `mmvae_fast.large_k`."""
    K = check_K(K)
    check_single(model, x)
    if k_chunk is not None:
        return large_k.chunked_objective("iwae", model, x, K, k_chunk, backend=backend)
    return _estimate(single_terms(model, x, K, backend), "stratified", "iwae", None, backend).sum()


def dreg(model, x, K, *, grad="eq8", k_chunk=None, backend=None):
    """IWAE bound with the DReG gradient (eq. 8; unbiased for one modality).

    grad="mixture" is the same estimator here (M = 1); grad="released" weights the z path by
    wbar instead of wbar**2, as the paper's released code does. k_chunk: see `mmvae_fast.large_k`."""
    check_grad(grad)
    K = check_K(K)
    check_single(model, x)
    if k_chunk is not None:
        return large_k.chunked_objective("dreg", model, x, K, k_chunk, grad=grad, backend=backend)
    return _estimate(single_terms(model, x, K, backend), "stratified", grad, None, backend).sum()


# ----------------------------------------------------------------------------------------------
# Multimodal objectives
# ----------------------------------------------------------------------------------------------


def m_elbo_naive(model, x, K=1, *, mask=None, backend=None):
    """(1/M) sum_r [sum_d llik_scale_d log p(x_d | z_r) - KL(q_r || p)], mean over k, sum over b.
    With a mask: the mean over the present r, the sum over the present d."""
    check_K(K)
    check_modalities(model, x, mask)
    t = multimodal_terms(model, x, K, backend, mask)
    M, B = len(t.zs), t.batch
    mask = check_mask(mask, M, B, t.zs[0].device)
    klds = torch.stack([kl(q, t.pz) for q in t.qz_xs])  # [M, B]
    per = t.lpx.mean(1) - klds  # [M, B]
    if mask is None:
        return (per.sum(0) / M).sum()
    return (torch.where(mask, per, 0.0).sum(0) / mask.sum(0).clamp_min(1)).sum()


def m_elbo(model, x, K=1, *, backend=None):
    """Appendix B: cross terms importance-weighted with the target modality's own samples,

        (1/M) sum_r [sum_d exp(log q_r(z_d) - sg log q_d(z_d)) llik_d(z_d) - KL(q_r || p)],
    z_d detached (ratio 1 on the diagonal); mean over k, sum over b."""
    check_K(K)
    check_modalities(model, x)
    qz_xs, px_zs, zss = model(x, K)
    M = len(qz_xs)
    z = stack_samples(list(zss))
    own = torch.stack([log_likelihood(px_zs[d][d], x[d], model.vaes[d].llik_scaling, backend) for d in range(M)])
    ratio = multimodal_experts(model, qz_xs, backend).ratios(z)  # [r, d, K, B]
    pz = model.pz(*model.pz_params)
    klds = torch.stack([kl(q, pz) for q in qz_xs]).sum(0)
    return (((ratio * own[None]).sum((0, 1)) - klds) / M).mean(0).sum()


def m_iwae(model, x, K=1, *, mask=None, k_chunk=None, backend=None):
    """Stratified MoE IWAE bound (eq. 5): all M*K samples in one logmeanexp per batch entry.
    mask: see the module docstring. k_chunk: see `mmvae_fast.large_k`."""
    return _multimodal("m_iwae", model, x, K, "iwae", False, mask, k_chunk, backend)


def m_iwae_looser(model, x, K=1, *, mask=None, k_chunk=None, backend=None):
    """Looser MoE IWAE bound (eq. 3): mean over modalities outside the logmeanexp.
    mask: see the module docstring. k_chunk: see `mmvae_fast.large_k`."""
    return _multimodal("m_iwae_looser", model, x, K, "iwae", True, mask, k_chunk, backend)


def m_dreg(model, x, K=1, *, grad=DEFAULT_GRAD, mask=None, k_chunk=None, backend=None):
    """Stratified MoE bound (eq. 5) with a DReG gradient; returns the bound's value.

    grad: "mixture" (the default), "mixture-centred", "eq8" or "released": see the module docstring.
    mask: see the module docstring. k_chunk: see `mmvae_fast.large_k`."""
    return _multimodal("m_dreg", model, x, K, check_grad(grad), False, mask, k_chunk, backend)


def m_dreg_looser(model, x, K=1, *, grad=DEFAULT_GRAD, mask=None, k_chunk=None, backend=None):
    """Looser MoE bound (eq. 3) with a DReG gradient; returns the bound's value.

    grad: "mixture" (the default), "mixture-centred", "eq8" or "released": see the module docstring.
    mask: see the module docstring. k_chunk: see `mmvae_fast.large_k`."""
    return _multimodal("m_dreg_looser", model, x, K, check_grad(grad), True, mask, k_chunk, backend)


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
