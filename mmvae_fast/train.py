"""Training: `mmvae-fast train` (single process, or DistributedDataParallel under torchrun).

    mmvae-fast train --experiment digits --obj dreg --looser --K 30 --epochs 20 --out runs/digits
    mmvae-fast train --resume runs/digits --epochs 30          # continue, bit-identically
    torchrun --nproc_per_node 2 -m mmvae_fast.cli train ...    # DDP: gloo on CPU, nccl on CUDA
    mmvae-fast train --experiment polydigits --missing-ratio 0.5   # five modalities, half of them missing
    mmvae-fast train --K 1000 --k-chunk 100 ...                # large K in the memory of K = 100

A run directory holds `checkpoint.pt` (model, optimiser, epoch, every rank's RNG states, args;
checksummed, written atomically at the end of each epoch, the previous one kept as
`checkpoint.prev.pt`), `args.json`, `metrics.jsonl` (one line per epoch: train/test objective per
datum and what produced it, written before the checkpoint) and `images/` (PNG grids per epoch).
One training at a time owns it (`.lock`); a new run on a directory that holds one (a checkpoint) is
refused unless --overwrite (or --resume to continue it, in that directory: --resume takes no other
--out); one whose training died before its first checkpoint is started over. See rundir.py for
what survives a kill.

The data (pairing, offline default, splits) always use the data module's fixed seed, so every run
and the evaluation classifiers see the same train/test split; --seed sets parameters, data order
and samples.

Exact resume: the data order of epoch e is a permutation seeded by (seed, e) (DistributedSampler
with `set_epoch`, also with one process), the sampling noise comes from the global torch RNG
whose state is checkpointed after everything an epoch draws (training, test objective, images),
so a resumed run makes the same draws in the same order as an uninterrupted one.
"""
import argparse
import inspect
import json
import math
import os
import random
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from . import objectives as O
from . import rundir

OBJECTIVES = ("elbo", "iwae", "dreg")

# The paper's settings (the released code's flags for its pretrained models). The offline default
# `digits` (16x16, MLPs) keeps the paper's objective, latent size, prior and optimiser, with a
# CPU-sized budget: K 10 and batch 64 make a step 6x cheaper than K 30 at batch 128, and 10 epochs
# (2,250 steps, about 3.5 minutes on 2 cores) meet the main job's targets (docs/train-eval.md).
# llik_scaling None: the model's default.
_PAPER = dict(obj="dreg", looser=True, K=30, epochs=30, batch_size=128, latent_dim=20, learn_prior=True, lr=1e-3)
EXPERIMENT_DEFAULTS = {
    "digits": dict(_PAPER, K=10, epochs=10, batch_size=64),
    "mnist-svhn": dict(_PAPER),
    "cub-features": dict(_PAPER, K=50, epochs=50, batch_size=64, latent_dim=64),
    "cub-images-sentences": dict(_PAPER, K=50, epochs=50, batch_size=64, latent_dim=64),
    # five modalities: M*K samples per item, so a smaller K keeps the offline default CPU-sized
    "polydigits": dict(_PAPER, K=10, epochs=10, batch_size=64, lr=2e-3),
    "polymnist": dict(_PAPER),
}
GLOBAL_DEFAULTS = dict(dreg_grad=None, llik_scaling=None, seed=1, device=None, data_dir=None, workers=0, limit=None,
                       test_n=None, missing_ratio=0.0, k_chunk=None)
