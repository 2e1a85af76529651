"""The estimator study (issue 8, item 4): does the gradient estimator change what MMVAE learns?

Trains every estimator -- iwae and dreg with grad in {eq8, mixture, mixture-centred, released} --
on both bounds (looser eq. 3, stratified eq. 5) with the same budget and 3 seeds through the
training CLI (`python -m mmvae_fast.cli train`), evaluates each run (`... evaluate`: cross
coherence both ways, joint coherence, latent accuracy, IWAE log-likelihood with --ll-K samples
per expert) and tabulates mean ± spread (sample std over seeds). Runs already evaluated are
reused, so an interrupted study resumes.

    python benchmarks/estimator_study.py                        # offline default (digits), full budget
    python benchmarks/estimator_study.py --epochs 2 --limit 2000 --ll-K 100   # a quick look

Writes OUT/study.md (and OUT/study.json with every run's results); OUT defaults to
benchmarks/out/estimator_study.
"""
import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ESTIMATORS = [("iwae", None), ("dreg", "eq8"), ("dreg", "mixture"), ("dreg", "mixture-centred"), ("dreg", "released")]


def run_name(obj, grad, looser, seed):
    return f"{obj}{'-' + grad if grad else ''}-{'looser' if looser else 'stratified'}-s{seed}"


def cli(*args, log=None, env=None):
    cmd = [sys.executable, "-m", "mmvae_fast.cli", *map(str, args)]
    print("$", " ".join(cmd[1:]), flush=True)
    if log is None:
        subprocess.run(cmd, cwd=ROOT, check=True, env=env)
        return
    with open(log, "a") as fh:  # parallel runs: one log per run, not interleaved on stdout
        r = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed ({r.returncode}); see {log}")


def train_and_evaluate(a, obj, grad, looser, seed, classifiers):
    run_dir = os.path.join(a.out, "runs", run_name(obj, grad, looser, seed))
    log = env = None
    if a.jobs > 1:
        os.makedirs(run_dir, exist_ok=True)
        log = os.path.join(run_dir, "log.txt")
        # share the cores between the concurrent runs instead of oversubscribing them
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // a.jobs)))
    result = os.path.join(run_dir, "eval.json")
    if os.path.exists(result):
        with open(result) as fh:
            res = json.load(fh)
        if res.get("epochs") == a.epochs:
            return res
    if a.no_train:
        return None
    args = ["train", "--experiment", a.experiment, "--obj", obj, "--looser" if looser else "--no-looser",
            "--K", a.K, "--epochs", a.epochs, "--seed", seed, "--out", run_dir, "--overwrite"]
    if grad:
        args += ["--dreg-grad", grad]
    for flag, v in (("--limit", a.limit), ("--test-n", a.test_n), ("--batch-size", a.batch_size), ("--device", a.device),
                    ("--data-dir", a.data_dir)):
        if v is not None:
            args += [flag, v]
    cli(*args, log=log, env=env)
    ev = ["evaluate", run_dir, "--classifiers", classifiers, "--ll-K", a.ll_K]
    for flag, v in (("--ll-n", a.ll_n), ("--limit", a.test_limit), ("--latent-n", a.latent_n), ("--n-joint", a.n_joint),
                    ("--device", a.device), ("--data-dir", a.data_dir)):
        if v is not None:
            ev += [flag, v]
    cli(*ev, log=log, env=env)
    with open(result) as fh:
        return json.load(fh)


def metrics(res):
    """name -> value (percent for coherences and accuracies)."""
    out = {}
    for k, v in sorted(res.get("cross_coherence", {}).items()):
        out[f"cross {k}"] = 100 * v
    if "joint_coherence" in res:
        out["joint"] = 100 * res["joint_coherence"]
    la = res.get("latent_acc")
    if isinstance(la, dict):
        for k, v in sorted(la.items()):
            out[f"latent {k}"] = 100 * v
    elif isinstance(la, (list, tuple)):
        for m, v in enumerate(la):
            out[f"latent m{m + 1}"] = 100 * v
    elif la is not None:
        out["latent"] = 100 * la
    if "log_likelihood" in res:
        out["log p(x)"] = res["log_likelihood"]["mean"]
    return out


