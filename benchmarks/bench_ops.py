"""Forward+backward time and peak memory of the four fused ops through the public API, per backend:
the fused CPU kernels (backend='cpu', where registered), the PyTorch reference eager
(backend='reference') and torch.compile of the reference; plus two objectives at MNIST-SVHN-like
sizes (fused where available vs reference).

    PYTHONPATH=. python benchmarks/bench_ops.py [--quick] [--ops importance_weights likelihood_sum]
                                                [--threads N] [--no-compile] [--max-gb 5]

Cases (float32, B = 128):
  importance_weights   lw [M, K, B] reduced over (M, K) (the stratified bound): M in {2, 5}, K in {30, 1000}
  mixture_log_density  z [M, K, B, L], Normal experts: M in {2, 5}, K in {30, 1000}, L in {20, 64}
  importance_ratios    the same grid
  likelihood_sum       decoder outputs [K, B, D]: Laplace D in {784, 3072}, Bernoulli D = 784 and
                       Categorical over a vocabulary of 1590 for sentences of 32 words, K in {30, 1000}
  objectives           m_dreg_looser, m_iwae on a 2-modality MLP MMVAE (784- and 3072-dim Laplace
                       likelihoods, Laplace posteriors, L = 20), K = 30
Backward is torch.autograd.backward(outputs, fixed random cotangents) over all the op's outputs, so
it runs through everything the op returns and nothing else is timed.

Time: median over repeats of one forward + backward, after a warm-up call (which also compiles).
Peak memory: the largest number of bytes torch's CPU allocator holds during one forward + backward
above what it held before (inputs and parameters are not counted; gradients and every
intermediate, including those allocated inside C++ kernels, are). It is read from the profiler's
allocation records (torch.profiler with profile_memory=True): each allocation and free reported
by c10's CPU allocator, replayed in time order. Small std::vector scratch rows inside the fused
kernels (a few KB per thread) are outside torch's allocator and not counted.
Configurations whose estimated reference footprint exceeds --max-gb are skipped and listed.

Writes benchmarks/out/bench_ops.csv and bench_ops.png, prints a markdown table; never asserts.
"""
import argparse
import csv
import gc
import os
import statistics
import time

import torch
import torch.distributions as D
import mmvae_fast.objectives as objectives
from mmvae_fast import ops
from mmvae_fast.profiling import peak_bytes
from mmvae_fast.models import MMVAE, VAE, ImageLikelihood, MLPDecoder, MLPEncoder, Prior

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
OPS = ("importance_weights", "mixture_log_density", "importance_ratios", "likelihood_sum", "moe_estimator")
GB = 1 << 30


# ------------------------------------------------------------------------------- measurement


def measure(step, repeats):
    """(median ms, min ms, peak bytes) of step(), one forward + backward. The minimum is printed
    too: on a shared machine it is the better estimate of the cost itself."""
    step()  # warm-up (compiles the torch.compile variant)
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    gc.collect()
    return 1e3 * statistics.median(times), 1e3 * min(times), peak_bytes(step)


def make_step(fn, leaves, cots):
    def step():
        for t in leaves:
            t.grad = None
        outs = fn(*leaves)
        torch.autograd.backward(list(outs) if isinstance(outs, (tuple, list)) else [outs], cots)
        for t in leaves:
            t.grad = None

    return step


# ------------------------------------------------------------------------------- op cases


def case_importance_weights(M, K, B, gen):
    lw = (5 * torch.randn(M, K, B, generator=gen)).requires_grad_()
    cots = [torch.randn(B, generator=gen), torch.randn(M, K, B, generator=gen), torch.randn(M, K, B, generator=gen)]

    def fn(backend):
        return lambda lw: tuple(ops.importance_weights(lw, (0, 1), backend=backend))

    return fn, [lw], cots


def _experts(M, K, B, L, gen):
    z = torch.randn(M, K, B, L, generator=gen).requires_grad_()
    loc = torch.randn(M, B, L, generator=gen).requires_grad_()
    scale = (0.5 + torch.rand(M, B, L, generator=gen)).requires_grad_()
    return [z, loc, scale]


def case_mixture(M, K, B, L, gen):
    leaves = _experts(M, K, B, L, gen)
    def fn(backend):
        return lambda z, loc, scale: ops.mixture_log_density(z, loc, scale, family="normal", backend=backend)

    return fn, leaves, [torch.randn(M, K, B, generator=gen)]


def case_ratios(M, K, B, L, gen):
    leaves = _experts(M, K, B, L, gen)
    def fn(backend):
        return lambda z, loc, scale: ops.importance_ratios(z, loc, scale, family="normal", backend=backend)

    return fn, leaves, [torch.randn(M, M, K, B, generator=gen)]


