"""Inputs that used to give raw tracebacks or silently wrong results now give clear errors (issue 16):
dims that are not ints, meta tensors, multimodal batches that do not fit the model, a CUDA device on
a CPU-only torch, missing training packages, mnist-svhn's missing files."""
import pytest
import torch

import mmvae_fast.objectives as O
from mmvae_fast import cli, ops
from mmvae_fast._checks import check_modalities
from mmvae_fast.models import build_model


@pytest.mark.parametrize("dim", [1.0, None, True, "1", (0, 1.5)])
def test_importance_weights_dim_must_be_ints(dim):
    with pytest.raises(TypeError, match="argument 'dim'"):
        ops.importance_weights(torch.randn(3, 4), dim)


def test_meta_tensors_give_shapes_not_a_crash():
    meta = dict(device="meta")
    b, w, w2 = ops.importance_weights(torch.empty(3, 4, **meta), 1)
    assert b.shape == (3,) and w.shape == (3, 4) and b.is_meta
    z, p = torch.empty(2, 3, 4, 5, **meta), torch.empty(2, 4, 5, **meta)
    assert ops.mixture_log_density(z, p, p).shape == (2, 3, 4)
    assert ops.importance_ratios(z, p, p).shape == (2, 2, 3, 4)
    x, params = torch.empty(4, 6, **meta), torch.empty(3, 4, 6, **meta)
    assert ops.likelihood_sum(x, params, family="normal", scale=torch.ones(6, **meta)).shape == (3, 4)
    with pytest.raises(ops.BackendUnavailableError, match="cpu"):  # a named backend says why it cannot
        ops.importance_weights(torch.empty(3, 4, **meta), 1, backend="cpu")


# ---- multimodal batches that do not fit the model
MODEL = None


def _model():
    global MODEL
    if MODEL is None:
        torch.manual_seed(0)
        MODEL = build_model("digits", latent_dim=4)
    return MODEL


def _batch(n=(3, 3)):
    from mmvae_fast.data import get_datasets

    train, _ = get_datasets("digits")
    xs = [torch.stack([train[i][0][m] for i in range(k)]) for m, k in enumerate(n)]
    return xs


BAD = {
    "batch sizes": lambda: _batch((3, 2)),
    "one modality": lambda: _batch()[:1],
    "extra modality": lambda: _batch() + [_batch()[0]],
    "a tensor": lambda: _batch()[0],
}
MATCH = {"batch sizes": "different batch sizes", "one modality": "fewer than the model",
         "extra modality": "more than the model", "a tensor": "list of 2 tensors"}


@pytest.mark.parametrize("case", list(BAD))
def test_check_modalities(case):
    with pytest.raises(ValueError, match=MATCH[case]):
        check_modalities(_model(), BAD[case]())
    check_modalities(_model(), _batch())  # a good batch passes


@pytest.mark.parametrize("objective", ["m_elbo", "m_iwae", "m_iwae_looser", "m_dreg", "m_dreg_looser"])
@pytest.mark.parametrize("case", list(BAD))
def test_multimodal_objectives_check_their_input(objective, case):
    with pytest.raises(ValueError, match=MATCH[case]):
        getattr(O, objective)(_model(), BAD[case](), 2)


