"""Run directories under faults (issue 16): a SIGKILL during an epoch, between the metrics line and
the checkpoint, or in the middle of the checkpoint write, then --resume gives parameters bit-identical
to an uninterrupted run; two trainings on one --out; a finished run is not overwritten by accident;
corrupted, truncated and zero-byte checkpoints; a torn metrics line; resume past the last epoch;
resume into another run's directory; a run killed before its first checkpoint.
Tiny runs (digits, 32 items, K=2, latent 4): a few seconds each."""
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from mmvae_fast import cli, rundir
from mmvae_fast import train as T

TINY = ["--experiment", "digits", "--obj", "dreg", "--K", "2", "--batch-size", "16", "--latent-dim", "4",
        "--limit", "32", "--device", "cpu"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The subprocesses start from this process's digits data (built once, saved), not a rebuild each.
_BOOT = ("import sys, torch; from mmvae_fast.data import digits; digits._CACHE.update(torch.load(sys.argv[1], "
         "weights_only=False)); from mmvae_fast import cli; sys.exit(cli.main(sys.argv[2:]))")


@pytest.fixture(scope="module", autouse=True)
def digits_cache(tmp_path_factory):
    from mmvae_fast.data import digits, get_datasets

    get_datasets("digits")
    path = tmp_path_factory.mktemp("data") / "digits.pt"
    torch.save(dict(digits._CACHE), path)
    _CACHE_FILE[:] = [str(path)]


_CACHE_FILE = []


def _env():
    # the threads of this process: the parallel kernels then split work the same way in both
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(rundir._KILL_ENV, None)
    return env


def _argv(args):
    return [sys.executable, "-c", _BOOT, _CACHE_FILE[0], "train", *TINY, *args]


def _cli(args, kill_at=None, check=True):
    """`mmvae-fast train` in a subprocess (so that it can be SIGKILLed at a named point)."""
    env = _env()
    if kill_at:
        env[rundir._KILL_ENV] = kill_at
    p = subprocess.run(_argv(args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and not kill_at:
        assert p.returncode == 0, p.stderr
    return p


def _run(args):
    """The CLI in this process: (exit code, stderr)."""
    return cli.main(["train", *TINY, *args])


def _params(run):
    return T.load_checkpoint(str(run))["model"]


def _metrics(run):
    return [json.loads(ln) for ln in open(os.path.join(run, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    assert _run(["--epochs", "2", "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize("kill_at", ["step:2:1", "metrics:2", "checkpoint-write:2", "checkpoint:2"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, uninterrupted, kill_at):
    run = tmp_path / "run"
    p = _cli(["--epochs", "2", "--out", str(run)], kill_at=kill_at)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert (run / rundir.LOCK).exists()  # the killed run's lock: stale now
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # killed after the checkpoint of epoch 2: nothing left to do, and resume says so
        assert _run(["--resume", str(run), "--epochs", "2"]) == (2 if kill_at == "checkpoint:2" else 0)
    want, got = _params(uninterrupted), _params(run)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert _metrics(run) == [dict(r, time_s=g["time_s"]) for r, g in zip(_metrics(uninterrupted), _metrics(run))]
    assert len(_metrics(run)) == 2
    left = [n for n in os.listdir(run) if n.startswith(rundir.TMP_PREFIX) or n == rundir.LOCK]
    assert not left, left  # temporary files cleaned, lock released
    assert any("stale lock" in str(w.message) for w in caught)


def test_second_training_on_a_locked_directory_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.LOCK).write_text(f"{os.getpid()} {os.uname().nodename}\n")  # a live training: this process
    assert _run(["--epochs", "1", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "in use by another training" in err and str(os.getpid()) in err
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoint.pt").exists()


def test_two_concurrent_trainings_do_not_mix(tmp_path):
    run = tmp_path / "run"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_argv(["--epochs", "2", "--out", str(run)]), env=_env(), cwd=ROOT, stdout=log, stderr=log)
    # the second starts once the first holds the directory (or has finished): otherwise either may win the lock
    deadline = time.monotonic() + 300
    while not (run / rundir.LOCK).exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    second = _cli(["--epochs", "2", "--out", str(run)], check=False)
    assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()
    assert second.returncode == 2  # refused: in use, or (if the first had finished) holds a run
    assert "in use by another training" in second.stderr or "already holds a run" in second.stderr
    assert [r["epoch"] for r in _metrics(run)] == [1, 2]


def test_new_run_on_a_finished_run_needs_resume_or_overwrite(tmp_path, uninterrupted, capsys):
    run = tmp_path / "run"
    assert _run(["--epochs", "1", "--out", str(run)]) == 0
    before = _params(run)
    assert _run(["--epochs", "1", "--out", str(run), "--seed", "7"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert all(torch.equal(before[k], v) for k, v in _params(run).items())
    assert _run(["--epochs", "1", "--out", str(run), "--seed", "7", "--overwrite"]) == 0
    assert any(not torch.equal(before[k], v) for k, v in _params(run).items())
    assert [r["seed"] for r in _metrics(run)] == [7]


@pytest.mark.parametrize("damage", ["corrupted", "truncated", "zero-byte"])
def test_damaged_checkpoint_is_an_error_or_falls_back(tmp_path, uninterrupted, damage, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _run(["--epochs", "1", "--out", str(one)]) == 0
    assert _run(["--epochs", "2", "--out", str(two)]) == 0
    for run in (one, two):
        path = run / "checkpoint.pt"
        data = bytearray(path.read_bytes())
        if damage == "corrupted":
            data[len(data) // 2: len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 64])
        else:
            data = data[: len(data) // 2] if damage == "truncated" else b""
        path.write_bytes(bytes(data))
    # no previous checkpoint: a clear error, nothing loaded, nothing changed
    assert _run(["--resume", str(one), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and str(one) in err and ("corrupted" in err or "empty" in err) and "Traceback" not in err
    assert [r["epoch"] for r in _metrics(one)] == [1]
    # a previous good checkpoint: a warning naming the damaged file, and epoch 2 trained again from epoch 1's
    with pytest.warns(UserWarning, match="falling back to the previous good checkpoint"):
        assert _run(["--resume", str(two), "--epochs", "2"]) == 0
    want, got = _params(uninterrupted), _params(two)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert [r["epoch"] for r in _metrics(two)] == [1, 2]


def test_torn_metrics_line_is_dropped_with_a_warning(tmp_path, uninterrupted):
    run = tmp_path / "run"
    assert _run(["--epochs", "1", "--out", str(run)]) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_obj": -12')  # a kill in the middle of an append
    with pytest.warns(UserWarning, match="metrics.jsonl.*unreadable line 2"):
        assert _run(["--resume", str(run), "--epochs", "2"]) == 0
    assert [r["epoch"] for r in _metrics(run)] == [1, 2]
    want, got = _params(uninterrupted), _params(run)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_resume_that_would_do_nothing_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(["--epochs", "1", "--out", str(run)]) == 0
    args = (run / "args.json").read_text()
    for epochs in ("1", "0"):
        assert _run(["--resume", str(run), "--epochs", epochs]) == 2
        err = capsys.readouterr().err
        assert ("already trained to epoch 1" in err) if epochs == "1" else ("--epochs must be >= 1" in err)
    assert (run / "args.json").read_text() == args and [r["epoch"] for r in _metrics(run)] == [1]



# A locker: imported and ready, it waits for the start signal, then tries the lock; the winner holds it until
# every rival has been refused.
_RACE = """
import os, sys, time
from mmvae_fast import rundir
run, sync, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
open(os.path.join(sync, f"ready-{os.getpid()}"), "w").close()
while not os.path.exists(os.path.join(sync, "go")):
    time.sleep(0.001)
try:
    lock = rundir.RunLock(run).acquire()
except rundir.RunDirError as e:
    open(os.path.join(sync, f"refused-{os.getpid()}"), "w").close()
    print(e, file=sys.stderr)
    sys.exit(3)
deadline = time.monotonic() + 60
while sum(f.startswith("refused-") for f in os.listdir(sync)) < n - 1 and time.monotonic() < deadline:
    time.sleep(0.01)
lock.release()
"""


def test_racing_lockers_one_wins(tmp_path):
    # Lockers let go at once: exactly one holds the directory; none takes a lock being written for a stale one.
    n = 5
    for trial in range(2):
        run, sync = tmp_path / f"run{trial}", tmp_path / f"sync{trial}"
        run.mkdir()
        sync.mkdir()
        procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(run), str(sync), str(n)], env=_env(), cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
        deadline = time.monotonic() + 120
        while sum(f.startswith("ready-") for f in os.listdir(sync)) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        (sync / "go").touch()
        outs = [p.communicate(timeout=120) for p in procs]
        assert sorted(p.returncode for p in procs) == [0] + [3] * (n - 1), outs
        assert not any("stale" in err for _, err in outs), outs
        assert os.listdir(run) == []


def test_resume_into_another_run_directory_is_refused(tmp_path, capsys):
    # --resume A --out B would mix A's epochs into B's metrics and push B's checkpoint aside
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(["--epochs", "1", "--out", str(a)]) == 0
    assert _run(["--epochs", "1", "--out", str(b), "--seed", "7"]) == 0
    capsys.readouterr()
    before = {d: {n: (d / n).read_bytes() for n in ("checkpoint.pt", "metrics.jsonl", "args.json")} for d in (a, b)}
    assert _run(["--resume", str(a), "--epochs", "2", "--out", str(b)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(b) in err and "Traceback" not in err
    assert {d: {n: (d / n).read_bytes() for n in before[d]} for d in (a, b)} == before
    assert not (b / rundir.PREVIOUS).exists() and not (a / rundir.LOCK).exists()


def test_resume_with_out_naming_the_same_directory_differently(tmp_path, uninterrupted):
    run = tmp_path / "run"
    assert _run(["--epochs", "1", "--out", str(run)]) == 0
    assert _run(["--resume", str(run), "--epochs", "2", "--out", f"{tmp_path}/./run/"]) == 0
    want, got = _params(uninterrupted), _params(run)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert [r["epoch"] for r in _metrics(run)] == [1, 2]


def test_training_killed_before_its_first_checkpoint_starts_over(tmp_path, uninterrupted, capsys):
    # No checkpoint: nothing a resume could continue, so a plain rerun starts the run over there.
    run = tmp_path / "run"
    p = _cli(["--epochs", "1", "--out", str(run)], kill_at="checkpoint-write:1")
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not (run / rundir.CHECKPOINT).exists() and len(_metrics(run)) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stale lock
        assert _run(["--resume", str(run), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "before its first checkpoint" in err and "without --resume" in err
    with pytest.warns(UserWarning, match="before its first checkpoint"):
        assert _run(["--epochs", "1", "--out", str(run)]) == 0
    want, got = rundir.read_checkpoint(str(uninterrupted / rundir.PREVIOUS))["model"], _params(run)  # epoch 1's
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert _metrics(run) == [dict(_metrics(uninterrupted)[0], time_s=_metrics(run)[0]["time_s"])]
    assert not [n for n in os.listdir(run) if n.startswith(rundir.TMP_PREFIX) or n == rundir.LOCK]


def test_corrupt_newest_checkpoint_does_not_displace_the_good_previous(tmp_path, uninterrupted):
    # After a fall-back resume (checkpoint.pt corrupt, checkpoint.prev.pt good), the next write must not
    # rotate the corrupt file over the good one: a kill before the rename would leave no usable checkpoint.
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    path = run / rundir.CHECKPOINT
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    path.write_bytes(bytes(data))
    assert rundir.verify_checkpoint(str(path)) is not None
    assert rundir.verify_checkpoint(str(run / rundir.PREVIOUS)) is None
    rundir.write_checkpoint({"epoch": 3}, str(run))
    assert rundir.read_checkpoint(str(run / rundir.PREVIOUS))["epoch"] == 1  # still the good one
    assert rundir.read_checkpoint(str(path))["epoch"] == 3
    rundir.write_checkpoint({"epoch": 4}, str(run))  # a newest that verifies is kept as the previous
    assert rundir.read_checkpoint(str(run / rundir.PREVIOUS))["epoch"] == 3
