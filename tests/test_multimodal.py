"""Any number of modalities and partially observed data: MMVAE with M = 1, 2, 5, absent modalities
(no encoder or decoder work, the placeholder contract), conditional generation from subsets,
missing-at-random masks, the five-modality datasets (offline default, PolyMNIST files)."""
import os

import numpy as np
import pytest
import torch
import torch.distributions as D

from mmvae_fast import objectives as O
from mmvae_fast.data import DataNotFoundError, MaskedDataset, get_datasets, missing_mask, split_batch, with_missing
from mmvae_fast.data.polydigits import group_within_class, textures
from mmvae_fast.models import MMVAE, Prior, build_model, poly_vae

SHAPE = (3, 12, 12)


def poly(M, L=4, seed=0):
    torch.manual_seed(seed)
    prior = Prior(L, D.Laplace, "softmax", learn_prior=True)
    return MMVAE([poly_vae("polydigits", m, L, hidden=16, prior=prior) for m in range(M)], prior)


def data(M, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(B, *SHAPE, generator=g) for _ in range(M)]


class Calls:
    """Counts the calls of every encoder and decoder of a model."""

    def __init__(self, model):
        self.enc, self.dec = [0] * len(model.vaes), [0] * len(model.vaes)
        for m, vae in enumerate(model.vaes):
            vae.enc.register_forward_hook(lambda *_, m=m: self.enc.__setitem__(m, self.enc[m] + 1))
            vae.dec.register_forward_hook(lambda *_, m=m: self.dec.__setitem__(m, self.dec[m] + 1))


@pytest.mark.parametrize("M", [1, 2, 5])
def test_mmvae_with_m_modalities_runs_every_objective(M):
    model, x, K, B = poly(M), data(M), 3, 3
    qz_xs, px_zs, zss = model(x, K)
    assert len(qz_xs) == len(zss) == len(px_zs) == M
    assert all(len(row) == M and all(p.loc.shape == (K, B, *SHAPE) for p in row) for row in px_zs)
    for name in ("m_elbo", "m_iwae", "m_iwae_looser", "m_dreg", "m_dreg_looser"):
        model.zero_grad()
        v = getattr(O, name)(model, x, K)
        v.backward()
        assert torch.isfinite(v)
        assert all(any(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.dec.parameters())
                   for vae in model.vaes)
    if M == 1:  # one expert: the mixture is the expert, the MoE bound is the single-modality IWAE
        torch.manual_seed(5)
        a = O.m_iwae(model, x, K)
        torch.manual_seed(5)
        b = O.iwae(model.vaes[0], x[0], K)
        torch.testing.assert_close(a, b)


def test_absent_modalities_cost_no_encoder_or_decoder_work():
    model, x = poly(5), data(5)
    calls = Calls(model)
    model(x, K=2)
    assert calls.enc == [1] * 5 and calls.dec == [5] * 5  # each decoder: every expert's samples
    calls.enc, calls.dec = [0] * 5, [0] * 5
    x[1] = None
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[3] = False  # absent from the whole batch through the mask, though its data is given
    model(x, K=2, mask=mask)
    assert calls.enc == [1, 0, 1, 0, 1] and calls.dec == [3, 0, 3, 0, 3]


def test_placeholders_of_absent_modalities():
    model, x, K, B, L = poly(5), data(5), 3, 3, 4
    x[2] = None
    qz_xs, px_zs, zss = model(x, K)
    q = qz_xs[2]
    assert type(q) is D.Laplace and q.loc.shape == q.scale.shape == (B, L)
    assert bool(torch.isfinite(q.loc).all()) and bool((q.scale > 0).all())
    assert q.loc.stride() == (0, 0) and zss[2].stride() == (0, 0, 0)  # expand()ed views: no compute
    assert zss[2].shape == (K, B, L) and bool(torch.isfinite(zss[2]).all())
    for r in range(5):
        for d in range(5):
            assert (px_zs[r][d] is None) == (2 in (r, d))
    # the present experts are those of the full forward on the same noise
    torch.manual_seed(3)
    full = model(data(5), K)
    torch.manual_seed(3)
    x = data(5)
    x[2] = None
    part = model(x, K)
    torch.testing.assert_close(part[0][4].loc, full[0][4].loc)
    torch.testing.assert_close(part[1][0][4].loc, full[1][0][4].loc)


