"""Launch each kernel of interest a few times on one benchmark shape, for Nsight Compute (ncu) to profile.

Run on the GPU machine under ncu, e.g. `ncu --kernel-name regex:kvgen --launch-skip 2 --launch-count 1
--section SpeedOfLight ... python3 bench/ncu_probe.py store-bf16`. Not a benchmark: ncu replays each profiled
launch with flushed caches and reports throughput, occupancy and warp stall reasons.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvgen.benchmark import decode_cache, permuted_pages  # noqa: E402
from kvgen.build import build, import_package  # noqa: E402
from kvgen.grid import load_config  # noqa: E402


def variant_of(config: str, pattern: str, pkg: str):
    out = Path(f"/tmp/kvgen-ncu-{config}")
    build(load_config(ROOT / "configs" / f"{config}.yaml"), out=out, jobs=4, pattern=pattern)
    mod = import_package(out, pkg)
    return next(iter(mod.VARIANTS.values()))


def store(pattern: str, batch: int = 8, per_req: int = 1024, cached: int = 512) -> None:
    v = variant_of("bench_store", pattern, "kvgen_ncu_store_" + pattern.replace("*", ""))
    p = v.spec().cache.page_size
    pages_per = (cached + per_req + p - 1) // p
    cache = v.cache(max_batch=batch, num_pages=batch * pages_per + 1, max_pages_per_request=pages_per, num_layers=1)
    cache.set_pages(permuted_pages([pages_per] * batch, np.random.default_rng(0)))
    cache.set_cache_lengths([cached] * batch)
    cache.begin_step([per_req] * batch)
    k = torch.randn(batch * per_req, 8, 128, device="cuda", dtype=torch.bfloat16)
    for _ in range(4):
        cache.store(0, k, k.clone())
    torch.cuda.synchronize()


def decode(pattern: str, batch: int, ctx: int) -> None:
    run_decode(variant_of("bench_decode", pattern, "kvgen_ncu_dec_" + pattern.replace("*", "")), batch, ctx)


def run_decode(v, batch: int, ctx: int) -> None:
    """Four decodes of `batch` requests of `ctx` tokens through variant v (32 query heads)."""
    cache = decode_cache(v, [ctx] * batch, np.random.default_rng(0))
    q = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    for _ in range(4):
        cache.decode(0, q, out)
    torch.cuda.synchronize()


def decode_flashinfer_tc(pattern: str, batch: int, ctx: int) -> None:
    """FlashInfer's tensor-core decode on the same cache layout and lengths as `decode` (the peer to compare with)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import peers

    v = variant_of("bench_decode", pattern, "kvgen_ncu_dec_" + pattern.replace("*", ""))
    cache = decode_cache(v, [ctx] * batch, np.random.default_rng(0))
    q = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    run = peers.make_flashinfer_decode(q, cache.blocks[:, :, 0], cache.lookup_table[:batch], lens, cache.page_size,
                                       32, 8, 128, True, cache.blocks.dtype)
    for _ in range(4):
        run()
    torch.cuda.synchronize()


def decode_groups(scales: str | None, batch: int, ctx: int) -> None:
    """FP8 decode with per-64 scales (float32, or e8m0 with scales="e8m0"), 16-token pages: the two builds whose
    speeds differ by 9-19% although their bytes differ by 5% (bench/RESULTS.md, session 14)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from decode_bench import load_generated

    mod = load_generated("auto", tag=f"-ncu-g64-{scales or 'f32'}", attention={"granularity": 64}, scales=scales)
    run_decode(next(v for n, v in mod.VARIANTS.items() if "e4m3" in n and "_p16_" in n), batch, ctx)


CASES = {
    "decode-fp8g64f32-128x4k": lambda: decode_groups(None, 128, 4096),
    "decode-fp8g64e8m0-128x4k": lambda: decode_groups("e8m0", 128, 4096),
    "store-bf16": lambda: store("*bf16*p128*"),
    "store-fp8": lambda: store("*e4m3*p128*"),
    "decode-bf16-16x1k": lambda: decode("*bf16*p16_*", 16, 1024),
    "decode-bf16-64x4k": lambda: decode("*bf16*p64_*", 64, 4096),
    "decode-fp8-16x1k": lambda: decode("*e4m3*p16_*", 16, 1024),
    "decode-bf16-128x4k": lambda: decode("*bf16*p16_*", 128, 4096),
    "decode-fp8-128x4k": lambda: decode("*e4m3*p16_*", 128, 4096),
    "decode-fp8-128x1k": lambda: decode("*e4m3*p16_*", 128, 1024),
    "decode-fp8-64x16k": lambda: decode("*e4m3*p16_*", 64, 16384),
    "decode-bf16-64x16k": lambda: decode("*bf16*p16_*", 64, 16384),
    "fi-tc-bf16-64x16k": lambda: decode_flashinfer_tc("*bf16*p16_*", 64, 16384),
}

if __name__ == "__main__":
    for name in sys.argv[1:]:
        CASES[name]()
