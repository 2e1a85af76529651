"""Networks of the five-modality experiments: one VAE per modality, all alike (PolyMNIST-style).

- polydigits [3, 12, 12] (the offline default): MLP 128 encoder and decoder, small enough that
  M = 5 experts x K samples train on a CPU in minutes;
- polymnist [3, 28, 28] (the real PolyMNIST files): the SVHN conv stack (32-64-128) on the image
  zero-padded to 32x32, the decoder's output cropped back to 28x28.
Laplace posterior (softmax scale) and Laplace(0.75) likelihood on sigmoid means, as the paper's
image modalities; llik_scaling 1 (every modality has the same size).
"""
import torch.distributions as D
import torch.nn as nn
import torch.nn.functional as F

from .nets import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder
from .vae import VAE, ImageLikelihood

POLYDIGITS_SHAPE, POLYMNIST_SHAPE = (3, 12, 12), (3, 28, 28)
N_MODALITIES = 5


class PaddedConvEncoder(ConvEncoder):
    """ConvEncoder on [B, C, 28, 28] zero-padded to 32x32."""

    def __init__(self, latent_dim, pad=2, **kw):
        super().__init__(latent_dim, **kw)
        self.pad = pad

    def forward(self, x):
        return super().forward(F.pad(x, (self.pad,) * 4))


class CroppedConvDecoder(ConvDecoder):
    """ConvDecoder to 32x32, cropped to the central 28x28."""

    def __init__(self, latent_dim, crop=2, **kw):
        super().__init__(latent_dim, **kw)
        self.crop = crop

    def forward(self, z):
        c = self.crop
        return super().forward(z)[..., c:-c, c:-c]


def poly_vae(experiment, m, latent_dim=20, hidden=128, **kw):
    """Modality m's VAE of `experiment` ("polydigits" or "polymnist")."""
    if experiment == "polydigits":
        shape = POLYDIGITS_SHAPE
        enc, dec = MLPEncoder(latent_dim, shape, hidden), MLPDecoder(latent_dim, shape, hidden)
    elif experiment == "polymnist":
        shape = POLYMNIST_SHAPE
        enc, dec = PaddedConvEncoder(latent_dim), CroppedConvDecoder(latent_dim)
    else:
        raise ValueError(f"argument 'experiment' must be 'polydigits' or 'polymnist', got {experiment!r}")
    return VAE(enc, dec, latent_dim, posterior=D.Laplace, scale_fn="softmax",
               likelihood=ImageLikelihood(D.Laplace, 0.75), data_shape=shape, name=f"m{m}", **kw)


def poly_vaes(experiment, latent_dim, prior, n_modalities=N_MODALITIES, llik_scaling=1.0):
    return nn.ModuleList(poly_vae(experiment, m, latent_dim, prior=prior, llik_scaling=llik_scaling)
                         for m in range(n_modalities))
