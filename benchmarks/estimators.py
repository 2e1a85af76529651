"""Bias and variance of the gradient estimators of the MoE bounds: iwae, eq8, mixture,
mixture-centred, released, on the stratified (eq. 5) and looser (eq. 3) bounds.

1. Bias, exact: the 1-D quadrature model of tests/quadrature.py (two Normal experts, K=2 each,
   Gauss-Hermite grid of the noise): relative error of each estimator's expected encoder gradient
   against the true one (IWAE's on the same grid) at each grid size.
2. Bias, sampled, on a small MMVAE (2 modalities, Laplace experts, linear networks): relative
   error of the mean encoder gradient against IWAE's, paired on the same noise, with its
   bootstrap standard error and the noise floor (the value an unbiased estimator shows).
3. Variance: encoder and decoder gradient SNR (|mean| / std per parameter, averaged over the
   parameters) at K in {4, 16, 64, 256} on the same small MMVAE.
4. With --run DIR, a trained model (a run directory of `mmvae-fast train`, e.g. the offline
   default's): encoder/decoder SNR and the sampled bias against IWAE on a batch of its test data,
   streamed (no replicate is kept, so conv networks at K = 256 fit).

Writes benchmarks/out/estimators.md and estimators.png; prints the tables.
    python benchmarks/estimators.py [--reps 200] [--Ks 4 16 64 256]
    python benchmarks/estimators.py --run runs/main --run-reps 100 --device cuda   # + trained model
"""
import argparse
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

import mmvae_fast.objectives as obj  # noqa: E402
import toy  # noqa: E402
from quadrature import GridMMVAE, expected_gradient, rel_err  # noqa: E402

ESTIMATORS = ("iwae", "eq8", "mixture", "mixture-centred", "released")
BOUNDS = {"stratified": (obj.m_iwae, obj.m_dreg), "looser": (obj.m_iwae_looser, obj.m_dreg_looser)}


def call(bound, est, model, x, K):
    f_iwae, f_dreg = BOUNDS[bound]
    return f_iwae(model, x, K) if est == "iwae" else f_dreg(model, x, K, grad=est)


def quadrature_table(ns):
    rows = []
    for n in ns:
        model = GridMMVAE(M=2, K=2, n=n)
        for bound in BOUNDS:
            true, _ = expected_gradient(model, BOUNDS[bound][0])
            for est in ESTIMATORS[1:]:
                g, _ = expected_gradient(model, BOUNDS[bound][1], grad=est)
                rows.append((bound, est, n, rel_err(g, true)))
    return rows


def small_model():
    torch.manual_seed(0)
    model = toy.make_mmvae(2, "laplace", ["laplace", "normal"], L=2)
    x = toy.sample_batch(model, B=16)
    return model, x


def enc_dec_params(model, x):
    """The encoder parameters, and the other parameters the objective reaches (the decoders and the
    MMVAE's prior, not the VAEs' own priors)."""
    enc = [p for n, p in model.named_parameters() if ".enc." in n]
    rest = [p for n, p in model.named_parameters() if ".enc." not in n and p.requires_grad]
    torch.manual_seed(0)
    used = torch.autograd.grad(obj.m_iwae(model, x, 1), rest, allow_unused=True)
    return enc, [p for p, g in zip(rest, used) if g is not None]


def sample_gradients(model, x, K, bound, reps):
    """{estimator: (enc [reps, P], dec [reps, Q])}, replicate i of every estimator on seed i."""
    enc, dec = enc_dec_params(model, x)
    out = {}
    for est in ESTIMATORS:
        ge, gd = [], []
        for seed in range(reps):
            torch.manual_seed(seed)
            gs = torch.autograd.grad(call(bound, est, model, x, K), enc + dec)
            ge.append(torch.cat([g.flatten() for g in gs[: len(enc)]]))
            gd.append(torch.cat([g.flatten() for g in gs[len(enc):]]))
        out[est] = (torch.stack(ge), torch.stack(gd))
    return out


