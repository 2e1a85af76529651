"""GPU benchmark of the fused ops (the moe_estimator at the MMVAE sizes included): Triton vs CUDA
extension vs reference eager vs torch.compile.

    python benchmarks/bench_gpu.py            # on a machine with a CUDA GPU
    python benchmarks/bench_gpu.py --quick    # fewer sizes

Times forward and forward+backward with triton.testing.do_bench (median ms) and reports the
forward's achieved bandwidth: the bytes an ideal single pass reads and writes (inputs once,
outputs once, nothing in between) divided by the time, against the device's peak memory
bandwidth. Prints a table, writes a CSV and a PNG plot. Never asserts timings. Without CUDA it
prints why and exits 0.
"""
import argparse
import csv
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mmvae_fast import ops  # noqa: E402
from mmvae_fast import reference as ref  # noqa: E402

# Peak memory bandwidth in GB/s (vendor datasheets), matched on the device name.
PEAK_GBS = {
    "H200": 4800.0,
    "H100 SXM": 3350.0,
    "H100 80GB HBM3": 3350.0,
    "H100 PCIe": 2000.0,
    "H100 NVL": 3900.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100-SXM4-40GB": 1555.0,
    "A100-PCIE-40GB": 1555.0,
    "L40S": 864.0,
    "L4": 300.0,
    "A10": 600.0,
    "RTX 4090": 1008.0,
    "RTX 3090": 936.0,
    "V100": 900.0,
    "T4": 320.0,
}


def peak_bandwidth(measure) -> tuple:
    name = torch.cuda.get_device_name()
    for key, gbs in PEAK_GBS.items():
        if key.lower() in name.lower():
            return gbs, f"{name} datasheet"
    # unknown device: a large device-to-device copy is a good proxy for the achievable peak
    x = torch.empty(256 * 2**20, dtype=torch.float32, device="cuda")
    ms = measure(lambda: x.clone())
    return 2 * x.numel() * 4 / ms / 1e6, f"{name} (measured copy)"