# What a resumed run may change; everything else comes from its checkpoint.
RESUMABLE = ("epochs", "device", "data_dir", "workers", "test_n")
ARG_NAMES = set(GLOBAL_DEFAULTS) | set(_PAPER) | {"experiment", "out", "resume"}


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option defaults to None here; `resolve_args` fills in the experiment's defaults."""
    from .models import EXPERIMENTS

    p.add_argument("--experiment", choices=EXPERIMENTS, help="dataset and architecture (default: digits, offline)")
    p.add_argument("--obj", choices=OBJECTIVES, help="objective (default: dreg)")
    p.add_argument("--looser", action=argparse.BooleanOptionalAction, default=None,
                   help="iwae/dreg: the looser bound (eq. 3, the paper's default) or --no-looser, the stratified one (eq. 5)")
    p.add_argument("--dreg-grad", choices=O.GRADS, help=f"dreg: gradient estimator of the MoE bounds (default: {O.DEFAULT_GRAD})")
    p.add_argument("--K", type=int, help="samples per expert (default 30)")
    p.add_argument("--epochs", type=int, help="last epoch to train (default 30)")
    p.add_argument("--batch-size", type=int, help="global batch size, split over DDP ranks (default 128)")
    p.add_argument("--latent-dim", type=int, help="latent dimension L (default 20)")
    p.add_argument("--learn-prior", action=argparse.BooleanOptionalAction, default=None,
                   help="learn the prior's scale (default on, as in the paper)")
    p.add_argument("--llik-scaling", type=float, help="likelihood scaling of the first modality (default: the model's)")
    p.add_argument("--lr", type=float, help="Adam (amsgrad) learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, help="seed of parameters, data order and samples (default 1)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--data-dir", help="directory of the dataset files (not needed for digits)")
    p.add_argument("--workers", type=int, help="data-loader worker processes (default 0)")
    p.add_argument("--limit", type=int, help="train on a fixed random subset of N items (short runs; default all)")
    p.add_argument("--test-n", type=int, help="test items for the per-epoch test objective (default: as many as --limit, or all)")
    p.add_argument("--missing-ratio", type=float, metavar="P",
                   help="train on incomplete data: each modality of each train item absent with probability P "
                        "(at least one present; fixed by the data seed); the objective gets mask= (default 0)")
    p.add_argument("--k-chunk", type=int, metavar="N",
                   help="iwae/dreg: compute the K samples in chunks of N (same value and gradient, memory of K=N)")
    p.add_argument("--out", help="run directory to write (default runs/<experiment>-<obj>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="start a new run in --out even if it holds one (its checkpoints, metrics and images are deleted)")


def resolve_args(ns: argparse.Namespace, stored: dict = None) -> argparse.Namespace:
    """Explicit options, else the resumed run's, else the experiment's defaults, else global ones."""
    given = {k: v for k, v in vars(ns).items() if v is not None and k in ARG_NAMES}
    if stored is not None:
        for k, v in given.items():
            if k in stored and k not in RESUMABLE + ("out", "resume") and stored[k] != v:
                raise ValueError(f"--{k.replace('_', '-')} {v!r} differs from the resumed run's {stored[k]!r}; "
                                 f"a resumed run may only change {', '.join('--' + r.replace('_', '-') for r in RESUMABLE)}")
        if given.get("epochs") is not None and given["epochs"] < 1:
            raise ValueError(f"--epochs must be >= 1, got {given['epochs']}")
        merged = dict(GLOBAL_DEFAULTS, **stored)  # runs from before an option existed get its default
        merged.update({k: v for k, v in given.items() if k in RESUMABLE})
        merged["resume"] = ns.resume
        merged["out"] = ns.out or ns.resume
        return argparse.Namespace(**merged)
    exp = given.get("experiment", "digits")
    from .models import EXPERIMENTS

    if exp not in EXPERIMENTS:
        raise ValueError(f"argument 'experiment' must be one of {EXPERIMENTS}, got {exp!r}")
    a = dict(GLOBAL_DEFAULTS, **EXPERIMENT_DEFAULTS[exp], experiment=exp, out=None, resume=None)
    a.update(given)
    if a["obj"] == "elbo" and given.get("looser"):
        raise ValueError("--looser applies to --obj iwae and dreg (elbo has no importance-weighted bound)")
    if a["obj"] == "elbo":
        a["looser"] = False
    if a["dreg_grad"] is not None and a["obj"] != "dreg":
        raise ValueError(f"--dreg-grad applies to --obj dreg, not {a['obj']}")
    if a["obj"] == "dreg" and a["dreg_grad"] is None:
        a["dreg_grad"] = O.DEFAULT_GRAD
    if a["k_chunk"] is not None and a["obj"] == "elbo":
        raise ValueError("--k-chunk applies to --obj iwae and dreg (the elbo has no K-sample bound to chunk)")
    if not 0.0 <= a["missing_ratio"] < 1.0:
        raise ValueError(f"--missing-ratio must be in [0, 1), got {a['missing_ratio']}")
    for k in ("K", "epochs", "batch_size", "latent_dim", "limit", "test_n", "k_chunk"):
        if a[k] is not None and a[k] < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {a[k]}")
    if a["out"] is None:
        a["out"] = os.path.join("runs", f"{exp}-{a['obj']}{'-looser' if a['looser'] else ''}")
    return argparse.Namespace(**a)


def takes_mask(fn) -> bool:
    """Whether an objective takes `mask=` (an expert mask [M, B] for partially observed data)."""
    return "mask" in inspect.signature(fn).parameters


def _objective_fn(obj: str, looser: bool):
    if obj == "elbo":
        return O.m_elbo
    if obj == "iwae":
        return O.m_iwae_looser if looser else O.m_iwae
    if obj == "dreg":
        return O.m_dreg_looser if looser else O.m_dreg
    raise ValueError(f"argument 'obj' must be one of {OBJECTIVES}, got {obj!r}")


def make_objective(obj: str, looser: bool, dreg_grad: str = None, k_chunk: int = None):
    """(train_fn, value_fn): train_fn(model, x, K, mask=None) gives the bound with the chosen
    gradient (K in chunks of k_chunk: same value and gradient), value_fn(model, x, K) the same
    bound's value (for the test set, under no_grad). mask is passed on only when given."""
    fn = _objective_fn(obj, looser)
    value = O.m_elbo if obj == "elbo" else (O.m_iwae_looser if looser else O.m_iwae)
    kw = dict(grad=dreg_grad) if obj == "dreg" else {}
    if k_chunk is not None:
        if obj == "elbo":
            raise ValueError("k_chunk applies to the iwae and dreg objectives")
        kw["k_chunk"] = k_chunk

    def train_fn(model, x, K, mask=None):
        return fn(model, x, K, **kw) if mask is None else fn(model, x, K, mask=mask, **kw)

    train_fn.takes_mask = takes_mask(fn)
    return train_fn, value


class ObjectiveModule(nn.Module):
    """The model and its objective as one module whose forward is the bound.

    Objectives read the model's attributes (vaes, pz_params, ...), so they run on the model
    itself; wrapping this module in DDP still syncs the gradients of every model parameter."""

    def __init__(self, model, objective, K):
        super().__init__()
        self.model, self.objective, self.K = model, objective, K

    def forward(self, xs, mask=None):
        return self.objective(self.model, xs, self.K, mask=mask)


# ----------------------------------------------------------------------------------------------
# RNG state and checkpoints
# ----------------------------------------------------------------------------------------------


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# What a checkpoint holds: `load_checkpoint` refuses a file without them (KeyError deep inside otherwise).
CHECKPOINT_KEYS = ("args", "model", "optimizer", "epoch", "rng")


def load_checkpoint(run_dir: str, map_location="cpu", need=CHECKPOINT_KEYS) -> dict:
    """The run's newest checkpoint that verifies and holds the keys in need (see rundir.load_latest)."""
    return rundir.load_latest(run_dir, map_location, need)


def load_model(run_dir: str, device="cpu"):
    """The trained model of a run directory, in eval mode, and the run's args (a Namespace)."""
    from .models import build_model

    ck = load_checkpoint(run_dir, need=("args", "model"))
    a = argparse.Namespace(**ck["args"])
    model = build_model(a.experiment, latent_dim=a.latent_dim, learn_prior=a.learn_prior, llik_scaling=a.llik_scaling)
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), a


# ----------------------------------------------------------------------------------------------
# Distributed setup
# ----------------------------------------------------------------------------------------------


_OWN_GROUP = []


def _distributed(device_arg):
    """(rank, world, device). Under torchrun (WORLD_SIZE > 1) joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device_arg is None else str(device_arg).startswith("cuda")
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():  # ours to destroy at the end of train()
            dist.init_process_group("nccl" if cuda else "gloo")
            _OWN_GROUP.append(True)
        device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return dist.get_rank(), world, device
    return 0, 1, usable_device(device_arg)


def usable_device(device_arg=None) -> torch.device:
    """The device of --device (default: cuda when present, else cpu), or ValueError saying what to
    pass instead: an unknown type, CUDA without a CUDA device, or a device that cannot compute."""
    if device_arg is None:
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_arg)
    except RuntimeError:
        raise ValueError(f"--device {device_arg} is not a device type torch knows; use --device cpu, cuda or "
                         f"cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device_arg} asks for CUDA, but this torch has no CUDA device "
                         f"(torch {torch.__version__}, CUDA {'built in' if torch.backends.cuda.is_built() else 'not built in'}); "
                         f"use --device cpu, or install a CUDA build of torch on a machine with a GPU")
    try:  # one number through the device now, not at the first step: meta holds no data, cuda:N may not exist
        torch.ones(1, device=device).add(1).item()
    except Exception as e:
        raise ValueError(f"--device {device_arg} cannot compute here ({str(e).strip().splitlines()[0]}); use "
                         f"--device cpu, or cuda / cuda:N on a machine with a GPU") from None
    return device


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def _is_image(t) -> bool:
    return torch.is_tensor(t) and t.dim() == 4 and t.shape[1] in (1, 3) and t.is_floating_point()


def image_grid(rows, pad=2):
    """rows: list of [N, C, H, W] tensors in [0, 1] (C 1 or 3, sizes may differ) -> H x W x 3 array."""
    H = max(r.shape[2] for r in rows)
    W = max(r.shape[3] for r in rows)
    N = max(r.shape[0] for r in rows)
    grid = np.ones((len(rows) * (H + pad) + pad, N * (W + pad) + pad, 3), dtype=np.float32)
    for i, r in enumerate(rows):
        r = r.detach().float().cpu().clamp(0, 1)
        r = r.expand(-1, 3, -1, -1) if r.shape[1] == 1 else r
        for j in range(r.shape[0]):
            y = pad + i * (H + pad) + (H - r.shape[2]) // 2
            x = pad + j * (W + pad) + (W - r.shape[3]) // 2
            grid[y:y + r.shape[2], x:x + r.shape[3]] = r[j].permute(1, 2, 0).numpy()
    return grid


@torch.no_grad()
def save_images(model, xs, out_dir, tag, n_prior=16):
    """Three PNG grids (paths returned): reconstructions (input row, reconstruction row per image
    modality), cross-modal generations (source row, generated row per pair r -> d) and prior samples
    (one row per image modality, one prior sample per column)."""
    import matplotlib.image

    os.makedirs(out_dir, exist_ok=True)
    rec = model.reconstruct(xs)
    M = len(xs)
    img = [_is_image(x) for x in xs]
    grids = {
        "recon": [t for d in range(M) if img[d] for t in (xs[d], rec[d][d])],
        "cross": [t for r in range(M) for d in range(M) if r != d and img[d]
                  for t in ([xs[r]] if img[r] else []) + [rec[r][d]]],
        "prior": [g for d, g in enumerate(model.generate(n_prior)) if img[d]],
    }
    paths = {}
    for name, rows in grids.items():
        if rows:
            paths[name] = os.path.join(out_dir, f"{name}_{tag}.png")
            matplotlib.image.imsave(paths[name], image_grid(rows))
    return paths


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def subset(ds, n, seed=0):
    """A fixed random subset of n items (all when n is None): every class, not the first ones."""
    if n is None or n >= len(ds):
        return ds
    return Subset(ds, torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values.tolist())


def _to(xs, device):
    return [x.to(device, non_blocking=True) for x in xs]


@torch.no_grad()
def test_objective(model, loader, value_fn, K, device, progress=False):
    """The bound per datum on a data set (no gradients)."""
    from tqdm.auto import tqdm

    model.eval()
    tot, n = 0.0, 0
    for xs, _ in tqdm(loader, desc="  test", leave=False, disable=not progress):
        xs = _to(xs, device)
        tot += value_fn(model, xs, K).item()
        n += len(xs[0])
    return tot / n


def train(ns: argparse.Namespace):
    """Train (or resume) a run; returns the trained model and the resolved args (a.out: the run dir)."""
    held = []  # the run directory's lock, once taken (by rank 0 only)
    try:
        return _train(ns, held)
    finally:
        for lock in held:
            lock.release()


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _lock(run_dir: str, held: list) -> None:
    held.append(rundir.RunLock(run_dir).acquire())
    rundir.remove_temporaries(run_dir)  # a killed writer's leftovers


def _train(ns: argparse.Namespace, held: list):
    from tqdm.auto import tqdm

    from .data import get_datasets, split_batch
    from .models import build_model

    lead = int(os.environ.get("RANK", "0")) == 0
    ck = None
    if ns.resume:
        rundir.check_run_dir(ns.resume, "--resume")
        # a resumed run writes only its own directory: another --out would get this run's epochs mixed
        # into its metrics and its checkpoint pushed aside (compared by real path: R/./S is R/S)
        if ns.out is not None and not _same_dir(ns.out, ns.resume):
            raise ValueError(f"--out {ns.out!r} is not the resumed run's directory {ns.resume!r}: a resumed run "
                             f"continues in its own directory; drop --out (to continue a copy, copy the directory "
                             f"and resume the copy)")
        if lead and os.path.isdir(ns.resume):
            _lock(ns.resume, held)  # before reading: no other training writes it meanwhile
        if os.path.isdir(ns.resume) and not rundir.holds_a_run(ns.resume):
            raise ValueError(f"no checkpoint in run directory {ns.resume!r}: its training stopped before its first "
                             f"checkpoint (or never ran), so there is nothing to resume; start it over without "
                             f"--resume (mmvae-fast train --out {ns.resume} ...; its options are in "
                             f"{os.path.join(ns.resume, rundir.ARGS)} if it got that far)")
        ck = load_checkpoint(ns.resume)
    a = resolve_args(ns, ck["args"] if ck else None)
    rundir.check_run_dir(a.out)
    overwrite = bool(getattr(ns, "overwrite", None))
    if ck is not None and a.epochs <= ck["epoch"]:
        raise ValueError(f"run {ns.resume!r} is already trained to epoch {ck['epoch']}: nothing to do for --epochs "
                         f"{a.epochs}; pass --epochs N with N > {ck['epoch']} to train it further")
    if ck is None and not overwrite and rundir.holds_a_run(a.out):
        raise ValueError(f"run directory {a.out!r} already holds a run; continue it with --resume {a.out}, "
                         f"start over with --overwrite, or pick another --out")
    rank, world, device = _distributed(a.device)
    lead = rank == 0
    if a.batch_size % world:
        raise ValueError(f"--batch-size {a.batch_size} must be divisible by the number of processes ({world})")
    train_fn, value_fn = make_objective(a.obj, a.looser, a.dreg_grad, a.k_chunk)
    if a.missing_ratio and not train_fn.takes_mask:
        raise ValueError(f"--missing-ratio needs an objective that takes mask=; this version's {a.obj} does not")

    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    random.seed(a.seed)
    # the data's own fixed seed (pairing, rendering, missing-data mask of the train split)
    train_set, test_set = get_datasets(a.experiment, data_dir=a.data_dir, missing_ratio=a.missing_ratio)
    train_set, test_set = subset(train_set, a.limit), subset(test_set, a.test_n or a.limit)
    model = build_model(a.experiment, latent_dim=a.latent_dim, learn_prior=a.learn_prior,
                        llik_scaling=a.llik_scaling).to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=a.lr, amsgrad=True)
    # A fixed test batch for the image grids, spread over the test set (made before the RNG is set: a DataLoader draws a seed).
    spread = Subset(test_set, list(range(0, len(test_set), max(1, len(test_set) // 16)))[:16])
    show = _to(next(iter(DataLoader(spread, batch_size=16, shuffle=False)))[0], device)
    torch.manual_seed(a.seed + 1000 * rank)  # each rank its own sampling noise
    start = 1
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start = ck["epoch"] + 1
        states = ck["rng"]
        if len(states) != world and lead:
            print(f"warning: resuming a {len(states)}-process run with {world}: not bit-identical")
        set_rng_state(states[rank % len(states)])

    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=a.seed)
    loader = DataLoader(train_set, batch_size=a.batch_size // world, sampler=sampler, num_workers=a.workers,
                        pin_memory=device.type == "cuda")
    test_loader = DataLoader(test_set, batch_size=a.batch_size, shuffle=False, num_workers=a.workers)
    step = ObjectiveModule(model, train_fn, a.K)
    if world > 1:
        step = nn.parallel.DistributedDataParallel(step, device_ids=[device] if device.type == "cuda" else None)

    out = a.out
    metrics_path = os.path.join(out, "metrics.jsonl")
    if lead:
        os.makedirs(out, exist_ok=True)
        if not any(_same_dir(os.path.dirname(lock.path), out) for lock in held):
            _lock(out, held)
        if ck is None and rundir.holds_a_run(out):  # checked again under the lock
            if not overwrite:
                raise ValueError(f"run directory {out!r} already holds a run; continue it with --resume {out}, "
                                 f"start over with --overwrite, or pick another --out")
            rundir.clear_run(out)
        elif ck is None and rundir.started(out):  # no checkpoint: nothing resume could continue
            warnings.warn(f"the training in {out!r} stopped before its first checkpoint; starting it over there",
                          stacklevel=2)
            rundir.clear_run(out)
        rundir.write_text_atomic(json.dumps(vars(a), indent=1, sort_keys=True) + "\n", os.path.join(out, "args.json"))
        if ck is not None:  # drop epochs past the checkpoint's (and a torn last line)
            rundir.reconcile_metrics(out, ck["epoch"])
        else:
            rundir.write_text_atomic("", metrics_path)  # a fresh run starts a fresh file
        what = f"{a.obj}{' looser' if a.looser else ''}{f' grad={a.dreg_grad}' if a.obj == 'dreg' else ''}"
        what += f"{f', k_chunk={a.k_chunk}' if a.k_chunk else ''}{f', {a.missing_ratio:.0%} missing' if a.missing_ratio else ''}"
        print(f"mmvae-fast train: {a.experiment}, {what}, K={a.K}, {len(train_set)} train / {len(test_set)} test, "
              f"device {device}{f' x{world} (DDP)' if world > 1 else ''}, run dir {out}")

    for epoch in range(start, a.epochs + 1):
        t0 = time.time()
        sampler.set_epoch(epoch)
        model.train()
        tot = torch.zeros(2, dtype=torch.float64, device=device)
        bar = tqdm(loader, desc=f"epoch {epoch}/{a.epochs}", leave=False, disable=not lead)
        for i, batch in enumerate(bar):
            xs, _, mask = split_batch(batch)
            xs = _to(xs, device)
            if mask is not None:
                mask = mask.to(device)
                # a modality absent from the whole batch costs the model nothing (x[m] None); not
                # under DDP, where a rank without it would leave its parameters out of the reduction
                if world == 1:
                    xs = [x if bool(mask[m].any()) else None for m, x in enumerate(xs)]
            bound = step(xs, mask)
            # The bound is a sum over the batch; DDP averages gradients over ranks, so scale by
            # the world size to train on the sum over the global batch, as one process would.
            loss = -bound * world
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rundir.fault_point(f"step:{epoch}:{i + 1}")
            b = bound.item()
            if not math.isfinite(b):
                raise FloatingPointError(f"the {a.obj} objective became {b} at epoch {epoch}, step {i + 1}")
            n = len(batch[1])
            tot += torch.tensor([b, n], dtype=torch.float64, device=device)
            bar.set_postfix(obj=f"{b / n:.1f}")
        if world > 1:
            dist.all_reduce(tot)
        train_obj = (tot[0] / tot[1]).item()
        rec = None
        if lead:
            test_obj = test_objective(model, test_loader, value_fn, a.K, device, progress=True)
            model.eval()
            images = save_images(model, show, os.path.join(out, "images"), f"e{epoch:03d}")
            rec = dict(epoch=epoch, train_obj=train_obj, test_obj=test_obj, obj=a.obj, looser=a.looser,
                       dreg_grad=a.dreg_grad, K=a.K, seed=a.seed, experiment=a.experiment, world=world,
                       missing_ratio=a.missing_ratio, k_chunk=a.k_chunk,
                       time_s=round(time.time() - t0, 2))
        states = [rng_state()]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, rng_state())
        if lead:  # the metrics line first: a kill after it is undone by resume's reconcile_metrics
            rundir.append_metrics(rec, out)
            rundir.fault_point(f"metrics:{epoch}")
            rundir.write_checkpoint(dict(model=model.state_dict(), optimizer=opt.state_dict(), epoch=epoch, rng=states,
                                         args=vars(a)), out, fault=f"checkpoint-write:{epoch}")
            rundir.fault_point(f"checkpoint:{epoch}")
            tqdm.write(f"epoch {epoch:3d}  train {train_obj:10.2f}  test {test_obj:10.2f}  "
                       f"({rec['time_s']:.0f}s)  {', '.join(images.values())}")
        if world > 1:
            dist.barrier()
    if world > 1:
        dist.barrier()
        if _OWN_GROUP:
            _OWN_GROUP.clear()
            dist.destroy_process_group()
    return model, a


def main(argv=None):
    p = argparse.ArgumentParser(prog="mmvae-fast train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return train(p.parse_args(argv))


if __name__ == "__main__":
    main()
