"""The decode split-K planner (pure host code, no GPU)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import base_config

from kvgen.config import SMEM_PER_CTA, SMEM_PER_SM, VariantSpec, validate_variant
from kvgen.derive import (
    DECODE_AUTO_LOADER,
    QUANTIZED_VECTORS_PER_LANE,
    SMEM_RESERVED_PER_CTA,
    decode_auto_key,
    decode_geometry,
    decode_loader,
    small_store_tokens_per_block,
    store_split,
    tokens_per_block,
)
from kvgen.errors import ConfigError
from kvgen.runtime.decode_plan import choose_chunk, grouped_groups, grouped_splits, workspace_pairs


def makespan(lengths: np.ndarray, heads: int, slots: int, chunk: int, overhead: int = 96) -> int:
    ctas = heads * int(np.sum(-(-lengths // chunk)))
    return -(-ctas // slots) * (min(chunk, int(lengths.max())) + overhead)


@pytest.mark.parametrize("lengths", [[1025] * 16, [4097] * 64, [1025] * 128, [16385], [1] * 7, [3, 9000, 17]])
@pytest.mark.parametrize("slots", [132, 264, 396])
def test_chunk_is_a_tile_multiple_and_optimal_under_the_model(lengths: list[int], slots: int) -> None:
    lens = np.array(lengths)
    chunk = choose_chunk(lens, heads=8, slots=slots)
    assert chunk % 64 == 0 and chunk >= 64
    best = min(makespan(lens, 8, slots, t * 64) for t in range(1, -(-lens.max() // 64) + 1))
    assert makespan(lens, 8, slots, chunk) == best


def test_small_batch_fills_one_wave_instead_of_a_partial_third() -> None:
    # 16 requests x 8 KV heads x 1025 rows on 264 resident CTAs: two splits each (256 CTAs, one wave),
    # where a fixed 256-row chunk gave 640 CTAs (2.4 waves).
    assert choose_chunk(np.array([1025] * 16), heads=8, slots=264) == 576


def test_single_long_request_is_split_across_the_gpu() -> None:
    chunk = choose_chunk(np.array([16385]), heads=8, slots=264)
    assert 8 * -(-16385 // chunk) >= 200


def _decode_spec(dtype: str, stages: int | None = None, ctas: int | None = None, head_size: int = 128,
                 loader: str = "auto") -> VariantSpec:
    d = base_config()
    d["cache"].update(dtype=dtype, page_size=16, head_size=head_size)
    d["kernels"] = ["store", "decode"]
    d["attention"] = {"num_q_heads": 32, "loader": loader, **({"stages": stages} if stages else {}),
                      **({"ctas_per_sm": ctas} if ctas else {})}
    if dtype.startswith("float8"):
        d["quantization"] = {"scale_dtype": "float32", "granularity": head_size}  # one scale per (token, head)
    return validate_variant(d)


@pytest.mark.parametrize(("dtype", "stages", "blocks"), [("bfloat16", None, 2), ("bfloat16", 2, 3),
                                                         ("bfloat16", 4, 1), ("float8_e4m3fn", None, 4)])
def test_launch_bounds_minimum_follows_shared_memory(dtype: str, stages: int | None, blocks: int) -> None:
    # __launch_bounds__(128, min_blocks): as many CTAs per SM as shared memory allows (at most 4), so ptxas
    # cannot take registers that would cost occupancy (FP8 once went 127 -> 139 registers, 4 -> 3 CTAs/SM).
    geo = decode_geometry(_decode_spec(dtype, stages), "sm_90a")
    assert geo.min_blocks == blocks
    assert geo.min_blocks * (geo.smem_bytes + geo.static_bytes + SMEM_RESERVED_PER_CTA) <= SMEM_PER_SM["sm_90a"]


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a"])
@pytest.mark.parametrize(("dtype", "head_size", "num_q_heads"), [("bfloat16", 128, 32), ("bfloat16", 256, 32),
                                                                 ("float8_e4m3fn", 128, 32), ("float8_e4m3fn", 256, 64),
                                                                 ("float16", 64, 128)])
def test_decode_geometry_fits_each_arch(arch: str, dtype: str, head_size: int, num_q_heads: int) -> None:
    # Every CTA the runtime may launch fits the arch's per-CTA opt-in (a grouped CTA holds max_groups pipelines),
    # and min_blocks of them fit an SM. An A100 build once used the H100's 228 KB: the 3-stage bf16 pipeline at
    # head size 256 (193 KB) and two 99 KB groups at head size 128 could not launch there (163 KB per CTA).
    d = base_config()
    d["cache"].update(dtype=dtype, page_size=16, head_size=head_size, num_kv_heads=8)
    d["kernels"] = ["store", "decode"]
    d["attention"] = {"num_q_heads": num_q_heads}
    if dtype.startswith("float8"):
        d["quantization"] = {"scale_dtype": "float32", "granularity": head_size}
    d["archs"] = [arch]
    if arch in ("sm_86", "sm_89") and (dtype, head_size) == ("bfloat16", 256):  # 2 x 64 KB stages: no room in 99 KB
        with pytest.raises(ConfigError, match=rf"archs.*smallest pipeline.*needs 129 KB.*{arch} leaves it 92 KB"):
            validate_variant(d)
        return
    geo = decode_geometry(validate_variant(d), arch)
    assert geo.max_groups * geo.smem_bytes <= SMEM_PER_CTA[arch]
    assert geo.min_blocks * (geo.smem_bytes + geo.static_bytes + SMEM_RESERVED_PER_CTA) <= SMEM_PER_SM[arch]
    if arch == "sm_80" and (dtype, head_size) == ("bfloat16", 256):
        assert geo.stages == 2  # 3 stages of 64 KB + rings do not fit 156 KB
    if arch == "sm_80" and (dtype, head_size) == ("bfloat16", 128):
        assert geo.max_groups == 1  # 99 KB per group: one per SM (two on an H100)


@pytest.mark.parametrize(("ctas", "blocks"), [(2, 2), (5, 5), (8, 6)])
def test_ctas_per_sm_sets_the_minimum_within_shared_memory(ctas: int, blocks: int) -> None:
    # attention.ctas_per_sm overrides the default of 4, but never past what shared memory holds (2-stage FP8:
    # 36.6 KB per CTA, so 6).
    geo = decode_geometry(_decode_spec("float8_e4m3fn", ctas=ctas), "sm_90a")
    assert geo.min_blocks == blocks
    assert geo.min_blocks * (geo.smem_bytes + geo.static_bytes + SMEM_RESERVED_PER_CTA) <= SMEM_PER_SM["sm_90a"]


@pytest.mark.parametrize("loader", ["cp_async", "tma"])
@pytest.mark.parametrize(("dtype", "head_size"), [("bfloat16", 64), ("bfloat16", 128), ("float16", 256),
                                                  ("float8_e4m3fn", 64), ("float8_e4m3fn", 128), ("float8_e4m3fn", 256)])
def test_tiles_are_unpadded_and_aligned_for_their_loader(dtype: str, head_size: int, loader: str) -> None:
    # decode.cuh's TileLayout under both loaders: unpadded rows keep every 128-byte global line of a cp.async in one
    # shared-memory wavefront (one L2 request), and are what a swizzled TMA box writes. Every warp group's pipeline
    # starts on a multiple of a row (cp.async: fragment addresses XOR chunk bits into row-aligned tile addresses) or
    # of 1024 bytes (TMA: its swizzle follows the address bits).
    spec = _decode_spec(dtype, head_size=head_size, loader=loader)
    geo = decode_geometry(spec, "sm_90a")
    fp8 = dtype.startswith("float8")
    row = head_size * (1 if fp8 else 2)
    scales = 2 * 64 * 4 if fp8 else 0  # one float32 scale per (token, head) for K and V
    assert geo.tma == (loader == "tma")
    assert geo.stage_bytes == 2 * 64 * row + scales
    # FP8: Q in shared memory (8 padded 16-bit rows for a group of 4) after the stages and row rings.
    need = geo.stages * (geo.stage_bytes + 64 * 4) + (8 * (2 * head_size + 16) if fp8 else 0)
    slack = 1024 if geo.tma else row  # decode.cuh ALIGN_SLACK, inside SMEM_BYTES (its static_assert)
    assert geo.smem_bytes >= need + slack and geo.smem_bytes % slack == 0
    assert geo.max_groups == geo.min_blocks  # grouped CTAs under both loaders (per-group mbarriers under TMA)


@pytest.mark.parametrize(("num_q_heads", "q_rows"), [(8, 8), (16, 8), (24, 16), (32, 16)])
def test_swizzled_fp8_reserves_q_rows_for_the_query_group(num_q_heads: int, q_rows: int) -> None:
    # decode.cuh keeps Q of swizzled FP8 kernels in shared memory: 8 rows (the MMA tile's rows 8-15 are zero and
    # never loaded) up to a group of 8, 16 rows above; 2 * D + 16 bytes per row. derive.py must reserve them.
    d = base_config()
    d["cache"].update(dtype="float8_e4m3fn", page_size=16, num_kv_heads=2)
    d["kernels"] = ["store", "decode"]
    d["attention"] = {"num_q_heads": num_q_heads}
    geo = decode_geometry(validate_variant(d), "sm_90a")
    rings = geo.stages * (geo.stage_bytes + 64 * 4)
    assert geo.smem_bytes >= rings + q_rows * (2 * 128 + 16)
    assert geo.smem_bytes - 128 < rings + q_rows * (2 * 128 + 16) + 128  # rounded up to a row, plus its slack


@pytest.mark.parametrize(("loader", "arch", "head_size", "tma"), [
    ("tma", "sm_90a", 128, True), ("tma", "sm_100a", 64, True),
    ("tma", "sm_80", 128, False),     # no TMA on sm_80: cp.async there
    ("auto", "sm_90a", 256, True),    # "auto" as TMA: every head size fits its block-column boxes
    ("cp_async", "sm_90a", 128, False)])
def test_decode_loader_choice(loader: str, arch: str, head_size: int, tma: bool, monkeypatch) -> None:
    monkeypatch.setitem(DECODE_AUTO_LOADER, ("16-bit", "small pages"), "tma")  # so "auto" exercises the TMA fallback
    d = base_config()
    d["cache"].update(dtype="bfloat16", page_size=16, head_size=head_size)
    d["kernels"] = ["store", "decode"]
    d["archs"] = ["sm_80", "sm_90a", "sm_100a"]
    d["attention"] = {"num_q_heads": 32, "loader": loader}
    geo = decode_geometry(validate_variant(d), arch)
    assert geo.tma is tma
    assert geo.smem_bytes % (1024 if tma else 16) == 0 and geo.min_blocks >= 1


@pytest.mark.parametrize(("dtype", "kind", "page_size", "loader"), [
    ("bfloat16", "paged", 16, "cp_async"), ("bfloat16", "paged", 64, "cp_async"), ("bfloat16", "continuous", None, "cp_async"),
    ("float8_e4m3fn", "paged", 16, "cp_async"), ("float8_e4m3fn", "paged", 32, "cp_async"),
    ("float8_e4m3fn", "paged", 64, "tma"), ("float8_e4m3fn", "paged", 256, "tma"), ("float8_e5m2", "continuous", None, "tma")])
def test_auto_loader_follows_the_measured_table(dtype: str, kind: str, page_size: int | None, loader: str) -> None:
    # FP8 caches whose pages hold a whole 64-row tile (one TMA box per tile and block) measured faster with TMA.
    d = base_config()
    d["cache"].update(dtype=dtype, kind=kind, page_size=page_size)
    d["kernels"] = ["store", "decode"]
    d["attention"] = {"num_q_heads": 32}
    spec = validate_variant(d)
    assert decode_loader(spec, "sm_90a") == loader == DECODE_AUTO_LOADER[decode_auto_key(spec)]
    assert decode_loader(spec, "sm_80") == "cp_async"
    assert decode_geometry(spec, "sm_90a").tma == (loader == "tma")


def test_unknown_loader_is_refused_naming_the_field() -> None:
    d = base_config()
    d["kernels"] = ["store", "decode"]
    d["attention"] = {"num_q_heads": 32, "loader": "bulk"}
    with pytest.raises(ConfigError, match="loader"):
        validate_variant(d)


def test_explicit_tma_loader_that_cannot_be_honored_is_refused() -> None:
    d = base_config()
    d["cache"].update(dtype="bfloat16", page_size=16)
    d["kernels"] = ["store", "decode"]
    d["archs"] = ["sm_80"]
    d["attention"] = {"num_q_heads": 32, "loader": "tma"}
    with pytest.raises(ConfigError, match="arch with TMA") as e:
        validate_variant(d)
    assert "attention.loader" in str(e.value) and "cp_async" in str(e.value)


def test_first_workspace_holds_two_splits_per_request_or_four_waves() -> None:
    assert workspace_pairs(max_batch=256, heads=8, slots=264) == 512
    assert workspace_pairs(max_batch=4, heads=8, slots=528) == 264  # 4 waves of 528 CTAs over 8 KV heads


def _store_spec(dtype: str, quantized: bool) -> VariantSpec:
    d = base_config()
    d["cache"]["dtype"] = dtype
    if quantized:
        d["quantization"] = {"scale_dtype": "float32", "granularity": 64}
    return validate_variant(d)


@pytest.mark.parametrize("input_dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize(("head_size", "granularity"), [(128, 16), (128, 32), (128, 64), (128, 128), (96, 48),
                                                        (96, 96), (256, 256)])
def test_quantized_store_split_tiles_each_scale_group_with_whole_lanes(input_dtype: str, head_size: int,
                                                                       granularity: int) -> None:
    # The kernel's amax butterfly needs TPG lanes, a power of two of at most 32, holding VPT whole vectors each,
    # that cover exactly one group; a head holds whole groups of lanes (RowSplit's static_asserts).
    d = base_config()
    d["cache"].update(dtype="float8_e4m3fn", head_size=head_size, input_dtype=input_dtype)
    d["quantization"] = {"scale_dtype": "float32", "granularity": granularity}
    d["tma"] = {"swizzle": "32B"}  # fits a 96-byte FP8 head row
    split = store_split(validate_variant(d))
    assert split.tpg & (split.tpg - 1) == 0 and 1 <= split.tpg <= 32
    assert split.tpg * split.vpt * split.vec == granularity
    assert (head_size // split.elems_per_item) % split.tpg == 0
    vectors = granularity // split.vec
    assert split.vpt >= min(QUANTIZED_VECTORS_PER_LANE, vectors)  # the per-item work spread over this many vectors


@pytest.mark.parametrize(("pairs", "max_groups", "groups"), [
    (128, 4, 4), (132, 4, 4),   # up to one pair per SM: every group the SM holds
    (133, 4, 2), (264, 4, 2),   # up to two per SM: two CTAs of 2 groups per SM (FP8: 17-33 requests x 8 KV heads)
    (265, 4, 0),                # more: split-K with a combine
    (200, 6, 3), (396, 6, 2), (397, 6, 0),  # ctas_per_sm 6: 2 CTAs of 3 groups, then 3 of 2
    (133, 2, 0), (100, 1, 0), (0, 4, 0)])
def test_grouped_plans_take_as_many_groups_as_fit_one_wave(pairs: int, max_groups: int, groups: int) -> None:
    assert grouped_groups(pairs, 132, max_groups) == groups


@pytest.mark.parametrize(("lengths", "max_groups", "tma", "groups"), [
    ([1024] * 16, 4, False, 4), ([16384] * 16, 4, False, 4),  # one pair per SM: every group, at any length
    ([2048] * 20, 4, False, 2), ([700] * 33, 4, False, 2),    # short contexts: 2-group CTAs even with empty slots
    ([700] * 34, 4, False, 1),                                # 272 pairs: past two per SM, split-K
    ([4096] * 20, 4, False, 1), ([8192] * 24, 4, False, 1),   # long, 61% / 73% of the slots in use: split-K
    ([8192] * 28, 4, False, 2), ([16384] * 32, 4, False, 2),  # long, 85% / 97%: 2-group CTAs
    ([4096] * 20, 4, True, 2),                                # TMA: 2-group CTAs measured faster or equal everywhere
    ([1024] * 32, 2, False, 1)])                              # 16-bit (2 groups per SM): split-K past one pair per SM
def test_plan_groups_follow_the_measured_rule(lengths: list[int], max_groups: int, tma: bool, groups: int) -> None:
    from kvgen.runtime.decode_plan import plan_decode

    plan = plan_decode(_fake_cache(lengths, max_groups, tma))
    assert plan.groups == groups
    if groups > 1 and len(lengths) * 8 > 132:
        assert plan.splits == 1  # partial grouping: one CTA per pair, no combine


@pytest.mark.parametrize(("longest", "pairs", "groups", "splits"), [
    (1024, 128, 4, 1),     # 16 requests x 8 KV heads: one grouped CTA per pair, no combine launch
    (1024, 132, 2, 1),     # exactly one per SM
    (16384, 8, 4, 16),     # one request: split to fill the 132 SMs (16 x 8 = 128 CTAs)
    (100, 8, 4, 1),        # short context: no split would give a warp group a whole tile
    (600, 8, 4, 3),        # ... at most ceil(600 / (4 x 64)) splits
    (600, 8, 2, 5),        # 2-group CTAs over 8 pairs: one tile per group (40 CTAs), not 4 per CTA (24)
    (600, 32, 2, 1),       # ... over 32 pairs: 2 splits of about 8 tiles (GROUPED_MIN_CTA_ROWS) save less than the merge
    (1024, 16, 2, 4),      # 16 requests over 1 KV head, bf16: 4 splits (measured 10.1 µs, 8 splits 11.3)
    (1024, 8, 2, 8),       # 1 request over 8 KV heads, bf16: 8 splits keep 64 CTAs (7.2 µs; 4 splits 7.5)
    (1024, 8, 3, 6),       # ... FP8 at head size 256 (3 groups): 6 splits, 48 CTAs (8.4 µs; 4 splits 9.2)
    (1024, 64, 4, 1),      # 64 pairs at 1k: unsplit, no combine (measured 11.9 µs against 2 splits' 12.8)
    (512, 64, 2, 1),        # ... bf16 at 512 tokens (10.8 against 13.5)
    (2048, 64, 4, 2),      # ... at 2k the splits pay (16.9 against 18.0); the SMs cap them at 2
    (1024, 48, 4, 2),      # 48 pairs at 1k: 96 CTAs, below DRAM saturation, split (11.4 against 11.5, bf16 14.5 / 14.8)
    (1024, 32, 2, 2),      # 32 pairs: 2 splits of 512 rows (session 18: 11.6 µs; 4 splits 13.0, unsplit 13.8)
    (1025, 32, 4, 2),      # ... a token past 1k adds no split (FP8 9.5 µs; 3 splits 9.8, 4 splits 10.3)
    (16385, 2, 4, 32),     # 2 requests x 16k over 1 KV head, FP8: 64 CTAs of 512 rows (11.8 µs; 64 splits 14.2)
    (2049, 16, 4, 4),      # 16 pairs x 2k, FP8: 4 splits (9.0 µs; 8 splits 9.8)
    (4097, 8, 4, 8),       # 1 request x 4k over 8 KV heads, FP8: 8 splits (9.8 µs; 16 splits 10.2)
])
def test_grouped_splits_fill_one_wave_and_never_split_below_a_tile(longest: int, pairs: int, groups: int, splits: int) -> None:
    assert grouped_splits(longest, pairs, 132, groups) == splits


@pytest.mark.parametrize(("dtype", "quantized", "default", "small"), [("bfloat16", False, 2, 1),
                                                                     ("float8_e4m3fn", True, 2, None)])
def test_small_store_steps_take_one_item_per_thread(dtype: str, quantized: bool, default: int, small: int | None) -> None:
    # 8 KV heads x 128. 16-bit stores: 256 items of 8 elements per token (K and V), IPT = 2 items per thread, so 2
    # tokens per 256-thread block, and one token per block when small. Quantizing stores: items of 2 vectors (16
    # elements, QUANTIZED_VECTORS_PER_LANE), 128 per token, one per thread at every size
    # (QUANTIZED_ITEMS_PER_THREAD), so 2 tokens per block and a small step changes nothing for them.
    spec = _store_spec(dtype, quantized)
    split = store_split(spec)
    assert tokens_per_block(spec, split) == default
    assert small_store_tokens_per_block(spec, split) == small


class _Workspace:  # stands in for the torch workspace: slicing and view return itself
    def __init__(self, pairs: int):
        self.pairs = pairs
        self.part_o = self.part_lse = self

    def __getitem__(self, _):
        return self

    def view(self, *_):
        return self


def _fake_cache(lengths: list[int], max_groups: int, tma: bool = False, heads: int = 8):
    """What plan_decode reads of a KVCache, without a GPU: the step's lengths (cache_length + 1 is decoded),
    8 KV heads (or `heads`), 132 SMs, 4 one-group CTAs per SM; K and V rows of an FP8 cache (head 128) where 4 groups
    fit an SM, of a bf16 one where fewer do."""
    from types import SimpleNamespace

    return SimpleNamespace(
        args=SimpleNamespace(batch_size=len(lengths)), host_lengths=np.asarray(lengths, np.uint32) - 1,
        spec=SimpleNamespace(attention=SimpleNamespace(sliding_window=False, num_q_heads=32)), _window=None,
        _decode_geo=SimpleNamespace(max_groups=max_groups, balanced=True, tma=tma,
                                    kv_row_bytes=256 if max_groups >= 4 else 512), num_heads=heads, head_size=128,
        sm_count=lambda: 132, decode_slots=lambda: 528, decode_workspace=_Workspace)


@pytest.mark.parametrize(("lengths", "max_groups", "programmatic"), [
    ([1024] * 16, 4, True),       # grouped CTAs, short contexts: PDL measured 2-4% faster
    ([2048] * 16, 4, True),       # the limit itself
    ([2049] * 16, 4, False),      # one token past it
    ([1024] * 128, 4, True),      # split-K plan, short contexts
    ([16384] * 64, 4, False),     # long contexts launch plainly (FP8 measured 0.1-2% slower with PDL)
    ([1, 5, 3000], 1, False),     # the longest request decides
])
def test_plan_launches_decode_programmatically_only_for_short_contexts(lengths: list[int], max_groups: int,
                                                                       programmatic: bool) -> None:
    from kvgen.runtime.decode_plan import PDL_MAX_CONTEXT, plan_decode

    assert PDL_MAX_CONTEXT == 2048
    assert plan_decode(_fake_cache(lengths, max_groups)).programmatic is programmatic


def test_programmatic_launch_is_refused_before_sm90_naming_the_field() -> None:
    from kvgen.errors import LaunchError
    from kvgen.runtime.kvcache import KVCache

    cache = object.__new__(KVCache)  # only the switch's own state: no GPU needed
    cache._arch, cache._pdl_capable, cache._programmatic = "sm_80", False, False
    with pytest.raises(LaunchError, match=r"programmatic_launch.*sm_90 or newer.*sm_80"):
        cache.programmatic_launch = True
    cache.programmatic_launch = False
    assert cache.programmatic_launch is False
    cache._arch, cache._pdl_capable = "sm_90a", True
    cache.programmatic_launch = True
    assert cache.programmatic_launch is True and cache._programmatic is True


@pytest.mark.parametrize(("arch", "fix"), [("sm_89", "add sm_89 to archs and rebuild"),
                                           ("sm_120", "kvgen builds for sm_80, sm_86, sm_89, sm_90a, sm_100a")])
def test_a_gpu_without_a_cubin_is_refused_by_arch(arch: str, fix: str) -> None:
    # KVCache() checks before it sizes the decode for the arch (its shared-memory tables know kvgen's archs only):
    # an unlisted GPU raised a bare KeyError there (session 17 review), not the launch error naming the arch.
    from types import SimpleNamespace

    from kvgen.errors import LaunchError
    from kvgen.runtime.kvcache import KVCache

    cache = object.__new__(KVCache)
    cache.variant = SimpleNamespace(NAME="v", CUBINS={"sm_90a": "v.cubin"})
    with pytest.raises(LaunchError, match=rf"no cubin for this GPU's arch.*{arch}.*{fix}.*have: sm_90a"):
        cache._require_cubin(arch)
    cache._require_cubin("sm_90a")


def _choose_chunk_one_by_one(lens: np.ndarray, heads: int, slots: int, overhead: int = 96, tile: int = 64) -> int:
    """The planner's rule written as the plain loop over candidate chunks it replaced (1.7 ms at 16k contexts)."""
    longest = int(lens.max())
    best_chunk, best_cost = 0, None
    for t in range(1, -(-longest // tile) + 1):
        chunk = t * tile
        cost = makespan(lens, heads, slots, chunk, overhead)
        if best_cost is None or cost < best_cost or (cost == best_cost and chunk > best_chunk):
            best_chunk, best_cost = chunk, cost
    return best_chunk


def test_choose_chunk_vectorized_keeps_the_rule() -> None:
    """All candidate chunks evaluated at once pick what the candidate-by-candidate loop picks (ties: the longest)."""
    rng = np.random.default_rng(4)
    for i in range(400):
        lens = rng.integers(0 if i % 4 == 0 else 1, int(rng.integers(2, 40000)), int(rng.integers(1, 300)))
        heads, slots = int(rng.choice([1, 2, 8])), int(rng.choice([132, 264, 528, 792]))
        assert choose_chunk(lens, heads, slots) == _choose_chunk_one_by_one(lens, heads, slots)


def _lognormal(n: int = 64, mean: int = 4096, cap: int = 24576) -> list[int]:
    from kvgen.benchmark import skewed_lengths

    return skewed_lengths(np.random.default_rng(0), n, mean, cap)


@pytest.mark.parametrize(("lengths", "heads", "max_groups", "groups"), [
    (_lognormal(), 1, 4, 1),       # 64 pairs of log-normal lengths (one GPU's share of a 70B model): split-K
    (_lognormal(), 1, 2, 1),       # the same with the 16-bit kernel's 2 groups per SM
    (_lognormal(16), 8, 4, 1),     # 128 pairs, skewed: split-K
    ([4096] * 64, 1, 4, 4),        # the same pairs with equal lengths stay grouped
    ([16384] * 16, 1, 4, 4),
    ([1024] * 16, 8, 4, 4),        # issue 4's small batch stays grouped at every length
    ([16384] * 16, 8, 4, 4),
    ([2048] * 20, 8, 4, 2),        # measured partial-grouping wins stand (1.34x modelled)
    ([4096] * 20, 8, 4, 2),        # (TMA below, 1.39x)
])
def test_skewed_lengths_leave_grouped_ctas_for_balanced_split_k(lengths: list[int], heads: int, max_groups: int,
                                                                groups: int) -> None:
    from kvgen.runtime.decode_plan import plan_decode

    tma = lengths == [4096] * 20
    assert plan_decode(_fake_cache(lengths, max_groups, tma, heads)).groups == groups


@pytest.mark.parametrize(("lengths", "heads", "max_groups", "slots", "groups", "splits"), [
    ([1024] * 64, 1, 2, 264, 2, 1),   # bf16, 64 pairs at 1k: grouped and unsplit (measured 15.7 µs; 2 splits 16.4)
    ([512] * 64, 1, 2, 264, 2, 1),    # ... at 512 tokens (10.8 against 13.5)
    ([1024] * 64, 1, 4, 528, 4, 1),   # FP8 (11.9 against 12.8)
    ([2048] * 64, 1, 2, 264, 2, 2),   # at 2k the splits pay
    ([512] * 33, 1, 2, 264, 2, 1),    # equal lengths stay grouped, never split-K for the unsplit cut's "skew"
])
def test_unsplit_grouped_plans_are_not_mistaken_for_skewed_ones(lengths: list[int], heads: int, max_groups: int,
                                                                slots: int, groups: int, splits: int) -> None:
    # The skew gate (GROUPED_SKEW_GATE) weighs the cut that fills the SMs. Weighing the unsplit cut instead
    # sent bf16 64 x 1k to split-K (4 splits and a combine): the opposite of what leaving it unsplit is for.
    from kvgen.runtime.decode_plan import plan_decode

    cache = _fake_cache(lengths, max_groups, heads=heads)
    cache.decode_slots = lambda: slots
    plan = plan_decode(cache)
    assert (plan.groups, plan.splits) == (groups, splits)


def _h200_cache(lengths: list[int], dtype: str, heads: int):
    """_fake_cache with the geometry of the H200 benchmark kernels (head 128, GQA 4 or 8): bf16 2 warp groups per
    SM and the device cut, FP8 4 groups and a host chunk."""
    fp8 = dtype == "fp8"
    cache = _fake_cache(lengths, 4 if fp8 else 2, heads=heads)
    cache._decode_geo.balanced, cache._decode_geo.kv_row_bytes = not fp8, 256 if fp8 else 512
    cache.decode_slots = lambda: 528 if fp8 else 264
    return cache


# Batches measured on the H200 under both plans (session 19, bench/decode_skew_*_h200_s19.*): the plan the time model
# picks, and the times of both (grouped, split-K) in µs.
@pytest.mark.parametrize(("lengths", "dtype", "heads", "grouped", "measured"), [
    ([1231, 3442, 7169, 12461, 15210, 24576], "fp8", 1, True, (14.8, 27.3)),  # the 1.5x rule took split-K: +84%
    ([291, 317, 319, 353, 354, 486, 721, 761, 850, 1158, 1232, 1311, 1357, 1428, 1570, 2165, 2581, 2707, 3152, 5318],
     "fp8", 1, True, (12.3, 19.3)),
    ([484, 508, 629, 813, 825, 930, 1051, 1181, 1303, 1691, 1816, 2223, 3282, 3394, 5240, 5743], "bf16", 1, True,
     (15.0, 18.4)),
    ([491, 1621, 1867, 2799, 3246, 3496, 4051, 5182], "bf16", 8, False, (34.7, 30.4)),  # the rule kept grouped: +14%
    ([2673, 4457, 6372, 6489, 8993], "bf16", 8, False, (41.1, 35.9)),
    ([1, 15, 16, 17, 64, 129, 700, 2053], "bf16", 8, False, (15.5, 14.1)),  # the GPU tests' batch
    ([1024] * 4, "fp8", 8, True, (9.0, 10.5)),  # equal lengths never reach the model (GROUPED_SKEW_GATE)
])
def test_skewed_batches_take_the_plan_the_time_model_finds_faster(lengths: list[int], dtype: str, heads: int,
                                                                  grouped: bool, measured: tuple[float, float]) -> None:
    from kvgen.runtime.decode_plan import plan_decode

    assert (measured[0] < measured[1]) == grouped  # the expectation is the measured winner
    plan = plan_decode(_h200_cache(lengths, dtype, heads))
    assert (plan.groups > 1) == grouped, f"{plan.groups} groups, modelled (grouped, split-K) µs {plan.modelled_us}"
    assert (plan.modelled_us is None) == (len(set(lengths)) == 1)  # equal lengths skip the model


def test_time_model_fluid_speeds_up_the_streams_left_and_charges_the_tail() -> None:
    from kvgen.runtime.decode_time_model import (
        MODEL_DRAM_BYTES_PER_US,
        MODEL_GROUP_ELEMENTS_PER_US,
        MODEL_SM_BYTES_PER_US,
        fluid_time_us,
    )

    # One stream alone runs at its SM's (or its own) rate; a thousand equal ones share the DRAM.
    one = fluid_time_us(np.array([1000]), 512, 1, 128)
    assert one == pytest.approx(1000 * 512 / min(MODEL_SM_BYTES_PER_US, MODEL_GROUP_ELEMENTS_PER_US[2] * 2))
    many = fluid_time_us(np.full(1000, 1000), 512, 4, 128)
    assert many == pytest.approx(1000 * 1000 * 512 / MODEL_DRAM_BYTES_PER_US)
    # A long stream among short ones costs its own tail: more than the bytes over the DRAM rate.
    skewed = fluid_time_us(np.array([8000] + [100] * 999), 512, 4, 128)
    assert skewed > (8000 + 99900) * 512 / MODEL_DRAM_BYTES_PER_US * 2
    assert fluid_time_us(np.zeros(3), 512, 1, 128) == 0.0
    # `copies` of each stream (one per KV head) are the streams tiled; empty streams are no streams.
    rows = np.array([700, 64, 0, 2053, 129])
    assert fluid_time_us(rows, 256, 4, 128, copies=8) == pytest.approx(fluid_time_us(np.tile(rows, 8), 256, 4, 128))
    assert fluid_time_us(rows, 256, 4, 128) == pytest.approx(fluid_time_us(rows[rows > 0], 256, 4, 128))


def test_time_model_cuts_the_plans_as_the_kernels_do() -> None:
    from kvgen.runtime.decode_time_model import (
        MODEL_COMBINE_US,
        MODEL_COMBINE_US_PER_SPLIT,
        MODEL_GROUPED_GROUP_ROWS,
        MODEL_SPLIT_K_CTA_ROWS,
        fluid_time_us,
        grouped_time_us,
        split_k_time_us,
    )

    lens = np.array([1000, 130, 1], dtype=np.uint32)  # unsigned, as host_lengths: no wrap-around in the cuts
    # 16-bit device cut over 2 splits x 2 groups: each request's own ceil(len / 4 tiles) tiles per part, the last
    # parts short or empty (1000 -> 256, 256, 256, 232; 130 -> 64, 64, 2; 1 -> 1).
    parts = np.array([256, 256, 256, 232, 64, 64, 2, 1])
    want = fluid_time_us(parts + MODEL_GROUPED_GROUP_ROWS, 512, 2, 128, copies=8) + MODEL_COMBINE_US + 2 * MODEL_COMBINE_US_PER_SPLIT
    assert grouped_time_us(lens, 8, 2, 2, 0, 512, 128, 132) == pytest.approx(want)
    # FP8's host chunk (the longest request's cut): 1000 -> 4 x 256 rows (the last 232), 130 -> 256 and empty ones.
    parts = np.array([256, 256, 256, 232, 130, 1])
    want = fluid_time_us(parts + MODEL_GROUPED_GROUP_ROWS, 256, 2, 128, copies=8) + MODEL_COMBINE_US + 2 * MODEL_COMBINE_US_PER_SPLIT
    assert grouped_time_us(lens, 8, 2, 2, 256, 256, 128, 132) == pytest.approx(want)
    # Split-K past the resident slots: CTA i runs after CTA i - slots on the same slot.
    ctas = np.array([256, 256, 256, 232, 130, 1]) + MODEL_SPLIT_K_CTA_ROWS
    folded = np.bincount(np.arange(12) % 10, weights=np.tile(ctas, 2), minlength=10)
    want = fluid_time_us(folded, 512, 10 / 132, 128) + MODEL_COMBINE_US + 4 * MODEL_COMBINE_US_PER_SPLIT
    assert split_k_time_us(lens, 2, 256, 10, 132, 512, 128) == pytest.approx(want)


def test_time_model_beats_the_row_ratio_rule_on_the_measured_batches() -> None:
    """The batches of bench/skew_s19 (H200, each timed under both plans), scored as bench/fit_decode_model.py scores
    them: the summed regret of the shipped constants stays where it was fitted, far below the old rule's."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("fit_decode_model", root / "bench" / "fit_decode_model.py")
    fit = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = fit  # its dataclass resolves annotations through the module
    spec.loader.exec_module(fit)
    logs = sorted((root / "bench" / "skew_s19").glob("*.log"))
    held = [p for p in logs if any(h in p.name for h in fit.HELD_OUT)]
    fitted, held = fit.load([p for p in logs if p not in held]), fit.load(held)
    assert (len(fitted), len(held)) == (712, 334)
    for batches, model_max, old_min in ((fitted, 3.7, 10.0), (held, 1.1, 8.0)):
        model = fit.regret(batches, fit.model_choice(None))
        old = fit.regret(batches, lambda b: b.ratio <= fit.OLD_LIMIT)
        assert model.sum() <= model_max and old.sum() >= old_min, (model.sum(), old.sum())


def test_grouped_and_split_k_makespans_are_modelled_in_the_same_rows() -> None:
    from kvgen.runtime.decode_plan import GROUPED_OVERHEAD_ROWS, grouped_makespan, split_k_makespan

    # 16 x 1k over 8 KV heads: one 4-group CTA per pair, 256 rows per group; split-K: 4 CTAs of 256 rows per pair.
    assert grouped_makespan(1024, 1, 4) == 256 + GROUPED_OVERHEAD_ROWS
    assert split_k_makespan(np.array([1024] * 16), 8, 528) == 256 + 96
    lens = np.array(_lognormal())
    assert split_k_makespan(lens, 1, 528) * 2 < grouped_makespan(int(lens.max()), 2, 4)  # 672 against 1840 rows


def test_gpu_decode_grid_runs_both_plans() -> None:
    """The GPU decode tests' skewed batch (tests/gpu/test_decode.py, ending "plan") reaches both the grouped and the
    split-K plan among the grid's 16-bit and FP8 variants (on 132 SMs, the driver's occupancy taken as the
    geometry's), so a change to the time model cannot quietly leave one of them untested on the GPU."""
    from pathlib import Path

    from kvgen.derive import decode_geometry
    from kvgen.grid import load_config
    from kvgen.runtime.decode_plan import plan_decode

    kinds: dict[tuple[bool, bool], int] = {}
    for v in load_config(Path(__file__).parents[1] / "configs" / "gpu_decode.yaml").variants:
        if v.spec.attention.sliding_window:
            continue  # the window (300 tokens) leaves these batches balanced
        geo = decode_geometry(v.spec, "sm_90a")
        if geo.max_groups < 2:
            continue
        p = v.spec.cache.page_size or 64
        lengths = [1, p - 1 if p > 1 else 2, p, p + 1, 700, 2053, 64, 129]
        cache = _fake_cache(lengths, geo.max_groups, geo.tma, v.spec.cache.num_kv_heads)
        cache._decode_geo, cache.head_size = geo, v.spec.cache.head_size
        cache.decode_slots = lambda geo=geo: geo.min_blocks * 132
        plan = plan_decode(cache)
        key = (v.spec.cache.dtype.startswith("float8"), plan.groups > 1)
        kinds[key] = kinds.get(key, 0) + 1
    assert set(kinds) == {(False, False), (False, True), (True, False), (True, True)}, kinds


def test_partial_grouping_follows_the_time_model_too() -> None:
    """133-264 pairs run CTAs of 2 of the SM's 4 FP8 warp groups, two CTAs per SM (measured on the H200, session 19,
    bench/skew_s19/decode_skew_pg_*: 42 batches, the model's choices lost 0.07 summed regret, as the ratio rule did)."""
    from kvgen.runtime.decode_plan import plan_decode

    skewed = [1312, 1095, 1590, 1270, 1162, 593, 3988, 1407, 1541, 1564, 220, 2214, 1116, 1152, 1535, 667, 2851, 832,
              704, 728, 1648, 2637, 902, 433, 3397, 619, 3777, 1390]  # grouped 48.9 µs, split-K 33.8
    plan = plan_decode(_h200_cache(skewed, "fp8", 8))
    assert plan.groups == 1 and plan.modelled_us[1] < plan.modelled_us[0]
    plan = plan_decode(_h200_cache([1024] * 24, "fp8", 8))  # equal lengths: grouped 17.7-19.3 µs, split-K 20.0-21.5
    assert (plan.groups, plan.splits, plan.modelled_us) == (2, 1, None)


def test_a_plan_says_what_it_is() -> None:
    from kvgen.runtime.decode_plan import plan_decode

    skewed = plan_decode(_h200_cache([491, 1621, 1867, 2799, 3246, 3496, 4051, 5182], "bf16", 8))
    assert repr(skewed).startswith("DecodePlan(split-K, ") and "modelled grouped" in repr(skewed)
    equal = plan_decode(_h200_cache([1024] * 16, "bf16", 8))
    assert repr(equal) == "DecodePlan(grouped, 2 warp groups per CTA, 1 split(s) per (request, KV head), chunk cut on the device, batch 16)"
