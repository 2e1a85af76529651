"""Exact expectations of gradient estimators by quadrature over the reparameterisation noise.

A drop-in model (the research-code protocol) whose *batch axis is a grid of the noise*: batch
entry b uses the noise eps[m, k, b] for sample k of expert m, one node of a tensor-product grid
over the M*K noise variables, and every batch entry sees the same data x. The objectives sum over
the batch, and every parameter reaches batch entry b through its own copy whose gradient is
scaled by the quadrature weight w_b (sum_b w_b = 1), so

    grad of objective  =  sum_b w_b g(eps_b)  ~=  E_eps[g(eps)],

the exact expectation of the objective's gradient estimator g up to the quadrature error, which
vanishes as the grid refines. For IWAE objectives that expectation is the true gradient of the
bound. Latent dim 1; experts q_m(z | x_m) = Normal(a_m x_m + c_m, exp(s_m)), prior N(0, 1),
likelihoods p(x_d | z) = Normal or Laplace(d_d z + e_d, sigma), float64.

Grids: "gauss" is Gauss-Hermite (probabilists') with its weights, exponentially accurate for the
smooth Normal-likelihood integrands; "quantile" is the equal-weight grid of standard-normal
quantiles at the midpoints (i + 1/2) / n, the plain "gradient over the grid divided by its size".
"""
import math

import numpy as np
import torch
import torch.distributions as D
import torch.nn as nn

DT = torch.float64


def grid(n, dims, kind="gauss"):
    """Tensor-product grid of n nodes per dim over `dims` standard-normal variables.

    Returns (eps [dims, n**dims], weights [n**dims]) with the weights summing to 1."""
    if kind == "gauss":
        nodes, w = np.polynomial.hermite_e.hermegauss(n)
        nodes, w = torch.tensor(nodes, dtype=DT), torch.tensor(w / w.sum(), dtype=DT)
    elif kind == "quantile":
        nodes = torch.special.ndtri((torch.arange(n, dtype=DT) + 0.5) / n)
        w = torch.full((n,), 1.0 / n, dtype=DT)
    else:
        raise ValueError(f"kind must be 'gauss' or 'quantile', got {kind!r}")
    idx = torch.cartesian_prod(*[torch.arange(n)] * dims).reshape(-1, dims).T  # [dims, n**dims]
    return nodes[idx], w[idx].prod(0)


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by the per-batch-entry weights."""

    @staticmethod
    def forward(ctx, t, w):
        ctx.save_for_backward(w)
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return g * w.view(-1, *[1] * (g.dim() - 1)), None


class _Expert(nn.Module):
    """One modality: its expert's (a, c, s) and its decoder's (d, e); `llik_scaling` 1."""

    def __init__(self, a, c, s, d, e):
        super().__init__()
        self.a, self.c, self.s = (nn.Parameter(torch.tensor(v, dtype=DT)) for v in (a, c, s))
        self.d, self.e = (nn.Parameter(torch.tensor(v, dtype=DT)) for v in (d, e))
        self.llik_scaling = 1.0
        self.qz_x = D.Normal
        self.qz_x_params = None


# Default parameters: two experts that overlap but disagree, decoders of different gain.
PARAMS = {
    "x": (1.0, 0.2),
    "enc": ((0.8, 0.0, math.log(0.8)), (0.3, 0.0, math.log(0.6))),
    "dec": ((0.5, 0.1), (0.9, -0.1)),
}


class GridMMVAE(nn.Module):
    """MMVAE with M one-dimensional Normal experts whose batch axis is the noise grid."""

    def __init__(self, M=2, K=2, n=8, kind="gauss", lik="normal", sigma=1.3, params=PARAMS):
        super().__init__()
        self.M, self.K, self.lik, self.sigma = M, K, lik, sigma
        self.vaes = nn.ModuleList(
            _Expert(*params["enc"][m], *params["dec"][m]) for m in range(M)
        )
        eps, w = grid(n, M * K, kind)
        self.register_buffer("eps", eps.reshape(M, K, -1, 1))  # [M, K, B, 1]
        self.register_buffer("w", w)
        self.B = w.numel()
        self.x = [torch.full((self.B, 1), params["x"][m], dtype=DT) for m in range(M)]
        self.pz = D.Normal
        self.pz_params = (torch.zeros(1, 1, dtype=DT), torch.ones(1, 1, dtype=DT))

    def _per_entry(self, p):
        """A copy of scalar parameter p per batch entry, its gradient weighted by w_b: [B, 1]."""
        return _ScaleGrad.apply(p.expand(self.B, 1), self.w)

    def px_z(self, d, z):
        v = self.vaes[d]
        loc = self._per_entry(v.d) * z + self._per_entry(v.e)
        dist = {"normal": D.Normal, "laplace": D.Laplace}[self.lik]
        return dist(loc, torch.tensor(self.sigma, dtype=DT))

    def forward(self, x, K):
        if K != self.K:
            raise ValueError(f"this grid model integrates K={self.K} samples per expert, got K={K}")
        qz_xs, zss = [], []
        for m, v in enumerate(self.vaes):
            loc = self._per_entry(v.a) * x[m] + self._per_entry(v.c)
            scale = self._per_entry(v.s).exp()
            v.qz_x_params = (loc, scale)
            qz_xs.append(D.Normal(loc, scale))
            zss.append(loc + scale * self.eps[m])  # [K, B, 1]: reparameterised on the grid
        px_zs = [[self.px_z(d, z) for d in range(self.M)] for z in zss]
        return qz_xs, px_zs, zss

    def encoder_parameters(self):
        return [p for v in self.vaes for p in (v.a, v.c, v.s)]

    def decoder_parameters(self):
        return [p for v in self.vaes for p in (v.d, v.e)]


class GridVAE(GridMMVAE):
    """The single-modality protocol (qz_x, px_z, zs) on the same grid, for `iwae` / `dreg`."""

    def __init__(self, K=2, n=8, kind="gauss", lik="normal", sigma=1.3, params=PARAMS):
        super().__init__(1, K, n, kind, lik, sigma, params)
        self.llik_scaling = 1.0
        self.qz_x = D.Normal

    @property
    def qz_x_params(self):
        return self.vaes[0].qz_x_params

    def forward(self, x, K):
        qz_xs, px_zs, zss = super().forward([x], K)
        return qz_xs[0], px_zs[0][0], zss[0]


def expected_gradient(model, objective, **kw):
    """(encoder, decoder) gradient of `objective(model, model.x, K)`: its exact expectation."""
    model.zero_grad()
    x = model.x[0] if isinstance(model, GridVAE) else model.x
    objective(model, x, model.K, **kw).backward()
    flat = lambda ps: torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in ps])  # noqa: E731
    return flat(model.encoder_parameters()), flat(model.decoder_parameters())


def rel_err(g, ref):
    return float((g - ref).norm() / ref.norm())


__all__ = ["grid", "GridMMVAE", "GridVAE", "expected_gradient", "rel_err", "PARAMS"]
