"""Memory of a callable as torch's CPU allocator sees it: every allocation, forward, backward and
inside the C++ kernels included, read from the profiler's memory records in time order. The
benchmarks report peaks with it; the tests use it to prove that no op materialises a big table."""
from torch.profiler import ProfilerActivity, profile


def allocations(fn):
    """(sizes in bytes of every allocation made while fn() runs, peak bytes held above the level
    at its start). A tensor built and freed inside backward shows up here; saved-tensor hooks
    would not see it."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return [n for _, n in events if n > 0], peak


def peak_bytes(fn) -> int:
    """The peak of torch's CPU allocations during fn() above the level at its start."""
    return allocations(fn)[1]
