"""Shared helpers of the Triton kernels: interpreter detection, autotuning, dtypes.

Infinities and NaN are float literals inside the kernels, never module globals: a NaN global fails
Triton's relaunch check (nan != nan: "Global variable ... has changed"), and an infinite one breaks
torch.compile, whose inductor re-emits the kernel's globals as source (`-inf` is no Python name)."""
import os

import triton

from .._numerics import acc_dtype  # noqa: F401  (re-exported for the kernels)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRETED = interpreting()  # at import, i.e. when the kernels of this process were decorated


def autotune(configs, key, interpret_config):
    """triton.autotune over `configs`; under the interpreter a single fixed config (no timing).

    The interpreter config uses small blocks on purpose: the tests then cross block boundaries
    and exercise the masks of ragged tiles with tiny tensors.
    """
    return triton.autotune(configs=[interpret_config] if interpreting() else configs, key=key)
