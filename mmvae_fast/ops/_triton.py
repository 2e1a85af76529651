"""The Triton backend: registers the kernels of `mmvae_fast.kernels` (kernels/<op>.py) for CUDA tensors, and for CPU
tensors when TRITON_INTERPRET=1 (Triton's interpreter: how the tests run them without a GPU).

Where CUDA is present the kernels load when this module registers them, so that torch.compile
never traces an import (dynamo refuses importlib); elsewhere importing this module never imports
triton: the kernels load on first use, so `import mmvae_fast` stays cheap and works where triton
is absent.
"""
import importlib
import importlib.util
import os

import torch

from . import _dispatch
from ._autograd import EagerLibrary

# each op's Triton ops live in mmvae_fast/kernels/<op>.py as mmvae_fast_triton::<op>, with the
# schema of the C++ op; mmvae_fast/ops/<op>.py gives them the autograd formula and the adapter
# (over an EagerLibrary: the registered ops while compiling, their implementations in eager)
_OPS = ("importance_weights", "mixture_log_density", "importance_ratios", "likelihood_sum", "moe_estimator")
_LOADED = {}  # op -> the backend entry, once the kernels are imported


def _load(op):
    if op not in _LOADED:
        kernels = importlib.import_module(f"mmvae_fast.kernels.{op}")  # defines mmvae_fast_triton::<op>
        front = importlib.import_module(f"mmvae_fast.ops.{op}")
        front.register_autograd("mmvae_fast_triton")  # for torch.compile
        # in eager, the kernels' Python entries as autograd Functions: no dispatcher layers per call
        _LOADED[op] = front.backend(EagerLibrary("mmvae_fast_triton", kernels, front.formula))
    return _LOADED[op]


def _lazy(op):
    def impl(*args):
        f = _LOADED.get(op)
        return (f if f is not None else _load(op))(*args)

    impl.__name__ = f"triton_{op}"
    return impl


def register() -> bool:
    """(Re-)register the Triton backend; reads TRITON_INTERPRET now. False if triton is absent."""
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or shadowed install counts as absent
        found = False
    if not found:
        _dispatch.mark_unavailable("triton", "triton is not installed")
        return False
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    devices = ("cuda", "cpu") if interpret else ("cuda",)
    if not interpret and torch.cuda.is_available():
        try:
            for op in _OPS:
                _load(op)
        except Exception as e:  # a triton that cannot build our kernels: say so, fall back
            _dispatch.mark_unavailable("triton", f"its kernels failed to load ({type(e).__name__}: {e})")
            return False
    for op in _OPS:
        _dispatch.register(op, "triton", _lazy(op), devices=devices)
    return True


register()
