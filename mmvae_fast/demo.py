"""A small demo: a few DReG steps of a two-modality MLP MMVAE on synthetic paired data.

    python -m mmvae_fast.demo [--steps 50] [--K 16]
"""
import argparse
import time

import torch
import torch.distributions as D
import torch.nn as nn
import torch.nn.functional as F

from . import objectives as obj
from .ops import _dispatch


class _Expert(nn.Module):
    def __init__(self, dx, L):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(dx, 64), nn.ReLU(), nn.Linear(64, 2 * L))
        self.dec = nn.Sequential(nn.Linear(L, 64), nn.ReLU(), nn.Linear(64, dx))
        self.qz_x, self.llik_scaling = D.Laplace, 1.0

    def forward(self, x, K):
        mu, s = self.enc(x).chunk(2, -1)
        self.qz_x_params = (mu, F.softmax(s, -1) * s.size(-1) + 1e-6)
        qz_x = D.Laplace(*self.qz_x_params)
        zs = qz_x.rsample(torch.Size([K]))
        return qz_x, self.px_z(zs), zs

    def px_z(self, z):
        return D.Laplace(self.dec(z), torch.tensor(0.75))


class _MMVAE(nn.Module):
    def __init__(self, dims, L):
        super().__init__()
        self.vaes = nn.ModuleList([_Expert(d, L) for d in dims])
        self.pz, self.pz_params = D.Laplace, (torch.zeros(1, L), torch.ones(1, L))

    def forward(self, x, K):
        outs = [v(xm, K) for v, xm in zip(self.vaes, x)]
        zss = [o[2] for o in outs]
        px = [[outs[e][1] if e == d else v.px_z(z) for d, v in enumerate(self.vaes)] for e, z in enumerate(zss)]
        return [o[0] for o in outs], px, zss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--K", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    z = torch.randn(512, 4)
    x = [torch.tanh(z @ torch.randn(4, 20)), torch.sin(z @ torch.randn(4, 30))]
    model = _MMVAE([20, 30], L=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    print(f"backends available here: {_dispatch.available_backends('cpu')}")
    t0 = time.time()
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, 512, (64,))
        loss = -obj.m_dreg_looser(model, [xm[idx] for xm in x], a.K) / 64
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == 1:
            print(f"step {step:4d}  m_dreg_looser bound per datum {-loss.item():9.3f}")
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
