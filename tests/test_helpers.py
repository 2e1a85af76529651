"""The test helpers can fail: a comparison that passes whatever a backend returns, or a memory
check that cannot see a table, would hide the bugs the op tests look for."""
import pytest
import torch
from helpers import check_close

from mmvae_fast.profiling import allocations


def test_check_close_fails_when_a_backend_returns_no_gradient_where_the_reference_has_one():
    with pytest.raises(AssertionError, match="no gradient where the reference has one"):
        check_close([None], [torch.ones(3)])


def test_check_close_fails_on_a_gradient_where_the_reference_has_none():
    with pytest.raises(AssertionError, match="nonzero where the reference has no gradient"):
        check_close([torch.ones(3)], [None])
    check_close([None, torch.zeros(3)], [None, None])  # none, or zeros: the same gradient


def test_check_close_fails_on_a_missing_result():
    with pytest.raises(AssertionError, match="results against"):
        check_close([torch.ones(3)], [torch.ones(3), torch.ones(3)])


class _TableInBackward(torch.autograd.Function):
    """Saves nothing large, but builds (and frees) an n x n table inside backward."""

    @staticmethod
    def forward(ctx, x):
        return x.sum()

    @staticmethod
    def backward(ctx, g):
        n = 512
        table = torch.ones(n, n)
        return g * table.sum(0)[:1].expand(n) / n


def test_allocations_see_a_table_built_and_freed_inside_backward():
    x = torch.ones(512, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        sizes, peak = allocations(lambda: _TableInBackward.apply(x).backward())
    assert saved == []  # what a saved-tensors check sees: nothing
    table = 512 * 512 * 4
    assert max(sizes) >= table and peak >= table  # what the allocator saw
