"""Run directories that survive faults: one training at a time, checksummed checkpoints with the
previous good one kept, and a metrics history that always agrees with the checkpoint.

    out/.lock               pid and host of the training that owns the directory (removed at exit;
                            a lock of a dead pid is stale and taken over)
    out/checkpoint.pt       the newest checkpoint: a header with the SHA-256 of the torch.save payload
    out/checkpoint.prev.pt  the one before it, the fall-back if the newest does not verify
    out/metrics.jsonl       one line per epoch, appended (and fsynced) before that epoch's checkpoint

Order of an epoch's end: metrics line (fsync), checkpoint to a temporary file (fsync), the old
checkpoint (if it verifies) renamed to checkpoint.prev.pt, the temporary file renamed to checkpoint.pt. A kill at any
point leaves a checkpoint of epoch e or e - 1 and a metrics file with at most one line past it; on
resume, `reconcile_metrics` drops lines past the checkpoint's epoch (and a torn last line).

Fault injection for the tests: MMVAE_FAST_KILL_AT=<point> SIGKILLs the process when it reaches
the point named by `fault_point` (e.g. "step:2:1", "metrics:2", "checkpoint-write:2").
"""
import hashlib
import io
import json
import os
import signal
import socket
import tempfile
import warnings

import torch

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
METRICS = "metrics.jsonl"
ARGS = "args.json"
LOCK = ".lock"
TMP_PREFIX = ".tmp-"
_MAGIC = b"MMVAE-FAST-CKPT1\n"  # then 64 hex digits of SHA-256 and a newline, then the payload
_KILL_ENV = "MMVAE_FAST_KILL_AT"


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked (in use, already holds a run, corrupted)."""


def fault_point(name: str) -> None:
    """SIGKILL this process here if MMVAE_FAST_KILL_AT names this point (fault-injection tests)."""
    if os.environ.get(_KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------- the lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """Exclusive use of a run directory by one training (a context manager)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK)
        self.held = False

    def acquire(self) -> "RunLock":
        me = f"{os.getpid()} {socket.gethostname()}\n"
        # The lock appears with its owner already written (link of a complete file): a rival never reads an
        # empty lock, which it would take for a stale one.
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(me)
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    self._clear_if_stale()
                    continue
                self.held = True
                return self
        finally:
            os.remove(tmp)
        raise RunDirError(f"could not lock the run directory ({self.path} keeps reappearing)")

    def _clear_if_stale(self) -> None:
        try:
            with open(self.path) as f:
                parts = f.read().split()
        except FileNotFoundError:
            return
        pid, host = (int(parts[0]) if parts and parts[0].isdigit() else None), (parts[1] if len(parts) > 1 else None)
        if pid is not None and host not in (None, socket.gethostname()):
            raise RunDirError(f"run directory {os.path.dirname(self.path)!r} is locked by pid {pid} on host {host} "
                              f"({self.path}); if that training is gone, delete the lock file")
        if pid is not None and _alive(pid):
            raise RunDirError(f"run directory {os.path.dirname(self.path)!r} is in use by another training (pid {pid}, "
                              f"lock file {self.path}); wait for it to finish or pick another --out (if no training runs "
                              f"there, delete the lock file)")
        warnings.warn(f"removing the stale lock {self.path} of a training that is gone (pid {pid})", stacklevel=3)
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def remove_temporaries(run_dir: str) -> list:
    """Delete the temporary files a killed writer left behind (call with the lock held)."""
    gone = []
    for name in os.listdir(run_dir):
        if name.startswith(TMP_PREFIX):
            os.remove(os.path.join(run_dir, name))
            gone.append(name)
    return gone


def holds_a_run(run_dir: str) -> bool:
    """True if run_dir has a checkpoint: a run that --resume continues and a new run must not overwrite.
    Metrics without a checkpoint are left by a training killed before its first one: resume would drop
    them anyway, so they are not protected (see `started`)."""
    return any(os.path.lexists(os.path.join(run_dir, n)) for n in (CHECKPOINT, PREVIOUS))


