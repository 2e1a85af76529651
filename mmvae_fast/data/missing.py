"""Partially observed data: missing-at-random masks over the modalities of a dataset.

    train = with_missing(train, ratio=0.5, seed=0)
    (x_1, ..., x_M), label, mask = train[i]        # mask [M] bool, True where x_m is present
    xs, labels, mask = train.batch(ids)            # mask [M, B], the objectives' `mask=`

Each modality of each item is absent with probability `ratio`, independently, conditioned on at
least one being present (items drawn with none are redrawn), fixed by `seed`. An absent modality's
tensor is zeros, so nothing of it can reach a model that ignores the mask.
"""
import torch
from torch.utils.data import Dataset


def missing_mask(n, n_modalities, ratio, seed=0):
    """Bool [n, M]: True where present; each entry absent with probability `ratio`, rows with
    nothing present redrawn (the distribution conditioned on at least one present)."""
    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"argument 'ratio' must be in [0, 1), got {ratio!r}")
    g = torch.Generator().manual_seed(int(seed))
    mask = torch.ones(n, n_modalities, dtype=torch.bool)
    redo = torch.ones(n, dtype=torch.bool)
    while bool(redo.any()):
        mask[redo] = torch.rand(int(redo.sum()), n_modalities, generator=g) >= ratio
        redo = ~mask.any(1)
    return mask


class MaskedDataset(Dataset):
    """A dataset of ((x_1, ..., x_M), label) items seen through a mask [N, M]: items become
    ((x_1, ..., x_M), label, mask_row) with the absent modalities zeroed."""

    def __init__(self, dataset, mask):
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.dim() != 2 or mask.shape[0] != len(dataset):
            raise ValueError(f"mask must be [N={len(dataset)}, M], got {tuple(mask.shape)}")
        if not bool(mask.any(1).all()):
            raise ValueError("every item must have at least one modality present")
        self.dataset, self.mask = dataset, mask
        self.names = getattr(dataset, "names", None)
        self.labels = getattr(dataset, "labels", None)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        xs, label = self.dataset[i]
        m = self.mask[i]
        return tuple(x if m[j] else torch.zeros_like(x) for j, x in enumerate(xs)), label, m

    def batch(self, ids):
        """([x_1[B], ..., x_M[B]], labels[B], mask [M, B])."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        xs, labels = self.dataset.batch(ids)
        mask = self.mask[ids].T.contiguous()
        return [x * mask[m].view(-1, *[1] * (x.dim() - 1)).to(x.dtype) for m, x in enumerate(xs)], labels, mask

    def __repr__(self):
        p = 1 - self.mask.float().mean().item()
        return f"MaskedDataset({self.dataset!r}, absent {100 * p:.1f}%)"


def with_missing(dataset, ratio, seed=0):
    """`dataset` with a missing-at-random mask of the given ratio (see `missing_mask`)."""
    xs = dataset[0][0]
    return MaskedDataset(dataset, missing_mask(len(dataset), len(xs), ratio, seed))


def split_batch(batch):
    """(xs, labels, mask [M, B] or None) from a DataLoader batch of a dataset with or without masks
    (the loader collates the per-item masks to [B, M])."""
    if len(batch) == 3:
        xs, labels, mask = batch
        return xs, labels, mask.T.contiguous()
    xs, labels = batch
    return xs, labels, None