def test_every_modality_absent_or_bad_mask_is_an_error():
    model = poly(2)
    with pytest.raises(ValueError, match="absent"):
        model([None, None], 2)
    with pytest.raises(ValueError, match="mask"):
        model(data(2), 2, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="modalities"):
        model(data(3), 2)


def test_conditional_generation_from_subsets():
    model, x = poly(5), data(5, B=64)
    calls = Calls(model)
    g = torch.Generator().manual_seed(0)
    out = model.generate_from(x, [1, 3], generator=g)
    assert [o.shape for o in out] == [(64, *SHAPE)] * 5
    assert calls.enc == [0, 1, 0, 1, 0] and calls.dec == [1] * 5  # only the given ones are encoded
    # each item decodes the posterior mean of one of the given experts, both chosen for some items
    z1, z3 = model.vaes[1].encode(x[1])[0], model.vaes[3].encode(x[3])[0]
    means = [model.vaes[0].decode(z).loc for z in (z1, z3)]
    is1 = torch.isclose(out[0], means[0]).flatten(1).all(1)
    is3 = torch.isclose(out[0], means[1]).flatten(1).all(1)
    assert bool((is1 | is3).all()) and 10 < int(is1.sum()) < 54
    # one given modality: the decoder at its posterior mean, i.e. reconstruct()'s row
    torch.testing.assert_close(model.generate_from(x, [2])[4], model.reconstruct(x)[2][4])
    # with a mask the choice keeps to the experts an item has
    mask = torch.ones(5, 64, dtype=torch.bool)
    mask[1, :32] = False
    out = model.generate_from(x, [1, 3], mask=mask, generator=g)
    assert torch.isclose(out[0][:32], means[1][:32]).all()
    with pytest.raises(ValueError, match="none of the given"):
        model.generate_from(x, [1], mask=mask)
    with pytest.raises(ValueError, match="given"):
        model.generate_from(x, [5])


def test_missing_masks_ratio_at_least_one_present_deterministic():
    m = missing_mask(20000, 5, 0.5, seed=3)
    assert m.shape == (20000, 5) and m.dtype == torch.bool
    assert bool(m.any(1).all())
    # P(absent | at least one present) = p (1 - p^(M-1)) / (1 - p^M) for independent absences
    p = 0.5
    expect = p * (1 - p ** 4) / (1 - p ** 5)
    assert abs((~m).float().mean().item() - expect) < 0.01
    assert torch.equal(m, missing_mask(20000, 5, 0.5, seed=3))
    assert not torch.equal(m, missing_mask(20000, 5, 0.5, seed=4))
    assert bool(missing_mask(10, 3, 0.0).all())
    with pytest.raises(ValueError, match="ratio"):
        missing_mask(10, 3, 1.0)


def test_masked_dataset_items_and_batches():
    train, _ = get_datasets("polydigits")
    ds = with_missing(train, 0.5, seed=0)
    assert isinstance(ds, MaskedDataset) and len(ds) == len(train)
    i = int(torch.nonzero(~ds.mask.all(1))[0])
    xs, y, m = ds[i]
    full, y0 = train[i]
    assert y == y0 and m.dtype == torch.bool
    for j in range(5):
        assert torch.equal(xs[j], full[j]) if m[j] else not bool(xs[j].any())  # absent ones zeroed
    xs, labels, mask = ds.batch(range(10))
    assert mask.shape == (5, 10) and torch.equal(mask, ds.mask[:10].T)
    assert not bool(xs[0][~mask[0]].any())
    loader = torch.utils.data.DataLoader(ds, batch_size=10)
    bx, by, bmask = split_batch(next(iter(loader)))
    assert torch.equal(bmask, mask) and torch.equal(bx[2], xs[2])
    assert split_batch(next(iter(torch.utils.data.DataLoader(train, batch_size=4))))[2] is None
    # get_datasets: the train split masked by the data seed, the test split complete
    tr, te = get_datasets("polydigits", missing_ratio=0.5)
    assert torch.equal(tr.mask, ds.mask) and not isinstance(te, MaskedDataset)


