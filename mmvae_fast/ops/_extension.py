"""The C++ extension's kernels (csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu) as the `cpu` and `cuda` backends.

Both kernels of an op implement the same torch.library op (mmvae_fast::<op>), for the CPU and the
CUDA dispatch keys, so one adapter and one fake kernel (in ops/<op>.py) and one C++ autograd
(csrc/autograd/<op>.cpp) serve both devices. Each op module hands its adapter to `register`.
"""
import torch

from .. import _ext
from . import _dispatch

if not _ext.AVAILABLE:
    _dispatch.mark_unavailable("cpu", _ext.WHY)
    _dispatch.mark_unavailable("cuda", _ext.WHY)
else:  # read only for an op without a CUDA kernel
    _dispatch.mark_unavailable(
        "cuda", "the C++ extension was built without CUDA kernels (torch without CUDA, or MMVAE_FAST_BUILD_CUDA=0)"
    )


def built(op: str) -> bool:
    """Whether the loaded extension defines mmvae_fast::<op>."""
    return _ext.AVAILABLE and hasattr(torch.ops.mmvae_fast, op)


def _has_cuda_kernel(op: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"mmvae_fast::{op}", "CUDA")
    except RuntimeError:  # the op itself is not defined (an older build)
        return False


def register(op: str, impl) -> bool:
    """impl (the adapter of mmvae_fast::<op>) becomes the cpu backend of op, and its cuda backend
    where the build has a CUDA kernel. False if the extension lacks the op."""
    if not built(op):
        if _ext.AVAILABLE:
            _dispatch.mark_unavailable("cpu", f"the built extension predates the {op} kernel: rebuild it")
        return False
    _dispatch.register(op, "cpu", impl, devices=("cpu",))
    if _has_cuda_kernel(op):
        _dispatch.register(op, "cuda", impl, devices=("cuda",))
    return True
