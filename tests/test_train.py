"""Training: the objective improves, resume is bit-identical, DDP keeps ranks in sync, clear errors."""
import argparse
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mmvae_fast import cli
from mmvae_fast import objectives as O
from mmvae_fast import train as T

# Tiny runs on the offline default: few items, small K and latent.
TINY = dict(experiment="digits", obj="dreg", looser=True, K=2, batch_size=16, latent_dim=4, limit=32, lr=1e-3,
            device="cpu")


def _ns(**kw):
    p = argparse.ArgumentParser()
    T.add_arguments(p)
    ns = p.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_few_steps_increase_the_bound():
    from mmvae_fast.data import get_datasets
    from mmvae_fast.models import build_model

    torch.manual_seed(0)
    train_set, _ = get_datasets("digits")
    xs = [torch.stack(t) for t in zip(*(train_set[i][0] for i in range(0, 320, 20)))]  # 16 items
    model = build_model("digits", latent_dim=4)
    fn, value = T.make_objective("dreg", True, "eq8")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)

    def bound():
        torch.manual_seed(123)  # the same noise before and after
        with torch.no_grad():
            return value(model, xs, 4).item()

    before = bound()
    for _ in range(10):
        loss = -fn(model, xs, 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert bound() > before


def test_objective_map():
    assert T._objective_fn("iwae", False) is O.m_iwae and T.make_objective("iwae", False)[1] is O.m_iwae
    assert T._objective_fn("iwae", True) is O.m_iwae_looser
    assert T._objective_fn("elbo", False) is O.m_elbo and T.make_objective("elbo", False)[1] is O.m_elbo
    assert T._objective_fn("dreg", True) is O.m_dreg_looser
    _, v = T.make_objective("dreg", False, "mixture")
    assert v is O.m_iwae
    with pytest.raises(ValueError, match="obj"):
        T.make_objective("vi", False)


def test_run_writes_metrics_images_and_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    _, a = T.train(_ns(**TINY, epochs=1, out=out, dreg_grad="mixture"))
    assert a.dreg_grad == "mixture" and a.looser
    rec = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    assert len(rec) == 1
    assert {k: rec[0][k] for k in ("epoch", "obj", "looser", "dreg_grad", "K", "seed")} == dict(
        epoch=1, obj="dreg", looser=True, dreg_grad="mixture", K=2, seed=1)
    assert rec[0]["train_obj"] < 0 and rec[0]["test_obj"] < 0
    imgs = sorted(os.listdir(os.path.join(out, "images")))
    assert imgs == ["cross_e001.png", "prior_e001.png", "recon_e001.png"]
    ck = T.load_checkpoint(out)
    assert ck["epoch"] == 1 and set(ck) >= {"model", "optimizer", "rng", "args"}
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


def test_resume_is_bit_identical(tmp_path):
    full, _ = T.train(_ns(**TINY, epochs=2, out=str(tmp_path / "full")))
    T.train(_ns(**TINY, epochs=1, out=str(tmp_path / "part")))
    first = _params(T.load_model(str(tmp_path / "part"))[0])
    resumed, _ = T.train(_ns(resume=str(tmp_path / "part"), epochs=2))
    a, b = _params(full), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(ln) for ln in open(tmp_path / "full" / "metrics.jsonl")]
    lb = [json.loads(ln) for ln in open(tmp_path / "part" / "metrics.jsonl")]
    assert [r["train_obj"] for r in la] == [r["train_obj"] for r in lb]
    # The parameters moved: the comparison above is not of two untouched models.
    assert any(not torch.equal(v, first[k]) for k, v in a.items())


def test_resume_refuses_changed_settings(tmp_path):
    T.train(_ns(**TINY, epochs=1, out=str(tmp_path / "r")))
    with pytest.raises(ValueError, match="--K"):
        T.train(_ns(resume=str(tmp_path / "r"), K=5, epochs=2))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, result):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model, _ = T.train(_ns(**dict(TINY, epochs=1, out=out)))
    torch.save(_params(model), os.path.join(result, f"rank{rank}.pt"))
    assert not torch.distributed.is_initialized()  # train() destroys the group it created


def test_ddp_two_processes_keep_parameters_identical(tmp_path):
    out, result = str(tmp_path / "ddp"), str(tmp_path)
    mp.spawn(_ddp_worker, args=(2, _free_port(), out, result), nprocs=2, join=True)
    p0, p1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
    ck = T.load_checkpoint(out)
    assert len(ck["rng"]) == 2  # every rank's RNG state, for an exact resume
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])  # each rank its own noise
    for k, v in ck["model"].items():
        assert torch.equal(v, p0[k]), k
    rec = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    assert len(rec) == 1 and rec[0]["world"] == 2  # only rank 0 wrote


def test_unknown_experiment_is_a_clear_error(capsys):
    with pytest.raises(ValueError, match="experiment.*nope"):
        T.resolve_args(_ns(experiment="nope"))
    with pytest.raises(SystemExit):
        cli.main(["train", "--experiment", "nope"])
    assert "nope" in capsys.readouterr().err


def test_missing_data_directory_is_a_clear_error(tmp_path, capsys):
    missing = str(tmp_path / "no-such-dir")
    rc = cli.main(["train", "--experiment", "mnist-svhn", "--data-dir", missing, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "no-such-dir" in err


def test_option_combinations_are_checked():
    with pytest.raises(ValueError, match="--dreg-grad"):
        T.resolve_args(_ns(obj="iwae", dreg_grad="mixture"))
    with pytest.raises(ValueError, match="--looser"):
        T.resolve_args(_ns(obj="elbo", looser=True))
    with pytest.raises(ValueError, match="--K"):
        T.resolve_args(_ns(K=0))
    a = T.resolve_args(_ns(experiment="mnist-svhn"))  # the paper's defaults
    assert (a.obj, a.looser, a.K, a.epochs, a.batch_size, a.latent_dim, a.lr) == ("dreg", True, 30, 30, 128, 20, 1e-3)
    assert a.dreg_grad == O.DEFAULT_GRAD == "mixture"
    # the offline default keeps the paper's objective, latent size and optimiser at a CPU budget
    d = T.resolve_args(_ns())
    assert (d.experiment, d.obj, d.looser, d.dreg_grad, d.latent_dim, d.lr, d.learn_prior) == \
        ("digits", "dreg", True, "mixture", 20, 1e-3, True)
    assert (d.K, d.epochs, d.batch_size) == (10, 10, 64)
    assert T.resolve_args(_ns(no_looser=None, looser=False)).looser is False