def case_likelihood(family, K, B, D_, V, gen):
    if family == "categorical":
        x = torch.randint(0, V, (B, D_), generator=gen)
        params = torch.randn(K, B, D_, V, generator=gen).requires_grad_()
    else:
        x = torch.rand(B, D_, generator=gen)
        params = torch.randn(K, B, D_, generator=gen).requires_grad_()
    scale = 0.75 if family in ("normal", "laplace") else None
    def fn(backend):
        return lambda p: ops.likelihood_sum(x, p, family=family, scale=scale, backend=backend)

    return fn, [params], [torch.randn(K, B, generator=gen)]


def case_moe_estimator(M, K, B, L, gen, estimator="mixture"):
    """The whole MoE bound with the unbiased mixture DReG (looser bound), Laplace experts and prior."""
    leaves = _experts(M, K, B, L, gen) + [
        torch.zeros(1, L).requires_grad_(), (0.5 + torch.rand(1, L, generator=gen)).requires_grad_(),
        torch.randn(M, K, B, generator=gen).requires_grad_(),
    ]

    def fn(backend):
        def run(z, loc, scale, ploc, pscale, lpx):
            est = ops.moe_estimator(z, loc, scale, ploc, pscale, lpx, family="laplace", bound="looser",
                                    estimator=estimator, backend=backend)
            return est.bound
        return run

    return fn, leaves, [torch.randn(B, generator=gen)]


def op_cases(quick):
    B = 32 if quick else 128
    Ms, Ks, Ls = ((2,), (30,), (20,)) if quick else ((2, 5), (30, 1000), (20, 64))
    for M in Ms:
        for K in Ks:
            yield "importance_weights", f"M={M} K={K} B={B}", 4 * M * K * B * 12, lambda g, M=M, K=K: case_importance_weights(M, K, B, g)
    for name, fn in (("mixture_log_density", case_mixture), ("importance_ratios", case_ratios)):
        for M in Ms:
            for K in Ks:
                for L in Ls:
                    est = 4 * M * M * K * B * L * 5
                    yield name, f"M={M} K={K} B={B} L={L}", est, lambda g, fn=fn, M=M, K=K, L=L: fn(M, K, B, L, g)
    for M, K, B_, L in ((2, 30, 128, 20), (2, 2000, 64, 32), (5, 300, 64, 32), (5, 1000, 32, 64))[: 1 if quick else 4]:
        yield "moe_estimator", f"M={M} K={K} B={B_} L={L}", 4 * M * M * K * B_ * L * 6, (
            lambda g, M=M, K=K, B_=B_, L=L: case_moe_estimator(M, K, B_, L, g))
    liks = [("laplace", 784, 1), ("laplace", 3072, 1), ("bernoulli", 784, 1), ("categorical", 32, 1590)]
    if quick:
        liks = [("laplace", 784, 1), ("categorical", 32, 1590)]
    for K in Ks:
        for fam, D_, V in liks:
            what = f"D={D_}" if fam != "categorical" else f"words={D_} V={V}"
            est = 4 * K * B * D_ * V * 6
            yield "likelihood_sum", f"{fam} {what} K={K} B={B}", est, lambda g, f=fam, K=K, D_=D_, V=V: case_likelihood(f, K, B, D_, V, g)


# ------------------------------------------------------------------------------- objectives


def mlp_mmvae(dims=(784, 3072), L=20):
    """MNIST-SVHN-like MMVAE from the library's own parts: MLP 400 encoder/decoder per modality (flat
    data of `dims`), Laplace posterior, prior (learnt scale) and Laplace(0.75) likelihood."""
    prior = Prior(L, D.Laplace, "softmax", learn_prior=True)
    return MMVAE([
        VAE(MLPEncoder(L, (d,)), MLPDecoder(L, (d,)), L, posterior=D.Laplace, likelihood=ImageLikelihood(D.Laplace, 0.75),
            prior=prior, llik_scaling=max(dims) / d, data_shape=(d,))
        for d in dims
    ], prior)


def objective_cases(quick):
    B, K = (32, 10) if quick else (128, 30)
    for name in ("m_dreg_looser", "m_iwae"):
        yield name, f"MNIST-SVHN MLP K={K} B={B}", B, K


# ------------------------------------------------------------------------------- main


def fused_available(op):
    return "cpu" in ops.available_backends("cpu", op=op)


