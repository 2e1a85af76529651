"""VAE and MMVAE with the protocol of the paper's research code (what `mmvae_fast.objectives` takes).

    vae(x, K)   -> (qz_x, px_z, zs),      zs [K, B, L]
    mmvae(x, K) -> (qz_xs, px_zs, zss),   px_zs[r][d] = p(x_d | z ~ q_r), zss[r] [K, B, L]

`qz_x`, `pz` are distribution classes called with (loc, scale); `px_z` is called with the
decoder's output. The scales follow the paper code: softmax(raw, -1) * L + eta (MNIST-SVHN,
CUB raw images) or softplus(raw) + eta (CUB features / captions).
"""
import contextlib

import torch
import torch.distributions as D
import torch.nn as nn
import torch.nn.functional as F

from .nets import ETA

SCALE_FNS = ("softmax", "softplus")


class Unvalidated:
    """A distribution class whose instances skip torch's argument validation: the checks read the
    values (a host-device sync per distribution on a GPU); the encoders' scales are positive by
    construction. Called like the class; picklable."""

    def __init__(self, family):
        self.family = family.family if isinstance(family, Unvalidated) else family

    def __call__(self, *args, **kwargs):
        return self.family(*args, validate_args=False, **kwargs)

    def __repr__(self):
        return f"Unvalidated({self.family.__name__})"


def scale_from_raw(raw, kind):
    """Positive scale from an unconstrained tensor, the paper code's two parameterisations."""
    if kind == "softmax":
        return F.softmax(raw, dim=-1) * raw.shape[-1] + ETA
    if kind == "softplus":
        return F.softplus(raw) + ETA
    raise ValueError(f"argument 'kind' must be one of {SCALE_FNS}, got {kind!r}")


class Prior(nn.Module):
    """p(z) = prod_l f(z_l; 0, scale_l) with scale from a `logvar` parameter [1, L] (zero-initialised,
    learnable only with learn_prior) through `scale_from_raw`."""

    def __init__(self, latent_dim, family=D.Laplace, scale_fn="softmax", learn_prior=False):
        super().__init__()
        if scale_fn not in SCALE_FNS:
            raise ValueError(f"argument 'scale_fn' must be one of {SCALE_FNS}, got {scale_fn!r}")
        self.dist, self.scale_fn = Unvalidated(family), scale_fn
        self.loc = nn.Parameter(torch.zeros(1, latent_dim), requires_grad=False)
        self.logvar = nn.Parameter(torch.zeros(1, latent_dim), requires_grad=bool(learn_prior))

    @property
    def params(self):
        return self.loc, scale_from_raw(self.logvar, self.scale_fn)


class ImageLikelihood:
    """p(x | z) = Laplace/Normal(mean, fixed scale), the decoder giving the mean (picklable callable)."""

    def __init__(self, family=D.Laplace, scale=0.75):
        self.family, self.scale = family, float(scale)

    def __call__(self, mean):
        return self.family(mean, mean.new_tensor(self.scale), validate_args=False)

    def __repr__(self):
        return f"ImageLikelihood({self.family.__name__}, scale={self.scale})"


def categorical(logits):
    """p(x | z) over words: Categorical on the decoder's logits [*S, T, V]."""
    return D.Categorical(logits=logits, validate_args=False)


def dist_mean(px_z):
    """Mean of a likelihood: loc for Laplace/Normal, probabilities [.., T, V] for Categorical
    (the mean of the one-hot word), `mean` otherwise."""
    if isinstance(px_z, D.Categorical):
        return px_z.probs
    return px_z.mean


@contextlib.contextmanager
def eval_mode(module):
    """No gradients and eval mode (BatchNorm running statistics), restoring the mode on exit."""
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was)