def table(rows):
    """rows: [(label, [metrics dict per seed])] -> markdown, mean ± std over seeds."""
    names = []
    for _, ms in rows:
        for m in ms:
            names += [n for n in m if n not in names]
    lines = ["| estimator | bound | runs | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for (obj, grad, looser), ms in rows:
        cells = []
        for n in names:
            v = [m[n] for m in ms if n in m]
            if not v:
                cells.append("")
            elif len(v) == 1:
                cells.append(f"{v[0]:.2f}")
            else:
                cells.append(f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}")
        est = grad if grad else obj
        lines.append(f"| {est} | {'looser' if looser else 'stratified'} | {len(ms)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experiment", default="digits")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--epochs", type=int, default=10, help="the same budget for every run")
    ap.add_argument("--K", type=int, default=30)
    ap.add_argument("--limit", type=int, default=None, help="train on a fixed subset of N items")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--test-n", type=int, default=None, help="test items of the per-epoch test objective")
    ap.add_argument("--ll-K", type=int, default=1000, help="samples per expert of the test log-likelihood")
    ap.add_argument("--ll-n", type=int, default=None, help="test items for the log-likelihood")
    ap.add_argument("--test-limit", type=int, default=None, help="evaluate on a fixed subset of N test items")
    ap.add_argument("--latent-n", type=int, default=None, help="train items for the latent classifier")
    ap.add_argument("--n-joint", type=int, default=None, help="prior samples for joint coherence")
    ap.add_argument("--classifiers", default=None, help="directory of trained digit classifiers (default: OUT/classifiers, trained once)")
    ap.add_argument("--clf-epochs", type=int, default=None, help="epochs of the digit classifiers (default: the CLI's)")
    ap.add_argument("--clf-max-train", type=int, default=None, help="train items of the digit classifiers (default: the CLI's)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--no-train", action="store_true", help="only tabulate the runs already evaluated")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each a process; e.g. several on one GPU)")
    ap.add_argument("--only", nargs="+", default=None, help="estimators to run (iwae eq8 mixture ...)")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "estimator_study"))
    ap.add_argument("--title", default="Estimator study", help="heading of the printed table")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    classifiers = a.classifiers or os.path.join(a.out, "classifiers")
    if not os.path.isdir(classifiers):
        cli("train-classifiers", "--experiment", a.experiment, "--out", classifiers,
            *(["--epochs", a.clf_epochs] if a.clf_epochs else []), *(["--max-train", a.clf_max_train] if a.clf_max_train else []),
            *(["--data-dir", a.data_dir] if a.data_dir else []), *(["--device", a.device] if a.device else []))
    cells = [(obj, grad, looser) for looser in (True, False) for obj, grad in ESTIMATORS
             if not a.only or (grad or obj) in a.only]
    with concurrent.futures.ThreadPoolExecutor(max(1, a.jobs)) as pool:
        # seed-major: each wave of runs covers every configuration once
        futures = {(c, s): pool.submit(train_and_evaluate, a, *c, s, classifiers) for s in a.seeds for c in cells}
        rows, everything = [], []
        for c in cells:
            ress = [r for r in (futures[c, s].result() for s in a.seeds) if r is not None]
            everything += ress
            rows.append((c, [metrics(r) for r in ress]))
    cmd = " ".join([f"python benchmarks/{os.path.basename(sys.argv[0])}", *sys.argv[1:]])
    text = "\n".join([
        f"# {a.title}: {a.experiment}, {a.epochs} epochs, K = {a.K}, seeds {a.seeds}",
        "",
        "Coherences and latent accuracy in percent, log p(x) per datum (IWAE estimate, "
        f"K = {a.ll_K} per expert); mean ± std over seeds.",
        "",
        table(rows),
        "",
        f"`{cmd}`",
        "",
    ])
    print(text)
    with open(os.path.join(a.out, "study.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(a.out, "study.json"), "w") as fh:
        json.dump(everything, fh, indent=1)


if __name__ == "__main__":
    main()