def run(args):
    torch.set_num_threads(args.threads or torch.get_num_threads())
    rows, skipped = [], []
    for op, config, est_bytes, make in op_cases(args.quick):
        if args.ops and op not in args.ops:
            continue
        if est_bytes > args.max_gb * GB:
            skipped.append(f"{op} {config} (reference needs ~{est_bytes / GB:.0f} GB)")
            continue
        gen = torch.Generator().manual_seed(0)
        fn_for, leaves, cots = make(gen)
        variants = []
        if fused_available(op):
            variants.append(("cpu (fused)", fn_for("cpu")))
        variants.append(("reference eager", fn_for("reference")))
        if not args.no_compile:
            variants.append(("reference compiled", torch.compile(fn_for("reference"))))
        results = {}
        for label, fn in variants:
            ms, ms_min, peak = measure(make_step(fn, leaves, cots), args.repeats)
            results[label] = (ms, ms_min, peak)
            print(f"  {op:20s} {config:36s} {label:18s} {ms:10.2f} ms {peak / 2**20:10.1f} MB", flush=True)
        rows += [(op, config, label, *r, results["reference eager"]) for label, r in results.items()]
        del fn_for, leaves, cots, variants
        torch._dynamo.reset()
    if not args.ops or "objectives" in args.ops:
        for name, config, B, K in objective_cases(args.quick):
            torch.manual_seed(0)
            model = mlp_mmvae()
            x = [torch.rand(B, 784), torch.rand(B, 3072)]
            fn = getattr(objectives, name)
            results = {}
            for label, backend in (("fused where available", None), ("reference eager", "reference")):
                def step(backend=backend):
                    model.zero_grad(set_to_none=True)
                    torch.manual_seed(1)
                    (-fn(model, x, K, backend=backend)).backward()
                    model.zero_grad(set_to_none=True)

                ms, ms_min, peak = measure(step, args.repeats)
                results[label] = (ms, ms_min, peak)
                print(f"  {name:20s} {config:36s} {label:18s} {ms:10.2f} ms {peak / 2**20:10.1f} MB", flush=True)
            rows += [(name, config, label, *r, results["reference eager"]) for label, r in results.items()]
    return rows, skipped


def report(rows, skipped, args):
    os.makedirs(OUT, exist_ok=True)
    header = ["op", "config", "backend", "fwd+bwd ms (median)", "min ms", "peak MB", "speed-up vs eager (median / min)", "peak vs eager"]
    table = []
    for op, config, label, ms, ms_min, peak, (ems, ems_min, epeak) in rows:
        speedup = f"{ems / ms:.2f}x / {ems_min / ms_min:.2f}x"
        table.append([op, config, label, f"{ms:.2f}", f"{ms_min:.2f}", f"{peak / 2**20:.2f}", speedup, f"{peak / epeak:.2f}" if epeak else "-"])
    print(f"\nforward + backward, float32, {torch.get_num_threads()} thread(s), torch {torch.__version__}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in table:
        print("| " + " | ".join(r) + " |")
    if skipped:
        print("\nskipped (over --max-gb): " + "; ".join(skipped))
    csv_path = os.path.join(OUT, "bench_ops.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["op", "config", "backend", "median_ms", "min_ms", "peak_bytes", "eager_median_ms", "eager_min_ms", "eager_peak_bytes", "threads"])
        for op, config, label, ms, ms_min, peak, (ems, ems_min, epeak) in rows:
            w.writerow([op, config, label, f"{ms:.4f}", f"{ms_min:.4f}", peak, f"{ems:.4f}", f"{ems_min:.4f}", epeak, torch.get_num_threads()])
    png = plot(rows)
    print(f"\nwrote {csv_path}" + (f" and {png}" if png else ""))


def plot(rows):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = list(dict.fromkeys(op for op, *_ in rows))
    fig, axes = plt.subplots(len(groups), 2, figsize=(16, 3.2 * len(groups)), squeeze=False)
    for gi, op in enumerate(groups):
        sub = [r for r in rows if r[0] == op]
        configs = list(dict.fromkeys(r[1] for r in sub))
        labels = list(dict.fromkeys(r[2] for r in sub))
        width = 0.8 / len(labels)
        for j, metric in enumerate(("fwd+bwd median time (ms)", "peak memory (MB)")):
            ax = axes[gi][j]
            for li, label in enumerate(labels):
                vals = {r[1]: (r[3] if j == 0 else r[5] / 2**20) for r in sub if r[2] == label}
                xs = [i + li * width for i, c in enumerate(configs) if c in vals]
                ax.bar(xs, [vals[c] for c in configs if c in vals], width, label=label)
            ax.set_yscale("log")
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))])
            ax.set_xticklabels(configs, rotation=20, ha="right", fontsize=7)
            ax.set_title(f"{op}: {metric}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(OUT, "bench_ops.png")
    fig.savefig(path, dpi=110)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small grid (B=32, M=2, K=30, L=20), for a smoke run")
    p.add_argument("--ops", nargs="*", choices=OPS + ("objectives",), help="only these ops (default: all, and the objectives)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 7, quick 3)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) rows")
    p.add_argument("--max-gb", type=float, default=5.0, help="skip cases whose reference would need more memory")
    args = p.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 7)
    rows, skipped = run(args)
    report(rows, skipped, args)


if __name__ == "__main__":
    main()
