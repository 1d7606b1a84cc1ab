"""What a decode step costs before the first layer when the engine owns the tables (vLLM: block_table [reqs, cols]
int32 and seq_lens [reqs] int32 on the device, seq_lens_cpu on the host), and what per-layer cache tensors cost.

- kvgen: KVCache.adopt_block_table (one kernel writes the lookup table, the cache lengths and the step's CSR
  offsets) + plan_decode (host arithmetic). Device time of the kernel in CUDA graphs (64 launches per graph, median
  of 50 replays, per launch), and eager host time of both calls.
- FlashInfer's paged decode, as vLLM's FLASHINFER backend drives it: BatchDecodeWithPagedKVCacheWrapper.plan per
  step (CUDA-graph mode, tensor cores), given host indptr / last_page_len and device indices. Eager host time only;
  building the CSR indices from the block table (a device kernel in vLLM) is not counted.
- XQA (trtllm_batch_decode_with_kv_cache) reads block_tables and seq_lens directly: no step preparation.
- Decode over per-layer tensors (KVCache.wrap_layers, vLLM's layout) against the same blocks wrapped as a one-layer
  cache: the same kernel with other pointers, so the two times should agree.

Usage: python bench/step_prep_bench.py [--out bench/step_prep_bench.md]
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402
from decode_bench import load_generated  # noqa: E402

from kvgen.benchmark import eager_host_costs, graph_times, print_report  # noqa: E402
from kvgen.reference import padded_lut_cols  # noqa: E402
from kvgen.runtime.kvcache import KVCache  # noqa: E402

HQ, H, D = 32, 8, 128
SHAPES = [(16, 1024), (64, 1024), (128, 1024), (256, 1024), (16, 16384), (64, 16384), (128, 16384), (256, 16384)]
POOL_PAGES = 4096  # block ids are drawn from this many blocks (the kernel checks ids, not uniqueness)


def engine_tables(batch: int, ctx: int, page: int, rng: np.random.Generator):
    """vLLM-like tables: seq_lens around ctx (the step's token counted), block ids in [1, POOL_PAGES] (0 is vLLM's
    null block), rows padded with 0."""
    lens = rng.integers(ctx // 2, ctx + 1, batch).astype(np.int32)
    cols = -(-ctx // page) + 2
    table = np.zeros((batch, cols), np.int32)
    for b, n in enumerate(lens):
        k = -(-int(n) // page)
        table[b, :k] = rng.integers(1, POOL_PAGES + 1, k)
    return table, lens


def layer_cache(variant, tensors: list[torch.Tensor], batch: int, cols: int) -> KVCache:
    lut = torch.zeros((batch, padded_lut_cols(cols)), dtype=torch.int32, device="cuda")
    lens = torch.zeros(batch, dtype=torch.int32, device="cuda")
    return KVCache.wrap_layers(variant, [t.unsqueeze(2) for t in tensors], None, lut, lens, null_page=0)


def flashinfer_plan(batch: int, table: np.ndarray, lens: np.ndarray, page: int):
    """FlashInfer's per-step plan call on host CSR metadata (device indices), as vLLM's FlashInfer backend makes it."""
    fi = peers._flashinfer()
    need = -(-lens.astype(np.int64) // page)
    indptr = torch.from_numpy(np.r_[0, np.cumsum(need)].astype(np.int32))
    indices = torch.from_numpy(np.concatenate([table[b, :k] for b, k in enumerate(need)])).cuda()
    last = torch.from_numpy((lens - (need - 1) * page).astype(np.int32))
    ws = torch.zeros(peers.FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(
        ws, "NHD", use_cuda_graph=True, use_tensor_cores=True,
        paged_kv_indptr_buffer=torch.empty(batch + 1, dtype=torch.int32, device="cuda"),
        paged_kv_indices_buffer=torch.empty(indices.numel(), dtype=torch.int32, device="cuda"),
        paged_kv_last_page_len_buffer=torch.empty(batch, dtype=torch.int32, device="cuda"))

    def plan() -> None:
        wrapper.plan(indptr, indices, last, HQ, H, D, page, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
                     o_data_type=torch.bfloat16)
    return plan


def prep_row(variant, pool: list[torch.Tensor], batch: int, ctx: int, page: int, rng: np.random.Generator,
             with_peers: bool) -> str:
    """One table row: adopt_block_table's device time, and the eager host time of kvgen's and FlashInfer's step."""
    table, lens = engine_tables(batch, ctx, page, rng)
    cache = layer_cache(variant, pool, batch, table.shape[1])
    bt, sl, host = torch.from_numpy(table).cuda(), torch.from_numpy(lens).cuda(), lens.tolist()
    cache.adopt_block_table(bt, sl, host)
    torch.cuda.synchronize()
    assert cache.errors() == [], cache.errors()
    # 64 launches per graph (the same tables each time), so one graph launch's own overhead is spread out
    (dev,) = graph_times([[lambda: cache.adopt_block_table(bt, sl, host)] * 64], replays=50)

    def step() -> None:
        cache.adopt_block_table(bt, sl, host)
        cache.plan_decode()
    fns = [step, flashinfer_plan(batch, table, lens, page)] if with_peers else [step]
    costs = eager_host_costs(fns, calls=500, batch=50)
    fi = f"{costs[1] * 1e6:.1f}" if len(costs) > 1 else "-"
    return f"| {batch} x {ctx} | {dev * 1e6:.2f} | {costs[0] * 1e6:.1f} | {fi} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args()
    gen = load_generated()
    variant = next(v for n, v in gen.VARIANTS.items() if "bf16" in n and "_p16_" in n)
    page = variant.spec().cache.page_size
    rng = np.random.default_rng(0)
    pool = [torch.randn((POOL_PAGES + 1, 2, page, H, D), device="cuda").to(torch.bfloat16)]
    gpu = torch.cuda.get_device_name()
    lines = [f"Step preparation from an engine's block table, {gpu}, {datetime.date.today()}; Llama-3-8B attention "
             f"(32 query heads, 8 KV heads of 128), bf16, {page}-token pages; seq_lens uniform in [ctx/2, ctx].", "",
             "| batch x ctx | kvgen adopt_block_table, graph (µs) | kvgen adopt + plan_decode, eager host (µs) | "
             "FlashInfer plan, eager host (µs) |", "|---|---|---|---|"]
    for batch, ctx in SHAPES:
        lines.append(prep_row(variant, pool, batch, ctx, page, rng, not args.no_peers))
        print(lines[-1], flush=True)

    # Per-layer tensors against one tensor: the same blocks, decode of 64 x 4k through both wraps.
    batch, ctx = 64, 4096
    need = -(-ctx // page)
    layers = [torch.randn((batch * need + 1, 2, page, H, D), device="cuda").to(torch.bfloat16) for _ in range(2)]
    ids = [rng.permutation(np.arange(1, batch * need + 1)).reshape(batch, need).astype(np.int32) for _ in layers]
    lens = np.full(batch, ctx, np.int32)
    q = torch.randn(batch, HQ, D, device="cuda").to(torch.bfloat16)
    ops, outs = [], []
    for layer, t in enumerate(layers):
        per_layer = layer_cache(variant, layers, batch, need)
        one = KVCache.wrap(variant, t.unsqueeze(2), None,
                           torch.zeros((batch, padded_lut_cols(need)), dtype=torch.int32, device="cuda"),
                           torch.zeros(batch, dtype=torch.int32, device="cuda"), num_layers=1, null_page=0)
        for c in (per_layer, one):
            c.adopt_block_table(torch.from_numpy(ids[layer]).cuda(), torch.from_numpy(lens).cuda(), lens.tolist())
            c.plan_decode()
        o1, o2 = torch.empty_like(q), torch.empty_like(q)
        ops += [[lambda c=per_layer, o=o1, ly=layer: c.decode(ly, q, o)], [lambda c=one, o=o2: c.decode(0, q, o)]]
        outs.append((o1, o2))
    times = graph_times(ops, replays=30)
    for o1, o2 in outs:
        assert torch.equal(o1, o2), "per-layer and one-tensor decode differ"
    lines += ["", "Decode 64 x 4096 (bf16, page 16), the same blocks through per-layer tensors and as a one-layer cache "
              "(µs, graph replays, two layers):", "",
              "| layer | per-layer tensors (wrap_layers) | one-layer cache (wrap) |", "|---|---|---|"]
    for layer in range(len(layers)):
        lines.append(f"| {layer} | {times[2 * layer] * 1e6:.1f} | {times[2 * layer + 1] * 1e6:.1f} |")
    print_report(lines, args.out)


if __name__ == "__main__":
    main()
