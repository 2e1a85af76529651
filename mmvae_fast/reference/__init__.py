"""Plain PyTorch implementations of the fused ops: the oracle every backend is tested against.

Written for clarity, not speed. Nothing here imports a backend. Every function accumulates in
float32 (float64 for float64 input) and returns results in that accumulation dtype.
"""
from .densities import acc_dtype, log_density, log_density_sum, kl_divergence
from .weights import importance_weights
from .mixture import mixture_log_density, pairwise_log_density, importance_ratios, ratios_from_pairwise
from .likelihood import likelihood_sum

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
]