def snr(g):
    return float((g.mean(0).abs() / g.std(0).clamp_min(1e-300)).mean())


def sampled_bias(g, g_iwae, boot=200):
    """||mean(g - g_iwae)|| / ||mean(g_iwae)||, its bootstrap standard error, and the noise floor
    sqrt(tr Cov(g - g_iwae) / reps) / ||mean(g_iwae)||."""
    d = g - g_iwae
    reps = d.shape[0]
    norm = g_iwae.mean(0).norm()
    val = float(d.mean(0).norm() / norm)
    gen = torch.Generator().manual_seed(0)
    bs = []
    for _ in range(boot):
        i = torch.randint(0, reps, (reps,), generator=gen)
        bs.append(float(d[i].mean(0).norm() / g_iwae[i].mean(0).norm()))
    floor = float(math.sqrt(float(d.var(0).sum()) / reps) / norm)
    return val, float(torch.tensor(bs).std()), floor


class Moments:
    """Running sums of g and g^2 in float64 over replicates (the replicates are not kept)."""

    def __init__(self):
        self.n, self.s1, self.s2 = 0, 0.0, 0.0

    def add(self, g):
        g = g.double()
        self.n, self.s1, self.s2 = self.n + 1, self.s1 + g, self.s2 + g * g

    def mean(self):
        return self.s1 / self.n

    def var(self):
        return ((self.s2 - self.s1 * self.s1 / self.n) / (self.n - 1)).clamp_min(0)

    def snr(self):
        return float((self.mean().abs() / self.var().sqrt().clamp_min(1e-300)).mean())


def trained_model_table(run_dir, Ks, reps, B, device):
    """Rows (bound, K, {est: enc SNR}, dec SNR, {est: (bias, floor)}) on the trained model of run_dir."""
    from mmvae_fast.data import get_datasets
    from mmvae_fast.train import load_model

    model, a = load_model(run_dir, device)
    _, test = get_datasets(a.experiment, data_dir=a.data_dir)
    xs = [torch.stack([test[i][0][m] for i in range(B)]).to(device) for m in range(len(model.vaes))]
    enc, dec = enc_dec_params(model, xs)
    rows = []
    for bound in BOUNDS:
        for K in Ks:
            t = time.time()
            mom = {e: (Moments(), Moments()) for e in ESTIMATORS}
            diff = {e: Moments() for e in ESTIMATORS[1:]}
            for seed in range(reps):
                g_iwae = None
                for est in ESTIMATORS:  # paired: replicate `seed` of every estimator on the same noise
                    torch.manual_seed(seed)
                    gs = torch.autograd.grad(call(bound, est, model, xs, K), enc + dec)
                    ge = torch.cat([g.flatten() for g in gs[: len(enc)]])
                    mom[est][0].add(ge)
                    mom[est][1].add(torch.cat([g.flatten() for g in gs[len(enc):]]))
                    if est == "iwae":
                        g_iwae = ge
                    else:
                        diff[est].add(ge - g_iwae)
            norm = mom["iwae"][0].mean().norm()
            bias = {e: (float(diff[e].mean().norm() / norm), float(diff[e].var().sum().div(reps).sqrt() / norm))
                    for e in diff}
            rows.append((bound, K, {e: mom[e][0].snr() for e in ESTIMATORS}, mom["iwae"][1].snr(), bias))
            print(f"[trained {bound} K={K}: {time.time() - t:.1f}s]", file=sys.stderr, flush=True)
    n_enc = sum(p.numel() for p in enc)
    desc = (f"`{run_dir}`: {a.experiment}, trained {a.epochs} epochs with {a.obj}"
            f"{' (' + a.dreg_grad + ')' if a.obj == 'dreg' and a.dreg_grad else ''}, "
            f"{'looser' if a.looser else 'stratified'} bound, K = {a.K}; {n_enc} encoder parameters")
    return desc, rows


