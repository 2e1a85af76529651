"""Triton kernels of mmvae_fast (installed as mmvae_fast.kernels). Optional: importing this
package never fails; `AVAILABLE` says whether triton could be imported."""
try:
    import triton  # noqa: F401

    AVAILABLE = True
except Exception:  # pragma: no cover - depends on the environment
    AVAILABLE = False
