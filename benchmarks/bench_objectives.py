"""Every drop-in objective against the code it replaces: forward+backward time and peak memory.

    PYTHONPATH=. python benchmarks/bench_objectives.py [--device cuda] [--no-compile] [--quick]
        [--objectives m_dreg_looser m_dreg ...] [--sizes 2,30,128,20 ...] [--repeats 7] [--threads N]

Rows, per size:
  research   the objective written the way the paper's research code writes it: a loop over the
             modalities, torch.distributions.log_prob for every density, log_mean_exp over a stacked
             [M, M, K, B] table, and for DReG a wbar-rescaling hook on a stacked copy of z
  compiled   torch.compile of that function (model included; default mode)
  fused compiled  torch.compile of the fused objective (model included; the op is a torch.library
             op with a fake kernel, so the model around it compiles as well)
  fused      mmvae_fast.objectives.<name> with its default gradient (m_dreg*: the unbiased "mixture")
  fused eq8  m_dreg*, grad="eq8"
  model      the model alone: model(x, K) and a backward through every sample and decoder output,
             no objective; both sides pay it, so research / model bounds any objective's speed-up
Sizes (M, K, B, L): a tiny MMVAE (Laplace experts and prior, linear encoders, linear decoders to 4-dim
Laplace modalities) so the objective's own maths dominates: (2,30,128,20), (2,2000,64,32), (5,300,64,32),
(5,1000,32,64); and the library's MNIST-SVHN model (Table 6 networks) at K = 30 (B = 32) and K = 1000
(B = 8; the fused row with k_chunk = 100).

Time: median of --repeats forward+backward steps (gradients of every parameter), after a warm-up
call; the variants of one objective and size are timed round-robin, one step of each per round, so
a slow spell of a shared machine falls on all of them alike. On CUDA each step ends with a synchronize. Peak: the most bytes torch's allocator holds during
one step above what it held before it (CPU: the profiler's allocation records; CUDA:
max_memory_allocated). Benchmarks print; they never assert.
"""
import argparse
import gc
import math
import os
import statistics
import sys
import time

import torch
import torch.distributions as D
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmvae_fast import objectives as O, profiling  # noqa: E402

OBJECTIVES = ("m_elbo_naive", "m_elbo", "m_iwae", "m_iwae_looser", "m_dreg", "m_dreg_looser")
SIZES = ((2, 30, 128, 20), (2, 2000, 64, 32), (5, 300, 64, 32), (5, 1000, 32, 64))


# ------------------------------------------------------------------------------------------------
# A tiny MMVAE of the research code's protocol
# ------------------------------------------------------------------------------------------------


class _Modality(nn.Module):
    def __init__(self, L, D_):
        super().__init__()
        self.enc, self.dec, self.L = nn.Linear(D_, 2 * L), nn.Linear(L, D_), L
        self.llik_scaling = 1.0
        self.qz_x = lambda loc, scale: D.Laplace(loc, scale, validate_args=False)
        self.qz_x_params = None

    def encode(self, x):
        loc, raw = self.enc(x).chunk(2, -1)
        return loc, F.softmax(raw, -1) * self.L + 1e-6


class TinyMMVAE(nn.Module):
    """M modalities of D dims; Laplace posteriors (softmax scale, as the paper), Laplace(0.75)
    likelihoods, a learnable Laplace prior."""

    def __init__(self, M, L, D_=4):
        super().__init__()
        self.vaes = nn.ModuleList(_Modality(L, D_) for _ in range(M))
        self._pz_params = nn.ParameterList([nn.Parameter(torch.zeros(1, L)), nn.Parameter(torch.zeros(1, L))])
        self.L = L

    @property
    def pz_params(self):
        return self._pz_params[0], F.softmax(self._pz_params[1], -1) * self.L

    @staticmethod
    def pz(loc, scale):
        return D.Laplace(loc, scale, validate_args=False)

    def forward(self, x, K):
        qz_xs, zss = [], []
        for vae, xm in zip(self.vaes, x):
            vae.qz_x_params = vae.encode(xm)
            q = vae.qz_x(*vae.qz_x_params)
            qz_xs.append(q)
            zss.append(q.rsample(torch.Size([K])))
        px_zs = [[D.Laplace(torch.sigmoid(v.dec(z)), 0.75, validate_args=False) for v in self.vaes] for z in zss]
        return qz_xs, px_zs, zss


# ------------------------------------------------------------------------------------------------
# The research code's way (written here from the paper's equations and its released style)
# ------------------------------------------------------------------------------------------------


