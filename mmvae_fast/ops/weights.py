"""Public op: importance weights (bound, wbar, wbar**2) in one pass."""
from typing import NamedTuple

import torch

from . import _dispatch, _validate
from ..reference.weights import normalize_dims


class ImportanceWeights(NamedTuple):
    bound: torch.Tensor  # logmeanexp of lw over dim (dim removed)
    wbar: torch.Tensor  # softmax of lw over dim (shape of lw)
    wbar_sq: torch.Tensor  # wbar**2, DReG's encoder weights


def importance_weights(lw, dim=0, *, backend=None) -> ImportanceWeights:
    """Normalised importance weights of log weights `lw` over `dim` (int or tuple of ints).

    bound   = log (1/N) sum_dim exp(lw)       (the IWAE bound of each slice)
    wbar    = exp(lw - logsumexp_dim lw)      (d bound / d lw)
    wbar_sq = wbar**2                         (DReG's weights on the z path)

    Accumulates and returns float32 (float64 for float64 input). A slice of all -inf gives
    bound -inf, weights 0 and zero gradients; NaN propagates. All three outputs are
    differentiable.
    """
    _validate.tensor("lw", lw)
    dims = normalize_dims(dim, lw.dim())
    for d in dims:
        if lw.shape[d] == 0:
            raise ValueError(f"argument 'lw' has size 0 along reduced dim {d}: need at least one sample")
    b = _dispatch.resolve("importance_weights", backend, lw.device.type)
    return ImportanceWeights(*_dispatch.impl("importance_weights", b)(lw, dims))