def test_polydigits_items_classes_and_split():
    train, test = get_datasets("polydigits")
    (xs, y), = [train[0]]
    assert len(xs) == 5 and all(x.shape == SHAPE and x.dtype == torch.float32 for x in xs)
    assert 0 <= y <= 9
    # the five digits of an item are different source instances of the item's class
    from mmvae_fast.data.digits import load_sources

    _, labels = load_sources()
    src = train.sources
    assert bool((labels[src] == train.labels[:, None]).all())
    assert all(len(set(r.tolist())) == 5 for r in src[:500])
    assert not set(src.flatten().tolist()) & set(test.sources.flatten().tolist())  # split by source
    # the modalities' styles: five distinct background images, kept away from 0.5 so the inverted
    # stroke always contrasts
    tex = textures()
    assert tex.shape[:2] == (5, 3)
    diff = (tex[:, None] - tex[None]).abs().mean((2, 3, 4))
    assert diff[~torch.eye(5, dtype=torch.bool)].min() > 0.2
    assert bool(((tex <= 0.25) | (tex >= 0.75)).all())


def test_group_within_class_counts():
    ids, labels = torch.arange(30), torch.arange(30) % 3
    src = group_within_class(ids, labels, 2, 5, torch.Generator().manual_seed(0))
    assert src.shape == (60, 5)
    for m in range(5):  # every id dm times per modality
        assert torch.equal(torch.bincount(src[:, m], minlength=30), torch.full((30,), 2))
    with pytest.raises(ValueError, match="instances"):
        group_within_class(ids[:9], labels[:9], 1, 5, torch.Generator())


