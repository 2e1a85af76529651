"""Evaluation of a trained run: coherence (the seed's Table 5), latent accuracy, log-likelihood.

    mmvae-fast train-classifiers --experiment digits --out runs/classifiers
    mmvae-fast evaluate runs/digits --classifiers runs/classifiers

- cross coherence r -> d: the digit classifier of modality d, applied to modality d generated
  from modality r alone (decoded mean at expert r's posterior mean), predicts the source label;
- subset coherence S -> d (more than two modalities, as MoPoE and MMVAE+ report on PolyMNIST):
  modality d generated from the subset S of modalities (`MMVAE.generate_from`: per item an expert
  of S drawn uniformly, decoded at its posterior mean) classified as the source's label;
  tabulated by |S| as the mean over every S of that size and every modality d *not in* S (the
  missing ones), and, as a second row, over every modality d;
- joint coherence: prior samples decoded in every modality get the same predicted label;
- latent accuracy: logistic regression on each expert's posterior means (train split -> test);
- log-likelihood: the stratified importance-sampled estimate of log p(x_1:M) with the MoE
  posterior as proposal, K samples per expert (M*K in all), unscaled likelihoods, per datum; on a
  fixed random subset of --ll-n (500) test items by default (`--ll-n all` for the whole test set:
  it decodes M*K samples per item in every modality, the one evaluation cost that grows with K).

Results go to RUN_DIR/eval.json; a markdown table is printed. Every loop over data shows a
progress bar (on stderr) unless verbose=False.
"""
import argparse
import itertools
import json
import math
import os
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from .large_k import iwae_log_likelihood as iwae_log_likelihood_chunked
from .train import subset as _subset

DIGIT_EXPERIMENTS = ("digits", "mnist-svhn", "polydigits", "polymnist")  # digit labels: coherence is defined
# Classifier epochs: 4, or more where the train split is small (polydigits: 1,437 handwriting instances)
CLASSIFIER_EPOCHS = {"polydigits": 12}
LL_N = 500  # default test items of the log-likelihood: minutes on a CPU at K = 1000


def _bar(iterable, desc, verbose, total=None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, disable=not verbose)


# ----------------------------------------------------------------------------------------------
# Digit classifiers, one per image modality
# ----------------------------------------------------------------------------------------------


CLASSIFIER_ARCH = 2  # saved with the classifiers; a file of another architecture is retrained


