"""Argument checks shared by the public ops: clear errors that name the argument."""
import os

import torch

from .._numerics import FAMILIES, LIKELIHOODS


def _checks_enabled(t=None) -> bool:
    # Value checks (e.g. scale > 0) read the data: skip them while torch.compile traces, and for
    # meta tensors, which have no data (the op then runs the reference for shapes and dtypes).
    return not torch.compiler.is_compiling() and not (t is not None and t.is_meta)


def tensor(name: str, t, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"argument '{name}' must be a floating-point tensor, got {t.dtype}")


def same_device(**tensors) -> torch.device:
    devs = {n: t.device for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    first = next(iter(devs.values()))
    if any(d != first for d in devs.values()):
        desc = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise ValueError(f"all tensors must be on one device; got {desc}. Move them with .to(device)")
    return first


def same_dtype(**tensors) -> None:
    dts = {n: t.dtype for n, t in tensors.items()}
    if len(set(dts.values())) > 1:
        desc = ", ".join(f"{n} is {d}" for n, d in dts.items())
        raise TypeError(f"arguments must share one dtype; got {desc}. Cast them with .to(dtype)")


def shape(name: str, t, expected, what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"argument '{name}' must have shape {tuple(expected)} ({what}), got {tuple(t.shape)}")


def broadcasts(name: str, t, to_name: str, to) -> None:
    """t broadcasts to the shape of `to` (one-way). A loop over the dims: torch.broadcast_shapes
    runs a Python reference implementation that costs more than the ops it guards."""
    a, b = tuple(t.shape), tuple(to.shape)
    if len(a) > len(b) or any(x not in (1, y) for x, y in zip(a[::-1], b[::-1])):
        raise ValueError(f"argument '{name}' of shape {a} does not broadcast to {to_name} {b}")


def _sync_checks(t) -> bool:
    # CPU tensors are checked at once; on a GPU the check must not wait for the device
    return t.device.type == "cpu" or os.environ.get("MMVAE_FAST_SYNC_CHECKS") == "1"


def _assert_none(bad, msg: str, detail=None) -> None:
    """Raise ValueError(msg) if the bool tensor `bad` has a True entry: at once on a CPU (with
    detail(bad) appended, when given) or with MMVAE_FAST_SYNC_CHECKS=1; on a GPU an asynchronous
    assertion (a device-side error at the next sync), so the host never waits for the device."""
    if _sync_checks(bad):
        if bool(bad.any()):
            raise ValueError(msg + (detail(bad) if detail else ""))
    else:
        torch._assert_async(~bad.any(), msg)


def positive(name: str, t) -> None:
    """scale > 0, for a tensor or a Python number (checked without a tensor op); see _assert_none."""
    if isinstance(t, (int, float)):
        if not t > 0:
            raise ValueError(f"argument '{name}' must be strictly positive (it is a scale)")
        return
    if _checks_enabled(t):
        if t.numel() == 1 and t.device.type == "cpu":  # one number: read it (NaN passes: NaN in, NaN out)
            if float(t) <= 0:
                raise ValueError(f"argument '{name}' must be strictly positive (it is a scale)")
            return
        _assert_none(t <= 0, f"argument '{name}' must be strictly positive (it is a scale)")


def class_indices(name: str, x, V: int) -> None:
    """Integer class indices in [0, V): an index outside would read past the logits row (torch's
    gather and the kernels fail each their own way); see _assert_none."""
    if not _checks_enabled(x) or x.numel() == 0:
        return
    bad = (x < 0) | (x >= V)
    if _sync_checks(x):
        if bool(bad.any()):
            i = x[bad].flatten()[0].item()
            raise ValueError(f"argument '{name}' holds class index {i}, outside the vocabulary [0, {V}) of the logits' last dim")
    else:
        torch._assert_async(~bad.any(), f"argument '{name}' holds a class index outside the vocabulary [0, {V})")


def unit_interval(name: str, x) -> None:
    """Values in [0, 1] (Bernoulli targets, soft ones allowed; NaN passes: NaN in, NaN out); see
    _assert_none."""
    if _checks_enabled(x) and x.numel():
        _assert_none((x < 0) | (x > 1), f"argument '{name}' must hold Bernoulli targets in [0, 1]",
                     lambda bad: f", got {x[bad].flatten()[0].item()}")


def family(name: str, f, allowed=FAMILIES) -> str:
    if f not in allowed:
        raise ValueError(f"argument '{name}' must be one of {allowed}, got {f!r}")
    return f


def likelihood(name: str, f) -> str:
    return family(name, f, LIKELIHOODS)


def experts(z, loc, scale, family_name) -> None:
    """The mixture ops' arguments: z [M, K, B, L], loc and scale [M, B, L] of one device and dtype."""
    for n, t in (("z", z), ("loc", loc), ("scale", scale)):
        tensor(n, t)
    same_device(z=z, loc=loc, scale=scale)
    same_dtype(z=z, loc=loc, scale=scale)
    family("family", family_name)
    if z.dim() != 4:
        raise ValueError(f"argument 'z' must have shape [M, K, B, L] (groups, samples, batch, latent), got {tuple(z.shape)}")
    M, K, B, L = z.shape
    if min(M, K, B, L) < 1:
        raise ValueError(f"argument 'z' must have non-empty dims [M, K, B, L], got {tuple(z.shape)}")
    shape("loc", loc, (M, B, L), "experts, batch, latent: one expert per group of z")
    shape("scale", scale, (M, B, L), "experts, batch, latent")
    positive("scale", scale)
