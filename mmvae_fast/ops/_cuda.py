"""The `cuda` backend: the CUDA kernels of the C++ extension (csrc/cuda/).

They implement the same torch.library ops as the CPU kernels (mmvae_fast::importance_weights, ...),
registered for the CUDA dispatch key, so the adapters, fake kernels and autograd formulas of the
cpu backend modules serve both devices. This module only makes them selectable for CUDA tensors,
and only for the ops the built extension has CUDA kernels for.
"""
import importlib

import torch

from .. import _ext
from . import _dispatch

# op -> (adapter module in this package, adapter function, the torch op whose CUDA kernel it runs)
_ADAPTERS = {
    "importance_weights": ("_cpu_weights", "importance_weights", "importance_weights"),
    "likelihood_sum": ("_cpu_likelihood", "likelihood_sum", "likelihood_sum"),
    "mixture_log_density": ("_cpu_mixture", "mixture_log_density", "mixture_log_density"),
    "importance_ratios": ("_cpu_mixture", "importance_ratios", "importance_ratios"),
}


def _has_cuda_kernel(name: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"mmvae_fast::{name}", "CUDA")
    except RuntimeError:  # the op itself is not defined (an older build)
        return False


def register() -> bool:
    """Register the CUDA kernels that the built extension has; False (and why) if none."""
    if not _ext.AVAILABLE:
        _dispatch.mark_unavailable("cuda", _ext.WHY)
        return False
    found = False
    for op, (module, fn, kernel) in _ADAPTERS.items():
        if _has_cuda_kernel(kernel):
            impl = getattr(importlib.import_module(f".{module}", __package__), fn)
            _dispatch.register(op, "cuda", impl, devices=("cuda",))
            found = True
    if not found:
        _dispatch.mark_unavailable(
            "cuda", "the C++ extension was built without CUDA kernels (torch without CUDA, or MMVAE_FAST_BUILD_CUDA=0)"
        )
    return found


register()
