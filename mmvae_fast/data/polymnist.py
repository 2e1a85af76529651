"""PolyMNIST from its released files (the layout of the MoPoE / MMVAE+ code):

    <data_dir>/PolyMNIST/{train,test}/m0 .. m4/<index>.<label>.png      (3x28x28 RGB)

(`data_dir` may also be the PolyMNIST folder itself.) Item i is the five images with file index i,
one per modality, all of one digit class; labels are checked to agree across modalities.
"""
import os
import re

import numpy as np
import torch

from .base import PairedDataset
from .mnist_svhn import DataNotFoundError

N_MODALITIES = 5
LAYOUT = "<data_dir>/PolyMNIST/{train,test}/m0..m4/<index>.<label>.png"
_NAME = re.compile(r"^(\d+)\.(\d+)\.png$")
_CACHE = {}


def find_root(data_dir):
    """The PolyMNIST folder under data_dir (or data_dir itself), else a DataNotFoundError naming the layout."""
    if data_dir is None:
        raise DataNotFoundError(f"polymnist needs --data-dir with the PolyMNIST files laid out as {LAYOUT}")
    for root in (os.path.join(data_dir, "PolyMNIST"), data_dir):
        if all(os.path.isdir(os.path.join(root, s, f"m{m}")) for s in ("train", "test") for m in range(N_MODALITIES)):
            return root
    raise DataNotFoundError(f"no PolyMNIST files under {data_dir!r}: expected {LAYOUT}")


def load_split(folder):
    """(images: list of M uint8 [N, 3, 28, 28], labels [N]) of one split folder, items sorted by index."""
    from PIL import Image

    images, labels, index = [], None, None
    for m in range(N_MODALITIES):
        d = os.path.join(folder, f"m{m}")
        files = sorted((int(mt[1]), int(mt[2]), f) for f in os.listdir(d) if (mt := _NAME.match(f)))
        if not files:
            raise DataNotFoundError(f"no <index>.<label>.png files in {d} (expected {LAYOUT})")
        idx = [i for i, _, _ in files]
        lab = torch.tensor([y for _, y, _ in files])
        if index is None:
            index, labels = idx, lab
        elif idx != index:
            raise ValueError(f"{d}: file indices differ from m0's (every modality needs the same indices)")
        elif not torch.equal(lab, labels):
            raise ValueError(f"{d}: labels differ from m0's for the same indices")
        arr = np.stack([np.asarray(Image.open(os.path.join(d, f)).convert("RGB")) for _, _, f in files])
        images.append(torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous())
    return images, labels


def get_polymnist(data_dir):
    """(train, test) PairedDatasets of PolyMNIST (module docstring); cached in memory per folder."""
    root = os.path.abspath(find_root(data_dir))
    if root not in _CACHE:
        out = []
        for split in ("train", "test"):
            images, labels = load_split(os.path.join(root, split))
            n = len(labels)
            out.append(PairedDataset(images, [torch.arange(n)] * N_MODALITIES, labels,
                                     [f"m{m}" for m in range(N_MODALITIES)]))
        _CACHE[root] = tuple(out)
    return _CACHE[root]
