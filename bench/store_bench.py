"""Store benchmark (issue 3): kvgen's store vs FlashInfer append, vLLM Triton reshape_and_cache_flash and
torch index_copy_, on the same shapes and data, as a fraction of the measured device-copy bandwidth.

Run on the GPU machine through scripts/gpu-check.sh bench. Method: every op is captured with N disjoint
buffer sets (>= 256 MB rotated, so L2 cannot serve repeats) in one CUDA graph; the median of 30 replays
divided by N is the time per call. Eager host cost: 2000 back-to-back calls, host time per call.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402

from kvgen import derive, nvrtc  # noqa: E402
from kvgen.benchmark import (  # noqa: E402
    STATIC_SCALES,
    copy_bandwidth,
    eager_host_costs,
    graph_times,
    permuted_pages,
    rotations,
)
from kvgen.build import build, import_package  # noqa: E402
from kvgen.grid import load_config  # noqa: E402

H, D = 8, 128


DEFAULT_CONFIG = ROOT / "configs" / "bench_store.yaml"
CONFIG = DEFAULT_CONFIG  # --config: another grid of the same shape


def load_generated(out: Path, package: str = "kvgen_bench_store"):
    cfg = load_config(CONFIG)
    build(cfg, out=out, jobs=4)
    return import_package(out, package)


def adopt_all(variant, caches: list) -> list:
    return [type(c).wrap(variant, c.blocks, c.scales, c.lookup_table, c.cache_lengths, num_layers=1,
                         static_scales=c.static_scales) for c in caches]


# --try knobs -> kvgen.derive constants
TUNABLE = {"ipt": "ITEMS_PER_THREAD", "qipt": "QUANTIZED_ITEMS_PER_THREAD", "min_blocks": "STORE_MIN_BLOCKS",
           "passes": "PASSES_PER_BLOCK", "small": "SMALL_STORE_ONE_ITEM",
           "qvpt": "QUANTIZED_VECTORS_PER_LANE"}


def parse_try(text: str) -> dict[str, int]:
    """'ipt=4,min_blocks=6' -> {'ITEMS_PER_THREAD': 4, 'STORE_MIN_BLOCKS': 6}."""
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in TUNABLE:
            raise SystemExit(f"--try: unknown knob {key!r}; use one of {', '.join(TUNABLE)}")
        out[TUNABLE[key]] = int(value)
    return out


def with_derive(knobs: dict[str, int], fn):
    """Run fn with kvgen.derive constants overridden (a tuning experiment: the kernels and the launch split)."""
    saved = {k: getattr(derive, k) for k in knobs}
    for k, v in knobs.items():
        setattr(derive, k, v)
    try:
        return fn()
    finally:
        for k, v in saved.items():
            setattr(derive, k, v)


def check_same_store(default_set, other, label: str) -> None:
    """A tuning build must write exactly what the default build writes: poison the cache, store with each, compare
    the blocks and scales byte for byte (a wrong knob is reported and stops the run, not timed)."""
    cache, k, v = default_set
    written = []
    for c in (cache, other):
        cache.blocks.view(torch.uint8).fill_(0xFF)
        if cache.scales is not None:
            cache.scales.view(torch.uint8).fill_(0xFF)
        c.store(0, k, v)
        torch.cuda.synchronize()
        written.append([t.clone() for t in (cache.blocks, cache.scales) if t is not None])
    for a, b in zip(*written):
        if not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
            raise SystemExit(f"--try {label}: the store wrote different bytes than the default build (mismatch)")


def bare_launch(cache, total: int):
    """cuLaunchKernel of the cache's store kernel with the arguments of its last store(), and nothing else:
    what any Python launcher pays on this host."""
    launch, tpb = cache._launches["store"], cache.store_tokens_per_block(total)
    grid, stream = ((total + tpb - 1) // tpb, 1, 1), cache._stream(None)
    return lambda: launch(grid, (256, 1, 1), stream)


def pdl_floor(cache):
    """A kvgen kernel launched as a programmatic dependent (as store is) that only waits for the kernel before it
    and exits (copy_pages of zero pairs): the floor of one PDL-chained launch in a graph, against which the 64-token
    store is measured (the plain empty kernel row is the floor of plain launches)."""
    p, s, u = cache._ptrs, cache._scalars, cache._u64
    launch = cache._launch("copy", "copy_pages", (cache.args, p["a"], p["b"], s["n"], u["page_bytes"], u["scale_bytes"]))

    def fire() -> None:
        s["n"].value = 0
        launch.fire_dependent((1, 1, 1), (256, 1, 1), cache._stream(None))
    return fire


def make_set(variant, batch: int, per_req: int, cached: int, rng: np.random.Generator):
    """One independent cache + inputs: `batch` requests with `cached` tokens each, `per_req` new ones."""
    spec = variant.spec()
    p = spec.cache.page_size
    pages_per = (cached + per_req + p - 1) // p
    cache = variant.cache(max_batch=batch, num_pages=batch * pages_per + 1, max_pages_per_request=pages_per, num_layers=1)
    cache.set_pages(permuted_pages([pages_per] * batch, rng))
    cache.set_cache_lengths([cached] * batch)
    if cache.static_scales is not None:
        cache.set_static_scales(0, *STATIC_SCALES)
    cache.begin_step([per_req] * batch)
    T = batch * per_req
    k = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
    return cache, k, v


def slot_mapping(cache, batch: int, per_req: int, cached: int) -> torch.Tensor:
    p = cache.page_size
    slots = [int(cache.host_lut[b, (cached + t) // p]) * p + (cached + t) % p for b in range(batch) for t in range(per_req)]
    return torch.tensor(slots, dtype=torch.int64, device="cuda")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "store_bench.md")
    ap.add_argument("--try", dest="tries", nargs="*", default=[], metavar="KNOB=V[,KNOB=V]",
                    help=f"also time the store built with other derive constants ({', '.join(TUNABLE)}), same data")
    ap.add_argument("--defines", nargs="*", default=[], metavar="NAME=V[,NAME=V]",
                    help="also time the store compiled with these -D defines, one build each, same data (for a knob added to "
                         "store_load.cuh for an experiment; it has none by default)")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                    help="the variants to time (H 8, D 128 caches), e.g. configs/bench_small_pages.yaml")
    args = ap.parse_args()
    global CONFIG
    CONFIG = args.config.resolve()
    shapes = {(v.spec.cache.num_kv_heads, v.spec.cache.head_size) for v in load_config(CONFIG).variants}
    if shapes != {(H, D)}:
        raise SystemExit(f"{CONFIG}: the store benchmark's data is {H} KV heads x {D}; the config has {shapes}")
    rng = np.random.default_rng(0)
    mod = load_generated(Path(f"/tmp/kvgen-bench-store-{CONFIG.stem}"))
    extra = {}
    for i, text in enumerate(args.tries):
        knobs = parse_try(text)
        extra[text] = (knobs, with_derive(knobs, lambda i=i, knobs=knobs: load_generated(
            Path(f"/tmp/kvgen-bench-store-try{i}"), f"kvgen_bench_store_try{i}")))
    for i, text in enumerate(args.defines):
        with nvrtc.defines(*text.split(",")):
            extra[text] = ({}, load_generated(Path(f"/tmp/kvgen-bench-store-def{i}"), f"kvgen_bench_store_def{i}"))
    copy_bw = copy_bandwidth()
    rows = []
    host_floor: list[float] = []  # bare cuLaunchKernel host cost, one per 64-token case
    gpu = torch.cuda.get_device_name()
    for variant in mod.VARIANTS.values():
        spec = variant.spec()
        quant = spec.quantization is not None  # per-group scales computed in the kernel
        fp8 = spec.cache.dtype.startswith("float8")  # per-group or static (per-tensor) scales
        kind = (f" g{spec.quantization.granularity} {spec.quantization.scale_dtype} scales" if quant
                else " static (per-tensor) scales" if spec.cache.static_scales else "")
        # vLLM's per-tensor k_scale / v_scale: the static-scales variant's own values (the same conversion), else 1
        vllm_scales = STATIC_SCALES if spec.cache.static_scales else (1.0, 1.0)
        for batch, per_req, cached in ((64, 1, 5), (8, 1024, 512)):
            T = batch * per_req
            cache_bytes = 1 if fp8 else 2
            scale_bytes = T * H * (D // spec.quantization.granularity) * 2 * (
                4 if spec.quantization.scale_dtype == "float32" else 1) if quant else 0
            kv_bytes = T * H * D * 2 * (2 + cache_bytes) + scale_bytes  # bf16 read + cache write (+ scales)
            n = rotations(kv_bytes, cap=256 if T < 1024 else 64)
            sets = [make_set(variant, batch, per_req, cached, rng) for _ in range(n)]
            ops = {}  # name -> (launches, bytes), all timed together (graph_times: round-robin replays)
            kv_launch = [lambda c=c, k=k, v=v: c.store(0, k, v) for c, k, v in sets]
            ops["kvgen"] = (kv_launch, kv_bytes)
            plain = [c.copy() for c, _, _ in sets]  # same tensors, store launched plainly (no PDL)
            for w in plain:
                w.programmatic_launch = False
                w.begin_step([per_req] * batch)
            ops["kvgen without PDL"] = ([lambda w=w, k=k, v=v: w.store(0, k, v) for w, (_, k, v) in zip(plain, sets)], kv_bytes)
            # vLLM's contract on the same rows: the slot mapping vLLM gets below, no begin_step token map
            slot_maps = [slot_mapping(c, batch, per_req, cached) for c, _, _ in sets]
            ops["kvgen store_slots"] = ([lambda c=c, k=k, v=v, s=s: c.store_slots(0, k, v, s)
                                         for (c, k, v), s in zip(sets, slot_maps)], kv_bytes)
            for text, (knobs, xmod) in extra.items():  # same tensors, adopted by the variant built with other knobs
                xv = xmod.VARIANTS[variant.NAME]
                wrapped = with_derive(knobs, partial(adopt_all, xv, [c for c, _, _ in sets]))
                for w in wrapped:
                    w.begin_step([per_req] * batch)
                ops[f"kvgen {text}"] = ([lambda w=w, k=k, v=v: w.store(0, k, v) for w, (_, k, v) in zip(wrapped, sets)], kv_bytes)
                check_same_store(sets[0], wrapped[0], text)
            eager_fns = {"kvgen": kv_launch[0], "kvgen without PDL": partial(plain[0].store, 0, sets[0][1], sets[0][2]),
                         "kvgen store_slots": ops["kvgen store_slots"][0][0]} if T <= 64 else {}  # host cost, timed below
            peer_bytes_fi = T * H * D * 2 * (2 * cache_bytes)  # FlashInfer moves cache-dtype bytes only
            try:
                fi = [peers.make_flashinfer_append(k, v, c.blocks[:, :, 0], c.lookup_table[:batch], c.cache_lengths[:batch],
                                                   [per_req] * batch) for c, k, v in sets]
                ops["flashinfer append" + (" (pre-cast fp8, no scales)" if fp8 else "")] = (fi, peer_bytes_fi)
                if T <= 64:
                    eager_fns["flashinfer append"] = fi[0]
            except Exception as e:  # noqa: BLE001 - a missing peer is reported, not fatal
                print(f"flashinfer unavailable: {type(e).__name__}: {str(e)[:300]}")
            try:
                vl = [peers.make_vllm_reshape_and_cache(k, v, c.blocks[:, 0, 0], c.blocks[:, 1, 0],
                                                        sm, "fp8" if fp8 else "auto",
                                                        torch.full((1,), vllm_scales[0], device="cuda"),
                                                        torch.full((1,), vllm_scales[1], device="cuda"))
                      for (c, k, v), sm in zip(sets, slot_maps)]
                ops["vllm triton" + (" (per-tensor scale)" if fp8 else "")] = (vl, T * H * D * 2 * (2 + cache_bytes))
                if T <= 64:
                    eager_fns["vllm triton"] = vl[0]
            except Exception as e:  # noqa: BLE001
                print(f"vllm unavailable: {type(e).__name__}: {str(e)[:300]}")
            if not fp8:
                rows_k = [(c.blocks.view(-1, H, D), c.blocks.view(-1, H, D)[c.page_size:]) for c, _, _ in sets]
                idx = [slot_mapping(c, batch, per_req, cached) for c, _, _ in sets]
                idx = [(i // c.page_size) * 2 * c.page_size + i % c.page_size for i, (c, _, _) in zip(idx, sets)]
                tc = [peers.make_torch_index_copy(k, v, rk, rv, ix) for (c, k, v), (rk, rv), ix in zip(sets, rows_k, idx)]
                ops["torch index_copy_"] = (tc, T * H * D * 2 * 4)
            if T <= 64:  # the floor of this method: an empty kernel per call (torch.cuda._sleep(0)), same graph shape
                ops["empty kernel (floor)"] = ([lambda: torch.cuda._sleep(0)] * n, 0)
                ops["empty PDL kernel (floor)"] = ([pdl_floor(c) for c, _, _ in sets], 0)
            times = graph_times([launches for launches, _ in ops.values()])
            eager = {}
            if eager_fns:  # with the host's own floor: the same kernel through a bare ctypes cuLaunchKernel
                costs = eager_host_costs([*eager_fns.values(), bare_launch(sets[0][0], T)])
                eager = dict(zip(eager_fns, costs))
                host_floor.append(costs[-1])
            results = {name: (t, nbytes) for (name, (_, nbytes)), t in zip(ops.items(), times)}
            for peer, (t, nbytes) in results.items():
                rows.append((spec.cache.dtype + kind,
                             spec.cache.page_size, T, peer, t * 1e6, nbytes / t / 1e12, nbytes / t / copy_bw,
                             eager.get(peer.split(" (")[0], float("nan")) * 1e6, n))
            del sets
            torch.cuda.empty_cache()
    first_bw, last_bw = copy_bw, copy_bandwidth()  # measured before and after: the best is the reference
    copy_bw = max(first_bw, last_bw)
    lines = [f"Store benchmark, {gpu}, {datetime.date.today()}; device copy_ bandwidth (256 MiB, read+write): "
             f"{copy_bw / 1e12:.3f} TB/s (best of {first_bw / 1e12:.3f} before and {last_bw / 1e12:.3f} after)",
             "",
             "| cache | page | new tokens | kernel | µs/call (graph) | TB/s | % of copy | eager host µs/call | rotated sets |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.2f} | {r[5]:.3f} | {100 * r[5] * 1e12 / copy_bw:.1f}% | "
                     f"{'' if np.isnan(r[7]) else f'{r[7]:.1f}'} | {r[8]} |")
    if host_floor:
        lines += ["", "Eager host cost: batches of 100 calls, the GPU drained between batches, all ops of a case "
                  "interleaved (kvgen.benchmark.eager_host_costs). This host's floor, a bare ctypes cuLaunchKernel of "
                  f"the same store kernel in the same interleaving: {min(host_floor) * 1e6:.1f}-{max(host_floor) * 1e6:.1f} µs."]
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
