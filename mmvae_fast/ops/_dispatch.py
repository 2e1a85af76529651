"""Backend selection for the fused ops.

Backends register an implementation per op; `resolve` picks one per call:
  explicit `backend=` argument > $MMVAE_FAST_BACKEND > "auto".
"auto": CUDA tensors -> triton, cuda, reference; CPU tensors -> cpu, reference.
"""
import os

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
ENV_VAR = "MMVAE_FAST_BACKEND"

_IMPLS: dict = {}  # (op, backend) -> callable
_UNAVAILABLE: dict = {}  # backend -> why it is not available (set by the backend module)
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
_INSTALL_HINT = {
    "cpu": "build the C++ extension: pip install --no-build-isolation -e .",
    "cuda": "build on a machine where torch has CUDA and nvcc is on PATH "
    "(MMVAE_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .)",
    "triton": "pip install triton (and use CUDA tensors, or set TRITON_INTERPRET=1 for CPU tensors)",
}
_DEVICES = {"reference": None, "cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",)}


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is asked for by name but cannot run this op here."""


def register(op: str, backend: str, impl, devices=None) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    _IMPLS[(op, backend)] = impl
    if devices is not None:
        _DEVICES[backend] = tuple(devices)


def mark_unavailable(backend: str, why: str) -> None:
    _UNAVAILABLE[backend] = why


def available(op: str, backend: str, device_type: str) -> bool:
    if (op, backend) not in _IMPLS:
        return False
    devs = _DEVICES.get(backend)
    return devs is None or device_type in devs


def available_backends(device_type: str = "cpu", op=None) -> list:
    """Backends that can run `op` (default: every registered op) on tensors of this device type."""
    ops = {o for o, _ in _IMPLS} if op is None else {op}
    return [b for b in BACKENDS[1:] if all(available(o, b, device_type) for o in ops)]


def resolve(op: str, backend, device_type: str) -> str:
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto") or "auto"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        for cand in _AUTO_ORDER.get(device_type, ("reference",)):
            if available(op, cand, device_type):
                return cand
        return "reference"
    if not available(op, name, device_type):
        if (op, name) in _IMPLS:
            why = f"it runs on {'/'.join(_DEVICES[name])} tensors and these are on {device_type}"
        else:
            why = _UNAVAILABLE.get(name, "it is not built or not importable")
        raise BackendUnavailableError(
            f"backend {name!r} cannot run {op}: {why}. To use it, {_INSTALL_HINT.get(name, '')}; "
            f"or pass backend='auto' / unset {ENV_VAR}."
        )
    return name


def impl(op: str, backend: str):
    return _IMPLS[(op, backend)]