def small_model_sections(args):
    """Markdown of sections 1-3, the quadrature rows and the sampled gradients."""
    rows = quadrature_table(args.grids)
    md = [
        "## Bias, exact (quadrature)",
        "",
        "Two 1-D Normal experts, K = 2 each, Normal likelihoods (tests/quadrature.py, default "
        "parameters); Gauss-Hermite grid of n nodes per noise variable (n^4 points). Relative error "
        "||E[g] - grad|| / ||grad|| of the expected encoder gradient, grad = the IWAE gradient on the "
        "same grid.",
        "",
        "| bound | estimator | " + " | ".join(f"n = {n}" for n in args.grids) + " |",
        "|---|---|" + "---|" * len(args.grids),
    ]
    for bound in BOUNDS:
        for est in ESTIMATORS[1:]:
            errs = [e for b, s, n, e in rows if b == bound and s == est]
            md.append(f"| {bound} | {est} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")
    md.append("")

    model, x = small_model()
    n_enc = sum(p.numel() for n, p in model.named_parameters() if ".enc." in n)
    res = {}
    for bound in BOUNDS:
        for K in args.Ks:
            t = time.time()
            res[bound, K] = sample_gradients(model, x, K, bound, args.reps)
            print(f"[{bound} K={K}: {time.time() - t:.1f}s]", file=sys.stderr, flush=True)

    md += [
        f"## Bias, sampled (small MMVAE, K = {args.bias_K})",
        "",
        f"2 modalities (Laplace 2x3, Normal 3), Laplace experts, L = 2, linear encoders/decoders "
        f"({n_enc} encoder parameters), batch 16, {args.reps} replicates paired on the same noise. "
        "Relative error of the mean encoder gradient against IWAE's ± bootstrap standard error; "
        "the noise floor is what an unbiased estimator shows at this sample size.",
        "",
        "| bound | estimator | rel. error | ± s.e. | noise floor |",
        "|---|---|---|---|---|",
    ]
    Kb = args.bias_K if args.bias_K in args.Ks else args.Ks[0]
    for bound in BOUNDS:
        g = res[bound, Kb]
        for est in ESTIMATORS[1:]:
            v, se, floor = sampled_bias(g[est][0], g["iwae"][0])
            md.append(f"| {bound} | {est} | {v:.3f} | {se:.3f} | {floor:.3f} |")
    md.append("")

    md += [
        "## Variance: gradient SNR (|mean| / std per parameter, averaged)",
        "",
        "Same small MMVAE and replicates. Decoder gradients of every DReG variant equal IWAE's "
        "sample by sample, so the decoder SNR is one column.",
        "",
        "| bound | K | " + " | ".join(f"enc {e}" for e in ESTIMATORS) + " | dec |",
        "|---|---|" + "---|" * (len(ESTIMATORS) + 1),
    ]
    for bound in BOUNDS:
        for K in args.Ks:
            g = res[bound, K]
            md.append(
                f"| {bound} | {K} | " + " | ".join(f"{snr(g[e][0]):.3f}" for e in ESTIMATORS)
                + f" | {snr(g['iwae'][1]):.3f} |"
            )
    md.append("")
    snrs = {(b, K, e): snr(res[b, K][e][0]) for b, K in res for e in ESTIMATORS}
    return md, rows, snrs


