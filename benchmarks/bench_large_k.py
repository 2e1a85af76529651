"""Peak memory and time of one MMVAE training step at large K: the unchunked objective (reference)
against the chunked exact path (``k_chunk=``, mmvae_fast.large_k).

    PYTHONPATH=. python benchmarks/bench_large_k.py [--batch 2] [--k-chunk 100] [--cap-gib 4]

Model: build_model("mnist-svhn") (Table 6 encoders/decoders, L = 20), float32, random inputs.
Step: loss = -objective(model, x, K[, k_chunk]); loss.backward(); Adam step (default objective
m_dreg_looser, grad "eq8"). Every point runs in a fresh subprocess: one warm-up step at K = 2,
then the measured step. Peak memory, CPU: the rise of the process's peak resident set (VmHWM,
reset through /proc/self/clear_refs) over its resident set just before the step, with glibc's
mmap threshold pinned so freed tensors go back to the OS at once (Linux); CUDA:
torch.cuda.max_memory_allocated over memory_allocated before the step.

--cap-gib C: the largest K whose step fits under C GiB, for both paths: K doubles from 30 until
a step does not fit (a CPU point is killed as soon as its resident set passes the cap), then
bisects between the last K that fit and the first that did not. The chunked path is measured at
the reference's largest K and at --cap-ratio (default 20) times it (its memory is flat in K, as
the sweep shows; past that only time limits it, so the search stops there).

Prints markdown tables, writes a PNG plot to benchmarks/out/; never asserts timings.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


# ----------------------------------------------------------------------------------------------
# One point, in its own process
# ----------------------------------------------------------------------------------------------


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def point(args):
    import torch

    sys.path.insert(0, ROOT)
    from mmvae_fast import objectives
    from mmvae_fast.models import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model("mnist-svhn").to(dev)
    x = [torch.rand(args.batch, 1, 28, 28, device=dev), torch.rand(args.batch, 3, 32, 32, device=dev)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    fn = getattr(objectives, args.objective)
    kw = {"grad": args.grad} if "dreg" in args.objective else {}

    def step(K, k_chunk):
        opt.zero_grad(set_to_none=True)
        loss = -fn(model, x, K, k_chunk=k_chunk, **kw)
        loss.backward()
        opt.step()
        return loss.item()

    k_chunk = args.k_chunk if args.path == "chunked" else None
    step(2, 1 if k_chunk else None)  # warm-up: allocator, kernels, optimiser state
    cuda = dev.type == "cuda"
    import gc

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
    print(json.dumps({"base": base}), flush=True)  # the parent polls the resident set from here
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        value = step(args.K, k_chunk)
    except torch.cuda.OutOfMemoryError:
        print(json.dumps({"oom": True}), flush=True)
        return
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = (torch.cuda.max_memory_allocated() if cuda else _status("VmHWM:")) - base
    print(json.dumps({"peak": peak, "seconds": seconds, "cpu": cpu_seconds, "value": value}), flush=True)


def _rss(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(args, path, K, cap=None):
    """{'peak', 'seconds'} of one step in a fresh process, or {'over': True} past the cap."""
    cmd = [sys.executable, os.path.abspath(__file__), "--point", "--path", path, "--K", str(K)]
    for a in ("batch", "k_chunk", "objective", "grad", "device", "threads"):
        cmd += [f"--{a.replace('_', '-')}", str(getattr(args, a))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=ROOT)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    first = json.loads(proc.stdout.readline() or "{}")
    if "base" not in first:
        proc.wait()
        raise RuntimeError(f"benchmark point {path} K={K} failed (exit {proc.returncode})")
    base = first["base"]
    if cap is not None and args.device == "cpu":
        while proc.poll() is None:
            if _rss(proc.pid) - base > cap:
                proc.kill()
                proc.wait()
                return {"over": True}
            time.sleep(0.02)
    out = json.loads(proc.stdout.readline() or "{}")
    proc.wait()
    if out.get("oom") or (cap is not None and out.get("peak", 0) > cap):
        return {"over": True, **out}
    if "peak" not in out:
        raise RuntimeError(f"benchmark point {path} K={K} failed (exit {proc.returncode})")
    return out


# ----------------------------------------------------------------------------------------------
# Table, cap search, plot
# ----------------------------------------------------------------------------------------------


def _mib(b):
    return f"{b / 2**20:.0f}"


def sweep(args):
    rows = []
    for K in args.K_list:
        r = measure(args, "reference", K)
        c = measure(args, "chunked", K)
        rows.append((K, r, c))
        print(f"  K={K}: reference {_mib(r['peak'])} MiB {r['seconds']:.2f} s ({r['cpu']:.2f} s CPU) | "
              f"chunked {_mib(c['peak'])} MiB {c['seconds']:.2f} s ({c['cpu']:.2f} s CPU)", file=sys.stderr, flush=True)
    print(f"\nOne training step, MNIST-SVHN MMVAE (Table 6), {args.objective}"
          f"{'/' + args.grad if 'dreg' in args.objective else ''}, batch {args.batch}, "
          f"k_chunk {args.k_chunk}, {args.device}, {args.threads or 'default'} thread(s); peak memory above "
          "the step's starting point; step time: wall clock (process CPU time)\n")
    print("| K | reference peak (MiB) | chunked peak (MiB) | reference step (s) | chunked step (s) |")
    print("|---:|---:|---:|---:|---:|")
    for K, r, c in rows:
        print(f"| {K} | {_mib(r['peak'])} | {_mib(c['peak'])} | {r['seconds']:.2f} ({r['cpu']:.2f}) "
              f"| {c['seconds']:.2f} ({c['cpu']:.2f}) |")
    return rows


def largest_fitting(args, path, cap, start):
    """Doubling from `start`, then bisection; returns (largest K that fit or None, first K that
    did not, the points measured)."""
    fit, over, points, K = None, None, [], start
    while True:
        r = measure(args, path, K, cap)
        points.append((K, r))
        print(f"  {path} K={K}: {'over the cap' if r.get('over') else _mib(r['peak']) + ' MiB'}",
              file=sys.stderr, flush=True)
        if r.get("over"):
            over = K
            break
        fit, K = K, 2 * K
    lo = fit if fit is not None else 0
    for _ in range(args.bisect):
        if over - lo <= max(1, lo // 50):
            break
        mid = (lo + over) // 2
        r = measure(args, path, mid, cap)
        points.append((mid, r))
        print(f"  {path} K={mid}: {'over the cap' if r.get('over') else _mib(r['peak']) + ' MiB'}",
              file=sys.stderr, flush=True)
        if r.get("over"):
            over = mid
        else:
            lo = fit = mid
    return fit, over, points


def cap_search(args):
    cap = args.cap_gib * GIB
    ref_fit, ref_over, ref_pts = largest_fitting(args, "reference", cap, 30)
    if ref_fit is None:
        print(f"\nThe reference does not fit under {args.cap_gib} GiB even at K=30 (batch {args.batch}).")
        return ref_pts, []
    target = int(args.cap_ratio * ref_fit)
    ch_fit, ch_over, ch_pts = None, None, []
    for K in sorted({ref_fit, target}):
        r = measure(args, "chunked", K, cap)
        ch_pts.append((K, r))
        print(f"  chunked K={K}: {'over the cap' if r.get('over') else _mib(r['peak']) + ' MiB'}",
              file=sys.stderr, flush=True)
        if r.get("over"):
            ch_over = K
            break
        ch_fit = K
    print(f"\nLargest K whose training step fits under {args.cap_gib} GiB (batch {args.batch}, "
          f"k_chunk {args.k_chunk}, {args.device})\n")
    print("| path | largest K that fit | smallest K over the cap | peak at the largest K (MiB) |")
    print("|---|---:|---:|---:|")
    peak_at = lambda pts, K: next((_mib(r["peak"]) for k, r in pts if k == K and "peak" in r), "-")  # noqa: E731
    print(f"| reference | {ref_fit} | {ref_over} | {peak_at(ref_pts, ref_fit)} |")
    ch_over_s = ch_over if ch_over is not None else f"not reached (stopped at {args.cap_ratio:g}x)"
    print(f"| chunked | {ch_fit} | {ch_over_s} | {peak_at(ch_pts, ch_fit)} |")
    if ch_fit is not None:
        more = "" if ch_over is not None else " (at least: the search stopped there)"
        print(f"\nchunked / reference largest K: {ch_fit / ref_fit:.1f}x{more}")
    return ref_pts, ch_pts


def plot(args, rows, caps):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, idx in (("reference", 1), ("chunked", 2)):
        pts = [(K, p[idx - 1]) for K, *p in rows]
        ks = [K for K, _ in pts]
        ax1.plot(ks, [r["peak"] / 2**20 for _, r in pts], "o-", label=label)
        ax2.plot(ks, [r["seconds"] for _, r in pts], "o-", label=label)
    if caps:
        for label, pts in zip(("reference (cap search)", "chunked (cap search)"), caps):
            good = [(K, r["peak"] / 2**20) for K, r in pts if "peak" in r and not r.get("over")]
            if good:
                ax1.plot(*zip(*sorted(good)), "x", label=label)
        ax1.axhline(args.cap_gib * 1024, color="grey", ls="--", lw=1, label=f"cap {args.cap_gib:g} GiB")
    for ax, title in ((ax1, "peak memory of one step (MiB)"), (ax2, "step time (s)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("K (samples per expert)")
        ax.set_title(title)
        ax.legend(fontsize="small", loc="upper left")
    fig.suptitle(f"One training step, MNIST-SVHN MMVAE, {args.objective}, batch {args.batch}, "
                 f"k_chunk {args.k_chunk}, {args.device}")
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "large_k.png")
    fig.savefig(path, dpi=120)
    print(f"\nplot: {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--k-chunk", type=int, default=100)
    p.add_argument("--Ks", dest="K_list", type=int, nargs="+", default=[30, 100, 300, 1000, 3000])
    p.add_argument("--objective", default="m_dreg_looser",
                   choices=["iwae", "dreg", "m_iwae", "m_iwae_looser", "m_dreg", "m_dreg_looser"])
    p.add_argument("--grad", default="eq8", choices=["eq8", "mixture", "released"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default; use 1 on a shared machine, where waiting "
                        "OpenMP threads stall every op)")
    p.add_argument("--cap-gib", type=float, default=None, help="find the largest K under this many GiB")
    p.add_argument("--cap-ratio", type=float, default=20.0, help="stop the chunked search at this x the reference")
    p.add_argument("--bisect", type=int, default=3, help="bisection steps after the doubling")
    p.add_argument("--no-sweep", action="store_true", help="only the cap search")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out"))
    # one point (internal)
    p.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", choices=["reference", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--K", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.point:
        return point(args)
    if args.device == "cpu" and not sys.platform.startswith("linux"):
        raise SystemExit("CPU memory is measured through /proc: Linux only")
    rows = [] if args.no_sweep else sweep(args)
    caps = cap_search(args) if args.cap_gib else None
    if rows:
        plot(args, rows, caps)


if __name__ == "__main__":
    main()
