"""The offline five-modality default, PolyMNIST-style, from scikit-learn's bundled 8x8 digits.

Every item is M = 5 colour images [3, 12, 12] of the same digit class, each a *different* source
digit (1,797 real handwritten digits, no download). As in PolyMNIST, modality m has its own
background (five procedural textures of distinct character: smooth colour clouds, diagonal
stripes, a checkerboard, colour speckle, rings), and the digit (upsampled to 10x10, centred as
MNIST's) is drawn by inverting the background's colours under the stroke. Texture values keep away
from 0.5 so the inverted stroke always contrasts. Unlike PolyMNIST, whose items show random crops
of a large background image, each modality's background is one fixed 12x12 image: a shared latent
cannot predict a random crop (MMVAE+ adds modality-specific latents for that), and the fixed style
keeps the offline default learnable in CPU-minutes while the modalities still look unlike.
Split by source image (digits.split_sources: stratified 20% test, the same for every seed), so no
handwriting instance is in both splits. Within a split, per class, each round (dm of them) takes
a random permutation p of the class's sources and M distinct cyclic shifts of it, so each source
appears dm times per modality and the M digits of an item are always different instances.
"""
import math

import torch
import torch.nn.functional as F

from .base import PairedDataset
from .digits import cached_split, check_dm

N_MODALITIES, SIZE, GLYPH = 5, 12, 10
_CACHE = {}


def _away_from_half(t):
    """Values in [0, 1] -> [0, 0.25] u [0.75, 1], keeping the side of 0.5 they were on."""
    s = torch.where(t >= 0.5, torch.ones_like(t), -torch.ones_like(t))
    return 0.5 + s * (0.25 + 0.25 * (2 * t - 1).abs())


def textures(seed=0, size=SIZE):
    """The five modalities' background images [5, 3, size, size] in [0, 1] (fixed by seed)."""
    g = torch.Generator().manual_seed(int(seed) + 7919)

    def u(*shape):
        return torch.rand(*shape, generator=g)

    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    clouds = F.interpolate(u(1, 3, 4, 4), size=(size, size), mode="bicubic", align_corners=False)[0]
    c1, c2 = u(3, 1, 1), u(3, 1, 1)
    stripes = torch.where(torch.sin((xx + yy) * math.pi) > 0, c1, (c1 + 0.5) % 1)
    checker = torch.where(((xx * 1.5).floor() + (yy * 1.5).floor()) % 2 == 0, c2, (c2 + 0.5) % 1) + 0.1 * (u(3, size, size) - 0.5)
    speckle = F.interpolate(u(1, 3, size // 4, size // 4), size=(size, size), mode="nearest")[0]
    r = (xx ** 2 + yy ** 2).sqrt()
    rings = torch.stack([0.5 + 0.5 * torch.cos(r * 1.5 * math.pi * f + ph) for f, ph in zip(u(3) + 0.5, u(3) * 6)])
    return _away_from_half(torch.stack([clouds, stripes, checker, speckle, rings]).clamp(0, 1))


def render(glyphs, background):
    """[N, 3, SIZE, SIZE]: glyphs [N, 8, 8] in [0, 1], centred, drawn by inverting the background
    [3, SIZE, SIZE] under the stroke."""
    n = glyphs.shape[0]
    a = F.interpolate(glyphs[:, None], size=(GLYPH, GLYPH), mode="bicubic", align_corners=False).clamp(0, 1)
    oy = ox = torch.full((n,), (SIZE - GLYPH) // 2)  # centred, as MNIST digits are
    rows = oy[:, None] + torch.arange(GLYPH)  # paste the glyph into an empty canvas
    cols = ox[:, None] + torch.arange(GLYPH)
    alpha = torch.zeros(n, 1, SIZE, SIZE)
    alpha[torch.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]] = a[:, 0]
    return background * (1 - alpha) + (1 - background) * alpha


def group_within_class(ids, labels, dm, n_modalities, g):
    """src [N, M]: per class, dm rounds of a random permutation p and M distinct cyclic shifts of
    it (the first 0), so the M sources of an item differ and each id appears dm times per modality."""
    out = []
    for c in torch.unique(labels[ids]).tolist():
        cid = ids[labels[ids] == c]
        n = len(cid)
        if n < n_modalities:
            raise ValueError(f"class {c} has {n} source image(s); {n_modalities} different instances are needed")
        for _ in range(dm):
            p = cid[torch.randperm(n, generator=g)]
            shifts = [0] + (torch.randperm(n - 1, generator=g)[: n_modalities - 1] + 1).tolist()
            out.append(torch.stack([torch.roll(p, s) for s in shifts], 1))
    return torch.cat(out)


def _build(split, seed, dm):
    return cached_split(_CACHE, split, seed, dm, lambda images, labels, ids, g: _make(images, labels, ids, g, dm, seed))


def _make(images, labels, ids, g, dm, seed):
    src = group_within_class(ids, labels, dm, N_MODALITIES, g)
    tex = textures(seed)
    stores = [(render(images[src[:, m]], tex[m]) * 255).round().to(torch.uint8) for m in range(N_MODALITIES)]
    n = len(src)
    ds = PairedDataset(stores, [torch.arange(n)] * N_MODALITIES, labels[src[:, 0]],
                       [f"m{m}" for m in range(N_MODALITIES)])
    ds.sources = src  # sklearn indices of every item's M source digits
    return ds


def get_polydigits(seed=0, dm=4):
    """(train, test) PairedDatasets of the offline five-modality experiment (module docstring)."""
    check_dm(dm)
    return _build("train", seed, dm), _build("test", seed, dm)