def trained_section(args):
    desc, trows = trained_model_table(args.run, args.Ks, args.run_reps, args.run_B, torch.device(args.device))
    md = [
        "## Trained model: SNR and sampled bias",
        "",
        f"{desc}; a batch of {args.run_B} test pairs, {args.run_reps} replicates paired on the "
        "same noise. Encoder SNR per estimator, decoder SNR (the same for all), and the relative "
        "error of the mean encoder gradient against IWAE's (noise floor in brackets: what an "
        "unbiased estimator shows at this sample size).",
        "",
        "| bound | K | " + " | ".join(f"enc {e}" for e in ESTIMATORS) + " | dec | "
        + " | ".join(f"bias {e}" for e in ESTIMATORS[1:]) + " |",
        "|---|---|" + "---|" * (2 * len(ESTIMATORS)),
    ]
    for bound, K, enc_snr, dec_snr, bias in trows:
        md.append(f"| {bound} | {K} | " + " | ".join(f"{enc_snr[e]:.3f}" for e in ESTIMATORS)
                  + f" | {dec_snr:.3f} | " + " | ".join(f"{bias[e][0]:.3f} ({bias[e][1]:.3f})" for e in bias) + " |")
    md.append("")
    return md, {(b, K, e): v[e] for b, K, v, _, _ in trows for e in ESTIMATORS}


def plot(path, Ks, panels, rows, grids):
    """panels: [(title, {(bound, K, est): snr})]; rows: quadrature rows (may be empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 2 * len(panels) + bool(rows)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4.2))
    axes = list(axes) if n > 1 else [axes]
    for title, snrs in panels:
        for bound in BOUNDS:
            ax = axes.pop(0)
            for est in ESTIMATORS:
                ax.plot(Ks, [snrs[bound, K, est] for K in Ks], "o-", label=est)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("K")
            ax.set_ylabel("encoder gradient SNR")
            ax.set_title(f"{title}, {bound} bound")
            ax.legend(fontsize=8)
    if rows:
        ax = axes.pop(0)
        for bound, ls in zip(BOUNDS, ("-", "--")):
            for est, col in zip(ESTIMATORS[1:], ("C1", "C2", "C3", "C4")):
                errs = [e for b, s, g, e in rows if b == bound and s == est]
                ax.plot(grids, errs, ls, marker="o", color=col, label=f"{est} ({bound})")
        ax.set_yscale("log")
        ax.set_xlabel("Gauss-Hermite nodes per noise variable")
        ax.set_ylabel("relative error of E[encoder gradient]")
        ax.set_title("bias by quadrature")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=200, help="gradient replicates per (estimator, K, bound)")
    ap.add_argument("--Ks", type=int, nargs="+", default=[4, 16, 64, 256])
    ap.add_argument("--grids", type=int, nargs="+", default=[8, 12, 16, 20], help="Gauss-Hermite nodes per noise variable")
    ap.add_argument("--bias-K", type=int, default=16, help="K of the sampled bias table")
    ap.add_argument("--run", default=None, help="also measure on the trained model of this run directory")
    ap.add_argument("--run-reps", type=int, default=100, help="replicates on the trained model")
    ap.add_argument("--run-B", type=int, default=16, help="test pairs in the trained model's batch")
    ap.add_argument("--device", default="cpu", help="device of the trained-model section")
    ap.add_argument("--trained-only", action="store_true", help="with --run: skip the small-model sections")
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    args = ap.parse_args()
    if args.trained_only and not args.run:
        ap.error("--trained-only needs --run")
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    md = ["# Gradient estimators of the MoE bounds: bias and variance", ""]
    t0 = time.time()
    rows, panels = [], []
    if not args.trained_only:
        sec, rows, snrs = small_model_sections(args)
        md += sec
        panels.append(("small MMVAE", snrs))
    if args.run:
        sec, snrs = trained_section(args)
        md += sec
        panels.append(("trained", snrs))
    cmd = " ".join(["python benchmarks/estimators.py", *sys.argv[1:]])
    md += [f"({time.time() - t0:.0f} s on {torch.get_num_threads()} threads; `{cmd}`)", ""]
    text = "\n".join(md)
    print(text)
    with open(os.path.join(args.out, "estimators.md"), "w") as fh:
        fh.write(text)
    plot(os.path.join(args.out, "estimators.png"), args.Ks, panels, rows, args.grids)
    print(f"wrote {args.out}/estimators.md and estimators.png", file=sys.stderr)


if __name__ == "__main__":
    main()