def _log_mean_exp(v, dim=0):
    return torch.logsumexp(v, dim) - math.log(v.size(dim))


def _lpx(model, px_zs_r, x):
    return torch.stack([
        px.log_prob(xd).view(*px.batch_shape[:2], -1).mul(model.vaes[d].llik_scaling).sum(-1)
        for d, (px, xd) in enumerate(zip(px_zs_r, x))
    ]).sum(0)


def _lws(model, x, K, detach_q):
    qz_xs, px_zs, zss = model(x, K)
    qs = [v.qz_x(*[p.detach() for p in v.qz_x_params]) for v in model.vaes] if detach_q else qz_xs
    lws = []
    for r, z in enumerate(zss):
        lpz = model.pz(*model.pz_params).log_prob(z).sum(-1)
        lqz = _log_mean_exp(torch.stack([q.log_prob(z).sum(-1) for q in qs]))
        lws.append(lpz + _lpx(model, px_zs[r], x) - lqz)
    return torch.stack(lws), zss


def research_m_iwae_looser(model, x, K):
    lw, _ = _lws(model, x, K, False)
    return _log_mean_exp(lw, 1).mean(0).sum()


def research_m_iwae(model, x, K):
    lw, _ = _lws(model, x, K, False)
    return _log_mean_exp(lw.flatten(0, 1), 0).sum()


def research_m_dreg_looser(model, x, K):
    lw, zss = _lws(model, x, K, True)
    zs = torch.stack(zss)  # as the released code: the hook sits on a copy
    with torch.no_grad():
        w = (lw - torch.logsumexp(lw, 1, keepdim=True)).exp()
        if zs.requires_grad:
            zs.register_hook(lambda g: w.unsqueeze(-1) * g)
    return (w * lw).mean(0).sum()


def research_m_dreg(model, x, K):
    lw, zss = _lws(model, x, K, True)
    zs = torch.stack(zss)
    with torch.no_grad():
        w = (lw - torch.logsumexp(lw.flatten(0, 1), 0)).exp()
        if zs.requires_grad:
            zs.register_hook(lambda g: w.unsqueeze(-1) * g)
    return (w * lw).sum()


def research_m_elbo_naive(model, x, K):
    qz_xs, px_zs, zss = model(x, K)
    pz = model.pz(*model.pz_params)
    out = 0
    for r, q in enumerate(qz_xs):
        kld = D.kl_divergence(q, pz).sum(-1)
        out = out + _lpx(model, px_zs[r], x).mean(0) - kld
    return (out / len(qz_xs)).sum()


def research_m_elbo(model, x, K):
    qz_xs, px_zs, zss = model(x, K)
    pz = model.pz(*model.pz_params)
    M, out = len(qz_xs), 0
    for r, q in enumerate(qz_xs):
        kld = D.kl_divergence(q, pz).sum(-1)
        lpx = 0
        for d in range(M):
            lp = px_zs[d][d].log_prob(x[d]).view(*px_zs[d][d].batch_shape[:2], -1).mul(model.vaes[d].llik_scaling)
            lp = lp.sum(-1)
            if d != r:
                zd = zss[d].detach()
                lp = (q.log_prob(zd) - qz_xs[d].log_prob(zd).detach()).sum(-1).exp() * lp
            lpx = lpx + lp
        out = out + lpx.mean(0) - kld
    return (out / M).sum()


RESEARCH = {n: globals()[f"research_{n}"] for n in OBJECTIVES}


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------


