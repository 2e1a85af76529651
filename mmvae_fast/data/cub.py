"""CUB Image-Caption in the layout of the paper's cleaned-up release (unzipped cub.zip):

    <root>/text_trainvalclasses.txt, text_testclasses.txt   captions, one per line, 10 per image
    <root>/train/<class>/*.jpg, test/<class>/*.jpg           images (class folders sorted, then files)
    <root>/resnet101_2048/{train,test}.ft                    torch.save'd [N_images, 2048] ResNet-101
                                                             features (what the released code extracts)
    <root>/oc:3_msl:32/cub.vocab, cub.{train,test}.s32       optional: the released code's tokenised
                                                             captions; used as they are when present

<root> is data_dir or data_dir/cub. Caption i belongs to image i // 10, as in the released code.
Captions: tokens[:31] + <eos>, padded with <pad> to 32; the vocabulary is built from the training
captions: <exc> (0, also unknown words), <pad> (1), <eos> (2), then every word seen more than 3
times, in order of first appearance (the released code's rule; its vocabulary has 1590 words).
Items: ((image features [2048] or image [3, 64, 64], caption [32] long), -1).
"""
import collections
import json
import os
import re

import torch

from .base import PairedDataset, as_float_image
from .mnist_svhn import DataNotFoundError

MAX_LEN, MIN_OCC, CAPTIONS_PER_IMAGE = 32, 3, 10
SPECIALS = ("<exc>", "<pad>", "<eos>")
_TOKEN = re.compile(r"[A-Za-z0-9]+(?:[-'][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")
_CACHE = {}


def find_root(data_dir):
    if data_dir is None:
        raise ValueError("CUB experiments need argument 'data_dir': the unzipped cub directory of the paper's release")
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataNotFoundError(f"CUB data directory {data_dir!r} does not exist")
    for root in (data_dir, os.path.join(data_dir, "cub")):
        if os.path.isfile(os.path.join(root, "text_trainvalclasses.txt")) or os.path.isdir(os.path.join(root, "oc:3_msl:32")):
            return root
    raise DataNotFoundError(
        f"no CUB captions in {data_dir!r} or {os.path.join(data_dir, 'cub')!r}: expected text_trainvalclasses.txt "
        "and text_testclasses.txt (or oc:3_msl:32/cub.vocab with cub.train.s32, cub.test.s32); see docs/models-data.md"
    )


def tokenize(line):
    return _TOKEN.findall(line)


def read_captions(path):
    with open(path, encoding="utf-8") as f:
        return [tokenize(line) for line in f if line.strip()]


def build_vocab(captions, min_occ=MIN_OCC):
    """i2w list: the specials, then words seen more than min_occ times, in order of first appearance."""
    counts = collections.Counter(w for c in captions for w in c)
    seen, i2w = set(SPECIALS), list(SPECIALS)
    for c in captions:
        for w in c:
            if w not in seen and counts[w] > min_occ:
                seen.add(w)
                i2w.append(w)
    return i2w


def encode(captions, w2i, max_len=MAX_LEN):
    """[N, max_len] word indices: tokens[:max_len-1] + <eos>, padded with <pad>; unknown -> <exc>."""
    out = torch.full((len(captions), max_len), w2i["<pad>"], dtype=torch.long)
    for i, c in enumerate(captions):
        toks = c[: max_len - 1] + ["<eos>"]
        out[i, : len(toks)] = torch.tensor([w2i.get(w, w2i["<exc>"]) for w in toks])
    return out


def load_sentences(root):
    """(train [N, 32], test [N', 32], i2w)."""
    gen = os.path.join(root, f"oc:{MIN_OCC}_msl:{MAX_LEN}")
    files = [os.path.join(gen, n) for n in ("cub.vocab", f"cub.train.s{MAX_LEN}", f"cub.test.s{MAX_LEN}")]
    if all(os.path.isfile(p) for p in files):
        with open(files[0], encoding="utf-8") as f:
            vocab = json.load(f)
        i2w = [vocab["i2w"][str(i)] for i in range(len(vocab["i2w"]))]
        splits = []
        for p in files[1:]:
            with open(p, encoding="utf-8") as f:
                data = json.load(f)
            splits.append(torch.tensor([data[str(i)]["idx"] for i in range(len(data))], dtype=torch.long))
        return splits[0], splits[1], i2w
    paths = [os.path.join(root, n) for n in ("text_trainvalclasses.txt", "text_testclasses.txt")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataNotFoundError(f"CUB caption files not found: {', '.join(missing)}")
    train, test = read_captions(paths[0]), read_captions(paths[1])
    i2w = build_vocab(train)
    w2i = {w: i for i, w in enumerate(i2w)}
    return encode(train, w2i), encode(test, w2i), i2w


def load_features(root, split):
    path = os.path.join(root, "resnet101_2048", f"{split}.ft")
    if not os.path.isfile(path):
        raise DataNotFoundError(
            f"CUB image features not found: {path} (a [N_images, 2048] tensor of ResNet-101 features, "
            "torch.save'd; see docs/models-data.md for how to extract them)"
        )
    ft = torch.load(path, map_location="cpu")
    ft = torch.as_tensor(ft).float().reshape(len(ft), -1)
    if ft.shape[1] != 2048:
        raise ValueError(f"{path}: expected features of size 2048, got {tuple(ft.shape)}")
    return ft


def load_images(root, split, size=64):
    """uint8 [N, 3, size, size]: class folders sorted, files sorted (torchvision ImageFolder's order),
    resized to size x size with bilinear filtering."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("reading CUB images needs Pillow (pip install pillow)") from e
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataNotFoundError(f"CUB image folder not found: {folder} (class sub-folders of .jpg images)")
    exts = (".jpg", ".jpeg", ".png")
    paths = [
        os.path.join(folder, c, f)
        for c in sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        for f in sorted(os.listdir(os.path.join(folder, c)))
        if f.lower().endswith(exts)
    ]
    if not paths:
        raise DataNotFoundError(f"no images under {folder}")
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert("RGB").resize((size, size), Image.BILINEAR)
            out[i] = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(size, size, 3).permute(2, 0, 1)
    return out


def _identity(t):
    return t


def get_cub(data_dir, images=False):
    """(train, test) PairedDatasets of (image features or 3x64x64 images, caption) pairs."""
    root = find_root(data_dir)
    key = (os.path.abspath(root), bool(images))
    if key in _CACHE:
        return _CACHE[key]
    s_train, s_test, i2w = load_sentences(root)
    out = []
    for split, sents in (("train", s_train), ("test", s_test)):
        store = load_images(root, split) if images else load_features(root, split)
        if len(sents) != CAPTIONS_PER_IMAGE * len(store):
            raise ValueError(
                f"CUB {split}: {len(sents)} captions for {len(store)} images; expected {CAPTIONS_PER_IMAGE} per image"
            )
        idx = torch.arange(len(sents))
        ds = PairedDataset(
            [store, sents], [idx // CAPTIONS_PER_IMAGE, idx], torch.full((len(sents),), -1),
            ["cub-image" if images else "cub-features", "cub-sentences"],
            [as_float_image, _identity],
        )
        ds.i2w, ds.vocab_size = i2w, len(i2w)
        out.append(ds)
    _CACHE[key] = tuple(out)
    return _CACHE[key]