def started(run_dir: str) -> bool:
    """True if a training wrote run_dir's args.json (with or without a checkpoint since)."""
    return os.path.lexists(os.path.join(run_dir, ARGS))


def check_run_dir(run_dir: str, flag: str = "--out") -> None:
    """RunDirError unless run_dir can hold a run: a directory (or a path to one not made yet) whose
    checkpoints, metrics and args.json are regular files. Reads only: called before anything is written."""
    check_dir_path(run_dir, flag)
    for n in (CHECKPOINT, PREVIOUS, METRICS, ARGS):
        p = os.path.join(run_dir, n)
        if os.path.lexists(p) and not os.path.isfile(p):
            raise RunDirError(f"{p} is not a file (a directory?), so the run directory cannot be used; move it "
                              f"out of {run_dir!r} or pick another {flag}")
    p = os.path.join(run_dir, "images")  # save_images makes it after the first epoch: a file there fails only then
    if os.path.lexists(p) and not os.path.isdir(p):
        raise RunDirError(f"{p} is not a directory (the epochs' PNG grids go there), so the run directory cannot be "
                          f"used; move it out of {run_dir!r} or pick another {flag}")


def check_dir_path(path: str, flag: str) -> None:
    """RunDirError unless path is a directory or can be made one (its nearest existing part is a directory)."""
    d = os.path.abspath(path)
    while not os.path.lexists(d):  # the nearest part that exists ("/" does)
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise RunDirError(f"{flag} {path!r}: {d} is not a directory; pick another {flag}")


def clear_run(run_dir: str) -> None:
    """--overwrite: remove a previous run's checkpoints, metrics and images."""
    import shutil

    for n in (CHECKPOINT, PREVIOUS, METRICS, ARGS):
        p = os.path.join(run_dir, n)
        if os.path.exists(p):
            os.remove(p)
    shutil.rmtree(os.path.join(run_dir, "images"), ignore_errors=True)


# ----------------------------------------------------------------------------------- checkpoints


def write_checkpoint(obj, run_dir: str, fault: str = None) -> str:
    """Checksummed, atomic: the payload to a temporary file (fsync), the current checkpoint kept as
    checkpoint.prev.pt (if it verifies), then the temporary file renamed to checkpoint.pt."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    header = _MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    path = os.path.join(run_dir, CHECKPOINT)

    def write(f):
        f.write(header)
        f.write(payload[: len(payload) // 2])
        if fault:
            f.flush()
            fault_point(fault)  # a kill in the middle of the write
        f.write(payload[len(payload) // 2:])

    def keep_previous():
        # Only a newest that verifies becomes the previous: after a fall-back resume checkpoint.pt is the
        # corrupt one and checkpoint.prev.pt the good one, which a kill before the rename must still find.
        if os.path.exists(path) and verify_checkpoint(path) is None:
            os.replace(path, os.path.join(run_dir, PREVIOUS))

    _write_atomic(path, write, "wb", before_replace=keep_previous)
    return path


def _verified_payload(path: str):
    """(None, the torch.save payload) if the file verifies, else (what is wrong, None). Reads, never unpickles.
    A file without the header (written before checksums) cannot be checked: its bytes count as the payload."""
    if not os.path.isfile(path):
        return f"checkpoint {path} does not exist", None
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        return f"checkpoint {path} is empty (0 bytes): the write was cut short", None
    if not data.startswith(_MAGIC):
        return None, data
    head = len(_MAGIC) + 65
    digest, payload = data[len(_MAGIC): head - 1].decode("ascii", "replace"), data[head:]
    if hashlib.sha256(payload).hexdigest() != digest:
        return (f"checkpoint {path} is corrupted or truncated: its SHA-256 does not match the one it was written "
                f"with ({len(data)} bytes)"), None
    return None, payload


def verify_checkpoint(path: str):
    """None if the checkpoint's SHA-256 matches its header (or it predates checksums), else what is wrong."""
    return _verified_payload(path)[0]


