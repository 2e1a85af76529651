"""Small drop-in models (the research-code protocol) and oracle objectives for the tests.

The oracles are straightforward torch.distributions implementations (log_prob everywhere) of
the research code's objectives, with DReG's hook registered on the samples that *are* on the
loss path (the research code's is not, so it never fires).
"""
import math

import torch
import torch.distributions as D
import torch.nn as nn
import torch.nn.functional as F

DISTS = {"normal": D.Normal, "laplace": D.Laplace}


class TinyVAE(nn.Module):
    """Linear encoder/decoder; posterior/prior Normal or Laplace; a chosen likelihood."""

    def __init__(self, x_shape, L=3, family="laplace", lik="laplace", vocab=5, llik_scaling=1.0, learn_prior=True):
        super().__init__()
        self.x_shape, self.L, self.lik, self.vocab = tuple(x_shape), L, lik, vocab
        dx = math.prod(x_shape)
        din = dx * vocab if lik == "categorical" else dx
        self.enc = nn.Linear(din, 2 * L)
        self.dec = nn.Linear(L, dx * (vocab if lik == "categorical" else 1))
        self.qz_x = self.pz = DISTS[family]
        self._pz_params = nn.ParameterList([
            nn.Parameter(torch.zeros(1, L), requires_grad=False),
            nn.Parameter(0.1 * torch.randn(1, L), requires_grad=learn_prior),
        ])
        self.llik_scaling = llik_scaling
        self._qz_x_params = None

    @property
    def pz_params(self):
        return self._pz_params[0], F.softmax(self._pz_params[1], dim=1) * self._pz_params[1].size(-1)

    @property
    def qz_x_params(self):
        return self._qz_x_params

    def encode(self, x):
        h = F.one_hot(x, self.vocab).to(self.enc.weight.dtype) if self.lik == "categorical" else x
        h = self.enc(h.reshape(x.shape[0], -1))
        mu, s = h.chunk(2, -1)
        return mu, F.softplus(s) + 1e-3

    def px_z(self, z):
        out = self.dec(z)
        lead = z.shape[:-1]
        if self.lik == "categorical":
            return D.Categorical(logits=out.reshape(*lead, *self.x_shape, self.vocab))
        out = out.reshape(*lead, *self.x_shape)
        if self.lik == "laplace":
            return D.Laplace(out, torch.tensor(0.75, dtype=out.dtype))
        if self.lik == "normal":
            return D.Normal(out, torch.tensor(0.5, dtype=out.dtype))
        if self.lik == "bernoulli":
            return D.Bernoulli(logits=out)
        raise ValueError(self.lik)

    def forward(self, x, K=1):
        self._qz_x_params = self.encode(x)
        qz_x = self.qz_x(*self._qz_x_params)
        zs = qz_x.rsample(torch.Size([K]))
        return qz_x, self.px_z(zs), zs

    def sample_x(self, B, gen=None):
        dt = self.enc.weight.dtype
        if self.lik == "categorical":
            return torch.randint(0, self.vocab, (B, *self.x_shape), generator=gen)
        if self.lik == "bernoulli":
            return (torch.rand(B, *self.x_shape, generator=gen) > 0.5).to(dt)
        return torch.randn(B, *self.x_shape, generator=gen).to(dt)


class TinyMMVAE(nn.Module):
    """The research MMVAE forward: each expert samples, every decoder decodes every sample."""

    def __init__(self, vaes, family="laplace", learn_prior=True):
        super().__init__()
        self.vaes = nn.ModuleList(vaes)
        L = vaes[0].L
        self.pz = DISTS[family]
        self._pz_params = nn.ParameterList([
            nn.Parameter(torch.zeros(1, L), requires_grad=False),
            nn.Parameter(0.1 * torch.randn(1, L), requires_grad=learn_prior),
        ])

    @property
    def pz_params(self):
        return self._pz_params[0], F.softmax(self._pz_params[1], dim=1) * self._pz_params[1].size(-1)

    def forward(self, x, K=1):
        qz_xs, zss = [], []
        px_zs = [[None] * len(self.vaes) for _ in self.vaes]
        for m, vae in enumerate(self.vaes):
            qz_x, px_z, zs = vae(x[m], K=K)
            qz_xs.append(qz_x)
            zss.append(zs)
            px_zs[m][m] = px_z
        for e, zs in enumerate(zss):
            for d, vae in enumerate(self.vaes):
                if e != d:
                    px_zs[e][d] = vae.px_z(zs)
        return qz_xs, px_zs, zss


