"""Datasets: MNIST-SVHN pairing and readers (on small fake files), the offline digits, CUB (fake files)."""
import gzip
import json
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mmvae_fast.data import DataNotFoundError, get_datasets, pair_indices, read_idx
from mmvae_fast.data import cub as cub_mod
from mmvae_fast.data import digits as digits_mod
from mmvae_fast.models import build_model
from mmvae_fast import objectives as O

# ---------------------------------------------------------------------------------------------
# pairing
# ---------------------------------------------------------------------------------------------


def fake_labels(counts, seed):
    g = torch.Generator().manual_seed(seed)
    lab = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return lab[torch.randperm(len(lab), generator=g)]


@pytest.mark.parametrize("dm,max_per_class", [(1, 100), (3, 100), (4, 5)])
def test_pairing_labels_counts_and_dm(dm, max_per_class):
    la = fake_labels([7, 3, 9, 0, 4], seed=1)
    lb = fake_labels([5, 6, 2, 3, 8], seed=2)
    ia, ib = pair_indices(la, lb, dm=dm, max_per_class=max_per_class, seed=0)
    assert ia.dtype == ib.dtype == torch.long and len(ia) == len(ib)
    assert torch.equal(la[ia], lb[ib])  # every pair shows the same digit
    for c, (na, nb) in enumerate(zip([7, 3, 9, 0, 4], [5, 6, 2, 3, 8])):
        n = min(na, nb, max_per_class)
        assert int((la[ia] == c).sum()) == dm * n
        for lab, idx in ((la, ia), (lb, ib)):
            first = torch.nonzero(lab == c).flatten()[:n]  # the first n of the class, dataset order
            used = idx[lab[idx] == c]
            assert set(used.tolist()) == set(first.tolist())
            assert all(int((used == i).sum()) == dm for i in first)  # each exactly dm times


def test_pairing_is_seeded_and_grouped():
    la, lb = fake_labels([6, 6, 6], 3), fake_labels([6, 6, 6], 4)
    a1, b1 = pair_indices(la, lb, dm=5, seed=7)
    a2, b2 = pair_indices(la, lb, dm=5, seed=7)
    a3, b3 = pair_indices(la, lb, dm=5, seed=8)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not (torch.equal(a1, a3) and torch.equal(b1, b3))
    # grouped by class then by permutation, as the paper's index files
    assert torch.equal(la[a1], torch.arange(3).repeat_interleave(30))
    # the dm permutations of one class are independent: not all identical
    blocks = a1[:30].reshape(5, 6)
    assert not all(torch.equal(blocks[0], blocks[k]) for k in range(1, 5))


def test_pairing_svhn_label_ten_and_bad_args():
    la = torch.tensor([0, 0, 1, 1])
    lb = torch.tensor([10, 1, 10, 1]) % 10  # what the SVHN reader gives
    ia, ib = pair_indices(la, lb, dm=2)
    assert torch.equal(la[ia], lb[ib]) and len(ia) == 8
    with pytest.raises(ValueError, match="dm"):
        pair_indices(la, lb, dm=0)
    with pytest.raises(ValueError, match="max_per_class"):
        pair_indices(la, lb, max_per_class=0)


# ---------------------------------------------------------------------------------------------
# MNIST / SVHN readers on fake files
# ---------------------------------------------------------------------------------------------


