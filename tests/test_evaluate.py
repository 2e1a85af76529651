"""Evaluation: coherence against stand-ins with known answers, the log-likelihood estimator against
an exact marginal, and a tiny trained run end to end."""
import argparse
import json
import math

import pytest
import torch
import torch.distributions as D
import torch.nn as nn
from torch.utils.data import DataLoader

from mmvae_fast import evaluate as E
from mmvae_fast import train as T
from mmvae_fast.data import get_datasets


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """Digit classifiers trained briefly (saved, then reloaded as evaluate does)."""
    d = str(tmp_path_factory.mktemp("clf"))
    clfs, accs = E.train_classifiers("digits", d, epochs=2, max_train=2048, verbose=False)
    loaded, ck = E.load_classifiers(E.classifier_path(d, "digits"))
    x = torch.rand(8, *clfs[1].shape)
    assert torch.equal(clfs[1].predict(x), loaded[1].predict(x))  # saved and reused as trained
    return d, loaded


@pytest.fixture(scope="module")
def test_loader():
    _, test = get_datasets("digits")
    return DataLoader(T.subset(test, 300), batch_size=100)


class PairedStandIn(nn.Module):
    """Cross-generation returns the true paired data; generate() hands out given pairs in order."""

    def __init__(self, pairs):
        super().__init__()
        self.pairs, self.i = pairs, 0

    def reconstruct(self, x):
        return [[x[d] for d in range(len(x))] for _ in x]

    def generate(self, N):  # the next N pairs
        self.i += N
        return [p[self.i - N:self.i] for p in self.pairs]


def test_cross_coherence_of_true_pairs_is_classifier_accuracy(classifiers, test_loader):
    _, clfs = classifiers
    acc = E.classifier_accuracy(clfs, test_loader)
    assert max(acc) > 0.3  # a classifier learnt something, so the comparison means something
    cc = E.cross_coherence(PairedStandIn(None), test_loader, clfs)
    assert cc[0][1] == pytest.approx(acc[1], abs=1e-6)  # m1 -> m2: classifier 2 on the true m2
    assert cc[1][0] == pytest.approx(acc[0], abs=1e-6)


def test_joint_coherence_counts_agreement(classifiers, test_loader):
    _, clfs = classifiers
    xs = [torch.cat(t) for t in zip(*(b for b, _ in test_loader))]
    pred = [c.predict(x) for c, x in zip(clfs, xs)]
    expect = (pred[0] == pred[1]).double().mean().item()
    assert E.joint_coherence(PairedStandIn(xs), clfs, n=len(xs[0]), batch=128) == pytest.approx(expect)
    # A generator whose second modality is the first's pairs shifted by one class-block disagrees more.
    assert E.joint_coherence(PairedStandIn([xs[0], xs[1].roll(37, 0)]), clfs, n=len(xs[0])) < expect


class ExactPosterior(nn.Module):
    """z ~ N(0, 1) (L=1), x_d = z + N(0, s_d^2); both experts *are* the exact joint posterior, so
    every importance weight equals p(x_1, x_2) and any K gives the exact log-likelihood."""

    def __init__(self, s=(0.5, 0.8), width=1.0):
        super().__init__()
        self.s, self.width = s, width
        self.pz, self.pz_params = D.Normal, (torch.zeros(1, 1), torch.ones(1, 1))

    def forward(self, x, K=1):
        prec = 1 + sum(1 / s**2 for s in self.s)
        mean = sum(xd / s**2 for xd, s in zip(x, self.s)) / prec
        q = D.Normal(mean, torch.full_like(mean, self.width * prec**-0.5))
        zss = [q.rsample(torch.Size([K])) for _ in x]
        px = [[D.Normal(z, torch.tensor(s)) for s in self.s] for z in zss]
        return [q, q], px, zss

    def exact(self, x):
        s1, s2 = self.s
        cov = torch.tensor([[1 + s1**2, 1.0], [1.0, 1 + s2**2]])
        return D.MultivariateNormal(torch.zeros(2), cov).log_prob(torch.cat(x, 1))