# ---- the CLI
def test_cuda_device_on_cpu_only_torch_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this torch has a CUDA device")
    out = tmp_path / "run"
    rc = cli.main(["train", "--device", "cuda", "--epochs", "1", "--limit", "16", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--device cuda" in err and "no CUDA device" in err and "Traceback" not in err


def test_missing_training_packages_are_named_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("matplotlib", "tqdm") else real(n, *a))
    out = tmp_path / "run"
    rc = cli.main(["train", "--epochs", "1", "--limit", "16", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "tqdm" in err and "matplotlib" in err and "pip install" in err
    assert not out.exists()  # nothing was started


def test_mnist_svhn_missing_files_message_and_no_directories_left(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "dir"
    rc = cli.main(["train", "--experiment", "mnist-svhn", "--data-dir", str(missing), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "files not found" in err
    assert "pass download=True" not in err  # no advice the CLI cannot follow
    assert not (tmp_path / "no").exists() and not (tmp_path / "o").exists()


# ---- run directories and devices the train CLI cannot use: a one-line error, nothing written
TINY = ["--epochs", "1", "--limit", "16", "--K", "2", "--latent-dim", "4", "--batch-size", "16"]


def _clear_error(capsys, argv):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("under", [False, True])
def test_out_that_is_a_file(tmp_path, capsys, under):
    f = tmp_path / "afile"
    f.write_text("mine\n")
    out = f / "run" if under else f
    err = _clear_error(capsys, ["train", *TINY, "--device", "cpu", "--out", str(out)])
    assert "not a directory" in err and str(f) in err and f.read_text() == "mine\n"


@pytest.mark.parametrize("device", ["tpu", "meta"])
def test_device_that_cannot_train(tmp_path, capsys, device):
    out = tmp_path / "run"
    err = _clear_error(capsys, ["train", *TINY, "--device", device, "--out", str(out)])
    assert f"--device {device}" in err and "--device cpu" in err
    assert not out.exists()  # checked before anything is written


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_checkpoint_without_args(tmp_path, capsys, command):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": {}, "epoch": 1}, run / "checkpoint.pt")  # unpickles, no header, no 'args'
    argv = ["train", "--resume", str(run), "--epochs", "2"] if command == "train" else ["evaluate", str(run)]
    err = _clear_error(capsys, argv)
    assert str(run / "checkpoint.pt") in err and "'args'" in err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize("resume", [False, True])
def test_metrics_file_that_is_a_directory(tmp_path, capsys, resume):
    run = tmp_path / "run"
    if resume:
        assert cli.main(["train", *TINY, "--device", "cpu", "--out", str(run)]) == 0
        (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir(parents=True)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    argv = ["train", "--resume", str(run), "--epochs", "2"] if resume else ["train", *TINY, "--device", "cpu", "--out", str(run)]
    err = _clear_error(capsys, argv)
    assert str(run / "metrics.jsonl") in err and "not a file" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("device", ["tpu", "meta"])
def test_evaluate_on_a_device_that_cannot_compute(tmp_path, capsys, device):
    """evaluate checks --device as train does, before reading the run (was a raw RuntimeError)."""
    err = _clear_error(capsys, ["evaluate", str(tmp_path / "run"), "--device", device])
    assert f"--device {device}" in err and "--device cpu" in err


# ---- entries of a run directory that train and evaluate write, but of the wrong kind; evaluate's
# numeric arguments: a clear error before the epoch / the evaluation, not an exception after it
@pytest.mark.parametrize("resume", [False, True])
def test_images_that_is_a_file(tmp_path, capsys, resume):
    run = tmp_path / "run"
    if resume:
        assert cli.main(["train", *TINY, "--device", "cpu", "--out", str(run)]) == 0
        import shutil

        shutil.rmtree(run / "images")
    run.mkdir(exist_ok=True)
    (run / "images").write_text("mine\n")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    argv = ["train", "--resume", str(run), "--epochs", "2"] if resume else ["train", *TINY, "--device", "cpu", "--out", str(run)]
    err = _clear_error(capsys, argv)
    assert str(run / "images") in err and "not a directory" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    assert cli.main(["train", *TINY, "--device", "cpu", "--out", str(run)]) == 0
    return run


def test_eval_json_that_is_a_directory(tiny_run, capsys):
    (tiny_run / "eval.json").mkdir()
    try:
        err = _clear_error(capsys, ["evaluate", str(tiny_run), "--device", "cpu", "--ll-K", "0", "--limit", "8"])
    finally:
        (tiny_run / "eval.json").rmdir()
    assert str(tiny_run / "eval.json") in err and "not a file" in err


@pytest.mark.parametrize("flag,value", [("--n-joint", "0"), ("--limit", "0"), ("--latent-n", "0"), ("--ll-K", "-5"),
                                        ("--n-joint", "-1")])
def test_evaluate_numbers_out_of_range(tiny_run, capsys, flag, value):
    err = _clear_error(capsys, ["evaluate", str(tiny_run), "--device", "cpu", flag, value])
    assert f"{flag} must be >=" in err and value in err
    assert not (tiny_run / "eval.json").exists()


def test_evaluate_function_checks_its_numbers(tiny_run):
    from mmvae_fast.evaluate import evaluate

    for kw in (dict(batch_size=0), dict(ll_n=0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            evaluate(str(tiny_run), device="cpu", verbose=False, **kw)


@pytest.mark.parametrize("under", [False, True])
def test_classifiers_that_is_a_file(tiny_run, tmp_path, capsys, under):
    f = tmp_path / "clfs"
    f.write_text("mine\n")
    path = f / "sub" if under else f
    err = _clear_error(capsys, ["evaluate", str(tiny_run), "--device", "cpu", "--classifiers", str(path)])
    assert "--classifiers" in err and "not a directory" in err and str(f) in err
    assert f.read_text() == "mine\n" and not (tiny_run / "eval.json").exists()