def write_idx(path, arr):
    code = {np.uint8: 0x08}[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    data = header + arr.tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(data)


def make_fake_mnist_svhn(root, n_mnist=(40, 20), n_svhn=(30, 25), seed=0):
    """torchvision-like layout: MNIST/raw/*.gz (train) and plain idx (test); SVHN .mat at the root."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw)
    out = {}
    for split, n, ext in (("train", n_mnist[0], ".gz"), ("t10k", n_mnist[1], "")):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labs = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labs)
        write_idx(os.path.join(raw, f"{split}-images-idx3-ubyte{ext}"), imgs)
        write_idx(os.path.join(raw, f"{split}-labels-idx1-ubyte{ext}"), labs)
        out[f"mnist-{split}"] = (imgs, labs)
    for split, n in (("train", n_svhn[0]), ("test", n_svhn[1])):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (rng.integers(0, 10, (n, 1)) + 1).astype(np.uint8)  # 1..10, 10 meaning 0
        savemat(os.path.join(root, f"{split}_32x32.mat"), {"X": x, "y": y})
        out[f"svhn-{split}"] = (x, y)
    return out


def test_read_idx_round_trip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "b-idx3-ubyte.gz"):
        write_idx(str(tmp_path / name), arr)
        assert np.array_equal(read_idx(str(tmp_path / name)), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="IDX"):
        read_idx(str(tmp_path / "bad"))


def test_mnist_svhn_from_fake_files(tmp_path):
    raw = make_fake_mnist_svhn(str(tmp_path))
    train, test = get_datasets("mnist-svhn", data_dir=str(tmp_path), seed=0, dm=3, download=False)
    mi, ml = raw["mnist-train"]
    sx, sy = raw["svhn-train"]
    sl = sy.reshape(-1).astype(np.int64) % 10
    ia, ib = train.index
    assert torch.equal(train.labels, torch.from_numpy(ml.astype(np.int64))[ia])
    assert np.array_equal(ml[ia.numpy()], sl[ib.numpy()])  # labels of every pair agree, 10 -> 0
    expected = sum(3 * min(int((ml == c).sum()), int((sl == c).sum())) for c in range(10))
    assert len(train) == expected
    (x_m, x_s), y = train[5]
    assert x_m.shape == (1, 28, 28) and x_s.shape == (3, 32, 32) and x_m.dtype == torch.float32
    torch.testing.assert_close(x_m[0], torch.from_numpy(mi[int(ia[5])]).float() / 255)
    torch.testing.assert_close(x_s, torch.from_numpy(sx[..., int(ib[5])]).permute(2, 0, 1).float() / 255)
    assert y == int(sl[int(ib[5])])
    assert len(test) > 0 and torch.equal(test.labels, torch.from_numpy(raw["mnist-t10k"][1].astype(np.int64))[test.index[0]])
    # batches feed the MNIST-SVHN model unchanged
    (xb, yb) = next(iter(DataLoader(train, batch_size=4)))
    value = O.m_iwae_looser(build_model("mnist-svhn", latent_dim=4), list(xb), K=2)
    assert torch.isfinite(value) and yb.shape == (4,)


def test_mnist_svhn_missing_files_are_named(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        get_datasets("mnist-svhn", data_dir=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(DataNotFoundError, match="train-images-idx3-ubyte"):
        get_datasets("mnist-svhn", data_dir=str(tmp_path), download=False)
    with pytest.raises(ValueError, match="data_dir"):
        get_datasets("mnist-svhn", data_dir=None)


def test_unknown_experiment():
    with pytest.raises(ValueError, match="experiment"):
        get_datasets("svhn")


# ---------------------------------------------------------------------------------------------
# the offline digits
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return get_datasets("digits", seed=0, dm=2)


def test_digits_shapes_ranges_and_labels(digits):
    images, labels = digits_mod.load_sources()
    for ds in digits:
        (x1, x2), y = ds[0]
        assert x1.shape == (1, 16, 16) and x2.shape == (3, 16, 16)
        assert tuple(x.shape for x in (x1, x2)) == digits_mod.SHAPES
        xs, ys = ds.batch(torch.arange(len(ds)))
        for x in xs:
            assert x.dtype == torch.float32 and float(x.min()) >= 0 and float(x.max()) <= 1
        assert ys.dtype == torch.long and set(ys.tolist()) == set(range(10))
        # both modalities show the same digit, drawn from two different handwriting instances
        assert torch.equal(labels[ds.sources[:, 0]], ys) and torch.equal(labels[ds.sources[:, 1]], ys)
        assert bool((ds.sources[:, 0] != ds.sources[:, 1]).all())
        # the grey image is the upsampled source digit (to the 8-bit rounding of the store)
        assert (xs[0] - digits_mod.grey(images[ds.sources[:, 0]])).abs().max() <= 0.5 / 255 + 1e-6
        # the colour image is not grey and its backgrounds vary
        assert float((xs[1][:, 0] - xs[1][:, 1]).abs().mean()) > 0.05
        assert float(xs[1].mean((2, 3)).std(0).mean()) > 0.05


def test_digits_colour_shows_the_second_source_digit(digits):
    """The colour image's luminance contrast follows the second source's strokes: its correlation
    with the upsampled second source beats the one with the first source (a different instance)."""
    images, _ = digits_mod.load_sources()
    xs, _ = digits[1].batch(torch.arange(200))
    luma = (xs[1] * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1).flatten(1)
    def corr(src):
        g = digits_mod.grey(images[src]).flatten(1)
        a, b = luma - luma.mean(1, keepdim=True), g - g.mean(1, keepdim=True)
        return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).abs()
    assert float(corr(digits[1].sources[:200, 1]).mean()) > float(corr(digits[1].sources[:200, 0]).mean()) + 0.05


def test_digits_split_by_source_and_counts(digits):
    train, test = digits
    src_train = set(train.sources.flatten().tolist())
    src_test = set(test.sources.flatten().tolist())
    assert not src_train & src_test  # no handwriting instance in both splits
    assert len(src_train) + len(src_test) == 1797
    assert 0.15 < len(src_test) / 1797 < 0.25
    # each source digit appears dm = 2 times on each side
    counts = torch.bincount(train.sources[:, 0], minlength=1797)
    assert set(counts[list(src_train)].tolist()) == {2}
    assert len(train) == 2 * len(src_train)


def test_digits_deterministic_and_seeded(monkeypatch):
    monkeypatch.setattr(digits_mod, "_CACHE", {})
    a, _ = digits_mod.get_digits(seed=3, dm=1)
    monkeypatch.setattr(digits_mod, "_CACHE", {})
    b, _ = digits_mod.get_digits(seed=3, dm=1)
    c, _ = digits_mod.get_digits(seed=4, dm=1)
    assert a is not b
    for s1, s2 in zip(a.stores, b.stores):
        assert torch.equal(s1, s2)
    assert torch.equal(a.sources, b.sources)
    assert not torch.equal(a.stores[1], c.stores[1])
    assert digits_mod.get_digits(seed=4, dm=1)[0] is c  # cached in memory
    # the split does not depend on the seed, so test sets of different seeds share their sources
    assert set(a.sources.flatten().tolist()) == set(c.sources.flatten().tolist())


def test_digits_batches_run_the_digits_model(digits):
    xs, ys = next(iter(DataLoader(digits[0], batch_size=8, shuffle=True)))
    model = build_model("digits", latent_dim=4)
    value = O.m_dreg_looser(model, list(xs), K=2)
    value.backward()
    assert torch.isfinite(value)


def test_digits_bad_dm():
    with pytest.raises(ValueError, match="dm"):
        get_datasets("digits", dm=0)


# ---------------------------------------------------------------------------------------------
# CUB on fake files in the release's layout
# ---------------------------------------------------------------------------------------------

WORDS = ["this", "bird", "has", "a", "red", "crown", "and", "black", "wings", "small", "yellow", "beak"]


def make_fake_cub(root, n_train=2, n_test=1, images=True, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    cub = os.path.join(root, "cub")
    for split, fname, n in (("train", "text_trainvalclasses.txt", n_train), ("test", "text_testclasses.txt", n_test)):
        os.makedirs(os.path.join(cub, "resnet101_2048"), exist_ok=True)
        torch.save(torch.rand(n, 2048), os.path.join(cub, "resnet101_2048", f"{split}.ft"))
        lines = []
        for _ in range(10 * n):
            k = int(rng.integers(3, 40))
            lines.append(" ".join(rng.choice(WORDS, k)) + " zzz-word .")
        with open(os.path.join(cub, fname), "w") as f:
            f.write("\n".join(lines) + "\n")
        if images:
            for i in range(n):
                d = os.path.join(cub, split, f"{i:03d}.Bird")
                os.makedirs(d, exist_ok=True)
                arr = rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)
                Image.fromarray(arr).save(os.path.join(d, f"img_{i}.jpg"))
    return cub


def test_cub_features_from_fake_release(tmp_path):
    cub = make_fake_cub(str(tmp_path), images=False)
    train, test = get_datasets("cub-features", data_dir=str(tmp_path))
    assert len(train) == 20 and len(test) == 10
    feats = torch.load(os.path.join(cub, "resnet101_2048", "train.ft"))
    (f, s), y = train[13]
    assert y == -1 and f.shape == (2048,) and s.shape == (32,) and s.dtype == torch.long
    torch.testing.assert_close(f, feats[1])  # caption i belongs to image i // 10
    i2w = train.i2w
    assert i2w[:3] == ["<exc>", "<pad>", "<eos>"] and train.vocab_size == len(i2w)
    assert "zzz-word" in i2w and "." in i2w  # seen > 3 times; punctuation is a token
    # the caption decodes back to its line: tokens, <eos>, then <pad>
    with open(os.path.join(cub, "text_trainvalclasses.txt")) as fh:
        line = fh.read().splitlines()[13].split()
    words = [i2w[i] for i in s.tolist()]
    n = min(len(line), 31)
    assert words[:n] == line[:n] and words[n] == "<eos>" and set(words[n + 1:]) <= {"<pad>"}
    # batches feed the CUB features model (vocabulary from the data)
    xs, ys = train.batch(torch.arange(4))
    model = build_model("cub-features", latent_dim=4, vocab_size=train.vocab_size)
    assert torch.isfinite(O.m_dreg_looser(model, xs, K=2)) and bool((ys == -1).all())


def test_cub_unknown_words_and_released_cache(tmp_path):
    captions = [["b", "a"]] * 4 + [["a", "c", "d"]] * 3
    i2w = cub_mod.build_vocab(captions)
    assert i2w == ["<exc>", "<pad>", "<eos>", "b", "a"]  # first-appearance order; c, d seen only 3 times
    w2i = {w: i for i, w in enumerate(i2w)}
    enc = cub_mod.encode([["a", "zzz"] + ["b"] * 40], w2i)
    assert enc.shape == (1, 32) and enc[0, 1] == 0 and enc[0, 31] == w2i["<eos>"]
    # the released code's tokenised json files are used as they are
    root = tmp_path / "cub"
    gen = root / "oc:3_msl:32"
    gen.mkdir(parents=True)
    vocab = {"w2i": {"<exc>": 0, "<pad>": 1, "<eos>": 2, "bird": 3}, "i2w": {"0": "<exc>", "1": "<pad>", "2": "<eos>", "3": "bird"}}
    (gen / "cub.vocab").write_text(json.dumps(vocab))
    for split, n in (("train", 10), ("test", 10)):
        data = {str(i): {"idx": [3, 2] + [1] * 30, "length": 2} for i in range(n)}
        (gen / f"cub.{split}.s32").write_text(json.dumps(data))
        (root / "resnet101_2048").mkdir(exist_ok=True)
        torch.save(torch.rand(1, 2048), root / "resnet101_2048" / f"{split}.ft")
    train, _ = cub_mod.get_cub(str(tmp_path))
    assert train.i2w == ["<exc>", "<pad>", "<eos>", "bird"]
    assert train[3][0][1].tolist() == [3, 2] + [1] * 30


def test_cub_images_from_fake_release(tmp_path):
    make_fake_cub(str(tmp_path), n_train=2, n_test=1, images=True)
    train, test = get_datasets("cub-images-sentences", data_dir=str(tmp_path))
    (img, s), y = train[15]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and 0 <= float(img.min()) <= float(img.max()) <= 1
    assert torch.equal(train.index[0], torch.arange(20) // 10)
    xs, _ = test.batch(torch.arange(3))
    model = build_model("cub-images-sentences", latent_dim=4, vocab_size=train.vocab_size)
    assert torch.isfinite(O.m_iwae(model, xs, K=1))


def test_cub_missing_files_are_named(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        get_datasets("cub-features", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFoundError, match="text_trainvalclasses.txt"):
        get_datasets("cub-features", data_dir=str(tmp_path))
    cub = make_fake_cub(str(tmp_path), images=False)
    os.remove(os.path.join(cub, "resnet101_2048", "test.ft"))
    with pytest.raises(DataNotFoundError, match="test.ft"):
        get_datasets("cub-features", data_dir=str(tmp_path))
    with pytest.raises(DataNotFoundError, match="image folder"):
        get_datasets("cub-images-sentences", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="data_dir"):
        get_datasets("cub-features")
