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
from torch._library.autograd import supports_tensorlist
from torch._library.utils import is_tensorlist_like_type


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


class EagerLibrary:
    """The ops of a namespace whose implementations are Python (the Triton ops, `triton_op`s), as a
    backend adapter calls them: while torch.compile traces, the registered ops (one graph node each,
    with their fake kernels and autograd); in eager, each forward op as a torch.autograd.Function
    over its Python implementation, with the op's own autograd formula. An eager call then costs one
    Function, not the dispatcher and torch.library's Python autograd wrapper around the kernels'
    launches (a GPU step at MMVAE sizes is bound by such host time).

    module: the Python module that defines the ops (its `triton_op`s); formula(lib) -> (setup_context,
    backward), the same formula the registered op gets (ops/<op>.py). The backward op runs as its
    implementation too, except under create_graph, where the registered op's first-order guard
    stands between a second derivative and the kernels (which record no graph)."""

    def __init__(self, ns: str, module, formula):
        self._ops, self._module, self._formula, self._eager = getattr(torch.ops, ns), module, formula, {}

    def __getattr__(self, name):
        if torch.compiler.is_compiling():
            return getattr(self._ops, name)
        fn = self._eager.get(name)
        if fn is None:
            setup_context, backward = self._formula(_FirstOrderImpls(self._ops, self._module))
            impl = getattr(self._module, name)._init_fn
            schema = getattr(self._ops, name).default._schema
            if any(is_tensorlist_like_type(a.type) for a in schema.arguments):
                # a Tensor[] argument (moe_estimator's samples): torch's own wrapper for registered
                # ops flattens the list for autograd and hands the formula a list of flags and
                # takes a list of gradients back; it needs forward and setup_context in one
                def forward(ctx, *args):
                    out = impl(*args)
                    setup_context(ctx, args, out)
                    return out

                cls = supports_tensorlist(type(f"{name}_eager", (torch.autograd.Function,), {
                    "forward": staticmethod(forward), "backward": staticmethod(backward)}))
            else:
                cls = type(f"{name}_eager", (torch.autograd.Function,), {
                    "forward": staticmethod(impl),
                    "setup_context": staticmethod(setup_context),
                    "backward": staticmethod(backward),
                })
            fn = self._eager[name] = cls.apply
        return fn


class _FirstOrderImpls:
    """The backward ops for an eager formula: their Python implementations, or under create_graph
    (grad mode on in backward) the registered ops, whose first_order_only guard raises on a second
    derivative."""

    def __init__(self, ops, module):
        self._ops, self._module = ops, module

    def __getattr__(self, name):
        return getattr(self._ops, name) if torch.is_grad_enabled() else getattr(self._module, name)._init_fn
