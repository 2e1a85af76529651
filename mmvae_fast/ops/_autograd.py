"""The autograd policy every fused op shares: its gradient is first-order only, and asking for more
fails loudly.

A fused op's backward is itself a custom op (mmvae_fast::*_backward, or a Triton backward op).
With no autograd formula for that op, a second derivative (a gradient taken with create_graph=True,
then a gradient of it) treats the first gradient as a constant in the op's inputs: torch only warns,
and the numbers are silently wrong. `first_order_only` gives each backward op a formula that raises
`DoubleBackwardError` when a second derivative actually flows through it. First-order gradients,
with or without create_graph, are unchanged; the reference backend supports any order.
"""
import torch


class DoubleBackwardError(RuntimeError):
    """A second-order gradient was asked of a fused backend that computes first-order ones only."""


_GUARDED: set = set()


def first_order_only(backward_op, *ops: str) -> None:
    """Register for `backward_op` (the backward of the public ops `ops`: a qualified name such as
    "mmvae_fast::importance_weights_backward", or a torch.library / triton_op custom op) an autograd
    formula that raises DoubleBackwardError naming the op and the way out. Idempotent."""
    key = backward_op if isinstance(backward_op, str) else id(backward_op)
    if key in _GUARDED:
        return

    op = " / ".join(f"ops.{o}" for o in ops)

    def backward(ctx, *grads):
        raise DoubleBackwardError(
            f"{op}: second-order gradients (a gradient of a gradient taken with create_graph=True, "
            f"e.g. a gradient penalty or a Hessian-vector product) are not implemented by the fused "
            f"backends (cpu, cuda, triton). Pass backend='reference' to {op} (or set "
            f"MMVAE_FAST_BACKEND=reference) for higher-order derivatives."
        )

    torch.library.register_autograd(backward_op, backward)
    _GUARDED.add(key)
