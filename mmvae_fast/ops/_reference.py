"""The reference backend: plain PyTorch, autograd for free."""
import torch

from . import _dispatch
from .. import reference as ref

_dispatch.register("importance_weights", "reference", ref.importance_weights)
_dispatch.register(
    "mixture_log_density",
    "reference",
    lambda z, loc, scale, family, mask, pairwise: ref.mixture_log_density(z, loc, scale, family, mask, pairwise),
)
_dispatch.register("importance_ratios", "reference", ref.importance_ratios)
_dispatch.register("likelihood_sum", "reference", ref.likelihood_sum)
_dispatch.register(
    "moe_estimator",
    "reference",
    lambda z, loc, scale, ploc, pscale, lpx, family, prior_family, bound, estimator, mask, lse, num_samples: tuple(
        ref.moe_estimator(torch.stack(z), loc, scale, ploc, pscale, lpx, family=family, prior_family=prior_family, bound=bound,
                          estimator=estimator, mask=mask, lse=lse, num_samples=num_samples)
    ),
)
