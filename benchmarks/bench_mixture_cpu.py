"""Forward+backward time and peak memory of the fused CPU mixture ops against the PyTorch
reference, eager and torch.compile'd.

    PYTHONPATH=. python benchmarks/bench_mixture_cpu.py [--quick] [--csv out.csv]

Ops: mixture_log_density (lq only; gradients to z, loc, scale) and importance_ratios (gradients
to loc, scale), float32, Normal experts, B = 128, M in {2, 5}, K in {30, 1000}, L in {20, 64}.
Time: median over repeats of one forward + backward, wall clock and CPU time of the process
(speed-ups use CPU time, which other processes on a shared machine do not inflate; run with
--threads 1 for that to be the whole story). Peak memory: the rise of the process's
peak resident set (VmHWM, reset through /proc/self/clear_refs) over its resident set before the
call; glibc's mmap threshold is pinned so freed tensors go back to the OS at once. Linux only.
Prints a markdown table; never asserts timings.
"""
import argparse
import gc
import os
import statistics
import sys
import time

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # re-exec: malloc reads it at start-up
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402

from mmvae_fast import ops, reference as ref  # noqa: E402


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(fn, args, repeats):
    """(median wall seconds, median CPU seconds of this process, peak bytes above the starting
    resident set) of fn(*args) and its backward."""
    def once():
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        for t in leaves:
            t.grad = None
        out = fn(*args)
        out.backward(torch.ones_like(out))
    once()  # warm-up (and compilation)
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        once()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    for t in args:
        if isinstance(t, torch.Tensor):
            t.grad = None
    gc.collect()
    base = _status("VmRSS:")
    _reset_peak()
    once()
    peak = _status("VmHWM:") - base
    return statistics.median(times), statistics.median(cpu), max(peak, 0)


def inputs(M, K, B, L, gen):
    z = torch.randn(M, K, B, L, generator=gen)
    loc = torch.randn(M, B, L, generator=gen, requires_grad=True)
    scale = (0.5 + torch.rand(M, B, L, generator=gen)).requires_grad_()
    z = (loc.detach()[:, None] + scale.detach()[:, None] * z).requires_grad_()
    return z, loc, scale


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one small size only")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--ops", default="mixture_log_density,importance_ratios", help="comma-separated")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not ops.available_backends("cpu", "mixture_log_density").count("cpu"):
        sys.exit("the C++ extension is not built: python setup.py build_ext --inplace")
    gen = torch.Generator().manual_seed(0)
    sizes = [(2, 30, 128, 20)] if args.quick else [
        (M, K, 128, L) for M in (2, 5) for K in (30, 1000) for L in (20, 64)
    ]
    mix = {
        "cpu": lambda z, l, s: ops.mixture_log_density(z, l, s, family="normal", backend="cpu"),
        "eager": lambda z, l, s: ref.mixture_log_density(z, l, s, "normal"),
    }
    rat = {
        "cpu": lambda z, l, s: ops.importance_ratios(z, l, s, family="normal", backend="cpu"),
        "eager": lambda z, l, s: ref.importance_ratios(z, l, s, "normal"),
    }
    if not args.no_compile:
        mix["compile"] = torch.compile(mix["eager"], dynamic=False)
        rat["compile"] = torch.compile(rat["eager"], dynamic=False)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, Normal, forward+backward\n")
    print("| op | M | K | B | L | impl | wall ms | CPU ms | peak MiB | speed-up vs eager | vs compile | memory vs eager |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, impls in (("mixture_log_density", mix), ("importance_ratios", rat)):
        if name not in args.ops.split(","):
            continue
        for M, K, B, L in sizes:
            x = inputs(M, K, B, L, gen)
            big = M * M * K * B * L > 5e7
            res = {}
            for impl, fn in impls.items():
                torch._dynamo.reset() if impl == "compile" else None
                res[impl] = measure(fn, x, 3 if big else 10)
            # speed-ups from CPU time: on a shared machine wall time also counts other processes
            _, e_c, e_m = res["eager"]
            c_c = res["compile"][1] if "compile" in res else float("nan")
            for impl, (t, c, mem) in res.items():
                line = (name, M, K, B, L, impl, 1e3 * t, 1e3 * c, mem / 2**20, e_c / c, c_c / c,
                        mem / e_m if e_m else float("nan"))
                rows.append(line)
                print("| {} | {} | {} | {} | {} | {} | {:.2f} | {:.2f} | {:.1f} | {:.1f}x | {:.1f}x | {:.3f} |".format(*line))
            sys.stdout.flush()
    if args.csv:
        with open(args.csv, "w") as f:
            f.write("op,M,K,B,L,impl,wall_ms,cpu_ms,peak_mib,speedup_eager,speedup_compile,memory_ratio_eager\n")
            for r in rows:
                f.write(",".join(str(v) for v in r) + "\n")


if __name__ == "__main__":
    main()
