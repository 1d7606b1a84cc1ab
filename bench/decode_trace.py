"""Per-CTA timeline of the decode kernel (a diagnosis tool, not a benchmark).

Builds the bench_decode variants with -DKVGEN_DECODE_TRACE (decode.cuh then records %globaltimer at the start
of each CTA, when its context length is known, when its first tile has landed, when its loop is done and at
exit, plus its SM), runs one decode per shape and prints where the time goes: launch spread, the ramp before
the first tile, streaming, the epilogue, and the tail after the last CTA's loop.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvgen import nvrtc  # noqa: E402
from kvgen.benchmark import decode_cache  # noqa: E402
from kvgen.build import build, import_package  # noqa: E402
from kvgen.grid import load_config  # noqa: E402
from kvgen.runtime import driver  # noqa: E402
from kvgen.runtime.decode_plan import DecodePlan  # noqa: E402


def read_trace(cache, n_ctas: int) -> np.ndarray:
    from cuda.bindings import driver as cu

    path = str(cache.variant.CUBINS[driver.device_arch(cache.device)])
    module = driver._modules[(path, cache.device)]
    err, ptr, size = cu.cuModuleGetGlobal(module.handle, b"kvgen_decode_trace")
    assert int(err) == 0, err
    host = np.zeros((1 << 16, 16), np.uint64)
    (err,) = cu.cuMemcpyDtoH(host.ctypes.data_as(ctypes.c_void_p).value, ptr, host.nbytes)
    assert int(err) == 0, err
    return host[:n_ctas]


def report(label: str, tr: np.ndarray) -> None:
    t0 = tr[:, 0].min()
    rel = (tr[:, :9].astype(np.int64) - int(t0)) / 1000.0  # µs from the first CTA's start
    start, known, first, loop, end, parked, merged = (rel[:, i] for i in range(7))
    q = lambda x: f"{np.percentile(x, 5):6.2f} / {np.median(x):6.2f} / {np.percentile(x, 95):6.2f} / {x.max():6.2f}"  # noqa: E731
    print(f"== {label}: {len(tr)} CTAs on {len(np.unique(tr[:, 15]))} SMs, kernel span {end.max():.2f} us "
          "(p5 / median / p95 / max, µs)")
    print(f"   start offset          {q(start)}")
    print(f"   length known - start  {q(known - start)}")
    print(f"   first tile - known    {q(first - known)}")
    print(f"   loop - first tile     {q(loop - first)}")
    print(f"   exit - loop (epilog)  {q(end - loop)}")
    print(f"     of which park+barrier {q(parked - loop)}, first merge {q(merged - parked)}, rest {q(end - merged)}")
    print(f"   CTA lifetime          {q(end - start)}")
    # Slot 14 holds clock64 at the last trace point reached, the exit (point 4) in every CTA that merges.
    cycles = tr[:, 14].astype(np.int64) - tr[:, 13].astype(np.int64)
    ghz = cycles / np.maximum((end - start) * 1000.0, 1.0)
    print(f"   SM clock, GHz         {q(ghz)}")
    hist = np.histogram(end, bins=8, range=(0, end.max()))[0]
    print(f"   CTAs ending per 1/8 of the span: {list(map(int, hist))}")
    # Per SM: how many CTAs it ran and when its last one ended (an SM with more CTAs of one wave ending later
    # means the SMs do not share the memory bandwidth evenly).
    sms, per_sm = np.unique(tr[:, 15], return_inverse=True)
    counts = np.bincount(per_sm)
    last = np.zeros(len(sms))
    np.maximum.at(last, per_sm, end)
    by_count = ", ".join(f"{int(n)} CTAs: {int((counts == n).sum())} SMs, last end {np.median(last[counts == n]):.2f}"
                         for n in np.unique(counts))
    print(f"   per SM (median last end): {by_count}")


def main() -> None:
    out = Path("/tmp/kvgen-trace")
    extra = tuple(d for d in os.environ.get("TRACE_DEFINES", "").split(",") if d)  # more decode.cuh knobs
    with nvrtc.defines("KVGEN_DECODE_TRACE", *extra):
        # TRACE_CONFIG: another benchmark config
        config = Path(os.environ.get("TRACE_CONFIG", ROOT / "configs" / "bench_decode.yaml"))
        build(load_config(config), out=out, jobs=1, pattern="*p16*")
    mod = import_package(out, "kvgen_trace")
    rng = np.random.default_rng(0)
    for v in mod.VARIANTS.values():
        spec = v.spec()
        for label, lens, chunk in (("16x1k planned", [1024] * 16, None), ("64x1k planned", [1024] * 64, None),
                                   ("128x1k planned", [1024] * 128, None),
                                   ("64x4k planned", [4096] * 64, None), ("64x4k chunk 128", [4096] * 64, 128)):
            # Three caches, the traced one built first: the other two (built and decoded after it) push its
            # blocks out of L2, so the traced decode reads HBM as in the benchmark.
            caches = [decode_cache(v, lens, rng) for _ in range(3)]
            q = torch.randn(len(lens), spec.attention.num_q_heads, spec.cache.head_size, device="cuda",
                            dtype=getattr(torch, spec.cache.io_dtype))
            o = torch.empty(q.shape, device="cuda", dtype=getattr(torch, spec.attention.output_dtype))
            for c in caches:
                if chunk is not None:
                    c.decode_plan = DecodePlan(c, chunk, -(-max(lens) // chunk), len(lens))
            for c in (caches[1], caches[2], caches[0]):
                c.decode(0, q, o)
            torch.cuda.synchronize()
            c = caches[0]
            n = c.decode_plan.splits * c.num_heads * len(lens)
            report(f"{spec.cache.dtype} {label} (chunk {c.decode_plan.chunk})", read_trace(c, n))
            del caches, c
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
