"""Split-K planning of decode attention: how many rows each CTA takes, and the partial-result workspace.

Pure host arithmetic over the host mirror of the cache lengths; one plan per step serves every layer, so
decode launches stay graph-capturable (re-capture after re-planning: the workspace is reallocated).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .decode_time_model import grouped_time_us, split_k_time_us

if TYPE_CHECKING:
    from .kvcache import KVCache


def _torch() -> Any:
    import torch

    return torch


# Longest context (tokens) at which the decode kernel itself launches as a programmatic dependent (with
# KVCache.programmatic_launch; early cache reads always do). Measured on three H100s (bench/NOTES.md, session 8,
# same caches, the default entry timed twice for the position bias): 2-4% faster at 16 x 1k, neutral at 1k-4k of
# larger batches, and 0.1-2% slower for FP8 at 16k contexts (bf16 neutral), so long contexts launch plainly.
PDL_MAX_CONTEXT = 2048


def launches_programmatically(longest: int) -> bool:
    """DecodePlan.programmatic of a step whose longest context is `longest` tokens."""
    return longest <= PDL_MAX_CONTEXT


class DecodePlan:
    """Split-K plan of one decode step, reused by every layer: chunk length per warp group (0: each request's
    context cut into `splits x groups` equal parts on the device), split count (CTAs per request and KV head), warp
    groups per CTA, views of the cache's decode workspace (float32 partial outputs and log-sum-exps), and whether
    the decode kernel launches as a programmatic dependent (`programmatic`: contexts up to PDL_MAX_CONTEXT)."""

    def __init__(self, cache: KVCache, chunk: int, splits: int, batch: int, groups: int = 1, programmatic: bool = True):
        self.chunk, self.splits, self.batch, self.groups = chunk, splits, batch, groups
        self.programmatic = programmatic
        self.modelled_imbalance: float | None = None  # plan_decode's skew gate: grouped over split-K makespan
        self.modelled_us: tuple[float, float] | None = None  # plan_decode's time model: (grouped, split-K)
        hq = cache.spec.attention.num_q_heads
        ws = cache.decode_workspace(batch * splits)
        # Views at the start of the workspace: every plan of this cache uses the same addresses, so a CUDA graph
        # captured with one plan stays valid after later plans (it keeps its own chunk and split count).
        self.part_o = ws.part_o[: batch * hq * splits * cache.head_size].view(batch, hq, splits, cache.head_size)
        self.part_lse = ws.part_lse[: batch * hq * splits].view(batch, hq, splits)

    def __repr__(self) -> str:
        kind = f"grouped, {self.groups} warp groups per CTA" if self.groups > 1 else "split-K"
        model = "" if self.modelled_us is None else \
            f", modelled grouped {self.modelled_us[0]:.1f} µs / split-K {self.modelled_us[1]:.1f} µs"
        return (f"DecodePlan({kind}, {self.splits} split(s) per (request, KV head), chunk "
                f"{self.chunk or 'cut on the device'}, batch {self.batch}{model})")


class DecodeWorkspace:
    """The partial results of split-K decode, shared by every plan of a cache. A plan used to allocate its own
    and free it on the next step's plan, while a CUDA graph captured with it still wrote there (memory the
    allocator had handed to something else). Now a workspace grows only when a plan needs more room, and the one
    it replaces stays allocated for the cache's lifetime (KVCache.decode_workspace), so a captured graph always
    writes live memory of its own. Sized for `pairs` (request, split) pairs."""

    def __init__(self, cache: KVCache, pairs: int):
        torch = _torch()
        hq, dev = cache.spec.attention.num_q_heads, f"cuda:{cache.device}"
        self.pairs = pairs
        self.part_o = torch.empty(pairs * hq * cache.head_size, dtype=torch.float32, device=dev)
        self.part_lse = torch.empty(pairs * hq, dtype=torch.float32, device=dev)


def workspace_pairs(max_batch: int, heads: int, slots: int) -> int:
    """(request, split) pairs of the first workspace: two splits per request at the largest batch, and at small
    batch enough splits for four waves of resident CTAs (the planner aims at one or two). Skewed batches may need
    more (their longest request sets the split count of all); the workspace then doubles."""
    return max(2 * max_batch, -(-4 * slots // heads))


SPLIT_K_OVERHEAD_ROWS = 96  # choose_chunk's per-CTA cost of the ramp, the merge and the combine, in rows
GROUPED_OVERHEAD_ROWS = 48  # a grouped CTA's: the ramp and its in-CTA merge, no partials and no combine launch
# A grouped plan cuts every request into the same splits x groups parts, so its makespan is the longest request's
# part; with skewed lengths and few (request, KV head) pairs that leaves most SMs idle (session 16, 8 query heads
# over 1 KV head, 64 requests of log-normal lengths up to 24k: grouped CTAs 68-75 µs against FlashInfer's 39-50).
# The skew gate: where the grouped plan's makespan in rows (grouped_makespan) exceeds split-K's (split_k_makespan)
# by more than this factor, the two plans' times are modelled (decode_time_model.py) and the faster one runs; at or below
# it the batch counts as balanced and stays grouped, where every measured equal-length shape had it ahead or within
# noise.
GROUPED_SKEW_GATE = 1.0


def choose_chunk(lengths: np.ndarray, heads: int, slots: int, overhead: int = SPLIT_K_OVERHEAD_ROWS, tile: int = 64) -> int:
    """Rows per CTA that minimize an estimate of the decode makespan: waves of `slots` resident CTAs, each
    wave as long as its longest CTA (chunk + a fixed per-CTA overhead in row units for the pipeline ramp,
    the merge and the combine). Measured on the H100, the old "total / budget" chunking lost up to a third
    of the time to a partial last wave (16 x 1k: 640 CTAs on 264 slots = 2.4 waves)."""
    return _best_chunk(lengths, heads, slots, overhead, tile)[0]


def split_k_makespan(lengths: np.ndarray, heads: int, slots: int, overhead: int = SPLIT_K_OVERHEAD_ROWS,
                     tile: int = 64) -> int:
    """choose_chunk's modelled makespan (row units) at its chunk."""
    return _best_chunk(lengths, heads, slots, overhead, tile)[1]


