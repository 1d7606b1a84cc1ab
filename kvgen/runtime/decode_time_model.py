"""The decode planner's time model of its two plans for one step (decode_plan.plan_decode's skew test): grouped
CTAs, each (request, KV head) cut among the warp groups of one CTA, against split-K, one-group CTAs of a balanced
chunk and a combine launch. Times in µs on the GPU the constants were fitted on (the H200)."""

from __future__ import annotations

import numpy as np

# The time model of both plans (grouped_time_us, split_k_time_us), in µs. Each warp group streams its rows of K and
# V at most at its own rate (FP8 groups are slower per row: they dequantize), the warp groups on one SM share that
# SM's bandwidth, and all share the DRAM's bandwidth equally: a "fluid" of streams, in which the rest speed up as
# the short ones finish, up to their own limits; that tail is what leaves a skewed grouped plan slow. Split-K CTAs
# pay a per-CTA ramp in rows and a combine launch whose cost grows with the longest request's split count; a grouped
# plan pays its ramp per warp group and the combine only when split. Fitted on the H200 (session 19,
# bench/skew_s19/: 712 batches, skewed, equal-length and tiny, 2-128 (request, KV head) pairs, bf16 and FP8 at
# pages 16 and 64, each timed under both plans; `bench/fit_decode_model.py bench/skew_s19/*.log` refits these
# constants and scores them). Two-fold cross-validated, the choice lost 3.7 summed relative regret against the better
# plan of each batch; the 1.5x row-ratio limit it replaced lost 10.2 (at most 84% on one batch: a 24k request among
# five short ones over one KV head, FP8, 27.3 µs against 14.8). On 334 later batches (seeds 3-5, not in the fit; 42
# of them with 133-264 pairs, 2-group CTAs two per SM) 1.03 against 8.25, at most 11% against 76%. The constants
# are the H200's, for head size 128; on another GPU both plans move alike except through the bandwidths.
MODEL_DRAM_BYTES_PER_US = 3.973e6  # all SMs together (3.97 TB/s)
MODEL_SM_BYTES_PER_US = 67.5e3  # one SM's warp groups together (67.5 GB/s)
MODEL_GROUP_ELEMENTS_PER_US = {1: 12.27e3, 2: 22.92e3}  # K and V elements one warp group reads, by element bytes
MODEL_COMBINE_US = 1.569
MODEL_COMBINE_US_PER_SPLIT = 0.1116
MODEL_SPLIT_K_CTA_ROWS = 111
MODEL_GROUPED_GROUP_ROWS = 111


def fluid_time_us(rows: np.ndarray, row_bytes: int, streams_per_sm: float, head_size: int, copies: int = 1) -> float:
    """Time for these streams of rows (one warp group each; `copies` of each, e.g. one per KV head) to drain, each
    at most at its own rate (MODEL_GROUP_ELEMENTS_PER_US) and at its SM's bandwidth over `streams_per_sm`, all that
    still run sharing the DRAM's bandwidth equally."""
    left = np.sort(rows[rows > 0].astype(np.float64))
    if left.size == 0:
        return 0.0
    elem_bytes = max(1, row_bytes // (2 * head_size))
    own = min(MODEL_GROUP_ELEMENTS_PER_US[min(elem_bytes, 2)] * elem_bytes,
              MODEL_SM_BYTES_PER_US / max(1.0, streams_per_sm))  # bytes per µs
    running = copies * np.arange(left.size, 0, -1)  # streams still running while the next-shortest one finishes
    per_stream = np.minimum(own, MODEL_DRAM_BYTES_PER_US / running)
    return float((np.diff(left, prepend=0.0) / per_stream).sum()) * row_bytes


def grouped_time_us(lens: np.ndarray, heads: int, splits: int, groups: int, chunk: int, row_bytes: int,
                    head_size: int, sms: int) -> float:
    """Modelled time of a grouped plan (see MODEL_*): each (request, KV head) cut into splits x groups parts of
    whole 64-row tiles, `chunk` rows each (FP8: the longest request's cut), or with chunk 0 (the 16-bit kernels'
    device cut) each request's own length over the parts, rounded up to tiles; the last parts may be short or empty
    (an empty warp group streams nothing). CTAs of fewer groups than the SM holds share an SM (133-264 pairs)."""
    lens = np.asarray(lens, dtype=np.int64)
    parts = splits * groups
    part_rows = np.full(len(lens), chunk, dtype=np.int64) if chunk else -(-lens // (parts * 64)) * 64
    per_part = np.clip(lens[:, None] - part_rows[:, None] * np.arange(parts)[None, :], 0, part_rows[:, None]).ravel()
    rows = np.where(per_part > 0, per_part + MODEL_GROUPED_GROUP_ROWS, 0)
    combine = MODEL_COMBINE_US + MODEL_COMBINE_US_PER_SPLIT * splits if splits > 1 else 0.0
    streams_per_sm = groups * max(1.0, len(lens) * heads * splits / sms)
    return fluid_time_us(rows, row_bytes, streams_per_sm, head_size, copies=heads) + combine


def split_k_time_us(lens: np.ndarray, heads: int, chunk: int, slots: int, sms: int, row_bytes: int,
                    head_size: int) -> float:
    """Modelled time of a split-K plan (see MODEL_*): one-group CTAs of `chunk` rows, `slots` at a time (a CTA past
    them runs after the one `slots` earlier), and the combine."""
    lens = np.asarray(lens, dtype=np.int64)
    splits = -(-lens // chunk)
    rows = np.full(int(splits.sum()), chunk + MODEL_SPLIT_K_CTA_ROWS, dtype=np.int64)  # each request's CTAs in order
    rows[np.cumsum(splits) - 1] = lens - (splits - 1) * chunk + MODEL_SPLIT_K_CTA_ROWS  # its last one partial
    combine = MODEL_COMBINE_US + MODEL_COMBINE_US_PER_SPLIT * int(splits.max())
    if rows.size * heads <= slots:
        return fluid_time_us(rows, row_bytes, rows.size * heads / sms, head_size, copies=heads) + combine
    rows = np.bincount(np.arange(rows.size * heads) % slots, weights=np.tile(rows, heads), minlength=slots)
    return fluid_time_us(rows, row_bytes, slots / sms, head_size) + combine
