"""The public fused ops, one module per op (ops/<op>.py: the op, and the fake kernels and autograd
formulas of its C++ op). Each call dispatches to a backend (see `_dispatch`); the API never
depends on which one runs. Plain helpers with no fused kernel (`log_density_sum`, `kl_divergence`)
live here too, so objectives import only from this package."""
from . import _reference  # noqa: F401  (registers the always-available backend)
from ._dispatch import BACKENDS, BackendUnavailableError, available_backends
from ._autograd import DoubleBackwardError
from .importance_weights import ImportanceWeights, importance_weights
from .mixture_log_density import mixture_log_density
from .importance_ratios import importance_ratios
from .likelihood_sum import likelihood_sum
from . import _triton  # noqa: F401,E402  (registers Triton for CUDA tensors if triton is installed)
from .._numerics import acc_dtype
from ..reference.densities import log_density_sum, kl_divergence
from ..reference.importance_ratios import ratios_from_pairwise
from .moe_estimator import MoEEstimate, moe_estimator, apply_z_weight, slice_stats

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "DoubleBackwardError",
    "available_backends",
    "ImportanceWeights",
    "importance_weights",
    "mixture_log_density",
    "importance_ratios",
    "likelihood_sum",
    "MoEEstimate",
    "moe_estimator",
    "apply_z_weight",
    "slice_stats",
    "log_density_sum",
    "kl_divergence",
    "acc_dtype",
    "ratios_from_pairwise",
]