def cases(quick: bool):
    """(op, label, make_inputs() -> (args, kwargs, tensors_needing_grad), ideal_bytes)."""
    out = []
    f32 = torch.float32

    def iw(R, N, dt):
        def make():
            lw = (3 * torch.randn(R, N, device="cuda")).to(dt).requires_grad_()
            return (lw, 1), {}, [lw]

        isz = torch.finfo(dt).bits // 8
        return ("importance_weights", f"R={R} N={N} {str(dt)[6:]}", make, R * N * isz + 2 * R * N * 4 + R * 4)

    def mix(M, K, B, L, pairwise):
        def make():
            z = torch.randn(M, K, B, L, device="cuda", requires_grad=True)
            loc = torch.randn(M, B, L, device="cuda", requires_grad=True)
            sc = (0.5 + torch.rand(M, B, L, device="cuda")).requires_grad_()
            return (z, loc, sc), dict(family="laplace", return_pairwise=pairwise), [z, loc, sc]

        nbytes = 4 * (M * K * B * L + 2 * M * B * L + M * K * B + (M * M * K * B if pairwise else 0))
        return ("mixture_log_density", f"M={M} K={K} B={B} L={L}" + (" +a" if pairwise else ""), make, nbytes)

    def rat(M, K, B, L):
        def make():
            z = torch.randn(M, K, B, L, device="cuda")
            loc = torch.randn(M, B, L, device="cuda", requires_grad=True)
            sc = (0.5 + torch.rand(M, B, L, device="cuda")).requires_grad_()
            return (z, loc, sc), dict(family="normal"), [loc, sc]

        return ("importance_ratios", f"M={M} K={K} B={B} L={L}", make, 4 * (M * K * B * L + 2 * M * B * L + M * M * K * B))

    def lik(fam, S, B, E, V=None):
        def make():
            if fam == "categorical":
                x = torch.randint(0, V, (B, E), device="cuda")
                p = torch.randn(S, B, E, V, device="cuda", requires_grad=True)
                return (x, p), dict(family=fam), [p]
            x = torch.rand(B, E, device="cuda")
            p = torch.randn(S, B, E, device="cuda", requires_grad=True)
            return (x, p), dict(family=fam, scale=0.75 if fam != "bernoulli" else None), [p]

        n = S * B * E * (V or 1)
        xb = B * E * (8 if fam == "categorical" else 4)
        return ("likelihood_sum", f"{fam} S={S} B={B} E={E}" + (f" V={V}" if V else ""), make, 4 * n + xb + 4 * S * B)

    def moe(M, K, B, L):
        def make():
            z = torch.randn(M, K, B, L, device="cuda", requires_grad=True)
            loc = torch.randn(M, B, L, device="cuda", requires_grad=True)
            sc = (0.5 + torch.rand(M, B, L, device="cuda")).requires_grad_()
            ploc = torch.zeros(B, L, device="cuda", requires_grad=True)
            psc = torch.ones(B, L, device="cuda", requires_grad=True)
            lpx = torch.randn(M, K, B, device="cuda", requires_grad=True)
            kw = dict(family="laplace", prior_family="laplace", bound="looser", estimator="mixture")
            return (z, loc, sc, ploc, psc, lpx), kw, [z, loc, sc, ploc, psc, lpx]

        # inputs once; outputs bound, lw, z_weight and the saved lq and slice stats
        nbytes = 4 * (M * K * B * L + 2 * M * B * L + 2 * B * L + M * K * B + B + 3 * M * K * B + 2 * M * B)
        return ("moe_estimator", f"M={M} K={K} B={B} L={L}", make, nbytes)

    out += [iw(128, 30 * 2, f32), iw(4096, 1000, f32), iw(4096, 1000, torch.bfloat16), iw(1, 2**20, f32)]
    out += [mix(2, 30, 128, 64, False), mix(4, 64, 256, 32, False), mix(2, 30, 128, 64, True)]
    out += [rat(2, 30, 128, 64), rat(4, 64, 256, 32)]
    out += [moe(2, 30, 128, 20), moe(2, 30, 32, 64), moe(2, 1000, 8, 64), moe(5, 300, 64, 32)]
    out += [lik("bernoulli", 30, 128, 784), lik("laplace", 30, 128, 3 * 32 * 32), lik("categorical", 30, 64, 32, 2**15 // 8)]
    if quick:
        out = out[::2]
    return out


def reference_fn(op):
    """The plain PyTorch oracle with the public op's signature (what eager/compile run)."""
    if op == "importance_weights":
        return lambda lw, dim: ref.importance_weights(lw, dim)
    if op == "mixture_log_density":
        return lambda z, loc, sc, family, return_pairwise: ref.mixture_log_density(z, loc, sc, family, None, return_pairwise)
    if op == "importance_ratios":
        return lambda z, loc, sc, family: ref.importance_ratios(z, loc, sc, family)
    if op == "moe_estimator":
        return lambda *a, **kw: ref.moe_estimator(*a, **kw)
    return lambda x, p, family, scale=None: ref.likelihood_sum(x, p, family, None if scale is None else torch.tensor(scale, device=p.device))


def runners(op):
    public = getattr(ops, op)
    out = {}
    for b in ("triton", "cuda"):
        if b in ops.available_backends("cuda", op=op):
            out[b] = lambda *a, _b=b, **k: public(*a, backend=_b, **k)
    out["eager"] = reference_fn(op)
    out["compile"] = torch.compile(reference_fn(op), dynamic=False)
    return out


def first(outs):
    return outs[0] if isinstance(outs, (tuple, list)) else outs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every other case")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), help="where the CSV and PNG go")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (torch.cuda.is_available() is False); nothing to time. "
              "Run `python benchmarks/bench_gpu.py` on a machine with an NVIDIA GPU and triton installed.")
        return 0
    from triton.testing import do_bench

    measure = lambda fn: do_bench(fn, warmup=25, rep=100)  # noqa: E731
    peak, peak_src = peak_bandwidth(measure)
    print(f"device: {torch.cuda.get_device_name()}, peak {peak:.0f} GB/s ({peak_src}); torch {torch.__version__}")
    rows = []
    for op, label, make, nbytes in cases(args.quick):
        for name, fn in runners(op).items():
            a, kw, leaves = make()
            try:
                outs = fn(*a, **kw)  # compile / autotune outside the timing
                loss = sum(o.float().sum() for o in (outs if isinstance(outs, (tuple, list)) else [outs])
                           if o is not None and o.numel())
                torch.autograd.grad(loss, leaves)
                with torch.no_grad():
                    ms_f = measure(lambda: fn(*a, **kw))

                def fwd_bwd():
                    o = fn(*a, **kw)
                    torch.autograd.grad(first(o).sum(), leaves, allow_unused=True)

                ms_fb = measure(fwd_bwd)
            except Exception as e:  # a backend that fails on a case is reported, not fatal
                print(f"  {op} {label} {name}: failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            gbs = nbytes / ms_f / 1e6
            rows.append(dict(op=op, case=label, backend=name, fwd_ms=ms_f, fwd_bwd_ms=ms_fb, fwd_GBs=gbs, pct_peak=100 * gbs / peak))
    hdr = f"{'op':<20} {'case':<34} {'backend':<8} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd GB/s':>9} {'% peak':>7}"
    print(hdr + "\n" + "-" * len(hdr))
    for r in rows:
        print(f"{r['op']:<20} {r['case']:<34} {r['backend']:<8} {r['fwd_ms']:>9.4f} {r['fwd_bwd_ms']:>11.4f} "
              f"{r['fwd_GBs']:>9.1f} {r['pct_peak']:>6.1f}%")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_gpu.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = list(dict.fromkeys((r["op"], r["case"]) for r in rows))
        backends = list(dict.fromkeys(r["backend"] for r in rows))
        fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(keys)), 4.5))
        width = 0.8 / len(backends)
        for i, b in enumerate(backends):
            vals = [next((r["pct_peak"] for r in rows if (r["op"], r["case"]) == k and r["backend"] == b), math.nan) for k in keys]
            ax.bar([j + i * width for j in range(len(keys))], vals, width, label=b)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels([f"{o}\n{c}" for o, c in keys], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("forward bandwidth, % of peak")
        ax.set_title(f"fused ops on {torch.cuda.get_device_name()}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "bench_gpu.png"), dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")
    print(f"wrote {args.out}/bench_gpu.csv and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
