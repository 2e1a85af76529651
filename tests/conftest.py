"""The `backend` fixture of the per-op test modules, and the Triton interpreter.

A test of tests/test_<op>.py that takes `backend` runs once per (device, backend) that can run
<op> here: CPU tensors on every CPU backend and, where a CUDA device is present, CUDA tensors on
every CUDA backend. The fixture makes the device torch's default for the test; the tests draw
their random numbers on the CPU (seeded) and move them, so every device sees the same inputs.
Triton on CPU tensors means Triton's interpreter: those cases carry the `triton` mark and run in
the `pytest -m triton` process, where TRITON_INTERPRET=1 holds before any kernel is decorated.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

OPS = ("importance_weights", "mixture_log_density", "importance_ratios", "likelihood_sum")
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def _triton_run(config) -> bool:
    expr = config.getoption("markexpr", "") or ""
    return "triton" in expr and "not triton" not in expr


def pytest_configure(config):
    if _triton_run(config):  # before mmvae_fast registers its backends (at collection)
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    op = metafunc.module.__name__.rpartition(".")[2].removeprefix("test_")
    if op not in OPS:
        return
    from mmvae_fast import ops

    cases = []
    for d in DEVICES:
        for b in ops.available_backends(d, op=op):
            marks = [pytest.mark.triton] if (d, b) == ("cpu", "triton") else []
            cases.append(pytest.param((d, b), id=f"{d}-{b}", marks=marks))
    metafunc.parametrize("backend", cases, indirect=True)


@pytest.fixture
def backend(request):
    device, name = request.param
    if (device, name) == ("cpu", "triton"):
        request.getfixturevalue("triton_interpreter")
    torch.set_default_device(device)
    try:
        yield name
    finally:
        torch.set_default_device(None)


@pytest.fixture(scope="session")
def triton_interpreter():
    """Triton's interpreter for CPU tensors, for this session's Triton tests. TRITON_INTERPRET must
    hold before the kernels are decorated; mmvae_fast.kernels loads lazily, on the first Triton
    call, so setting it here (and registering the backend for CPU tensors) is in time unless the
    kernels were already compiled for the GPU in this process."""
    from mmvae_fast.ops import _triton

    common = sys.modules.get("mmvae_fast.kernels._common")
    if common is not None and not common.INTERPRETED:
        pytest.skip("the Triton kernels were already compiled for the GPU in this process; run `pytest -m triton`")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    _triton.register()  # now also for CPU tensors
    yield
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old
    _triton.register()
