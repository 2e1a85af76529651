"""Plain PyTorch implementations of the fused ops: the oracle every backend is tested against.

Written for clarity, not speed. Nothing here imports a backend. Every function accumulates in
float32 (float64 for float64 input) and returns results in that accumulation dtype.
"""
from .._numerics import acc_dtype
from .densities import log_density, log_density_sum, kl_divergence
from .importance_weights import importance_weights
from .mixture_log_density import mixture_log_density, pairwise_log_density
from .importance_ratios import importance_ratios, ratios_from_pairwise
from .likelihood_sum import likelihood_sum
from .moe_estimator import moe_estimator

__all__ = [
    "acc_dtype",
    "log_density",
    "log_density_sum",
    "kl_divergence",
    "importance_weights",
    "pairwise_log_density",
    "mixture_log_density",
    "importance_ratios",
    "ratios_from_pairwise",
    "likelihood_sum",
    "moe_estimator",
]
