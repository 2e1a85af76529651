r"""Large K: IWAE / DReG training whose memory does not grow with K, and chunked evaluation.

Training (docs/design.md section 5). Every objective below takes ``k_chunk``:

    loss = -objectives.m_dreg_looser(model, x, K=5000, k_chunk=250)
    loss.backward()        # the gradient of the K = 5000 estimator; the memory of K = 250

for ``iwae``, ``dreg``, ``m_iwae``, ``m_iwae_looser``, ``m_dreg``, ``m_dreg_looser`` (every
``grad=`` choice). The returned value is the bound over all K samples; its gradient equals the
unchunked objective's on the same noise.

Why it is exact. Once the normalised weights wbar (softmax of lw over the bound's axes) are known,
the gradient of each of these estimators is a sum of per-sample terms:
    IWAE:  sum_k wbar_k d lw_k                     (the surrogate sg(wbar) * lw)
    DReG:  the same with the encoder detached inside log q and the z path of sample k rescaled
           by its own weight (wbar_k for eq. 8; docs/design.md 2a's per-sample factor for "mixture")
and wbar needs only the log weights (M*K*B numbers), not the graph. So:
  1. forward, under no_grad: run ``model(x, k)`` on K in chunks, keep lw (``ops.moe_estimator``'s
     log weights) and the RNG state at the start of each chunk; the log-normaliser of every
     softmax over all K gives the bound;
  2. backward: for each chunk, restore its RNG state (so the model draws the same noise), rebuild
     that chunk's graph and back-propagate ``ops.moe_estimator`` given those normalisers
     (``lse=``, ``num_samples=K``), accumulate the gradients, and free the graph before the next.
Peak memory is one chunk's graph plus O(M*K*B) numbers; compute is about two forward passes and
one backward (the encoders run once per chunk and pass).

Contract with the model. ``model(x, k)`` must draw its samples from torch's global RNG (CPU, and
CUDA for CUDA tensors), as ``rsample`` does; the K samples must not interact inside the model
(no batch-norm in training mode over the sample axis); anything else it reads from Python's or
NumPy's RNG is not replayed. The gradient reaches ``model.parameters()`` and the tensors of ``x``
that require grad; a graph that reaches any other tensor requiring grad is an error (it could
not be recomputed). The backward is not differentiable again (no double backward).

Evaluation: `iwae_log_likelihood` estimates log-likelihoods with K = 1000..5000 under no_grad,
vectorised over the batch and chunked over K (an online log-sum-exp over the chunks).
"""
import contextlib
import math
from typing import NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable

from . import ops
from ._args import check_grad, check_K, check_k_chunk
from .bounds import dreg_estimator, mixture_dreg_estimator
from .protocol import Experts, check_mask, fused_prior, log_likelihood, log_prior, multimodal_experts
from .protocol import multimodal_terms, single_terms
from .ops.moe_estimator import bound_from_lse, slice_stats

OBJECTIVES = ("iwae", "dreg", "m_iwae", "m_iwae_looser", "m_dreg", "m_dreg_looser")


def _chunks(K, k_chunk):
    return [(s, min(k_chunk, K - s)) for s in range(0, K, k_chunk)]


class _RNG:
    """Save / restore the global RNG streams the model may draw from (CPU, and the CUDA devices in use)."""

    def __init__(self, tensors):
        self.devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})

    def get(self):
        return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self.devices]

    def set(self, state):
        cpu, cuda = state
        torch.set_rng_state(cpu)
        for d, s in zip(self.devices, cuda):
            torch.cuda.set_rng_state(s, d)


class _Autocast:
    """The autocast state of the forward, re-entered for the recompute (as checkpointing does), so
    the chunks are recomputed in the precision their weights were computed in."""

    def __init__(self):
        self.states = [
            (dev, torch.get_autocast_dtype(dev)) for dev in ("cpu", "cuda") if torch.is_autocast_enabled(dev)
        ]

    def __call__(self):
        stack = contextlib.ExitStack()
        for dev, dtype in self.states:
            stack.enter_context(torch.autocast(dev, dtype=dtype))
        return stack


def _tensors(x):
    return [x] if isinstance(x, torch.Tensor) else [t for t in x if isinstance(t, torch.Tensor)]


# ----------------------------------------------------------------------------------------------
# The six objectives as (log weights, weights axes, reduction, surrogate given the weights)
# ----------------------------------------------------------------------------------------------


