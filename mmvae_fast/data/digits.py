"""The offline default: an MNIST-SVHN-like pair dataset built from scikit-learn's bundled digits.

Source: sklearn.datasets.load_digits, 1,797 real handwritten 8x8 digits (~180 per class), no download.
  modality 1, MNIST-like [1, 28, 28] grey: the source digit upsampled to 20x20 and centred in 28x28
    (MNIST's layout), one fixed image per source digit;
  modality 2, SVHN-like [3, 32, 32] colour: a *different* source digit of the same class, randomly
    scaled, rotated and shifted, in a random colour over a random coloured, cluttered background
    (smooth colour noise, stripes, and cropped distractor digits at the sides as house-number
    neighbours), rendered afresh for every pair, like PolyMNIST is made from MNIST.
Split by source image (stratified, 20% test, the same for every seed): no handwriting instance is
in both train and test. Within a split, per class, each source digit is paired dm times (dm
random permutations, each matched to a cyclic shift of itself, so the two images of a pair are
always different instances). Everything follows `seed`; the built tensors are cached in memory.
"""
import functools
import math

import torch
import torch.nn.functional as F

from .base import PairedDataset

TEST_FRACTION = 0.2
SPLIT_SEED = 0
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


def mnist_like(images):
    """[N, 8, 8] in [0, 1] -> [N, 1, 28, 28]: 20x20 bicubic upsampling centred with a 4-pixel margin."""
    x = F.interpolate(images[:, None], size=(20, 20), mode="bicubic", align_corners=False)
    x = ((x - 0.1) / 0.8).clamp(0, 1)  # crisp strokes on a zero background, like MNIST
    return F.pad(x, (4, 4, 4, 4))


def _warp(glyphs, scale, angle, shift_x, shift_y, size=32):
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


def _luma(c):
    return c @ torch.tensor([0.299, 0.587, 0.114])


def svhn_like(glyph_src, distract_src, g, size=32):
    """Render [N, 3, size, size] colour images: glyph_src [N, 1, h, w] the digit, distract_src
    [N, 2, 1, h, w] two digits partly visible at the left and right edges."""
    n = glyph_src.shape[0]

    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    # background: a base colour, smooth colour noise, and a few soft stripes
    base = u(n, 3)
    noise = F.interpolate(u(n, 3, 4, 4, lo=-1, hi=1), size=(size, size), mode="bicubic", align_corners=False)
    img = base[:, :, None, None] + 0.18 * noise
    yy = torch.linspace(-1, 1, size)[None, :, None].expand(n, size, size)
    xx = torch.linspace(-1, 1, size)[None, None, :].expand(n, size, size)
    for _ in range(2):
        ang = u(n, lo=0, hi=math.pi)
        off = u(n, lo=-1, hi=1)
        width = u(n, lo=0.05, hi=0.25)
        d = (xx * torch.cos(ang)[:, None, None] + yy * torch.sin(ang)[:, None, None] - off[:, None, None]).abs()
        stripe = (torch.sigmoid((width[:, None, None] - d) * 20) * u(n, lo=0.0, hi=0.5)[:, None, None])[:, None]
        img = img * (1 - stripe) + u(n, 3)[:, :, None, None] * stripe
    # digit colour with a luminance contrast of at least ~0.35 to the background
    fg = u(n, 3)
    dark_bg = (_luma(base) > 0.5)[:, None]
    fg = torch.where(dark_bg, fg * 0.45, 0.55 + 0.45 * fg)
    # neighbours: digits shifted to the sides so only part of each shows
    scale = u(n, lo=0.62, hi=0.85)
    for side in (-1.0, 1.0):
        src = distract_src[:, 0 if side < 0 else 1]
        shift = side * u(n, lo=0.5, hi=0.7) * size
        a = _warp(src, scale, u(n, lo=-0.15, hi=0.15), shift, u(n, lo=-2, hi=2), size).clamp(0, 1)
        img = img * (1 - a) + fg[:, :, None, None] * a
    a = _warp(glyph_src, scale, u(n, lo=-0.2, hi=0.2), u(n, lo=-2.5, hi=2.5), u(n, lo=-2, hi=2), size)
    a = (a * 1.4).clamp(0, 1)
    img = img * (1 - a) + fg[:, :, None, None] * a
    img = img + 0.03 * torch.randn(img.shape, generator=g)
    return img.clamp(0, 1)


def _build(split, seed, dm, chunk=4096):
    key = (split, int(seed), int(dm))
    if key in _CACHE:
        return _CACHE[key]
    images, labels = load_sources()
    train_ids, test_ids = split_sources(labels)
    ids = train_ids if split == "train" else test_ids
    g = torch.Generator().manual_seed(int(seed) * 2 + (split == "test"))
    s1, s2 = pair_within_class(ids, labels, dm, g)
    m1_store = (mnist_like(images) * 255).round().to(torch.uint8)  # one per source digit
    glyphs = F.interpolate(images[:, None], size=(24, 24), mode="bicubic", align_corners=False).clamp(0, 1)
    m2 = torch.empty(len(s2), 3, 32, 32, dtype=torch.uint8)
    for lo in range(0, len(s2), chunk):
        hi = min(lo + chunk, len(s2))
        distract = ids[torch.randint(len(ids), (hi - lo, 2), generator=g)]  # any class, same split
        m2[lo:hi] = (svhn_like(glyphs[s2[lo:hi]], glyphs[distract], g) * 255).round().to(torch.uint8)
    ds = PairedDataset([m1_store, m2], [s1, torch.arange(len(s2))], labels[s1], ["mnist-like", "svhn-like"])
    ds.sources = torch.stack([s1, s2], 1)  # sklearn indices of the two source digits of every pair
    _CACHE[key] = ds
    return ds


def get_digits(seed=0, dm=10):
    """(train, test) PairedDatasets of the offline digits experiment (see the module docstring)."""
    if isinstance(dm, bool) or not isinstance(dm, int) or dm < 1:
        raise ValueError(f"argument 'dm' must be a positive integer, got {dm!r}")
    return _build("train", seed, dm), _build("test", seed, dm)