def test_iwae_log_likelihood_is_exact_at_the_true_posterior():
    torch.manual_seed(0)
    model = ExactPosterior()
    x = [torch.randn(40, 1) * 1.5, torch.randn(40, 1) * 1.5]
    ll = E.iwae_log_likelihood(model, x, K=50, max_samples=160)  # 4 samples per chunk: 13 chunks
    assert ll.shape == (40,)
    torch.testing.assert_close(ll, model.exact(x), rtol=0, atol=1e-4)


def test_iwae_log_likelihood_is_a_bound_that_tightens_with_K():
    """A posterior too narrow by half: the estimate is below the exact value, less so for large K."""
    torch.manual_seed(0)
    model = ExactPosterior(width=0.5)
    x = [torch.randn(200, 1), torch.randn(200, 1)]
    exact = model.exact(x).mean()
    small = E.iwae_log_likelihood(model, x, K=2).mean()
    large = E.iwae_log_likelihood(model, x, K=400).mean()
    assert small < large < exact + 1e-3


def test_evaluate_a_tiny_trained_run(classifiers, tmp_path):
    cdir, _ = classifiers
    ns = argparse.Namespace(experiment="digits", obj="dreg", looser=True, K=2, batch_size=16, latent_dim=4,
                            limit=32, epochs=1, device="cpu", out=str(tmp_path / "run"))
    p = argparse.ArgumentParser()
    T.add_arguments(p)
    full = p.parse_args([])
    vars(full).update(vars(ns))
    T.train(full)
    res = E.evaluate(str(tmp_path / "run"), classifiers=cdir, ll_K=8, ll_n=16, n_joint=200, latent_n=200, limit=100,
                     device="cpu", verbose=False)
    on_disk = json.load(open(tmp_path / "run" / "eval.json"))
    assert on_disk["cross_coherence"] == res["cross_coherence"]
    probs = list(res["cross_coherence"].values()) + [res["joint_coherence"]] + res["latent_acc"] + res["classifier_acc"]
    assert set(res["cross_coherence"]) == {"m1->m2", "m2->m1"}
    assert all(0.0 <= v <= 1.0 for v in probs)
    # Coherence counts are multiples of 1/n.
    assert all(abs(v * 100 - round(v * 100)) < 1e-6 for v in res["cross_coherence"].values())
    ll = res["log_likelihood"]
    assert ll["K"] == 8 and ll["n"] == 16 and math.isfinite(ll["mean"]) and ll["stderr"] > 0
    table = E.markdown_table(res)
    assert "| dreg --looser" in table and "cross m1->m2" in table


def test_evaluate_needs_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        E.evaluate(str(tmp_path), verbose=False)


def test_classifiers_need_digit_labels(tmp_path):
    with pytest.raises(ValueError, match="cub-features"):
        E.train_classifiers("cub-features", str(tmp_path))


def test_evaluate_defaults_finish_in_minutes():
    """The log-likelihood runs on a fixed subset of LL_N test items unless asked for all of them."""
    import inspect

    p = argparse.ArgumentParser()
    E.add_evaluate_arguments(p)
    assert p.parse_args(["run"]).ll_n == E.LL_N == 500
    assert inspect.signature(E.evaluate).parameters["ll_n"].default == E.LL_N
    assert p.parse_args(["run", "--ll-n", "all"]).ll_n is None
    assert p.parse_args(["run", "--ll-n", "20"]).ll_n == 20
    for bad in ("0", "-3", "some"):
        with pytest.raises(SystemExit):
            p.parse_args(["run", "--ll-n", bad])


def test_evaluation_loops_show_progress(classifiers, test_loader, capsys):
    _, clfs = classifiers
    E.cross_coherence(PairedStandIn(None), test_loader, clfs, verbose=True)
    assert "cross coherence" in capsys.readouterr().err
    E.cross_coherence(PairedStandIn(None), test_loader, clfs)
    assert capsys.readouterr().err == ""


def test_classifiers_of_another_architecture_or_shape_are_not_reused(classifiers, tmp_path):
    cdir, clfs = classifiers
    path = E.classifier_path(cdir, "digits")
    shapes = [c.shape for c in clfs]
    assert E.classifiers_current(path, shapes)
    assert not E.classifiers_current(path, [(1, 28, 28), (3, 32, 32)])
    old = torch.load(path, weights_only=False)
    old.pop("arch")
    torch.save(old, tmp_path / "old.pt")
    assert not E.classifiers_current(str(tmp_path / "old.pt"), shapes)