def read_checkpoint(path: str, map_location="cpu", need=()) -> dict:
    """A checkpoint that verifies and holds the keys in need, else RunDirError saying what is wrong
    with the file. Files without the header (written before checksums) load unverified."""
    problem, payload = _verified_payload(path)
    if problem:
        raise RunDirError(problem)
    try:
        ck = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    except Exception as e:  # an unverified legacy file that does not unpickle
        raise RunDirError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None
    missing = [repr(k) for k in need if not isinstance(ck, dict) or k not in ck]  # a file of some other program
    if missing:
        raise RunDirError(f"checkpoint {path} is not one mmvae-fast train wrote: it has no {', '.join(missing)}; "
                          f"pass the run directory of an mmvae-fast training")
    return ck


def load_latest(run_dir: str, map_location="cpu", need=()) -> dict:
    """checkpoint.pt, or if it does not verify (or lacks a key in need), checkpoint.prev.pt with a
    warning naming both; RunDirError when neither does."""
    path, prev = os.path.join(run_dir, CHECKPOINT), os.path.join(run_dir, PREVIOUS)
    if not os.path.exists(path) and not os.path.exists(prev):
        raise FileNotFoundError(f"no {CHECKPOINT} in run directory {run_dir!r}")
    try:
        return read_checkpoint(path, map_location, need)
    except RunDirError as newest:
        if not os.path.exists(prev):
            raise
        try:
            ck = read_checkpoint(prev, map_location, need)
        except RunDirError as older:
            raise RunDirError(f"no usable checkpoint in {run_dir!r}: {newest}; {older}") from None
        warnings.warn(f"{newest}; falling back to the previous good checkpoint {prev} (epoch {ck.get('epoch')})",
                      stacklevel=2)
        return ck


# --------------------------------------------------------------------------------------- metrics


def append_metrics(record: dict, run_dir: str) -> None:
    """One epoch's line, on disk (fsync) before the checkpoint of that epoch is written."""
    with open(os.path.join(run_dir, METRICS), "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def reconcile_metrics(run_dir: str, last_epoch: int) -> list:
    """Keep the lines of epochs <= last_epoch (the checkpoint's), drop the rest and any torn line
    (a kill in the middle of an append) with a warning naming the file; rewrite atomically.
    Returns the kept records."""
    path = os.path.join(run_dir, METRICS)
    keep, dropped = [], []
    if os.path.exists(path):
        with open(path) as f:
            lines = f.read().split("\n")
        for i, ln in enumerate(lines, 1):
            if not ln.strip():
                continue
            try:
                rec = json.loads(ln)
                epoch = int(rec["epoch"])
            except (ValueError, KeyError, TypeError):
                warnings.warn(f"{path}: dropping unreadable line {i} (a write cut short): {ln[:60]!r}", stacklevel=2)
                continue
            (keep if epoch <= last_epoch else dropped).append(ln)
        if dropped:
            warnings.warn(f"{path}: dropping {len(dropped)} line(s) past the checkpoint's epoch {last_epoch}",
                          stacklevel=2)
    write_text_atomic("".join(ln + "\n" for ln in keep), path)
    return [json.loads(ln) for ln in keep]


def _write_atomic(path: str, write, mode: str, before_replace=None) -> None:
    """write(f) into a temporary file beside path, fsynced, then (after before_replace(), if given)
    os.replace and an fsync of the directory: a crash leaves the old file or the new one, never half
    of one, and no temporary file behind (a kill's leftover is removed by remove_temporaries)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(text: str, path: str) -> None:
    _write_atomic(path, lambda f: f.write(text), "w")


def save_atomic(obj, path: str) -> None:
    """torch.save, atomically (see _write_atomic)."""
    _write_atomic(path, lambda f: torch.save(obj, f), "wb")
