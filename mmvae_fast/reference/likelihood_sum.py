"""Per-sample log-likelihood sums log p(x | params) over the event dims of x."""
import torch
import torch.nn.functional as F

from .._numerics import LIKELIHOODS, acc_dtype
from .densities import log_density


def likelihood_sum(x, params, family: str, scale=None):
    """out[*S, b] = sum_e log p(x[b, e] | params[*S, b, e]).

    laplace / normal: params is the location, scale a fixed (broadcastable) scale.
    bernoulli: params are logits, x in [0, 1]. categorical: params are logits with a trailing
    vocabulary axis, x integer class indices. x is observed data: no gradient reaches it.
    """
    x = x.detach()
    dt = acc_dtype(params.dtype)
    n_event = x.dim() - 1
    if family in ("laplace", "normal"):
        lp = log_density(x.to(dt), params.to(dt), torch.as_tensor(scale).to(dt), family)
    elif family == "bernoulli":
        # -(1 - x) softplus(l) - x softplus(-l) (= x l - softplus(l)), a term of weight 0 dropped so
        # that infinite logits give the limits (0 or -inf), never inf - inf = NaN
        logits, xx = params.to(dt), x.to(dt)
        lp = -(torch.where(xx != 1, (1 - xx) * F.softplus(logits), 0.0)  # NaN x: NaN
               + torch.where(xx != 0, xx * F.softplus(-logits), 0.0))
    elif family == "categorical":
        logp = torch.log_softmax(params.to(dt), dim=-1)
        idx = x.long().expand(logp.shape[:-1]).unsqueeze(-1)
        lp = logp.gather(-1, idx).squeeze(-1)
    else:
        raise ValueError(f"family must be one of {LIKELIHOODS}, got {family!r}")
    return lp.sum(tuple(range(lp.dim() - n_event, lp.dim()))) if n_event else lp
