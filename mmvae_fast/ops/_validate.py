"""Argument checks shared by the public ops: clear errors that name the argument."""
import torch

from ..reference.densities import FAMILIES
from ..reference.likelihood import LIKELIHOODS


def _checks_enabled() -> bool:
    # Value checks (e.g. scale > 0) read the data: skip them while torch.compile traces.
    return not torch.compiler.is_compiling()


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


def positive(name: str, t) -> None:
    if _checks_enabled() and bool((t <= 0).any()):
        raise ValueError(f"argument '{name}' must be strictly positive (it is a scale)")


def family(name: str, f, allowed=FAMILIES) -> str:
    if f not in allowed:
        raise ValueError(f"argument '{name}' must be one of {allowed}, got {f!r}")
    return f


def likelihood(name: str, f) -> str:
    return family(name, f, LIKELIHOODS)
