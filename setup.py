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


def build_config():
    """csrc/build.cfg: the sources (globs) and flags that CMakeLists.txt reads too."""
    cfg = {}
    with open(os.path.join(ROOT, "csrc", "build.cfg")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                key, value = (s.strip() for s in line.split("=", 1))
                cfg[key] = value.split()
    return cfg


def _extensions():
    if os.environ.get("MMVAE_FAST_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    flag = os.environ.get("MMVAE_FAST_BUILD_CUDA", "auto")
    with_cuda = flag == "1" or (flag == "auto" and torch.version.cuda is not None and CUDA_HOME is not None)
    cfg = build_config()

    def sources(key):
        return [os.path.relpath(p, ROOT) for pat in cfg[key] for p in sorted(glob.glob(os.path.join(ROOT, pat)))]

    srcs = sources("cpu_sources")
    cxx = [f"-std=c++{cfg['cxx_standard'][0]}"] + cfg["cxx_flags"]
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_link_args=cfg["link_flags"],
    )
    if with_cuda:
        srcs += sources("cuda_sources")
        ext = CUDAExtension(
            "mmvae_fast._C",
            srcs,
            define_macros=[("MMVAE_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": [f"-std=c++{cfg['cxx_standard'][0]}"] + cfg["nvcc_flags"]},
            **kwargs,
        )
    else:
        ext = CppExtension("mmvae_fast._C", srcs, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
