"""Where the host time of one eager kvgen store goes (validation, stream lookup, launch), on the GPU machine."""

from __future__ import annotations

import cProfile
import pstats
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvgen.benchmark import eager_host_costs  # noqa: E402
from kvgen.build import build, import_package  # noqa: E402
from kvgen.grid import load_config  # noqa: E402
from kvgen.runtime.tensors import check_tensor  # noqa: E402


def one_long_loop(fn, n: int = 5000) -> float:
    """The method before session 6: one loop of n calls, which fills the launch queue and then times the GPU."""
    import time

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def main() -> None:
    out = Path("/tmp/kvgen-host-profile")
    build(load_config(ROOT / "configs" / "bench_store.yaml"), out=out, jobs=4, pattern="bench_paged_bf16_h8_d128_p16")
    mod = import_package(out, "kvgen_host_profile")
    v = next(iter(mod.VARIANTS.values()))
    cache = v.cache(max_batch=64, num_pages=65, max_pages_per_request=1, num_layers=1)
    cache.set_pages([[i] for i in range(64)])
    cache.begin_step([1] * 64)
    k = torch.randn(64, 8, 128, device="cuda", dtype=torch.bfloat16)
    cache.store(0, k, k)
    launch = cache._launches["store"]
    grid, stream = (32, 1, 1), cache._stream(None)
    kt, vptr, ro = cache._ragged_inputs("store", 0, ("k", "v"), k, k, None)
    ops = {
        "full store()": lambda: cache.store(0, k, k),
        "_ragged_inputs (every check)": lambda: cache._ragged_inputs("store", 0, ("k", "v"), k, k, None),
        "check_tensor x1": lambda: check_tensor("s", "k", k, dtype="bfloat16", shape=(None, 8, 128), device=0),
        "_launch_ragged (no checks)": lambda: cache._launch_ragged("store", 0, 64, kt.ptr, vptr, ro.ptr, 0, None),
        "_stream(None)": lambda: cache._stream(None),
        "launch only (ctypes cuLaunchKernel)": lambda: launch(grid, (256, 1, 1), stream),
        "torch.add eager (reference)": lambda: torch.add(k, k),
    }
    costs = eager_host_costs(list(ops.values()), calls=5000)  # interleaved: the rows share the host's noise
    rows = {name: c * 1e6 for name, c in zip(ops, costs)}
    rows["full store(), one 5000-call loop"] = one_long_loop(lambda: cache.store(0, k, k))
    rows["launch only, one 5000-call loop"] = one_long_loop(lambda: launch(grid, (256, 1, 1), stream))
    for name, us in rows.items():
        print(f"{name:40s} {us:7.2f} us")
    # Where store() spends it, by function (cProfile inflates every call; the shares are what matter).
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(3000):
        cache.store(0, k, k)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
