"""MNIST-SVHN from the original files: small readers (no torchvision), checked downloads, pairing.

Files looked for in data_dir, data_dir/MNIST/raw (torchvision's layout), data_dir/mnist,
data_dir/SVHN and data_dir/svhn:
    MNIST: train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
           t10k-labels-idx1-ubyte (each also as .gz), or torchvision's MNIST/processed/{training,test}.pt
    SVHN:  train_32x32.mat, test_32x32.mat (label 10 means digit 0)
Missing files are downloaded into data_dir (MNIST to data_dir/MNIST/raw) when `download` and the
network allow, and checked against their published MD5 sums.
"""
import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request

import numpy as np
import torch

from .base import PairedDataset
from .pairing import pair_indices

MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
MNIST_FILES = {  # name -> md5 of the .gz
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_FILES = {
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
}
_CACHE = {}


class DataNotFoundError(FileNotFoundError):
    """Raised when dataset files are neither present nor downloadable; the message names them."""


def md5sum(path, chunk=1 << 20):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def download(url, path, md5, timeout=60):
    """Fetch url to path atomically; raise if the MD5 does not match (the partial file is removed)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out)
        got = md5sum(tmp)
        if got != md5:
            raise OSError(f"checksum mismatch for {url}: md5 {got}, expected {md5}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_idx(path):
    """Read an IDX file (MNIST's format), gzipped or not, to a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type 0x{data[2]:02x}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, found {arr.size} values")
    return arr.reshape(shape)


def _dirs(data_dir, *subs):
    return [os.path.join(data_dir, *s.split("/")) if s else data_dir for s in ("",) + subs]


def _find(data_dir, names, subs):
    for d in _dirs(data_dir, *subs):
        for n in names:
            p = os.path.join(d, n)
            if os.path.isfile(p):
                return p
    return None


def _missing_error(what, data_dir, names, subs, reason):
    where = ", ".join(_dirs(data_dir, *subs))
    return DataNotFoundError(
        f"{what} files not found: {', '.join(names)} (looked in {where}); {reason}. "
        f"Put them into {data_dir} (see docs/models-data.md for the files and where to get them); with network "
        f"access, `mmvae-fast train` and get_datasets (download=True, its default) fetch missing files themselves."
    )


MNIST_SUBS = ("MNIST/raw", "mnist", "mnist/raw")
SVHN_SUBS = ("SVHN", "svhn")


def load_mnist(data_dir, train=True, download_ok=True):
    """(images uint8 [N, 28, 28], labels long [N])."""
    split = "train" if train else "t10k"
    names = [f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"]
    paths = [_find(data_dir, [n, n + ".gz"], MNIST_SUBS) for n in names]
    if None in paths:
        pt = _find(data_dir, ["training.pt" if train else "test.pt"], ("MNIST/processed",))
        if pt is not None:
            images, labels = torch.load(pt)
            return images.to(torch.uint8), labels.long()
    errors = []
    for i, n in enumerate(names):
        if paths[i] is not None:
            continue
        if not download_ok:
            raise _missing_error("MNIST", data_dir, names, MNIST_SUBS, "download=False")
        target = os.path.join(data_dir, "MNIST", "raw", n + ".gz")
        for mirror in MNIST_MIRRORS:
            try:
                paths[i] = download(mirror + n + ".gz", target, MNIST_FILES[n])
                break
            except Exception as e:  # noqa: BLE001 - try the next mirror, report all
                errors.append(f"{mirror}{n}.gz: {e}")
        if paths[i] is None:
            raise _missing_error("MNIST", data_dir, names, MNIST_SUBS, "download failed (" + "; ".join(errors) + ")")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(f"MNIST files {paths} hold images {images.shape} and labels {labels.shape}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_svhn(data_dir, train=True, download_ok=True):
    """(images uint8 [N, 3, 32, 32], labels long [N] in 0..9: the .mat's label 10 is digit 0)."""
    name = "train_32x32.mat" if train else "test_32x32.mat"
    path = _find(data_dir, [name], SVHN_SUBS)
    if path is None:
        if not download_ok:
            raise _missing_error("SVHN", data_dir, [name], SVHN_SUBS, "download=False")
        try:
            path = download(SVHN_URL + name, os.path.join(data_dir, name), SVHN_FILES[name])
        except Exception as e:  # noqa: BLE001
            raise _missing_error("SVHN", data_dir, [name], SVHN_SUBS, f"download failed ({e})") from e
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise ImportError("reading SVHN's .mat files needs scipy (pip install scipy)") from e
    mat = loadmat(path)
    x, y = mat["X"], mat["y"]  # X [32, 32, 3, N]
    images = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))).to(torch.uint8)
    labels = torch.from_numpy(y.reshape(-1).astype(np.int64)) % 10
    return images, labels


def _mnist_convert(t):
    return t.float().div_(255).unsqueeze(-3)  # [.., 28, 28] -> [.., 1, 28, 28]


def _svhn_convert(t):
    return t.float().div_(255)


def get_mnist_svhn(data_dir, seed=0, dm=30, max_per_class=10000, download=True):
    """(train, test) PairedDatasets of (MNIST [1,28,28], SVHN [3,32,32]) pairs of the same digit."""
    if data_dir is None:
        raise ValueError("experiment 'mnist-svhn' needs argument 'data_dir': a directory with (or for) the MNIST and SVHN files")
    data_dir = os.fspath(data_dir)
    made = None  # the topmost directory this call creates: removed again if nothing could be fetched
    if not os.path.isdir(data_dir):
        if not download:
            raise DataNotFoundError(f"data directory {data_dir!r} does not exist (MNIST-SVHN needs the MNIST and SVHN files there)")
        made = os.path.abspath(data_dir)
        while not os.path.isdir(os.path.dirname(made)):
            made = os.path.dirname(made)
        os.makedirs(data_dir, exist_ok=True)
    try:
        return _load_pairs(data_dir, seed, dm, max_per_class, download)
    except DataNotFoundError:
        if made is not None:
            _remove_empty_dirs(made)
        raise


def _remove_empty_dirs(top):
    """Delete top and the directories below it, as long as they hold no files."""
    for d, _, files in os.walk(top, topdown=False):
        if not files and not os.listdir(d):
            os.rmdir(d)


def _load_pairs(data_dir, seed, dm, max_per_class, download):
    out = []
    for train in (True, False):
        key = (os.path.abspath(data_dir), train, int(seed), int(dm), int(max_per_class))
        if key not in _CACHE:
            mi, ml = load_mnist(data_dir, train, download)
            si, sl = load_svhn(data_dir, train, download)
            ia, ib = pair_indices(ml, sl, dm=dm, max_per_class=max_per_class, seed=seed + (0 if train else 1))
            ds = PairedDataset([mi, si], [ia, ib], ml[ia], ["mnist", "svhn"], [_mnist_convert, _svhn_convert])
            _CACHE[key] = ds
        out.append(_CACHE[key])
    return tuple(out)
