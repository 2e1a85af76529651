"""Argument checks of the objectives and the large-K path: clear errors that say what to pass."""

GRADS = ("eq8", "mixture", "mixture-centred", "released")


def check_K(K) -> int:
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"argument 'K' must be an integer >= 1 (samples per expert), got {K!r}")
    return K


def check_grad(grad) -> str:
    if grad not in GRADS:
        raise ValueError(f"argument 'grad' must be one of {GRADS}, got {grad!r}")
    return grad


def check_k_chunk(k_chunk) -> int:
    if isinstance(k_chunk, bool) or not isinstance(k_chunk, int) or k_chunk < 1:
        raise ValueError(f"argument 'k_chunk' must be an integer >= 1 (samples per chunk), got {k_chunk!r}")
    return k_chunk
