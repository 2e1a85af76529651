"""Input checks of the multimodal objectives, in one place: clear errors before any work.

`check_modalities(model, x)` is what every objective that takes a batch per modality calls first.
"""
import torch


def check_modalities(model, x) -> None:
    """Raise ValueError unless `x` holds one batch per modality of `model` (an MMVAE: `model.vaes`),
    in the model's order, all of one batch size (item b of every modality is one multimodal datum).
    A single-modality model (no `vaes`) takes one tensor and is not checked here."""
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
