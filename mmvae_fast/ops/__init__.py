"""The public fused ops. Each dispatches to a backend (see `_dispatch`); the API never depends on
which one runs. Plain helpers with no fused kernel (`log_density_sum`, `kl_divergence`) live here
too, so objectives import only from this package."""
from . import _reference  # noqa: F401  (registers the always-available backend)
from . import _cpu_weights, _cpu_likelihood  # noqa: F401  (the C++ kernels, when the extension is built)
from . import _cpu_mixture  # noqa: F401  (the cpu backend of the mixture ops, when the extension is built)
from . import _triton  # noqa: F401  (registers Triton for CUDA tensors if triton is installed)
from . import _cuda  # noqa: F401  (the extension's CUDA kernels, after the cpu modules whose ops they share)
from ._dispatch import BACKENDS, BackendUnavailableError, available_backends
from .weights import ImportanceWeights, importance_weights
from .mixture import mixture_log_density, importance_ratios
from .likelihood import likelihood_sum
from ..reference.densities import log_density_sum, kl_divergence, acc_dtype
from ..reference.mixture import ratios_from_pairwise

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "ImportanceWeights",
    "importance_weights",
    "mixture_log_density",
    "importance_ratios",
    "likelihood_sum",
    "log_density_sum",
    "kl_divergence",
    "acc_dtype",
    "ratios_from_pairwise",
]
