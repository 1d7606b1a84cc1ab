"""Timing helpers shared by kvgen's benchmarks: CUDA-graph replays with buffer rotation, copy bandwidth."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

Launch = Callable[[], None]


def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 50) -> float:
    """Device-to-device copy_ of nbytes, bytes read + written per second (median of reps)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e-3)
    return 2 * nbytes / statistics.median(times)


def graph_time(launches: Sequence[Launch], replays: int = 30) -> float:
    """Median seconds per launch: all launches (each on its own buffers, so L2 cannot serve repeats) are
    captured in one CUDA graph, which is replayed; Python launch cost stays out of the number."""
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for fn in launches:  # warm-up on the capture stream: lazy init, JIT, module loads
            fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for fn in launches:
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        g.replay()
        en.record()
        en.synchronize()
        times.append(st.elapsed_time(en) * 1e-3 / len(launches))
    return statistics.median(times)


def eager_host_cost(fn: Launch, calls: int = 2000) -> float:
    """Host seconds per eager call (launch-bound loop; the GPU work per call is tiny)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls


def rotations(bytes_per_set: int, floor: int = 256 << 20, cap: int = 64) -> int:
    """How many disjoint buffer sets make the rotated working set at least `floor` bytes."""
    return max(2, min(cap, -(-floor // max(1, bytes_per_set))))