class VAE(nn.Module):
    """Single-modality VAE: q(z|x) = qz_x(loc, scale), p(x|z) = px_z(dec(z)), p(z) = pz(*pz_params).

    enc(x) -> (loc, raw) [B, L]; dec(z) -> likelihood parameters for z of any leading shape.
    llik_scaling multiplies log p(x|z) in the objectives. `prior` may be shared between the VAEs
    of an MMVAE (then a VAE taken out of it keeps the joint prior)."""

    def __init__(self, enc, dec, latent_dim, *, posterior=D.Laplace, scale_fn="softmax", likelihood,
                 prior=None, learn_prior=False, llik_scaling=1.0, data_shape=None, name="vae"):
        super().__init__()
        if scale_fn not in SCALE_FNS:
            raise ValueError(f"argument 'scale_fn' must be one of {SCALE_FNS}, got {scale_fn!r}")
        self.enc, self.dec = enc, dec
        self.latent_dim, self.scale_fn, self.name = int(latent_dim), scale_fn, name
        self.qz_x = Unvalidated(posterior)
        self.px_z = likelihood
        self.prior = prior if prior is not None else Prior(latent_dim, posterior, scale_fn, learn_prior)
        self.pz = self.prior.dist
        self.llik_scaling = float(llik_scaling)
        self.data_shape = tuple(data_shape) if data_shape is not None else None
        self._qz_x_params = None

    @property
    def pz_params(self):
        return self.prior.params

    @property
    def qz_x_params(self):
        if self._qz_x_params is None:
            raise RuntimeError("qz_x_params is set by forward(); call the model first")
        return self._qz_x_params

    def check_input(self, x, name="x"):
        """Raise unless x is a batch this VAE takes: shape [B, *data_shape] (ValueError) and the
        encoder's float dtype, or integer class indices for a Categorical likelihood (TypeError).
        The objectives call it (mmvae_fast._checks) before the model runs, so a wrong image size or
        dtype is named here, not as a matmul shape error deep in the encoder. Reads no data."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"argument '{name}' (modality '{self.name}') must be a torch.Tensor, got {type(x).__name__}")
        indices = self.px_z is categorical
        p = next(self.enc.parameters(), None)
        shape_ok = self.data_shape is None or (x.dim() >= 1 and tuple(x.shape[1:]) == self.data_shape)
        if indices:
            dtype_ok, want = not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool, "integer class indices"
        else:
            dtype_ok, want = p is None or x.dtype == p.dtype, f"dtype {None if p is None else p.dtype}"
        if shape_ok and dtype_ok:
            return
        shape = "[B, *event]" if self.data_shape is None else f"[B, {', '.join(map(str, self.data_shape))}]"
        raise (TypeError if shape_ok else ValueError)(
            f"argument '{name}' (modality '{self.name}') must have shape {shape} and {want}, "
            f"got shape {tuple(x.shape)} and dtype {x.dtype}")

    def encode(self, x):
        """Posterior parameters (loc, scale), each [B, L]."""
        loc, raw = self.enc(x)
        return loc, scale_from_raw(raw, self.scale_fn)

    def decode(self, z):
        """p(x | z) for latents of any leading shape."""
        return self.px_z(self.dec(z))

    def forward(self, x, K=1):
        self._qz_x_params = self.encode(x)
        qz_x = self.qz_x(*self._qz_x_params)
        zs = qz_x.rsample(torch.Size([K]))
        return qz_x, self.decode(zs), zs

    def generate(self, N):
        """Decoded means of N prior samples: [N, *data]."""
        with eval_mode(self):
            z = self.pz(*self.pz_params).sample(torch.Size([N])).reshape(N, -1)
            return dist_mean(self.decode(z))

    def reconstruct(self, x):
        """Decoded mean at the posterior mean: [B, *data]."""
        with eval_mode(self):
            return dist_mean(self.decode(self.encode(x)[0]))


class MMVAE(nn.Module):
    """Mixture-of-experts multimodal VAE over `vaes` (one per modality) with a shared prior."""

    def __init__(self, vaes, prior=None, name="mmvae"):
        super().__init__()
        self.vaes = nn.ModuleList(vaes)
        if len(self.vaes) < 1:
            raise ValueError("argument 'vaes' must hold at least one VAE")
        self.prior = prior if prior is not None else self.vaes[0].prior
        for v in self.vaes:  # one prior for the joint model and each unimodal view of it
            v.prior, v.pz = self.prior, self.prior.dist
        self.pz = self.prior.dist
        self.name = name

    @property
    def pz_params(self):
        return self.prior.params

    @property
    def latent_dim(self):
        return self.vaes[0].latent_dim

    def absent(self, x, mask=None):
        """Per modality, True where it is absent from the whole batch: x[m] is None or mask[m] has
        no True. (Per-item absence is the objective's business, through its own mask.)"""
        if len(x) != len(self.vaes):
            raise ValueError(f"argument 'x' must hold {len(self.vaes)} modalities, got {len(x)}")
        if mask is not None and tuple(mask.shape[:1]) != (len(self.vaes),):
            raise ValueError(f"argument 'mask' must have shape [M={len(self.vaes)}, B], got {tuple(mask.shape)}")
        out = [xm is None or (mask is not None and not bool(mask[m].any())) for m, xm in enumerate(x)]
        if all(out):
            raise ValueError("every modality is absent from the batch; at least one must be given")
        return out

    def _placeholder(self, m, B, K):
        """Expert m's stand-ins when it is absent from the batch: q = family(0, 1) of shape [B, L]
        and samples 0 of shape [K, B, L], all expand()ed views of one number (no compute, finite)."""
        vae, L = self.vaes[m], self.latent_dim
        zero = self.prior.loc.new_zeros(1, 1)  # the model's device and dtype
        qz_x = vae.qz_x(zero.expand(B, L), (zero + 1).expand(B, L))
        return qz_x, zero.expand(1, 1, 1).expand(K, B, L)

    def forward(self, x, K=1, *, mask=None):
        """(qz_xs, px_zs, zss). A modality absent from the whole batch (x[m] None, or mask[m] all
        False for a bool mask [M, B]) costs no encoder or decoder work: qz_xs[m] and zss[m] are
        placeholders of the right family and shape, px_zs[r][d] is None where r or d is absent."""
        absent = self.absent(x, mask)
        M = len(self.vaes)
        B = next(len(xm) for xm, a in zip(x, absent) if not a)
        qz_xs, zss = [None] * M, [None] * M
        px_zs = [[None] * M for _ in range(M)]
        for m, vae in enumerate(self.vaes):
            if absent[m]:
                qz_xs[m], zss[m] = self._placeholder(m, B, K)
            else:
                qz_xs[m], px_zs[m][m], zss[m] = vae(x[m], K=K)
        for r in range(M):
            for d, vae in enumerate(self.vaes):
                if r != d and not absent[r] and not absent[d]:
                    px_zs[r][d] = vae.decode(zss[r])
        return qz_xs, px_zs, zss

    def generate(self, N):
        """Per modality, the decoded means of the same N prior samples: list of [N, *data_d]."""
        with eval_mode(self):
            z = self.pz(*self.pz_params).sample(torch.Size([N])).reshape(N, -1)
            return [dist_mean(v.decode(z)) for v in self.vaes]

    def latents(self, x):
        """Posterior means of every expert: [M, B, L]."""
        with eval_mode(self):
            return torch.stack([v.encode(x[m])[0] for m, v in enumerate(self.vaes)])

    def reconstruct(self, x):
        """recons[r][d]: modality d decoded from the posterior mean of expert r (the diagonal are
        reconstructions, the rest cross-modal generations)."""
        zs = self.latents(x)
        with eval_mode(self):
            return [[dist_mean(v.decode(zs[r])) for v in self.vaes] for r in range(len(self.vaes))]

    def generate_from(self, x, given, mask=None, generator=None):
        """Conditional generation from the subset `given` of modalities (indices): per item, an
        expert chosen uniformly among the given ones (that the item has, with a bool mask [M, B])
        -- a draw from the subset's mixture -- and every modality decoded from that expert's
        posterior mean. Only the given modalities are encoded. Returns a list of [B, *data_d].
        generator: a torch.Generator for the expert choice (reproducible coherence)."""
        given = sorted({int(m) for m in given})
        M = len(self.vaes)
        if not given or any(not 0 <= m < M for m in given):
            raise ValueError(f"argument 'given' must be a non-empty subset of range({M}), got {given!r}")
        if any(x[m] is None for m in given):
            raise ValueError("a given modality's data is None")
        with eval_mode(self):
            locs = torch.stack([self.vaes[m].encode(x[m])[0] for m in given])  # [S, B, L]
            S, B = locs.shape[:2]
            have = torch.ones(S, B, dtype=torch.bool) if mask is None else mask[given].bool().cpu()
            if not bool(have.any(0).all()):
                raise ValueError("an item has none of the given modalities")
            # uniform over the item's given experts: argmax of uniform noise on the present ones
            u = torch.rand(S, B, generator=generator).masked_fill(~have, -1.0)
            pick = u.argmax(0).to(locs.device)
            z = locs.gather(0, pick[None, :, None].expand(1, B, locs.shape[-1]))[0]
            return [dist_mean(v.decode(z)) for v in self.vaes]
