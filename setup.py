"""Builds the C++ extension mmvae_fast._C (CPU kernels with OpenMP; CUDA kernels where torch
has CUDA and nvcc is found). Metadata lives in pyproject.toml.

    pip install --no-build-isolation -e .

--no-build-isolation builds against the torch already installed: the extension must link the
same torch it runs with, and an isolated build would download a different (CUDA) torch.
MMVAE_FAST_BUILD_CUDA=1 forces the CUDA kernels, =0 skips them; unset, they build when torch has
CUDA and CUDA_HOME is set. MMVAE_FAST_NO_EXT=1 installs the pure-Python package only.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("MMVAE_FAST_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    flag = os.environ.get("MMVAE_FAST_BUILD_CUDA", "auto")
    with_cuda = flag == "1" or (flag == "auto" and torch.version.cuda is not None and CUDA_HOME is not None)
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))  # noqa: E731
    sources = ["csrc/ops.cpp"] + rel("csrc/cpu/*.cpp")
    # -fno-trapping-math lets GCC vectorise the branch-free exp/log of csrc/include/mmvae_fast/fastmath.h
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden", "-fno-trapping-math"]
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        sources += rel("csrc/cuda/*.cu")
        ext = CUDAExtension(
            "mmvae_fast._C",
            sources,
            define_macros=[("MMVAE_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            **kwargs,
        )
    else:
        ext = CppExtension("mmvae_fast._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