def peak_bytes(step, device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return profiling.peak_bytes(step)


def _timed(step, device):
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(step, repeats, device):
    step()
    times = [_timed(step, device) for _ in range(repeats)]
    return 1e3 * statistics.median(times), peak_bytes(step, device)


def measure_interleaved(steps, repeats, device):
    """{name: (median ms, peak bytes)} of steps {name: step}, timed round-robin (one step of each
    variant per round), so a slow spell of a shared machine falls on every variant alike instead of
    on whichever ran during it. A step that fails in its warm-up call is left out, with a line."""
    ok = {}
    for name, step in steps.items():
        try:
            step()
            ok[name] = step
        except Exception as e:  # noqa: BLE001 - a benchmark reports, never stops
            print(f"  {name}: failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
    times = {name: [] for name in ok}
    for _ in range(repeats):
        for name, step in ok.items():
            times[name].append(_timed(step, device))
    return {name: (1e3 * statistics.median(times[name]), peak_bytes(step, device)) for name, step in ok.items()}


def make_step(model, fn):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        loss = -fn()
        loss.backward()

    return step


def model_alone(model, x, K):
    """The floor: the model's forward, and a backward reaching every sample, decoder and encoder."""
    out = model(x, K)
    zss, px_zs = out[2], out[1]
    dec = [p for row in px_zs for p in row if p is not None]
    return sum(z.sum() for z in zss) + sum(getattr(p, "loc", getattr(p, "logits", None)).sum() for p in dec)


def tiny_case(M, K, B, L, device, seed=0):
    torch.manual_seed(seed)
    model = TinyMMVAE(M, L).to(device)
    x = [torch.rand(B, 4, device=device) for _ in range(M)]
    return model, x


def mnist_svhn_case(B, device):
    from mmvae_fast.models import build_model

    torch.manual_seed(0)
    model = build_model("mnist-svhn").to(device)
    x = [torch.rand(B, 1, 28, 28, device=device), torch.rand(B, 3, 32, 32, device=device)]
    return model, x


def rows_for(name, model, x, K, args, k_chunk=None):
    """(variant, fn) pairs of one objective; k_chunk applies to the fused rows."""
    research = RESEARCH[name]
    out = [("research", lambda: research(model, x, K))]
    if args.compile:
        comp = torch.compile(research)
        out.append(("compiled", lambda: comp(model, x, K)))
    fused = getattr(O, name)
    kw = {} if k_chunk is None or name in ("m_elbo", "m_elbo_naive") else {"k_chunk": k_chunk}
    out.append(("fused" + (f" k_chunk={k_chunk}" if kw else ""), lambda: fused(model, x, K, **kw)))
    if args.compile and not kw:
        fused_comp = torch.compile(fused)
        out.append(("fused compiled", lambda: fused_comp(model, x, K)))
    if name.startswith("m_dreg"):
        out.append(("fused eq8", lambda: fused(model, x, K, grad="eq8", **kw)))
    return out


def run(args):
    cases = [(f"tiny M={M} K={K} B={B} L={L}", (lambda M=M, K=K, B=B, L=L: tiny_case(M, K, B, L, args.device)), K, None,
              args.objectives) for M, K, B, L in args.sizes]
    if args.mnist_svhn:
        dreg = [n for n in args.objectives if n == "m_dreg_looser"] or args.objectives[:1]
        cases.append(("MNIST-SVHN K=30 B=32", lambda: mnist_svhn_case(32, args.device), 30, None, dreg))
        cases.append(("MNIST-SVHN K=1000 B=8", lambda: mnist_svhn_case(8, args.device), 1000, 100, dreg))
    rows = []
    for label, build, K, k_chunk, names in cases:
        model, x = build()
        for name in names:
            variants = rows_for(name, model, x, K, args, k_chunk)
            if k_chunk is None:
                variants.append(("model", lambda model=model, x=x, K=K: model_alone(model, x, K)))
            steps = {variant: make_step(model, fn) for variant, fn in variants}
            got = measure_interleaved(steps, args.repeats if k_chunk is None else 3, args.device)
            for variant, (ms, peak) in got.items():
                rows.append((label, name, variant, ms, peak))
                print(f"  {label:28s} {name:14s} {variant:18s} {ms:10.2f} ms  {peak / 2**20:9.1f} MiB", flush=True)
        del model, x
    return rows


def report(rows):
    base = {(r[0], r[1]): r for r in rows if r[2] == "research"}
    comp = {(r[0], r[1]): r for r in rows if r[2] == "compiled"}  # fused compiled vs compiled: like for like
    print("\n| case | objective | variant | ms | peak MiB | vs research | vs compiled | peak vs research |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for label, name, variant, ms, peak in rows:
        b, c = base.get((label, name)), comp.get((label, name))
        sp = f"{b[3] / ms:.2f}x" if b else ""
        sc = f"{c[3] / ms:.2f}x" if c else ""
        mem = f"{peak / b[4]:.2f}" if b and b[4] else ""
        print(f"| {label} | {name} | {variant} | {ms:.2f} | {peak / 2**20:.1f} | {sp} | {sc} | {mem} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    ap.add_argument("--sizes", nargs="+", default=[",".join(map(str, s)) for s in SIZES])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--no-mnist-svhn", dest="mnist_svhn", action="store_false")
    ap.add_argument("--quick", action="store_true", help="the first size, 3 repeats, no MNIST-SVHN")
    args = ap.parse_args()
    args.sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes]
    if args.quick:
        args.sizes, args.repeats, args.mnist_svhn = args.sizes[:1], 3, False
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}", flush=True)
    report(run(args))


if __name__ == "__main__":
    main()
