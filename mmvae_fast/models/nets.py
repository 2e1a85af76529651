"""Encoders and decoders of the MMVAE paper (appendix, Table 6) and of its released code.

Encoders map a batch [B, *data] to (loc, raw) of shape [B, L]; the VAE turns `raw` into a scale.
Decoders map latents of any leading shape [*S, L] to the parameters of p(x | z), shape [*S, *data]
(words: logits [*S, T, V]); they flatten the leading dims, run, and restore them.
"""
import math

import torch
import torch.nn as nn

ETA = 1e-6  # keeps scales and image means away from 0 (the paper code's Constants.eta)


def _flat(z):
    return z.reshape(-1, z.shape[-1]), z.shape[:-1]


class MLPEncoder(nn.Module):
    """MNIST: FC 400 ReLU, then FC L (loc) and FC L (raw scale). Input [B, 1, 28, 28]."""

    def __init__(self, latent_dim, data_shape=(1, 28, 28), hidden=400):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(math.prod(data_shape), hidden), nn.ReLU(True))
        self.fc_loc = nn.Linear(hidden, latent_dim)
        self.fc_scale = nn.Linear(hidden, latent_dim)

    def forward(self, x):
        h = self.body(x.flatten(1))
        return self.fc_loc(h), self.fc_scale(h)


class MLPDecoder(nn.Module):
    """MNIST: FC 400 ReLU, FC 784 Sigmoid; the mean is clamped to [eta, 1 - eta] as in the paper code."""

    def __init__(self, latent_dim, data_shape=(1, 28, 28), hidden=400):
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(True), nn.Linear(hidden, math.prod(data_shape)))

    def forward(self, z):
        zf, lead = _flat(z)
        mean = torch.sigmoid(self.net(zf)).clamp(ETA, 1 - ETA)
        return mean.reshape(*lead, *self.data_shape)


class ConvEncoder(nn.Module):
    """SVHN: 4x4 convs 32-64-128 (stride 2, pad 1, ReLU) on 3x32x32, then two 4x4 convs to L.

    CUB raw images (released code): the same pattern with 64-128-256-512 channels on 3x64x64."""

    def __init__(self, latent_dim, channels=(32, 64, 128), in_channels=3):
        super().__init__()
        layers, c = [], in_channels
        for c_out in channels:
            layers += [nn.Conv2d(c, c_out, 4, 2, 1), nn.ReLU(True)]
            c = c_out
        self.body = nn.Sequential(*layers)
        self.c_loc = nn.Conv2d(c, latent_dim, 4, 1, 0)
        self.c_scale = nn.Conv2d(c, latent_dim, 4, 1, 0)

    def forward(self, x):
        h = self.body(x)
        return self.c_loc(h).flatten(1), self.c_scale(h).flatten(1)


class ConvDecoder(nn.Module):
    """SVHN: 4x4 upconv 128 (stride 1, pad 0) then 64, 32 and 3 channels (stride 2, pad 1), Sigmoid."""

    def __init__(self, latent_dim, channels=(128, 64, 32), out_channels=3):
        super().__init__()
        layers, c = [nn.ConvTranspose2d(latent_dim, channels[0], 4, 1, 0), nn.ReLU(True)], channels[0]
        for c_out in channels[1:]:
            layers += [nn.ConvTranspose2d(c, c_out, 4, 2, 1), nn.ReLU(True)]
            c = c_out
        layers += [nn.ConvTranspose2d(c, out_channels, 4, 2, 1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        zf, lead = _flat(z)
        out = self.net(zf[:, :, None, None])
        return out.reshape(*lead, *out.shape[1:])


class FeatureEncoder(nn.Module):
    """CUB image features: 2048 -> FC 1024 -> 512 -> 256 (ELU), then FC L, FC L."""

    def __init__(self, latent_dim, n_features=2048, hidden=(1024, 512, 256)):
        super().__init__()
        layers, d = [], n_features
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ELU(inplace=True)]
            d = h
        self.body = nn.Sequential(*layers)
        self.fc_loc = nn.Linear(d, latent_dim)
        self.fc_scale = nn.Linear(d, latent_dim)

    def forward(self, x):
        h = self.body(x)
        return self.fc_loc(h), self.fc_scale(h)


class FeatureDecoder(nn.Module):
    """CUB image features: L -> FC 256 -> 512 -> 1024 (ELU) -> FC 2048 (the feature mean)."""

    def __init__(self, latent_dim, n_features=2048, hidden=(256, 512, 1024)):
        super().__init__()
        layers, d = [], latent_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ELU(inplace=True)]
            d = h
        layers.append(nn.Linear(d, n_features))
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        zf, lead = _flat(z)
        out = self.net(zf)
        return out.reshape(*lead, out.shape[-1])


