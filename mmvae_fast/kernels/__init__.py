"""Triton kernels of mmvae_fast, one module per op (kernels/<op>.py: the op's triton_op
mmvae_fast_triton::<op>, its backward and the backend entry `<op>`). Optional: importing this
package never fails; `AVAILABLE` says whether triton could be imported."""
try:
    import triton  # noqa: F401

    AVAILABLE = True
except Exception:  # pragma: no cover - depends on the environment
    AVAILABLE = False
