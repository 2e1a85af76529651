"""Pairing two labelled datasets class by class (the MNIST-SVHN construction of the paper's code)."""
import torch


def pair_indices(labels_a, labels_b, dm=30, max_per_class=10000, seed=0):
    """Indices (idx_a, idx_b) of pairs with labels_a[idx_a] == labels_b[idx_b].

    Per class c (in increasing order): n = min(#a of class c, #b of class c, max_per_class); the
    first n indices of class c in each dataset (dataset order) are matched by dm independent
    random permutations of each, so every one of them appears exactly dm times. Classes present
    in only one dataset give no pairs. Deterministic in `seed`. Returns two LongTensors of length
    dm * sum_c n_c, grouped by class then permutation, as the paper's code."""
    la = torch.as_tensor(labels_a).long().flatten()
    lb = torch.as_tensor(labels_b).long().flatten()
    if isinstance(dm, bool) or not isinstance(dm, int) or dm < 1:
        raise ValueError(f"argument 'dm' must be a positive integer, got {dm!r}")
    if isinstance(max_per_class, bool) or not isinstance(max_per_class, int) or max_per_class < 1:
        raise ValueError(f"argument 'max_per_class' must be a positive integer, got {max_per_class!r}")
    g = torch.Generator().manual_seed(int(seed))
    out_a, out_b = [], []
    for c in torch.unique(la).tolist():
        ia = torch.nonzero(la == c).flatten()
        ib = torch.nonzero(lb == c).flatten()
        n = min(len(ia), len(ib), max_per_class)
        if n == 0:
            continue
        ia, ib = ia[:n], ib[:n]
        for _ in range(dm):
            out_a.append(ia[torch.randperm(n, generator=g)])
            out_b.append(ib[torch.randperm(n, generator=g)])
    if not out_a:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(out_a), torch.cat(out_b)