class _Objective(NamedTuple):
    name: str
    grad: str
    backend: Optional[str]
    K_total: int  # the bound's K (a chunk sees k of them)
    mask: Optional[torch.Tensor]

    @property
    def multimodal(self):
        return self.name.startswith("m_")

    @property
    def bound(self):  # one modality: the "stratified" bound of M = 1 is the IWAE bound
        return "looser" if self.name.endswith("_looser") else "stratified"

    @property
    def estimator(self):
        return self.grad if "dreg" in self.name else "iwae"

    def terms(self, model, x, k):
        if self.multimodal:
            return multimodal_terms(model, x, k, self.backend, self.mask)
        return single_terms(model, x, k, self.backend)

    def _fused(self, t, **kw):
        prior = fused_prior(t.pz)
        if t.experts.family is None or prior is None:
            return None
        loc, scale = t.experts.params()
        return ops.moe_estimator(t.zs, loc, scale, prior[0], prior[1], t.lpx, family=t.experts.family,
                                 prior_family=prior[2], bound=self.bound, mask=self.mask, backend=self.backend, **kw)

    def log_weights(self, model, x, k):
        """lw [M, k, B] of a chunk (no graph)."""
        t = self.terms(model, x, k)
        est = self._fused(t, estimator="iwae")
        if est is not None:
            return est.lw
        z = t.z
        return log_prior(t.pz, z) + t.lpx - t.experts.log_density(z)

    def surrogate(self, model, x, k, stats):
        """The objective on k fresh samples given the normalisers of all K (their (max, log-sum)
        pairs): its gradient is this chunk's share of the full gradient."""
        t = self.terms(model, x, k)
        est = self._fused(t, estimator=self.estimator, lse=stats, num_samples=self.K_total)
        if est is None:
            return self._fallback(t, stats)
        ops.apply_z_weight(t.zs, est.z_weight)
        return est.bound.sum()

    def _fallback(self, t, stats):
        """log_prob families (no mask): the tensor-level estimators with the global weights."""
        looser = self.bound == "looser"
        dims = 1 if looser else (0, 1)
        z = t.z
        M = z.shape[0]
        n = self.K_total * (1 if looser else M)
        lpz = log_prior(t.pz, z)
        lw = lpz + t.lpx - t.experts.log_density(z, detach=self.estimator != "iwae")
        mx, ls = (v[:, None] if looser else v[None, None] for v in stats.unbind(-1))
        wbar = torch.where(lw == -math.inf, 0.0, torch.exp((lw.detach() - mx) - ls))
        w = ops.ImportanceWeights(stats.sum(-1) - math.log(n), wbar, wbar * wbar)
        if self.estimator in ("mixture", "mixture-centred") and M > 1:
            loc, scale = t.experts.params()
            est = mixture_dreg_estimator(lpz + t.lpx, t.zs, loc, scale, dims, family=t.experts.family,
                                         centred=self.estimator == "mixture-centred", weights=w, num_samples=n,
                                         backend=self.backend)
        else:
            zw = "one" if self.estimator in ("iwae", "released") else "wbar"
            est = dreg_estimator(lw, t.zs, dims, z_weight=zw, weights=w, backend=self.backend)
        return (est.mean(0) if looser else est).sum()


