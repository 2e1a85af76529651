"""The offline default: a two-modality digits dataset at the native resolution of scikit-learn's
bundled digits, no download.

Source: sklearn.datasets.load_digits, 1,797 real handwritten 8x8 digits (~180 per class).
  modality 1, "grey" [1, 16, 16]: the source digit upsampled 2x (bicubic), strokes stretched to
    [0, 1] on a black background; one fixed image per source digit;
  modality 2, "colour" [3, 16, 16]: a *different* source digit of the same class, randomly scaled,
    rotated and shifted, in a random bright colour over a dark, smoothly varying background of
    another random colour with pixel noise, rendered afresh for every pair: the same content (the
    digit) in a distinct style, as the SVHN-like side of MNIST-SVHN is.
Why 16x16 and not MNIST-SVHN's 28x28 / 32x32: the sources hold 8x8 pixels, so larger canvases add
interpolated pixels, not information, and cost 4x the compute per decoded sample (see
docs/train-eval.md for what that did to training on a CPU).

Split by source image (stratified, 20% test, the same for every seed): no handwriting instance is
in both train and test. Within a split, per class, each source digit is paired dm times (dm
random permutations, each matched to a cyclic shift of itself, so the two images of a pair are
always different instances). Everything follows `seed`; the built tensors are cached in memory.
"""
import functools

import torch
import torch.nn.functional as F

from .base import PairedDataset

TEST_FRACTION = 0.2
SPLIT_SEED = 0
SIZE = 16
SHAPES = ((1, SIZE, SIZE), (3, SIZE, SIZE))
NAMES = ("grey", "colour")
_CACHE = {}


@functools.lru_cache(maxsize=1)
def load_sources():
    """(images [1797, 8, 8] float in [0, 1], labels [1797]) from scikit-learn (cached)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the 'digits' experiment needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


def split_sources(labels, test_fraction=TEST_FRACTION, seed=SPLIT_SEED):
    """(train_ids, test_ids): a stratified split of the source images, disjoint, sorted."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        ids = torch.nonzero(labels == c).flatten()
        ids = ids[torch.randperm(len(ids), generator=g)]
        n_test = int(round(test_fraction * len(ids)))
        test.append(ids[:n_test])
        train.append(ids[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def pair_within_class(ids, labels, dm, g):
    """(src_1, src_2): per class, dm rounds of a random permutation p matched with p rolled by a
    random shift in [1, n-1], so src_1 != src_2 in every pair and each id appears dm times on each side."""
    s1, s2 = [], []
    for c in torch.unique(labels[ids]).tolist():
        cid = ids[labels[ids] == c]
        n = len(cid)
        if n < 2:
            raise ValueError(f"class {c} has {n} source image(s); pairing different instances needs 2")
        for _ in range(dm):
            p = cid[torch.randperm(n, generator=g)]
            shift = int(torch.randint(1, n, (1,), generator=g))
            s1.append(p)
            s2.append(torch.roll(p, shift))
    return torch.cat(s1), torch.cat(s2)


def upsample(images, size=SIZE):
    """[N, 8, 8] in [0, 1] -> [N, 1, size, size]: bicubic, strokes stretched to a zero background."""
    x = F.interpolate(images[:, None], size=(size, size), mode="bicubic", align_corners=False)
    return ((x - 0.1) / 0.8).clamp(0, 1)


def grey(images):
    """Modality 1: [N, 8, 8] -> [N, 1, 16, 16]."""
    return upsample(images)


def _warp(glyphs, scale, angle, shift_x, shift_y, size):
    """Place [N, 1, h, w] glyphs into size x size canvases with a per-image similarity transform.

    scale: glyph height over canvas height; shifts in pixels."""
    n = glyphs.shape[0]
    cos, sin = torch.cos(angle), torch.sin(angle)
    inv = 1.0 / scale  # affine_grid maps output coords to input coords
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * inv, -sin * inv
    theta[:, 1, 0], theta[:, 1, 1] = sin * inv, cos * inv
    theta[:, 0, 2] = -(shift_x * 2 / size) * inv
    theta[:, 1, 2] = -(shift_y * 2 / size) * inv
    grid = F.affine_grid(theta, (n, 1, size, size), align_corners=False)
    return F.grid_sample(glyphs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def colour(glyphs, g, size=SIZE):
    """Modality 2: render [N, 3, size, size] images of the glyphs [N, 1, h, w] (in [0, 1]).

    A bright digit of a random colour over a dark background of another random colour with smooth
    colour noise and pixel noise. The polarity is fixed (digit brighter than background): with
    random polarity, as in the first SVHN-like rendering, the mean image of a class is flat, so
    nothing decoded from the digit's identity alone can show the digit (docs/train-eval.md)."""
    n = glyphs.shape[0]

    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    base = u(n, 3, hi=0.4)  # background: a dark base colour with smooth colour noise
    noise = F.interpolate(u(n, 3, 3, 3, lo=-1, hi=1), size=(size, size), mode="bicubic", align_corners=False)
    img = base[:, :, None, None] + 0.1 * noise
    fg = u(n, 3, lo=0.2, hi=1.0)  # the digit: a bright colour (its brightest channel at least 0.8)
    fg = fg / fg.amax(1, keepdim=True) * u(n, 1, lo=0.8, hi=1.0)
    a = _warp(glyphs, u(n, lo=0.8, hi=1.0), u(n, lo=-0.25, hi=0.25), u(n, lo=-1.5, hi=1.5), u(n, lo=-1, hi=1), size)
    a = (a * 1.3).clamp(0, 1)
    img = img * (1 - a) + fg[:, :, None, None] * a
    img = img + 0.03 * torch.randn(img.shape, generator=g)
    return img.clamp(0, 1)


def cached_split(cache, split, seed, dm, make):
    """The dataset of (split, seed, dm) from cache, or make(images, labels, ids, g) on the split's
    source ids with the split's own generator, cached."""
    key = (split, int(seed), int(dm))
    if key not in cache:
        images, labels = load_sources()
        train_ids, test_ids = split_sources(labels)
        g = torch.Generator().manual_seed(int(seed) * 2 + (split == "test"))
        cache[key] = make(images, labels, train_ids if split == "train" else test_ids, g)
    return cache[key]


def check_dm(dm):
    if isinstance(dm, bool) or not isinstance(dm, int) or dm < 1:
        raise ValueError(f"argument 'dm' must be a positive integer, got {dm!r}")


def _build(split, seed, dm, chunk=4096):
    return cached_split(_CACHE, split, seed, dm, lambda images, labels, ids, g: _make(images, labels, ids, g, dm, chunk))


def _make(images, labels, ids, g, dm, chunk):
    s1, s2 = pair_within_class(ids, labels, dm, g)
    m1_store = (grey(images) * 255).round().to(torch.uint8)  # one per source digit
    glyphs = upsample(images)
    m2 = torch.empty(len(s2), *SHAPES[1], dtype=torch.uint8)
    for lo in range(0, len(s2), chunk):
        hi = min(lo + chunk, len(s2))
        m2[lo:hi] = (colour(glyphs[s2[lo:hi]], g) * 255).round().to(torch.uint8)
    ds = PairedDataset([m1_store, m2], [s1, torch.arange(len(s2))], labels[s1], list(NAMES))
    ds.sources = torch.stack([s1, s2], 1)  # sklearn indices of the two source digits of every pair
    return ds


def get_digits(seed=0, dm=10):
    """(train, test) PairedDatasets of the offline digits experiment (see the module docstring)."""
    check_dm(dm)
    return _build("train", seed, dm), _build("test", seed, dm)
