"""Datasets of the experiments: items are ((x_1, ..., x_M), label), label an int digit or -1.

    train, test = get_datasets("digits")                      # offline, no download
    train, test = get_datasets("mnist-svhn", data_dir="data")  # MNIST + SVHN files (downloaded if possible)
    train, test = get_datasets("cub-features", data_dir="data/cub")
    train, test = get_datasets("polydigits")                  # five modalities, offline
    train, test = get_datasets("polydigits", missing_ratio=0.5)  # train items carry a mask

See docs/models-data.md for the files each experiment reads.
"""
from ..models import EXPERIMENTS
from .base import PairedDataset, as_float_image  # noqa: F401
from .digits import get_digits
from .missing import MaskedDataset, missing_mask, split_batch, with_missing  # noqa: F401
from .mnist_svhn import DataNotFoundError, get_mnist_svhn, load_mnist, load_svhn, read_idx  # noqa: F401
from .pairing import pair_indices

DEFAULT_DM = {"digits": 10, "mnist-svhn": 30, "polydigits": 4}


def get_datasets(experiment, data_dir=None, seed=0, dm=None, *, download=True, missing_ratio=0.0):
    """(train, test) datasets of `experiment` (one of EXPERIMENTS).

    data_dir: where the files are (mnist-svhn, cub-*); unused by 'digits'.
    seed: fixes the pairing (and the digits' rendering).
    dm: pairings per source item (MNIST-SVHN: 30, the paper's; digits: 10); unused by CUB.
    download: fetch missing MNIST/SVHN files into data_dir (checked by MD5).
    missing_ratio: > 0 makes the train split partially observed (`with_missing`, mask fixed by
    seed): its items become (xs, label, mask). The test split stays complete."""
    train, test = _get(experiment, data_dir, seed, dm, download)
    if missing_ratio:
        train = with_missing(train, missing_ratio, seed)
    return train, test


def _get(experiment, data_dir, seed, dm, download):
    if experiment not in EXPERIMENTS:
        raise ValueError(f"argument 'experiment' must be one of {EXPERIMENTS}, got {experiment!r}")
    if dm is None:
        dm = DEFAULT_DM.get(experiment, 1)
    if experiment == "digits":
        return get_digits(seed=seed, dm=dm)
    if experiment == "polydigits":
        from .polydigits import get_polydigits

        return get_polydigits(seed=seed, dm=dm)
    if experiment == "polymnist":
        from .polymnist import get_polymnist

        return get_polymnist(data_dir)
    if experiment == "mnist-svhn":
        return get_mnist_svhn(data_dir, seed=seed, dm=dm, download=download)
    from .cub import get_cub

    return get_cub(data_dir, images=experiment == "cub-images-sentences")


__all__ = ["EXPERIMENTS", "get_datasets", "pair_indices", "PairedDataset", "DataNotFoundError", "MaskedDataset",
           "missing_mask", "with_missing", "split_batch"]