def _foreign_leaves(root, allowed_ids):
    """Tensors requiring grad that the graph of `root` reaches but that are not in `allowed_ids`."""
    seen, stack, foreign = set(), [root.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # AccumulateGrad nodes hold their leaf
        if var is not None and id(var) not in allowed_ids:
            foreign.append(var)
        stack.extend(f for f, _ in fn.next_functions)
    return foreign


class _Run:
    """What the backward needs: the model and inputs, each chunk's RNG state, the weights."""

    def __init__(self, objective, model, x, chunks, states, rng, stats):
        self.objective, self.model, self.x = objective, model, x
        self.chunks, self.states, self.rng, self.stats = chunks, states, rng, stats
        self.autocast = _Autocast()

    def backward(self, g, inputs, n_x):
        # Recompute on detached copies of x so the chunk graphs stop at x; the gradient w.r.t.
        # x is returned to autograd, which carries it further up x's own graph.
        x_det = {id(t): t.detach().requires_grad_() for t in inputs[:n_x]}
        if isinstance(self.x, torch.Tensor):
            x = x_det.get(id(self.x), self.x)
        else:
            x = type(self.x)(x_det.get(id(t), t) for t in self.x)
        targets = [x_det[id(t)] for t in inputs[:n_x]] + list(inputs[n_x:])
        acc = [None] * len(targets)
        entry = self.rng.get()
        try:
            with torch.enable_grad(), self.autocast():
                for i, ((_start, k), state) in enumerate(zip(self.chunks, self.states)):
                    self.rng.set(state)
                    s = self.objective.surrogate(self.model, x, k, self.stats)
                    if not s.requires_grad:
                        continue
                    if i == 0:
                        foreign = _foreign_leaves(s, {id(t) for t in targets})
                        if foreign:
                            shapes = ", ".join(str(list(t.shape)) for t in foreign[:4])
                            raise RuntimeError(
                                f"k_chunk: the objective depends on {len(foreign)} tensor(s) requiring grad "
                                f"(shapes {shapes}) that are neither parameters of `model` nor tensors of `x`; "
                                "the chunked backward recomputes the graph and can differentiate only those. "
                                "Register them as nn.Parameters of the model, or detach them."
                            )
                    grads = torch.autograd.grad(s, targets, g.to(s.dtype), allow_unused=True)
                    for j, gj in enumerate(grads):
                        if gj is not None:
                            acc[j] = gj if acc[j] is None else acc[j].add_(gj)
                    del s, grads  # this chunk's graph is gone before the next is built
        finally:
            self.rng.set(entry)  # the backward leaves the caller's RNG stream untouched
        return acc


class _ChunkedBound(torch.autograd.Function):
    """Identity on the precomputed bound; its backward runs the chunked recompute."""

    @staticmethod
    def forward(ctx, run, n_x, value, *inputs):
        # inputs are kept by reference (not saved tensors): the recompute must see the very
        # objects the model uses, and none of them is an output, so there is no reference cycle
        ctx.run, ctx.n_x, ctx.inputs = run, n_x, inputs
        return value.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        grads = ctx.run.backward(g, ctx.inputs, ctx.n_x)
        return (None, None, None, *grads)


def chunked_objective(name, model, x, K, k_chunk, *, grad="mixture", mask=None, backend=None):
    """``name``'s bound over K samples per expert, computed and differentiated in chunks of k_chunk.

    Called by the objectives when given ``k_chunk`` (``objectives.m_dreg(model, x, K, k_chunk=...)``);
    returns a scalar whose ``backward()`` recomputes each chunk with the same noise (module docstring).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"argument 'name' must be one of {OBJECTIVES}, got {name!r}")
    K, k_chunk = check_K(K), check_k_chunk(k_chunk)
    objective = _Objective(name, check_grad(grad), backend, K, mask)
    chunks = _chunks(K, k_chunk)
    params = [p for p in model.parameters() if p.requires_grad]
    x_in = list({id(t): t for t in _tensors(x) if t.requires_grad}.values())  # each tensor once
    rng = _RNG(_tensors(x) + list(model.parameters()))
    states, lws = [], []
    with torch.no_grad():
        for _, k in chunks:
            states.append(rng.get())
            lws.append(objective.log_weights(model, x, k))
        lw = torch.cat(lws, 1)  # [M, K, B]
        M, _, B = lw.shape
        if mask is not None:
            objective = objective._replace(mask=check_mask(mask, M, B, lw.device))
        stats = slice_stats(lw, objective.bound)  # (max, log-sum): the chunks' weights stay exact at any |lw|
        value = bound_from_lse(stats.sum(-1), objective.bound, objective.mask, K, M).sum()
    if not torch.is_grad_enabled() or not (params or x_in):
        return value
    run = _Run(objective, model, x, chunks, states, rng, stats)
    return _ChunkedBound.apply(run, len(x_in), value, *x_in, *params)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


class LogLikelihood(NamedTuple):
    """IWAE log-likelihood estimates per batch entry (nats). For M modalities, n, m index them:

    joint        [B]        log p(x_1..x_M): all M*K samples of the MoE posterior in one
                            log-mean-exp (the stratified bound, eq. 5)
    marginal     [M, B]     log p(x_m) with the same M*K samples of q(z | x_1..x_M) as proposal
                            (the paper's "log p(x_m | x_m, x_n)" column)
    cross        [M, M, B]  cross[n, m] = log p(x_m) with the K samples of q(z | x_n) alone (the
                            paper's "log p(x_m | x_n)" column; the diagonal is modality m's own IWAE)
    conditional  [M, M, B]  conditional[n, m] = log p(x_m | x_n) = log E_{p(z | x_n)} p(x_m | z),
                            self-normalised with the samples of q(z | x_n):
                            log sum_k w_k p(x_m | z_k) - log sum_k w_k, w_k = p(x_n, z_k) / q(z_k | x_n);
                            NaN on the diagonal (undefined)
    A single-modality model gives only `joint` (log p(x)); the other fields are None.
    """

    joint: torch.Tensor
    marginal: Optional[torch.Tensor] = None
    cross: Optional[torch.Tensor] = None
    conditional: Optional[torch.Tensor] = None


def _lse_into(acc, chunk_lw, dims):
    lse = torch.logsumexp(chunk_lw, dims)
    return lse if acc is None else torch.logaddexp(acc, lse)


@torch.no_grad()
def iwae_log_likelihood(model, x, K=1000, k_chunk=100, *, llik_scaling=False, backend=None) -> LogLikelihood:
    """IWAE estimates of log p(x) (joint, per modality, cross, conditional; see `LogLikelihood`),
    with K samples per expert, vectorised over the batch and chunked over K (k_chunk samples per
    model call; None: one call). Returns per-example estimates; average them over the data set.

    llik_scaling=False uses the decoders' densities as they are (the model's log-likelihood);
    True multiplies log p(x_m | z) by the modality's ``llik_scaling`` everywhere, as the training
    objective does (the research code's joint number is computed that way). Call ``model.eval()``
    first if the model has dropout or batch-norm.
    """
    K = check_K(K)
    k_chunk = K if k_chunk is None else check_k_chunk(k_chunk)
    if isinstance(x, torch.Tensor):  # one modality
        acc = None
        scale = model.llik_scaling if llik_scaling else 1.0
        for _, k in _chunks(K, k_chunk):
            qz_x, px_z, zs = model(x, k)
            lpz = log_prior(model.pz(*model.pz_params), zs)
            lpx = log_likelihood(px_z, x, scale, backend)
            lq = Experts([qz_x], backend).log_density(zs[None])[0]
            acc = _lse_into(acc, lpz + lpx - lq, 0)
        return LogLikelihood(acc - math.log(K))

    M = len(x)
    joint = marginal = cross = cond = None
    for _, k in _chunks(K, k_chunk):
        qz_xs, px_zs, zss = model(x, k)
        z = torch.stack(list(zss))  # [M, k, B, L]
        lpz = log_prior(model.pz(*model.pz_params), z)  # [M, k, B]
        lpx = torch.stack([  # lpx[r, d] = log p(x_d | z ~ q_r)   [M, M, k, B]
            torch.stack([
                log_likelihood(px_zs[r][d], x[d], model.vaes[d].llik_scaling if llik_scaling else 1.0, backend)
                for d in range(M)
            ])
            for r in range(M)
        ])
        lq, a = multimodal_experts(model, qz_xs, backend).log_density(z, return_pairwise=True)
        own = torch.diagonal(a, 0, 0, 1).permute(2, 0, 1)  # log q_r(z ~ q_r)   [M, k, B]
        joint = _lse_into(joint, lpz + lpx.sum(1) - lq, (0, 1))
        marginal = _lse_into(marginal, (lpz - lq)[:, None] + lpx, (0, 2))
        lw_cross = (lpz - own)[:, None] + lpx  # [n, m, k, B]
        cross = _lse_into(cross, lw_cross, 2)
        cond = _lse_into(cond, lw_cross + torch.diagonal(lpx, 0, 0, 1).permute(2, 0, 1)[:, None], 2)
    eye = torch.eye(M, dtype=torch.bool, device=cross.device)[:, :, None]
    own_lse = torch.diagonal(cross, 0, 0, 1).T[:, None]  # log sum_k w_k, w from q_n   [n, 1, B]
    conditional = (cond - own_lse).masked_fill(eye, float("nan"))
    return LogLikelihood(joint - math.log(M * K), marginal - math.log(M * K), cross - math.log(K), conditional)


__all__ = ["OBJECTIVES", "chunked_objective", "LogLikelihood", "iwae_log_likelihood"]
