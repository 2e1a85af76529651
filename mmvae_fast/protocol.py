r"""The research code's model protocol, turned into the tensors the ops take.

A multimodal model: ``model(x, K) -> (qz_xs, px_zs, zss)`` with ``qz_xs[m]`` the posterior of
modality m (batch [B, L]), ``px_zs[r][d]`` the decoder of modality d at the samples of expert r
(batch [K, B, ...]), ``zss[m]`` the samples [K, B, L]; ``model.pz(*model.pz_params)`` the prior;
``model.vaes[d].llik_scaling``. A single-modality model: ``model(x, K) -> (qz_x, px_z, zs)`` with
``model.llik_scaling``. Normal/Laplace posteriors and priors and Laplace/Normal/Bernoulli/
Categorical likelihoods map to the fused ops; any other distribution falls back to ``log_prob``
with a one-time warning.

With a mask [M, B] (True where modality m of item b is present), ``px_zs[r][d]`` may be None when
modality r or d is absent from the whole batch: the model did no work for it.
"""
import math
import warnings
from typing import NamedTuple, Optional

import torch
import torch.distributions as D

from . import _checks, ops

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


def family(dist) -> Optional[str]:
    if type(dist) is D.Normal:
        return "normal"
    if type(dist) is D.Laplace:
        return "laplace"
    return None


def _compact(t):
    """Undo expand(): dims of stride 0 become size 1, so a broadcast scale costs nothing."""
    idx = tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for st, n in zip(t.stride(), t.shape))
    return t[idx]


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
    return lp if isinstance(llik_scaling, (int, float)) and llik_scaling == 1 else lp * llik_scaling


def log_prior(pz, z):
    """sum_l log p(z_l): [*z.shape[:-1]]."""
    fam = family(pz)
    if fam is None:
        _warn_once("prior", pz)
        return pz.log_prob(z).sum(-1)
    return ops.log_density_sum(z, pz.loc, pz.scale, fam)


def kl(qz_x, pz):
    """Closed-form KL(q || p) summed over the latent dim: [B]."""
    fam = family(qz_x)
    if fam is not None and family(pz) == fam:
        return ops.kl_divergence(qz_x.loc, qz_x.scale, pz.loc, pz.scale, fam).sum(-1)
    return D.kl_divergence(qz_x, pz).sum(-1)


class Experts:
    """The M posteriors as stacked tensors loc, scale [M, B, L] (or their log_prob fallback)."""

    def __init__(self, qz_xs, backend, detached=None):
        # detached: () -> the posteriors rebuilt from detached parameters (log_prob fallback only)
        self.qz_xs, self.backend, self.detached = list(qz_xs), backend, detached
        fams = {family(q) for q in self.qz_xs}
        self.family = fams.pop() if len(fams) == 1 else None
        if self.family is None:
            _warn_once("posterior", self.qz_xs[0])
            self.loc = self.scale = None
        else:
            self.loc = torch.stack([q.loc for q in self.qz_xs]) if len(self.qz_xs) > 1 else self.qz_xs[0].loc[None]
            sc = [q.scale for q in self.qz_xs]
            self.scale = torch.stack(sc) if len(sc) > 1 else sc[0][None]

    def params(self, detach=False):
        return (self.loc.detach(), self.scale.detach()) if detach else (self.loc, self.scale)

    def _fallback_pairwise(self, z, detach):
        qs = self.detached() if detach else self.qz_xs
        a = torch.stack([torch.stack([q.log_prob(z[r]).sum(-1) for q in qs]) for r in range(z.shape[0])])
        return a.to(ops.acc_dtype(a.dtype))

    def log_density(self, z, detach=False, return_pairwise=False, mask=None):
        """lq [M, K, B] (and the pairwise table a [M, M, K, B])."""
        if self.family is not None:
            loc, scale = self.params(detach)
            return ops.mixture_log_density(
                z, loc, scale, family=self.family, mask=mask, return_pairwise=return_pairwise, backend=self.backend
            )
        a = self._fallback_pairwise(z, detach)
        if mask is None:
            lq = torch.logsumexp(a, 1) - math.log(a.shape[1])
        else:
            lq = torch.logsumexp(a.masked_fill(~mask[None, :, None, :], -math.inf), 1) - torch.log(mask.sum(0))
        return (lq, a) if return_pairwise else lq

    def ratios(self, z):
        if self.family is not None:
            return ops.importance_ratios(z, self.loc, self.scale, family=self.family, backend=self.backend)
        return ops.ratios_from_pairwise(self._fallback_pairwise(z.detach(), False))