def _fake_polymnist(root, n=(4, 3)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in zip(("train", "test"), n):
        for m in range(5):
            d = os.path.join(root, "PolyMNIST", split, f"m{m}")
            os.makedirs(d)
            for i in range(count):
                img = np.full((28, 28, 3), 10 * m + i, dtype=np.uint8)
                img[0, 0] = rng.integers(0, 255, 3)
                Image.fromarray(img).save(os.path.join(d, f"{i}.{(i * 3) % 10}.png"))


def test_polymnist_loader_reads_the_released_layout(tmp_path):
    _fake_polymnist(str(tmp_path))
    train, test = get_datasets("polymnist", data_dir=str(tmp_path))
    assert len(train) == 4 and len(test) == 3
    xs, y = train[2]
    assert y == 6 and [x.shape for x in xs] == [(3, 28, 28)] * 5
    assert xs[4][0, 5, 5].item() == pytest.approx((10 * 4 + 2) / 255)  # modality 4, index 2
    model = build_model("polymnist", latent_dim=4)
    xs, labels = train.batch(range(4))
    qz_xs, px_zs, _ = model(xs, K=2)
    assert px_zs[0][3].loc.shape == (2, 4, 3, 28, 28)
    # the PolyMNIST folder itself works too
    assert len(get_datasets("polymnist", data_dir=str(tmp_path / "PolyMNIST"))[1]) == 3


def test_polymnist_missing_files_name_the_layout(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"PolyMNIST/\{train,test\}/m0..m4/<index>.<label>.png"):
        get_datasets("polymnist", data_dir=str(tmp_path))
    with pytest.raises(DataNotFoundError, match="--data-dir"):
        get_datasets("polymnist")
    _fake_polymnist(str(tmp_path))
    os.remove(tmp_path / "PolyMNIST" / "train" / "m3" / "1.3.png")
    from mmvae_fast.data import polymnist

    polymnist._CACHE.clear()
    with pytest.raises(ValueError, match="m3"):
        get_datasets("polymnist", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------------------------
# Training and evaluation on five modalities, incomplete data, large K
# ----------------------------------------------------------------------------------------------

import argparse  # noqa: E402
import json  # noqa: E402

from mmvae_fast import cli  # noqa: E402
from mmvae_fast import evaluate as E  # noqa: E402
from mmvae_fast import train as T  # noqa: E402

TINY = ["--experiment", "polydigits", "--K", "4", "--batch-size", "16", "--latent-dim", "4", "--limit", "32",
        "--device", "cpu", "--missing-ratio", "0.5", "--k-chunk", "2"]


def _parse(argv):
    p = argparse.ArgumentParser()
    T.add_arguments(p)
    return p.parse_args(argv)


def test_cli_flags_parse_and_are_checked():
    a = T.resolve_args(_parse(TINY))
    assert a.missing_ratio == 0.5 and a.k_chunk == 2 and a.experiment == "polydigits"
    d = T.resolve_args(_parse([]))
    assert d.missing_ratio == 0.0 and d.k_chunk is None
    with pytest.raises(ValueError, match="--missing-ratio"):
        T.resolve_args(_parse(["--missing-ratio", "1"]))
    with pytest.raises(ValueError, match="--k-chunk"):
        T.resolve_args(_parse(["--k-chunk", "0"]))
    with pytest.raises(ValueError, match="--k-chunk"):
        T.resolve_args(_parse(["--obj", "elbo", "--k-chunk", "2"]))
    # a run from before the options existed resumes with their defaults
    stored = {k: v for k, v in vars(T.resolve_args(_parse([]))).items() if k not in ("missing_ratio", "k_chunk")}
    r = T.resolve_args(argparse.Namespace(resume="x", out=None), stored)
    assert r.missing_ratio == 0.0 and r.k_chunk is None


def test_k_chunk_reaches_the_objective(monkeypatch):
    seen = {}

    def fake(model, x, K, *, grad=None, k_chunk=None):
        seen.update(K=K, k_chunk=k_chunk, grad=grad)
        return torch.zeros(())

    monkeypatch.setattr(T, "_objective_fn", lambda obj, looser: fake)
    f, _ = T.make_objective("dreg", True, "mixture", k_chunk=3)
    f(None, [], 12)
    assert seen == dict(K=12, k_chunk=3, grad="mixture") and not f.takes_mask


def _masked(monkeypatch, record):
    """Objectives that take mask= (recording what they get) over the real unmasked ones."""
    real = T._objective_fn

    def objective_fn(obj, looser):
        fn = real(obj, looser)

        def masked(model, x, K, mask=None, **kw):
            record.append(mask)
            return fn(model, x, K, **kw)
        return masked

    monkeypatch.setattr(T, "_objective_fn", objective_fn)


def test_tiny_train_and_resume_with_missing_data_and_k_chunk(tmp_path, monkeypatch):
    if not T.takes_mask(O.m_dreg_looser):
        with pytest.raises(ValueError, match="mask="):
            T.train(_parse(TINY + ["--epochs", "1", "--out", str(tmp_path / "no")]))
        seen = []
        _masked(monkeypatch, seen)
    else:
        seen = None
    full, _ = T.train(_parse(TINY + ["--epochs", "2", "--out", str(tmp_path / "full")]))
    T.train(_parse(TINY + ["--epochs", "1", "--out", str(tmp_path / "part")]))
    resumed, a = T.train(_parse(["--resume", str(tmp_path / "part"), "--epochs", "2"]))
    assert a.missing_ratio == 0.5 and a.k_chunk == 2
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    rec = [json.loads(ln) for ln in open(tmp_path / "part" / "metrics.jsonl")]
    assert [r["epoch"] for r in rec] == [1, 2] and rec[0]["missing_ratio"] == 0.5 and rec[0]["k_chunk"] == 2
    if seen is not None:  # the objective got the data's masks: [M, B], every absent item counted
        train_set, _ = get_datasets("polydigits", missing_ratio=0.5)
        sub = T.subset(train_set, 32)
        want = int((~train_set.mask[sub.indices]).sum())
        epoch1 = seen[:2]  # two batches of 16
        assert all(m.shape == (5, 16) and m.dtype == torch.bool for m in epoch1)
        assert int(sum((~m).sum() for m in epoch1)) == want > 0


def test_evaluate_five_modalities_by_subset_size(tmp_path):
    out = str(tmp_path / "run")
    T.train(_parse(["--experiment", "polydigits", "--K", "2", "--batch-size", "16", "--latent-dim", "4",
                    "--limit", "32", "--epochs", "1", "--device", "cpu", "--out", out]))
    cdir = str(tmp_path / "clf")
    E.train_classifiers("polydigits", cdir, epochs=1, max_train=256, verbose=False)
    res = E.evaluate(out, classifiers=cdir, ll_K=0, n_joint=100, latent_n=100, limit=50, device="cpu", verbose=False)
    assert len(res["subset_coherence"]) == 31  # every non-empty subset of five
    by = res["coherence_by_size"]
    assert list(by) == ["1", "2", "3", "4", "5"] and by["5"]["missing"] is None
    acc = res["subset_coherence"]
    m1 = [v[d] for S, v in acc.items() if S.count("m") == 1 for d in range(5) if f"m{d}" not in S.split(",")]
    assert by["1"]["missing"] == pytest.approx(sum(m1) / 20)
    # one given modality is cross generation: the same numbers as cross_coherence
    assert acc["m0"][3] == pytest.approx(res["cross_coherence"]["m1->m4"])
    table = E.markdown_table(res)
    assert "| coherence, missing modalities |" in table and "4 given" in table
    assert cli.main(["evaluate", out, "--classifiers", cdir, "--ll-K", "0", "--n-joint", "50", "--latent-n", "50",
                     "--limit", "20"]) == 0
