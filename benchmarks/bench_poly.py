"""Training-step time of the five-modality model (polydigits, M = 5): the fused ops against the
reference backend, with complete data and, where the objectives take `mask=`, 50% missing.

    PYTHONPATH=. python benchmarks/bench_poly.py [--K 10 50] [--batch 64] [--threads 1] [--reps 5]

Step: loss = -m_dreg_looser(model, x, K, backend=b[, mask=mask]); loss.backward(), on real
polydigits batches (model: build_model("polydigits"), L = 20). Process CPU time (robust to other
processes on a shared machine; with --threads 1 it is the step's own work), median over --reps
after one warm-up step; both backends alternate within a rep so machine load hits them alike. The networks'
own work (M encoders, M*M decoder passes over the M*K*B samples) is the same for both, so the
ratio understates the ops' own speed-up. Prints a markdown table; never asserts.
"""
import argparse
import inspect
import statistics
import time

import torch

from mmvae_fast import objectives as O
from mmvae_fast.data import get_datasets, with_missing
from mmvae_fast.models import build_model


def step(model, x, K, backend, mask):
    kw = {} if mask is None else dict(mask=mask)
    model.zero_grad(set_to_none=True)
    t = time.process_time()
    loss = -O.m_dreg_looser(model, x, K, backend=backend, **kw)
    loss.backward()
    return time.process_time() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--K", type=int, nargs="+", default=[10, 50])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    train, _ = get_datasets("polydigits")
    model = build_model("polydigits", learn_prior=True)
    cases = [("complete", None)]
    if "mask" in inspect.signature(O.m_dreg_looser).parameters:
        xs, _, mask = with_missing(train, 0.5).batch(range(a.batch))
        cases.append(("50% missing", (xs, mask)))
    else:
        print("(the objectives take no mask= in this version: complete data only)")
    x, _ = train.batch(range(a.batch))
    rows = []
    for K in a.K:
        for name, case in cases:
            xs, mask = (x, None) if case is None else case
            times = {b: [] for b in ("auto", "reference")}
            for b in times:
                step(model, xs, K, b, mask)  # warm-up
            for _ in range(a.reps):
                for b in times:
                    times[b].append(step(model, xs, K, b, mask))
            fused, ref = statistics.median(times["auto"]), statistics.median(times["reference"])
            rows.append(f"| {K} | {a.batch} | {name} | {1e3 * fused:.0f} | {1e3 * ref:.0f} | {ref / fused:.2f}x |")
    print(f"\nm_dreg_looser training step, polydigits M = 5, L = 20, {a.threads} thread(s), CPU ms, median of {a.reps}")
    print("| K | B | data | fused (auto) CPU ms | reference CPU ms | speed-up |\n|---:|---:|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