def host_chunk(longest: int, splits: int, groups: int, tile: int = 64) -> int:
    """Rows per warp group when the longest request is cut into splits x groups parts of whole tiles (the FP8
    kernels' chunk, which the host gives them; 16-bit kernels cut each request on the device)."""
    return -(-longest // (splits * groups * tile)) * tile


def grouped_makespan(longest: int, splits: int, groups: int, overhead: int = GROUPED_OVERHEAD_ROWS, tile: int = 64) -> int:
    """A grouped plan's modelled makespan in the same units: the warp group with the longest request's part."""
    return host_chunk(longest, splits, groups, tile) + overhead


def _best_chunk(lengths: np.ndarray, heads: int, slots: int, overhead: int, tile: int) -> tuple[int, int]:
    lens = np.asarray(lengths, dtype=np.int64)
    if lens.size == 0:
        return tile, 0
    longest = int(lens.max())
    # Every candidate chunk, j = 1 .. J tiles, at once (a Python loop over them cost 1.7 ms at 16k contexts). A
    # request of n >= 1 rows takes ceil(n / (j tile)) = floor(y / j) + 1 CTAs, y = floor((n - 1) / tile).
    y = (lens[lens > 0] - 1) // tile  # empty requests take no CTA
    if y.size == 0:
        return tile, 0
    tiles = int(y.max()) + 1  # J: the longest request in one chunk
    j = np.arange(1, tiles + 1, dtype=np.int64)
    if y.size <= np.log(tiles) + 1:  # few requests: the [J, batch] matrix is the smaller
        ctas = heads * (y[None, :] // j[:, None] + 1).sum(axis=1)
    else:
        # The sum of floor(y / j) over the batch is the sum over k >= 1 of how many y reach k j: about J ln J terms
        # from one histogram, whatever the batch size (the matrix took 0.3-1 ms at 128-512 requests).
        reach = np.cumsum(np.bincount(y, minlength=tiles + 1)[::-1])[::-1]  # reach[t] = #requests with y >= t
        multiples = tiles // j  # k j up to J: past max(y) they count no request
        owner = np.repeat(j, multiples)
        k = np.arange(owner.size, dtype=np.int64) - np.repeat(np.cumsum(multiples) - multiples, multiples) + 1
        ctas = heads * (y.size + np.bincount(owner - 1, weights=reach[owner * k], minlength=tiles).astype(np.int64))
    chunks = tile * j
    cost = -(-ctas // max(1, slots)) * (np.minimum(chunks, longest) + overhead)
    return int(chunks[cost == cost.min()].max()), int(cost.min())  # the longest chunk among the cheapest (fewer CTAs to merge)


def grouped_groups(pairs: int, sms: int, max_groups: int) -> int:
    """Warp groups per CTA of a grouped plan (one CTA per (request, KV head), no combine launch), or 0 where none
    fits: the most groups g >= 2 such that every pair's CTA is resident at once, max_groups // g CTAs per SM (so the
    SM holds them in the shared memory of max_groups one-group CTAs). max_groups up to one pair per SM; fewer for
    up to max_groups // 2 pairs per SM (FP8, 4 groups: 2 groups per CTA for 133-264 pairs, e.g. 17-33 requests
    over 8 KV heads, which otherwise split in two with a combine launch)."""
    for g in range(max_groups, 1, -1):
        if 0 < pairs <= sms * (max_groups // g):
            return g
    return 0


# Fewer groups per CTA than the SM holds (grouped_groups below max_groups) leave group slots empty when the pairs do
# not fill them. Measured on the H200 (bench/decode_ab_twogroup*_h200_s11.md, FP8, 2-group CTAs against split-K on
# the same caches): at contexts up to 2k the saved combine wins (-9 to -11% at 24-32 x 1k, even with 27% of the slots
# empty); past that, cp.async with 16-token pages loses when many slots are empty (+11-13% at 20 requests, 61% of
# the slots in use; +2-6% at 24, 73%) and wins from 85% on (-5.6% at 28 x 8k); TMA won or tied at every shape.
PARTIAL_GROUPING_MAX_CONTEXT = 2048
PARTIAL_GROUPING_MIN_SLOT_USE = 0.8


def partial_grouping_pays(pairs: int, groups: int, sms: int, max_groups: int, longest: int, tma: bool) -> bool:
    """Whether CTAs of `groups` < max_groups warp groups beat split-K (see PARTIAL_GROUPING_*)."""
    used = pairs * groups / (sms * max_groups)
    return tma or longest <= PARTIAL_GROUPING_MAX_CONTEXT or used >= PARTIAL_GROUPING_MIN_SLOT_USE


# Rows of the longest request a grouped CTA gets, about (rounded to the nearest whole number of CTAs, so a context
# a token past a multiple of it does not add a nearly empty split): every warp group at least one tile. Measured on
# the H200 (session 18, every split count on the same caches, `bench/decode_splits_*_h200_s18.md`, after the
# one-barrier epilogue): 2-40 pairs at 768-16k tokens ran fastest at 384-768 rows per CTA, e.g. 2 pairs x 16k FP8 at
# 32 splits 11.8 µs against 64 splits' 14.2, 16 pairs x 2k at 4 splits 9.0 against 8 splits' 9.8, 32 pairs x 1k at 2
# splits 9.5 against 4 splits' 10.3. Over those 16 shapes and session 17's 36 (`decode_splits_*_h200_s17.md`) the
# summed regret against the best split count fell from 84% / 27% (256 rows, rounded up) to 16% / 5%.
GROUPED_MIN_CTA_ROWS = 512
# Skewed batches are judged on a finer cut (GROUPED_SKEW_GATE above): the 512-row CTAs were measured on equal
# lengths only, and at 256 rows a skewed small batch (a 2k request among short ones) kept the grouped plan the GPU
# tests and sessions 16-17 ran with.
GROUPED_SKEW_CTA_ROWS = 256
# ... unless that leaves fewer CTAs than this (half the SMs) where one tile per group would not: a single request
# over 8 KV heads at 1k (8 pairs) measured bf16 7.2 µs at 8 splits against 7.5 at 4, and FP8 at head size 256
# (3 groups) 8.4 at 6 splits against 9.2 at 4 (H200, session 16); 16 pairs over 1 KV head at 1k, bf16, 10.1 µs at 4
# splits against 11.3 at 8 and 11.3 at 2 (sessions 16-17).
GROUPED_MIN_CTAS = 64


# Splitting a grouped plan buys parallelism at the price of a combine launch and its partials, and buys nothing once
# the CTAs already stream at DRAM speed. Measured on the H200 (session 17, `bench/decode_splits_*_h200_s17.md`, every
# split count on the same caches, 16-128 pairs at 512-2048 tokens, bf16 and FP8): 64 pairs at 512-1024 tokens ran
# fastest unsplit (FP8 64 x 512 over 1 KV head 8.7 µs against the 2 splits' 10.9, 64 x 1k 11.9 against 12.8; bf16
# 10.8 / 13.5 and 15.7 / 16.5), while 48 pairs at 1k, 64 at 2k and 16-32 at 1k still gained from splitting. The model
# that separates them, in rows per CTA: a CTA's rows, slowed by the share of DRAM bandwidth when more than
# SATURATING_CTA_FRACTION x SMs CTAs stream at once, plus COMBINE_CTA_ROWS when there is a combine.
SATURATING_CTA_FRACTION = 0.75
COMBINE_CTA_ROWS = 384


def grouped_cta_cost(longest: int, pairs: int, splits: int, groups: int, sms: int, tile: int = 64) -> float:
    """Modelled time of a grouped plan in rows of one CTA (see SATURATING_CTA_FRACTION)."""
    rows = groups * -(-longest // (splits * groups * tile)) * tile
    slowdown = max(1.0, pairs * splits / (SATURATING_CTA_FRACTION * sms))
    return rows * slowdown + (COMBINE_CTA_ROWS if splits > 1 else 0)


def grouped_fill_splits(longest: int, pairs: int, sms: int, groups: int, tile: int = 64,
                        cta_rows: int | None = None) -> int:
    """CTAs per (request, KV head) that fill the SMs with one wave of grouped CTAs: no more splits than give every
    warp group a tile of the longest request, nor than give every CTA about `cta_rows` rows (default
    GROUPED_MIN_CTA_ROWS, 8 tiles) unless that leaves fewer than GROUPED_MIN_CTAS CTAs."""
    pairs = max(1, pairs)
    one_tile = -(-longest // (groups * tile))
    per_cta = max(groups * tile, GROUPED_MIN_CTA_ROWS if cta_rows is None else cta_rows)
    whole_ctas = max(1, (longest + per_cta // 2) // per_cta)
    return max(1, min(sms // pairs, max(whole_ctas, min(one_tile, -(-GROUPED_MIN_CTAS // pairs)))))


def grouped_splits(longest: int, pairs: int, sms: int, groups: int, tile: int = 64) -> int:
    """CTAs per (request, KV head) of a grouped plan: grouped_fill_splits, or one where the combine would cost more
    than the splits save (grouped_cta_cost)."""
    splits = grouped_fill_splits(longest, pairs, sms, groups, tile)
    if splits > 1 and grouped_cta_cost(longest, pairs, 1, groups, sms, tile) < grouped_cta_cost(
            longest, pairs, splits, groups, sms, tile):
        return 1
    return splits


def plan_decode(cache: KVCache, splits: int | None = None, skew_test: bool = True) -> DecodePlan:
    """Split-K plan of one step from the host mirror of the lengths (no sync).

    Small batches (at most one (request, KV head) pair per SM) get grouped CTAs: one CTA per pair and SM with
    every warp group the SM holds (DecodeGeometry.max_groups), its context cut among the groups, split further
    only to fill the SMs (grouped_splits); with one split the CTA writes the final output and the combine launch
    is skipped. Up to max_groups / 2 pairs per SM, CTAs of fewer groups (grouped_groups), one split, where that
    measured faster than split-K (partial_grouping_pays). Skewed lengths (GROUPED_SKEW_GATE) take split-K where the
    time model has it faster (grouped_time_us, split_k_time_us). Otherwise
    `choose_chunk` over the resident one-group CTAs of this very kernel (decode_slots).
    splits: a fixed split count (CTAs per pair) instead, grouped when those CTAs fit one per SM, with chunk 0
    where the kernel supports it (16-bit caches): it cuts each request's context into splits x groups equal parts
    from the lengths on the device, so a CUDA graph captured once stays balanced while the contexts grow. FP8
    kernels get the chunk of this step's longest request (a replay keeps the capture's chunk: correct, less
    balanced). skew_test=False keeps the grouped plan whatever the lengths (a benchmark's view of the other plan).
    The plan records the skew gate's ratio as `modelled_imbalance`, and the two modelled times (grouped, split-K)
    as `modelled_us`, where they were computed."""
    b = int(cache.args.batch_size)
    lens = cache.host_lengths[:b].astype(np.int64) + 1  # the step's token is stored before decoding
    if cache.spec.attention.sliding_window and cache._window:
        lens = np.minimum(lens, cache._window)
    longest = int(lens.max(initial=1))
    geo, pairs, sms = cache._decode_geo, b * cache.num_heads, cache.sm_count()
    imbalance, times, plan = None, None, None
    if splits is None:
        groups = grouped_groups(pairs, sms, geo.max_groups)
        if 0 < groups < geo.max_groups and not partial_grouping_pays(pairs, groups, sms, geo.max_groups, longest, geo.tma):
            groups = 0
        chunk = None  # split-K's, once computed
        if groups:
            splits, slots = grouped_splits(longest, pairs, sms, groups), cache.decode_slots()
            chunk, split_k_rows = _best_chunk(lens, cache.num_heads, slots, SPLIT_K_OVERHEAD_ROWS, 64)
            # Skew is judged on a cut that fills the SMs with CTAs of GROUPED_SKEW_CTA_ROWS: an unsplit plan, taken
            # for the combine it saves, must not read as a skewed one (bf16 64 x 1k over 1 KV head went to split-K
            # that way, session 17 review), nor must the larger CTAs equal lengths measured faster with.
            fill = grouped_fill_splits(longest, pairs, sms, groups, cta_rows=GROUPED_SKEW_CTA_ROWS)
            imbalance = grouped_makespan(longest, fill, groups) / max(1, split_k_rows)
            if imbalance > GROUPED_SKEW_GATE:
                grouped_chunk = 0 if geo.balanced else host_chunk(longest, splits, groups)
                times = (grouped_time_us(lens, cache.num_heads, splits, groups, grouped_chunk, geo.kv_row_bytes,
                                         cache.head_size, sms),
                         split_k_time_us(lens, cache.num_heads, chunk, slots, sms, geo.kv_row_bytes, cache.head_size))
                if skew_test and times[1] < times[0]:
                    groups = 0  # skewed lengths: balanced split-K chunks
        if not groups:
            plan = split_k_plan(cache, lens, chunk)
    else:  # a fixed split count: grouped CTAs only where they fit one per SM
        groups = geo.max_groups if 0 < pairs * splits <= sms else 1
    if plan is None:
        # 16-bit: the kernel cuts each request from its length on the device; FP8: the chunk of this step's lengths.
        chunk = 0 if geo.balanced else host_chunk(longest, splits, groups)
        plan = DecodePlan(cache, chunk, splits, b, groups, programmatic=launches_programmatically(longest))
    plan.modelled_imbalance, plan.modelled_us = imbalance, times
    return plan


def split_k_plan(cache: KVCache, lens: np.ndarray, chunk: int | None = None) -> DecodePlan:
    """The one-group split-K plan of `choose_chunk` for these context lengths (plan_decode's rule above one pair
    per SM; bench/decode_bench.py --plan-ab times it against the grouped plan at small batch). chunk: choose_chunk's
    answer when the caller has it already."""
    if chunk is None:
        chunk = choose_chunk(lens, cache.num_heads, cache.decode_slots())
    longest = int(lens.max(initial=1))
    return DecodePlan(cache, chunk, max(1, -(-longest // chunk)), len(lens), programmatic=launches_programmatically(longest))