def make_mmvae(M=2, family="laplace", liks=None, L=3, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    liks = liks or ["laplace", "bernoulli", "categorical", "normal"][:M]
    shapes = {"laplace": (2, 3), "bernoulli": (5,), "categorical": (4,), "normal": (3,)}
    vaes = [TinyVAE(shapes[lik], L, family, lik, llik_scaling=1.0 + 0.5 * i) for i, lik in enumerate(liks)]
    return TinyMMVAE(vaes, family).to(dtype)


def sample_batch(model, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    if hasattr(model, "vaes"):
        return [v.sample_x(B, g) for v in model.vaes]
    return model.sample_x(B, g)


# ------------------------------------------------------------------------------------------
# Oracles: the research code's objectives, with log_prob
# ------------------------------------------------------------------------------------------


def _lpx(px_z, x, s):
    return (px_z.log_prob(x).view(*px_z.batch_shape[:2], -1) * s).sum(-1)


def _log_mean_exp(v, dim=0):
    return torch.logsumexp(v, dim) - math.log(v.size(dim))


def o_elbo(model, x, K=1):
    qz_x, px_z, _ = model(x, K)
    kld = D.kl_divergence(qz_x, model.pz(*model.pz_params))
    return _lpx(px_z, x, model.llik_scaling).mean(0).sum() - kld.sum()


def o_single_lw(model, x, K, detach=False):
    qz_x, px_z, zs = model(x, K)
    lpz = model.pz(*model.pz_params).log_prob(zs).sum(-1)
    q = model.qz_x(*[p.detach() for p in model.qz_x_params]) if detach else qz_x
    return lpz + _lpx(px_z, x, model.llik_scaling) - q.log_prob(zs).sum(-1), zs


def o_iwae(model, x, K):
    return _log_mean_exp(o_single_lw(model, x, K)[0]).sum()


def o_dreg(model, x, K):
    lw, zs = o_single_lw(model, x, K, detach=True)
    with torch.no_grad():
        w = (lw - torch.logsumexp(lw, 0, keepdim=True)).exp()
    if zs.requires_grad:
        zs.register_hook(lambda g: w.unsqueeze(-1) * g)
    return (w * lw).sum()


def o_m_lw(model, x, K, detach=False):
    qz_xs, px_zs, zss = model(x, K)
    qs = [v.qz_x(*[p.detach() for p in v.qz_x_params]) for v in model.vaes] if detach else qz_xs
    lws = []
    for r in range(len(qz_xs)):
        lpz = model.pz(*model.pz_params).log_prob(zss[r]).sum(-1)
        lqz = _log_mean_exp(torch.stack([q.log_prob(zss[r]).sum(-1) for q in qs]))
        lpx = torch.stack([_lpx(px, x[d], model.vaes[d].llik_scaling) for d, px in enumerate(px_zs[r])]).sum(0)
        lws.append(lpz + lpx - lqz)
    return torch.stack(lws), zss


def o_m_iwae(model, x, K):
    lw, _ = o_m_lw(model, x, K)
    return _log_mean_exp(lw.flatten(0, 1)).sum()


def o_m_iwae_looser(model, x, K):
    lw, _ = o_m_lw(model, x, K)
    return _log_mean_exp(lw, 1).mean(0).sum()


def o_m_dreg(model, x, K, looser=False):
    lw, zss = o_m_lw(model, x, K, detach=True)
    with torch.no_grad():
        dims = 1 if looser else (0, 1)
        w = (lw - torch.logsumexp(lw, dims, keepdim=True)).exp()
    for r, z in enumerate(zss):
        if z.requires_grad:
            z.register_hook(lambda g, wr=w[r]: wr.unsqueeze(-1) * g)
    return (w * lw).sum(1).mean(0).sum() if looser else (w * lw).sum()


def o_m_elbo_naive(model, x, K=1):
    qz_xs, px_zs, zss = model(x, K)
    lpx_zs, klds = [], []
    for r, qz_x in enumerate(qz_xs):
        klds.append(D.kl_divergence(qz_x, model.pz(*model.pz_params)).sum(-1))
        for d, px_z in enumerate(px_zs[r]):
            lpx_zs.append(_lpx(px_z, x[d], model.vaes[d].llik_scaling))
    return ((torch.stack(lpx_zs).sum(0) - torch.stack(klds).sum(0)) / len(model.vaes)).mean(0).sum()


def o_m_elbo(model, x, K=1):
    qz_xs, px_zs, zss = model(x, K)
    lpx_zs, klds = [], []
    for r, qz_x in enumerate(qz_xs):
        klds.append(D.kl_divergence(qz_x, model.pz(*model.pz_params)).sum(-1))
        for d in range(len(px_zs)):
            lpx_z = _lpx(px_zs[d][d], x[d], model.vaes[d].llik_scaling)
            if d == r:
                lwt = torch.tensor(0.0)
            else:
                zs = zss[d].detach()
                lwt = (qz_x.log_prob(zs) - qz_xs[d].log_prob(zs).detach()).sum(-1)
            lpx_zs.append(lwt.exp() * lpx_z)
    return ((torch.stack(lpx_zs).sum(0) - torch.stack(klds).sum(0)) / len(model.vaes)).mean(0).sum()
