"""Input checks of the objectives, in one place: clear errors before any work.

`check_modalities(model, x, mask)` is what every multimodal objective calls first: the list of
modalities, each modality's batch against the shape and dtype its VAE takes (`VAE.check_input`), and
the mask; `check_single(model, x)` the single-modality objectives' batch.
"""
import torch


def check_mask(mask, M, B) -> None:
    """mask: None or a bool tensor [M, B] (True = modality m of item b present)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"argument 'mask' must be a bool tensor [M, B] (True = modality present), got {mask!r:.80}")
    if tuple(mask.shape) != (M, B):
        raise ValueError(f"argument 'mask' must have shape [M, B] = [{M}, {B}], got {tuple(mask.shape)}")


def _check_input(model, t, name) -> None:
    check = getattr(model, "check_input", None)  # the package's VAEs; other models are not checked
    if check is not None:
        check(t, name)


def check_single(model, x) -> None:
    """The single-modality objectives' batch: checked against the model when it is one of the
    package's VAEs (`check_input`), whatever else it holds."""
    _check_input(model, x, "x")


def check_modalities(model, x, mask=None) -> None:
    """Raise ValueError unless `x` holds one batch per modality of `model` (an MMVAE: `model.vaes`),
    in the model's order, all of one batch size (item b of every modality is one multimodal datum),
    each of the shape and dtype its VAE takes (ValueError / TypeError naming the modality), and
    `mask` is None or a bool [M, B]. A single-modality model (no `vaes`) takes one tensor and is
    not checked here (see check_single). Nothing here reads the data: no host-device sync."""
    vaes = getattr(model, "vaes", None)
    if vaes is None:
        return
    M = len(vaes)
    if isinstance(x, torch.Tensor) or not isinstance(x, (list, tuple)):
        raise ValueError(f"argument 'x' must be a list of {M} tensors, one batch per modality of the model, "
                         f"got a {type(x).__name__}; pass [x_1, ..., x_{M}] in the model's modality order")
    if len(x) != M:
        what = "fewer" if len(x) < M else "more"
        raise ValueError(f"argument 'x' holds {len(x)} modalities, {what} than the model's {M}; pass one batch per "
                         f"modality, [x_1, ..., x_{M}] in the model's order (a missing modality needs a model "
                         f"without it, not a shorter list)")
    for m, t in enumerate(x):
        if t is None:  # a modality absent from the whole batch (see MMVAE.forward)
            continue
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            raise ValueError(f"argument 'x[{m}]' must be a tensor with a leading batch dim, got "
                             f"{type(t).__name__}{'' if not isinstance(t, torch.Tensor) else ' of shape ' + str(tuple(t.shape))}")
    sizes = [int(t.shape[0]) for t in x if t is not None]
    if len(set(sizes)) > 1:
        raise ValueError(f"the modalities of argument 'x' have different batch sizes {sizes}; every modality needs "
                         f"the same batch of data (item b of each is one multimodal datum): pair them first")
    for m, t in enumerate(x):
        if t is not None:
            _check_input(vaes[m], t, f"x[{m}]")
    if sizes:  # none given: the model says every modality is absent
        check_mask(mask, M, sizes[0])
