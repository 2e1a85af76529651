"""Shared helpers of the Triton kernels: interpreter detection, autotuning, dtypes, and the
Normal/Laplace log-density with its derivatives (the one Triton copy of docs/design.md section 2).

Infinities and NaN are float literals inside the kernels, never module globals: a NaN global fails
Triton's relaunch check (nan != nan: "Global variable ... has changed"), and an infinite one breaks
torch.compile, whose inductor re-emits the kernel's globals as source (`-inf` is no Python name)."""
import math
import os

import triton
import triton.language as tl

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


_HALF_LOG_2PI = tl.constexpr(0.5 * math.log(2.0 * math.pi))
_LOG_2 = tl.constexpr(math.log(2.0))


@triton.jit
def log_density_terms(x, loc, scale, NORMAL: tl.constexpr):
    """Elementwise (log f(x; loc, scale), d/dloc, d/dscale) for f Normal (NORMAL) or Laplace.

    d/dx = -d/dloc. Laplace takes the subgradient sign(0) = 0 at x == loc, as torch's abs does.
    Where phi(u) overflows the density is -inf with zero gradients (docs/design.md section 2).
    One return statement: the compiler wants a single exit."""
    inv = 1.0 / scale
    u = (x - loc) * inv
    if NORMAL:
        phi = 0.5 * u * u
        lp = -phi - tl.log(scale) - _HALF_LOG_2PI
        dloc = u * inv
        dscale = (u * u - 1.0) * inv
    else:
        phi = tl.abs(u)
        lp = -phi - tl.log(scale) - _LOG_2
        dloc = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0)) * inv
        dscale = (tl.abs(u) - 1.0) * inv
    overflow = phi == float("inf")
    return lp, tl.where(overflow, 0.0, dloc), tl.where(overflow, 0.0, dscale)


@triton.jit
def weighted(g, d):
    """g * d with a zero weight g contributing exactly 0: d may be infinite there (a collapsed
    expert's derivative at a sample it gives no mass), and 0 * inf would be NaN. NaN g propagates."""
    return tl.where(g == 0.0, 0.0, g * d)


@triton.jit
def sample_tile(K, B, L, K_CHUNK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_B: tl.constexpr):
    """The tile of a program on the grid (groups x k-chunks, batch blocks) over z [G, K, B, L]:
    (group g, first sample k0, batch offsets, batch mask, [BLOCK_B, BLOCK_L] mask, (b, l) offsets
    within one [B, L] slab)."""
    n_kc = tl.cdiv(K, K_CHUNK)
    g = tl.program_id(0) // n_kc
    k0 = (tl.program_id(0) % n_kc) * K_CHUNK
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_l = tl.arange(0, BLOCK_L)
    bmask = offs_b < B
    tmask = bmask[:, None] & (offs_l < L)[None, :]
    bl = offs_b.to(tl.int64)[:, None] * L + offs_l[None, :]
    return g, k0, offs_b, bmask, tmask, bl
