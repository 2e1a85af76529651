"""The accumulation dtype and the family names and codes, written once for every Python face
(reference, ops, Triton kernels). The C++ kernels mirror the codes in
csrc/include/mmvae_fast/densities.h (enum Family, enum Likelihood)."""
import torch

FAMILIES = ("normal", "laplace")  # location-scale families of priors and posteriors
LIKELIHOODS = ("laplace", "normal", "bernoulli", "categorical")
# `int family` of the C++ and Triton likelihood_sum ops
LIKELIHOOD_CODES = {"normal": 0, "laplace": 1, "bernoulli": 2, "categorical": 3}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and output) dtype for an input dtype: float64 stays, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
