"""mmvae_fast: fast, memory-lean, provably right objectives for MMVAE / IWAE / DReG.

    from mmvae_fast import objectives, ops
    loss = -objectives.m_dreg_looser(model, x, K=30)
"""
from . import ops, objectives  # noqa: F401
from .objectives import (  # noqa: F401
    elbo,
    iwae,
    dreg,
    m_elbo_naive,
    m_elbo,
    m_iwae,
    m_iwae_looser,
    m_dreg,
    m_dreg_looser,
)

__version__ = "0.1.0"