def _conv_bn(conv, c_out):
    return [conv, nn.BatchNorm2d(c_out), nn.ReLU(True)]


class SentenceEncoder(nn.Module):
    """CUB captions: word embedding, then a conv stack with BatchNorm over the [T, E] 'image'.

    Input [B, T] word indices (T = 32). With E = 128 the stack 32x128 -> 16x64 -> 8x32 -> 4x16
    (4x4 convs 32, 64, 128) -> 4x8 -> 4x4 (1x4 convs 256, 512) ends at 1x1 after the final 4x4
    convs to L, as in the released code. (Table 6 prints "Word Emb. 256", which its own conv
    stack cannot reduce to 1x1; the decoder's output width 128 fixes E = 128.)"""

    def __init__(self, latent_dim, vocab_size=1590, emb_dim=128, base=32):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, emb_dim, padding_idx=0)
        b = base
        self.body = nn.Sequential(
            *_conv_bn(nn.Conv2d(1, b, 4, 2, 1), b),
            *_conv_bn(nn.Conv2d(b, 2 * b, 4, 2, 1), 2 * b),
            *_conv_bn(nn.Conv2d(2 * b, 4 * b, 4, 2, 1), 4 * b),
            *_conv_bn(nn.Conv2d(4 * b, 8 * b, (1, 4), (1, 2), (0, 1)), 8 * b),
            *_conv_bn(nn.Conv2d(8 * b, 16 * b, (1, 4), (1, 2), (0, 1)), 16 * b),
        )
        self.c_loc = nn.Conv2d(16 * b, latent_dim, 4, 1, 0)
        self.c_scale = nn.Conv2d(16 * b, latent_dim, 4, 1, 0)

    def forward(self, x):
        h = self.body(self.embedding(x.long()).unsqueeze(1))
        return self.c_loc(h).flatten(1), self.c_scale(h).flatten(1)


class SentenceDecoder(nn.Module):
    """CUB captions: the mirror conv stack to a [T, E] map, then the transposed word embedding
    (weights tied to the encoder's embedding, as in the released code) gives logits [*S, T, V]."""

    def __init__(self, latent_dim, vocab_size=1590, emb_dim=128, base=32, max_len=32):
        super().__init__()
        b = base
        self.max_len, self.vocab_size = max_len, vocab_size
        self.net = nn.Sequential(
            *_conv_bn(nn.ConvTranspose2d(latent_dim, 16 * b, 4, 1, 0), 16 * b),
            *_conv_bn(nn.ConvTranspose2d(16 * b, 8 * b, (1, 4), (1, 2), (0, 1)), 8 * b),
            *_conv_bn(nn.ConvTranspose2d(8 * b, 4 * b, (1, 4), (1, 2), (0, 1)), 4 * b),
            *_conv_bn(nn.ConvTranspose2d(4 * b, 2 * b, 4, 2, 1), 2 * b),
            *_conv_bn(nn.ConvTranspose2d(2 * b, b, 4, 2, 1), b),
            nn.ConvTranspose2d(b, 1, 4, 2, 1),
            nn.ReLU(True),
        )
        self.to_vocab = nn.Linear(emb_dim, vocab_size)

    def forward(self, z):
        zf, lead = _flat(z)
        h = self.net(zf[:, :, None, None])  # [N, 1, T, E]
        return self.to_vocab(h.squeeze(1)).reshape(*lead, self.max_len, self.vocab_size)
