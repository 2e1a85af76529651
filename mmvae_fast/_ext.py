"""Loads the compiled extension if it was built. Importing mmvae_fast never fails without it."""
try:
    from . import _C  # noqa: F401  (registers torch.ops.mmvae_fast.*)

    AVAILABLE, WHY = True, ""
except ImportError as e:  # pragma: no cover - depends on the install
    AVAILABLE, WHY = False, f"the C++ extension mmvae_fast._C is not built ({e})"