class Terms(NamedTuple):
    """One model call as the ops see it."""

    zs: list  # the model's samples, one [K, B, L] per expert: what the fused estimator reads, in place
    experts: Experts
    pz: D.Distribution
    lpx: torch.Tensor  # [M, K, B]: sum_d llik_scale_d log p(x_d | z[r]) over the present d
    qz_xs: list
    px_zs: list

    @property
    def z(self) -> torch.Tensor:
        """The samples stacked, [M, K, B, L]: a copy, for the log_prob fallbacks only."""
        return stack_samples(self.zs)

    @property
    def batch(self) -> int:
        return self.zs[0].shape[1]


def stack_samples(ts):
    # torch.stack's result is a view of a cat, whose strides Inductor failed to order next to
    # convolutions under dynamic shapes (tests/test_objectives.py); a cat of [1, ...] pieces is not
    return ts[0][None] if len(ts) == 1 else torch.cat([t[None] for t in ts])


def check_mask(mask, M, B, device):
    """The mask (None or bool [M, B], see _checks.check_mask) on `device`."""
    _checks.check_mask(mask, M, B)
    return None if mask is None else mask.to(device)


def multimodal_terms(model, x, K, backend, mask=None) -> Terms:
    """Run the model once; its samples, experts, prior and the summed log-likelihoods lpx [M, K, B].

    With a mask, lpx[r] sums over the modalities d present in each item (absent ones add 0, and
    decoders the model skipped, px_zs[r][d] None, are never read)."""
    qz_xs, px_zs, zss = model(x, K)
    zss = list(zss)
    M = len(zss)
    rows = []
    for r in range(M):
        terms = []
        for d in range(len(px_zs[r])):
            if px_zs[r][d] is None:
                if mask is None or bool(mask[d].any()) and bool(mask[r].any()):
                    raise ValueError(f"the model returned no decoder for modality {d} at the samples of expert {r}, "
                                     "but the mask says both are present; pass mask= with them absent")
                continue
            lp = log_likelihood(px_zs[r][d], x[d], model.vaes[d].llik_scaling, backend)
            terms.append(lp if mask is None else torch.where(mask[d], lp, torch.zeros((), dtype=lp.dtype, device=lp.device)))
        rows.append(sum(terms) if terms else torch.zeros(zss[0].shape[:2], dtype=ops.acc_dtype(zss[0].dtype),
                                                         device=zss[0].device))
    return Terms(zss, multimodal_experts(model, qz_xs, backend), model.pz(*model.pz_params), stack_samples(rows), list(qz_xs), px_zs)


def multimodal_experts(model, qz_xs, backend) -> Experts:
    detached = lambda: [v.qz_x(*[p.detach() for p in v.qz_x_params]) for v in model.vaes]  # noqa: E731
    return Experts(qz_xs, backend, detached)


def single_terms(model, x, K, backend) -> Terms:
    """The single-modality protocol as M = 1."""
    qz_x, px_z, zs = model(x, K)
    lpx = log_likelihood(px_z, x, model.llik_scaling, backend)
    detached = lambda: [model.qz_x(*[p.detach() for p in model.qz_x_params])]  # noqa: E731
    return Terms([zs], Experts([qz_x], backend, detached), model.pz(*model.pz_params), lpx[None], [qz_x], [[px_z]])


def fused_prior(pz):
    """(loc, scale, family) of a Normal/Laplace prior broadcast to [B, L], or None (log_prob fallback)."""
    fam = family(pz)
    if fam is None:
        return None
    return pz.loc, pz.scale, fam
