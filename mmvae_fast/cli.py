"""The `mmvae-fast` command (also `python -m mmvae_fast.cli`).

    mmvae-fast train --experiment digits --obj dreg --looser --K 30 --epochs 20 --out runs/digits
    mmvae-fast train-classifiers --experiment digits --out runs/classifiers
    mmvae-fast evaluate runs/digits --classifiers runs/classifiers
"""
import argparse
import importlib.util
import sys

# What each command imports beyond torch and numpy: pyproject.toml's `train` extra.
NEEDS = {"train": ("tqdm", "sklearn", "matplotlib"), "train-classifiers": ("tqdm", "sklearn"),
         "evaluate": ("tqdm", "sklearn")}
PIP_NAMES = {"sklearn": "scikit-learn"}


def missing_packages(command: str) -> list:
    """The pip names of the packages `command` needs that are not installed."""
    return [PIP_NAMES.get(m, m) for m in NEEDS.get(command, ()) if importlib.util.find_spec(m) is None]


def main(argv=None):
    from . import evaluate, train

    p = argparse.ArgumentParser(prog="mmvae-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{train,train-classifiers,evaluate}")
    sub.required = True
    t = sub.add_parser("train", help="train an MMVAE (torchrun for DDP)", description=train.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(t)
    t.set_defaults(func=train.train)
    c = sub.add_parser("train-classifiers", help="train the digit classifiers used by evaluate")
    evaluate.add_classifier_arguments(c)
    c.set_defaults(func=evaluate.run_train_classifiers)
    e = sub.add_parser("evaluate", help="coherence, latent accuracy and log-likelihood of a run",
                       description=evaluate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_evaluate_arguments(e)
    e.set_defaults(func=evaluate.run_evaluate)
    a = p.parse_args(argv)
    missing = missing_packages(a.command)
    if missing:  # before any work: a missing package must not end a run after its first epoch
        print(f"mmvae-fast {a.command}: error: needs {', '.join(missing)}, not installed. Install the training "
              f"dependencies with: pip install {' '.join(missing)}  (or pip install -e \".[train]\" in a source checkout)",
              file=sys.stderr)
        return 2
    from .rundir import RunDirError

    try:
        a.func(a)
    except (ValueError, FileNotFoundError, RunDirError) as err:  # user errors: one clear line, no traceback
        print(f"mmvae-fast {a.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
