"""The dataset type shared by every experiment: paired modalities gathered from stored tensors."""
import torch
from torch.utils.data import Dataset


def as_float_image(t):
    """uint8 pixels -> float32 in [0, 1]; float tensors pass through."""
    return t.float().div_(255) if t.dtype == torch.uint8 else t


class PairedDataset(Dataset):
    """Item i is ((x_1, ..., x_M), label): x_m = convert_m(store_m[index_m[i]]).

    The stores hold each source item once (uint8 images, features, word indices) and the index
    tensors say which one every pair uses, so a dataset with dm pairings per item costs dm index
    entries, not dm copies. label is an int (-1 where the data has none).
    Attributes: labels [N], index (list of the M index tensors), names (one per modality)."""

    def __init__(self, stores, index, labels, names, converts=None):
        if not (len(stores) == len(index) == len(names)):
            raise ValueError("stores, index and names must have one entry per modality")
        n = len(labels)
        for m, idx in enumerate(index):
            if len(idx) != n:
                raise ValueError(f"modality {names[m]!r}: {len(idx)} indices for {n} labels")
        self.stores, self.index, self.names = list(stores), [torch.as_tensor(i) for i in index], list(names)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.converts = list(converts) if converts is not None else [as_float_image] * len(stores)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        xs = tuple(conv(store[idx[i]]) for store, idx, conv in zip(self.stores, self.index, self.converts))
        return xs, int(self.labels[i])

    def batch(self, ids):
        """The items `ids` as one batch: ([x_1[B], ..., x_M[B]], labels[B]) without a DataLoader."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        xs = [conv(store[idx[ids]]) for store, idx, conv in zip(self.stores, self.index, self.converts)]
        return xs, self.labels[ids]

    def __repr__(self):
        return f"{type(self).__name__}(n={len(self)}, modalities={self.names})"