class DigitClassifier(nn.Module):
    """A small CNN on [C, H, W] images in [0, 1]: per-image channel standardisation (random
    background and digit colours otherwise take many steps to ignore), two conv-pool blocks and
    an MLP head."""

    def __init__(self, shape, n_classes=10):
        super().__init__()
        C, H, W = shape
        self.shape = tuple(shape)
        self.net = nn.Sequential(
            nn.InstanceNorm2d(C),
            nn.Conv2d(C, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * (H // 4) * (W // 4), 128), nn.ReLU(),
            nn.Linear(128, n_classes),
        )

    def forward(self, x):
        return self.net(x.reshape(-1, *self.shape))

    @torch.no_grad()
    def predict(self, x, batch=1024):
        self.eval()
        return torch.cat([self(x[i:i + batch]).argmax(-1) for i in range(0, len(x), batch)])


def _check_digits(experiment):
    if experiment not in DIGIT_EXPERIMENTS:
        raise ValueError(f"digit classifiers need an experiment with digit labels {DIGIT_EXPERIMENTS}, got {experiment!r}")


def classifier_path(directory, experiment):
    return os.path.join(directory, f"classifiers-{experiment}.pt")




def train_classifiers(experiment, out, data_dir=None, epochs=None, max_train=8000, batch_size=128, lr=1e-3,
                      seed=0, device="cpu", verbose=True):
    """Train one digit classifier per modality on the experiment's train split; save them to
    out/classifiers-<experiment>.pt and return (classifiers, test accuracies)."""
    from tqdm.auto import tqdm

    from .data import get_datasets

    _check_digits(experiment)
    epochs = CLASSIFIER_EPOCHS.get(experiment, 4) if epochs is None else epochs
    torch.manual_seed(seed)
    train_set, test_set = get_datasets(experiment, data_dir=data_dir)
    (xs, _), = [train_set[0]]
    clfs = [DigitClassifier(tuple(x.shape)).to(device) for x in xs]
    params = [p for c in clfs for p in c.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(_subset(train_set, max_train, seed), batch_size=batch_size, shuffle=True, generator=g)
    for c in clfs:
        c.train()
    bar = tqdm(range(epochs * len(loader)), desc=f"digit classifiers ({experiment})", leave=False, disable=not verbose)
    for _ in range(epochs):
        for xs, y in loader:
            y = y.to(device)
            loss = sum(nn.functional.cross_entropy(c(x.to(device)), y) for c, x in zip(clfs, xs))
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    accs = classifier_accuracy(clfs, DataLoader(test_set, batch_size=512), device)
    os.makedirs(out, exist_ok=True)
    path = classifier_path(out, experiment)
    from .rundir import save_atomic

    save_atomic(dict(experiment=experiment, arch=CLASSIFIER_ARCH, shapes=[c.shape for c in clfs], state_dicts=[c.state_dict() for c in clfs],
                     test_acc=accs, seed=seed, epochs=epochs), path)
    if verbose:
        print(f"classifiers for {experiment}: test accuracy {', '.join(f'm{m + 1} {a:.4f}' for m, a in enumerate(accs))}"
              f" -> {path}")
    return clfs, accs


def load_classifiers(path, device="cpu"):
    ck = torch.load(path, map_location=device, weights_only=False)
    clfs = []
    for shape, sd in zip(ck["shapes"], ck["state_dicts"]):
        c = DigitClassifier(shape).to(device)
        c.load_state_dict(sd)
        clfs.append(c.eval())
    return clfs, ck


def classifiers_current(path, shapes):
    """Whether the saved classifiers have this code's architecture and the data's shapes."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    return ck.get("arch") == CLASSIFIER_ARCH and [tuple(s) for s in ck["shapes"]] == [tuple(s) for s in shapes]


@torch.no_grad()
def classifier_accuracy(clfs, loader, device="cpu"):
    """Accuracy of each modality's classifier on the true data."""
    correct, n = torch.zeros(len(clfs)), 0
    for xs, y in loader:
        for m, (c, x) in enumerate(zip(clfs, xs)):
            correct[m] += (c.predict(x.to(device)).cpu() == y).sum()
        n += len(y)
    return (correct / n).tolist()


# ----------------------------------------------------------------------------------------------
# Coherence
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def cross_coherence(model, loader, clfs, device="cpu", verbose=False):
    """acc[r][d] (r != d): fraction of the data whose modality d generated from modality r alone
    (model.reconstruct(x)[r][d]) is classified as the source's label; the diagonal is the
    same for reconstructions. Returns an M x M list."""
    M = len(clfs)
    correct, n = torch.zeros(M, M), 0
    for xs, y in _bar(loader, "cross coherence", verbose):
        rec = model.reconstruct([x.to(device) for x in xs])
        for r in range(M):
            for d in range(M):
                correct[r, d] += (clfs[d].predict(rec[r][d]).cpu() == y).sum()
        n += len(y)
    return (correct / n).tolist()


@torch.no_grad()
def subset_coherence(model, loader, clfs, device="cpu", seed=0, verbose=False):
    """acc[S][d]: for every non-empty subset S of the modalities (a tuple, increasing), the fraction
    of the data whose modality d generated from S (`model.generate_from`, experts drawn with a
    generator seeded by `seed`) is classified as the source's label. Returns {S: [acc_d for d]}."""
    M = len(clfs)
    subsets = [S for k in range(1, M + 1) for S in itertools.combinations(range(M), k)]
    correct, n = torch.zeros(len(subsets), M), 0
    g = torch.Generator().manual_seed(seed)
    for xs, y, *_ in _bar(loader, "subset coherence", verbose):
        xs = [x.to(device) for x in xs]
        for i, S in enumerate(subsets):
            gens = model.generate_from(xs, S, generator=g)
            for d in range(M):
                correct[i, d] += (clfs[d].predict(gens[d]).cpu() == y).sum()
        n += len(y)
    return {S: (correct[i] / n).tolist() for i, S in enumerate(subsets)}


def coherence_by_size(acc):
    """From `subset_coherence`'s {S: [acc_d]}: {k: (missing, every)}, the mean over subsets of size
    k of the coherence of the modalities not in S (None for k = M) and of every modality."""
    M = len(next(iter(acc.values())))
    out = {}
    for k in range(1, M + 1):
        rows = [(S, a) for S, a in acc.items() if len(S) == k]
        miss = [a[d] for S, a in rows for d in range(M) if d not in S]
        every = [v for _, a in rows for v in a]
        out[k] = (sum(miss) / len(miss) if miss else None, sum(every) / len(every))
    return out


@torch.no_grad()
def joint_coherence(model, clfs, n=10000, batch=1000, verbose=False):
    """Fraction of prior samples whose decodings in all modalities get the same predicted label."""
    agree = 0
    for i in _bar(range(0, n, batch), "joint coherence", verbose):
        gens = model.generate(min(batch, n - i))
        preds = torch.stack([c.predict(g).cpu() for c, g in zip(clfs, gens)])
        agree += (preds == preds[:1]).all(0).sum().item()
    return agree / n


# ----------------------------------------------------------------------------------------------
# Latent accuracy and log-likelihood
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def _latents(model, loader, device, verbose=False):
    zs, ys = [], []
    for xs, y in _bar(loader, "latents", verbose):
        zs.append(model.latents([x.to(device) for x in xs]).float().cpu())
        ys.append(y)
    return torch.cat(zs, 1).numpy(), torch.cat(ys).numpy()


def latent_accuracy(model, train_loader, test_loader, device="cpu", verbose=False):
    """Per modality: test accuracy of a logistic regression fit on the train posterior means."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ztr, ytr = _latents(model, train_loader, device, verbose)
    zte, yte = _latents(model, test_loader, device, verbose)
    accs = []
    for m in range(ztr.shape[0]):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        clf.fit(ztr[m], ytr)
        accs.append(float(clf.score(zte[m], yte)))
    return accs


@torch.no_grad()
def iwae_log_likelihood(model, xs, K=1000, max_samples=4096):
    """Stratified IWAE estimate of log p(x_1:M) per datum, [B]: logmeanexp over all M*K weights
    (unscaled likelihoods). The library's one evaluator, `large_k.iwae_log_likelihood` (its
    `joint`), with chunks of at most max_samples / B samples per expert, so memory is set by
    max_samples, not by K."""
    B = len(next(x for x in xs if x is not None))
    return iwae_log_likelihood_chunked(model, xs, K, k_chunk=max(1, max_samples // B)).joint


# ----------------------------------------------------------------------------------------------
# The evaluate command
# ----------------------------------------------------------------------------------------------


def default_classifier_dir():
    return os.environ.get("MMVAE_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mmvae_fast"))


def evaluate(run_dir, classifiers=None, ll_K=1000, ll_n=LL_N, n_joint=10000, latent_n=10000, limit=None,
             batch_size=256, device=None, data_dir=None, verbose=True):
    """Evaluate the run in run_dir; writes run_dir/eval.json and returns the results dict.

    ll_n: test items of the log-likelihood (a fixed random subset of the evaluated test set; None:
    all of it); ll_K = 0 skips it. limit: evaluate everything on a fixed random subset of the test set."""
    from .data import get_datasets
    from .rundir import RunDirError, check_dir_path
    from .train import load_model, usable_device

    # Everything checked before any work: each of these otherwise fails only after minutes of evaluation.
    for flag, v, low in (("--ll-K", ll_K, 0), ("--ll-n", ll_n, 1), ("--n-joint", n_joint, 1),
                         ("--latent-n", latent_n, 1), ("--limit", limit, 1), ("batch_size", batch_size, 1)):
        if v is not None and v < low:  # None: all of them (ll_n, limit); ll_K = 0 skips the log-likelihood
            raise ValueError(f"{flag} must be >= {low}, got {v}")
    if classifiers is not None:
        try:
            check_dir_path(classifiers, "--classifiers")  # where they are trained if absent
        except RunDirError as e:  # a bad argument, not a bad run directory
            raise ValueError(str(e)) from None
    device = usable_device(device)
    out = os.path.join(run_dir, "eval.json")
    if os.path.lexists(out) and not os.path.isfile(out):
        raise ValueError(f"{out} is not a file (a directory?), so the results cannot be written there; move it "
                         f"out of {run_dir!r}")
    model, a = load_model(run_dir, device)
    torch.manual_seed(a.seed)
    train_set, test_set = get_datasets(a.experiment, data_dir=data_dir or a.data_dir)
    test_set = _subset(test_set, limit)
    test_loader = DataLoader(test_set, batch_size=batch_size)
    res = dict(run_dir=run_dir, experiment=a.experiment, obj=a.obj, looser=a.looser, dreg_grad=a.dreg_grad, K=a.K,
               seed=a.seed, epochs=a.epochs, missing_ratio=getattr(a, "missing_ratio", 0.0))
    t0 = time.time()
    if a.experiment in DIGIT_EXPERIMENTS:
        cdir = classifiers or default_classifier_dir()
        path = classifier_path(cdir, a.experiment)
        stale = os.path.exists(path) and not classifiers_current(path, [x.shape for x in test_set[0][0]])
        if stale and verbose:
            print(f"classifiers at {path} are of another architecture or data shape: retraining them")
        if os.path.exists(path) and not stale:
            clfs, ck = load_classifiers(path, device)
            clf_acc = classifier_accuracy(clfs, test_loader, device)
        else:
            if verbose and not stale:
                print(f"no classifiers at {path}: training them")
            clfs, clf_acc = train_classifiers(a.experiment, cdir, data_dir=data_dir or a.data_dir, device=device,
                                              verbose=verbose)
        cc = cross_coherence(model, test_loader, clfs, device, verbose)
        M = len(clfs)
        res["classifier_acc"] = clf_acc
        res["cross_coherence"] = {f"m{r + 1}->m{d + 1}": cc[r][d] for r in range(M) for d in range(M) if r != d}
        res["self_coherence"] = {f"m{d + 1}->m{d + 1}": cc[d][d] for d in range(M)}
        res["joint_coherence"] = joint_coherence(model, clfs, n_joint, verbose=verbose)
        if M > 2:
            acc = subset_coherence(model, test_loader, clfs, device, seed=a.seed, verbose=verbose)
            res["subset_coherence"] = {",".join(f"m{m}" for m in S): v for S, v in acc.items()}
            res["coherence_by_size"] = {str(k): dict(missing=miss, every=every)
                                        for k, (miss, every) in coherence_by_size(acc).items()}
        res["latent_acc"] = latent_accuracy(model, DataLoader(_subset(train_set, latent_n), batch_size=batch_size),
                                            test_loader, device, verbose)
    if ll_K:
        ll_set = _subset(test_set, ll_n)
        loader = DataLoader(ll_set, batch_size=min(batch_size, 64))
        ll = torch.cat([iwae_log_likelihood(model, [x.to(device) for x in xs], ll_K).cpu()
                        for xs, _ in _bar(loader, f"log-likelihood (K={ll_K}, {len(ll_set)} items)", verbose)])
        res["log_likelihood"] = dict(K=ll_K, n=len(ll_set), mean=ll.mean().item(),
                                     stderr=(ll.std() / math.sqrt(len(ll))).item() if len(ll) > 1 else float("nan"))
    res["time_s"] = round(time.time() - t0, 1)
    from .rundir import write_text_atomic

    write_text_atomic(json.dumps(res, indent=1) + "\n", out)
    if verbose:
        print(markdown_table(res))
        print(f"\nresults: {out}")
        images = os.path.join(run_dir, "images")
        if os.path.isdir(images):
            print(f"PNG grids (per epoch: recon_eNNN reconstructions, cross_eNNN cross-modal generations, "
                  f"prior_eNNN prior samples): {images}")
    return res


def markdown_table(res):
    """The coherence table of the seed's Table 5 (percent), plus latent accuracy and log-likelihood."""
    what = f"{res['obj']}{' --looser' if res['looser'] else ''}" + (f" ({res['dreg_grad']})" if res.get("dreg_grad") else "")
    lines = []
    if "coherence_by_size" in res:  # more than two modalities: the table by number of given modalities
        by = res["coherence_by_size"]
        ks = list(by)
        lines += [f"| {what}, K={res['K']}{_missing(res)} | " + " | ".join(f"{k} given" for k in ks) + " | joint |",
                  "|---|" + "---|" * (len(ks) + 1),
                  "| coherence, missing modalities | " + " | ".join(
                      "-" if by[k]["missing"] is None else f"{100 * by[k]['missing']:.1f}" for k in ks)
                  + f" | {100 * res['joint_coherence']:.1f} |",
                  "| coherence, every modality | " + " | ".join(f"{100 * by[k]['every']:.1f}" for k in ks) + " | |"]
        lines.append("\n(percent; mean over the subsets of each size; latent acc "
                     + ", ".join(f"m{m} {100 * v:.1f}" for m, v in enumerate(res["latent_acc"]))
                     + "; digit classifiers' own test accuracy: "
                     + ", ".join(f"m{m} {100 * v:.1f}" for m, v in enumerate(res["classifier_acc"])) + ")")
    elif "cross_coherence" in res:
        cross = res["cross_coherence"]
        cols = ["joint"] + [f"cross {k}" for k in cross] + [f"latent acc m{m + 1}" for m in range(len(res["latent_acc"]))]
        vals = [res["joint_coherence"]] + list(cross.values()) + res["latent_acc"]
        lines += [f"| objective | K | {' | '.join(cols)} |", "|---|---|" + "---|" * len(cols),
                  f"| {what} | {res['K']} | " + " | ".join(f"{100 * v:.1f}" for v in vals) + " |"]
        lines.append("\n(percent; digit classifiers' own test accuracy: "
                     + ", ".join(f"m{m + 1} {100 * v:.1f}" for m, v in enumerate(res["classifier_acc"])) + ")")
    if "log_likelihood" in res:
        ll = res["log_likelihood"]
        lines.append(f"test log p(x_1:M) ~ {ll['mean']:.2f} +- {ll['stderr']:.2f} nats (IWAE, K={ll['K']} per expert, "
                     f"{ll['n']} test items)")
    return "\n".join(lines)


def _missing(res):
    return f", {100 * res['missing_ratio']:.0f}% missing" if res.get("missing_ratio") else ""


def add_classifier_arguments(p):
    from .models import EXPERIMENTS

    p.add_argument("--experiment", choices=EXPERIMENTS, default="digits")
    p.add_argument("--out", default=None, help="directory for classifiers-<experiment>.pt (default: the cache dir)")
    p.add_argument("--data-dir")
    p.add_argument("--epochs", type=int, default=None, help="default 4 (polydigits 12)")
    p.add_argument("--max-train", type=int, default=8000, help="train on a fixed random subset of this many items")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")


def run_train_classifiers(a):
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    train_classifiers(a.experiment, a.out or default_classifier_dir(), data_dir=a.data_dir, epochs=a.epochs,
                      max_train=a.max_train, seed=a.seed, device=device)


def add_evaluate_arguments(p):
    p.add_argument("run_dir", help="a run directory written by mmvae-fast train")
    p.add_argument("--classifiers", help="directory of classifiers-<experiment>.pt (trained there if absent; "
                                         "default $MMVAE_FAST_CACHE or ~/.cache/mmvae_fast)")
    p.add_argument("--ll-K", type=int, default=1000, help="samples per expert of the log-likelihood estimate (0: skip)")
    p.add_argument("--ll-n", type=_count_or_all, default=LL_N,
                   help=f"test items for the log-likelihood, a fixed random subset (default {LL_N}; 'all': the whole test set)")
    p.add_argument("--n-joint", type=int, default=10000, help="prior samples for joint coherence")
    p.add_argument("--latent-n", type=int, default=10000, help="train items for the latent classifier")
    p.add_argument("--limit", type=int, default=None, help="evaluate on a fixed random subset of N test items (default all)")
    p.add_argument("--data-dir")
    p.add_argument("--device")


def _count_or_all(v):
    """--ll-n: a positive count, or 'all' (None: no subset)."""
    if v == "all":
        return None
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive count or 'all', got {v!r}")
    return n


def run_evaluate(a):
    return evaluate(a.run_dir, classifiers=a.classifiers, ll_K=a.ll_K, ll_n=a.ll_n, n_joint=a.n_joint,
                    latent_n=a.latent_n, limit=a.limit, device=a.device, data_dir=a.data_dir)
