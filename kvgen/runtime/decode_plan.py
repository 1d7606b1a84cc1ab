"""Split-K planning of decode attention: how many rows each CTA takes, and the partial-result workspace.

Pure host arithmetic over the host mirror of the cache lengths; one plan per step serves every layer, so
decode launches stay graph-capturable (re-capture after re-planning: the workspace is reallocated).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import driver

if TYPE_CHECKING:
    from .kvcache import KVCache


def _torch() -> Any:
    import torch

    return torch


class DecodePlan:
    """Split-K plan of one decode step, reused by every layer: chunk length per CTA and the workspace."""

    def __init__(self, cache: KVCache, chunk: int, splits: int, batch: int):
        torch = _torch()
        self.chunk, self.splits, self.batch = chunk, splits, batch
        hq = cache.spec.attention.num_q_heads
        dev = f"cuda:{cache.device}"
        self.part_o = torch.empty((batch, hq, splits, cache.head_size), dtype=torch.float32, device=dev)
        self.part_lse = torch.empty((batch, hq, splits), dtype=torch.float32, device=dev)


def choose_chunk(lengths: np.ndarray, heads: int, slots: int, overhead: int = 96, tile: int = 64) -> int:
    """Rows per CTA that minimize an estimate of the decode makespan: waves of `slots` resident CTAs, each
    wave as long as its longest CTA (chunk + a fixed per-CTA overhead in row units for the pipeline ramp,
    the merge and the combine). Measured on the H100, the old "total / budget" chunking lost up to a third
    of the time to a partial last wave (16 x 1k: 640 CTAs on 264 slots = 2.4 waves)."""
    lens = np.asarray(lengths, dtype=np.int64)
    if lens.size == 0:
        return tile
    max_tiles = max(1, int(-(-int(lens.max()) // tile)))
    best_chunk, best_cost = tile * max_tiles, None
    for t in range(1, max_tiles + 1):
        chunk = t * tile
        ctas = heads * int(np.sum(-(-lens // chunk)))
        waves = -(-ctas // max(1, slots))
        cost = waves * (min(chunk, int(lens.max())) + overhead)
        if best_cost is None or cost < best_cost or (cost == best_cost and chunk > best_chunk):
            best_chunk, best_cost = chunk, cost
    return best_chunk


def plan_decode(cache: KVCache, slots: int | None = None) -> DecodePlan:
    """Split-K plan of one step: `choose_chunk` over the host mirror of the lengths (no sync), with the
    number of resident CTAs from the driver's occupancy calculator for this very kernel."""
    b = int(cache.args.batch_size)
    lens = cache.host_lengths[:b].astype(np.int64) + 1  # the step's token is stored before decoding
    if cache.spec.attention.sliding_window and cache._window:
        lens = np.minimum(lens, cache._window)
    if slots is None:
        kernel = cache._kernel("decode", cache._decode_smem)
        slots = driver.resident_blocks(kernel, 128, cache.device)
    chunk = choose_chunk(lens, cache.num_heads, slots)
    splits = max(1, int(-(-int(lens.max(initial=1)) // chunk)))
    return DecodePlan(cache, chunk, splits, b)
