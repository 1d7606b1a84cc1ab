"""The NumPy reference (the oracle of the GPU tests): row math, populate, quantization, store/load/copy."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest

from kvgen import reference as ref
from kvgen.dtypes import DTYPES

SENTINEL = 999999


# ---- lookup table and row math ------------------------------------------------------------------------
@pytest.mark.parametrize(("pages", "cols"), [(1, 24), (8, 24), (9, 32), (16, 32), (17, 40), (0, 16)])
def test_padded_lut_cols(pages: int, cols: int) -> None:
    assert ref.padded_lut_cols(pages) == cols


def test_make_lookup_table_fills_null_page() -> None:
    lut = ref.make_lookup_table([[3, 1], [], [0, 2, 5]], null_page=7, cols=6)
    assert lut.dtype == np.uint32 and lut.shape == (3, 6)
    assert lut.tolist() == [[3, 1, 7, 7, 7, 7], [7] * 6, [0, 2, 5, 7, 7, 7]]


def test_row_math_small_geometry() -> None:
    g = ref.Geometry(kv_dim=2, num_layers=3, page_size=16, num_blocks=5)
    assert g.stride == 2 * 3 * 16 == 96 and g.null_page == 4
    lut = np.array([[2, 0, 3, 4]], dtype=np.uint32)
    assert ref.row_idx(g, lut, 0, 0) == 192
    assert ref.row_idx(g, lut, 0, 15) == 207
    assert ref.row_idx(g, lut, 0, 17) == 1
    assert ref.row_idx(g, lut, 0, 40) == 3 * 96 + 8
    assert ref.num_kv_rows(g) == 4 * 96 + 16 == 400
    assert ref.get_tma_row(g, 0) == 0
    assert ref.get_tma_row(g, 37) == 2 * 96 + 5
    assert ref.get_tma_row(g, 4 * 16 + 15) == 399  # last row of the null page is the last row of the view


def test_row_math_continuous() -> None:
    g = ref.Geometry(kv_dim=1, num_layers=2, page_size=32, num_blocks=4, paged=False)
    lut = np.array([2, 0, 3], dtype=np.uint32)
    assert g.stride == 64
    assert ref.row_idx(g, lut, 0, 5) == 2 * 64 + 5
    assert ref.row_idx(g, lut, 2, 31) == 3 * 64 + 31
    assert ref.get_tma_row(g, 123) == 123
    assert ref.num_kv_rows(g) == 3 * 64 + 32
    assert ref.populate(g, lut, 1, 7, bn=64, base_alignment=64) == [7]


# ---- populate -----------------------------------------------------------------------------------------
def _populate_cases() -> list[tuple[int, int, int]]:
    out = []
    for p, bn in itertools.product([16, 32, 64, 128, 256], [64, 128, 256]):
        for align in sorted({bn, p}):
            out.append((p, bn, align))
    # pages below the swizzle atom, at the largest tile the 16-column tail allows (bn = 16 P, config.py)
    for p in (1, 2, 4, 8):
        for align in sorted({16 * p, p}):
            out.append((p, 16 * p, align))
    return out


@pytest.mark.parametrize(("p", "bn", "align"), _populate_cases(), ids=lambda x: str(x))
def test_populate_page_boundaries(p: int, bn: int, align: int) -> None:
    assigned = 9
    nb = 40
    g = ref.Geometry(kv_dim=2, num_layers=2, page_size=p, num_blocks=nb)
    rng = np.random.default_rng(p * 1000 + bn + align)
    pages = rng.permutation(nb - 1)[:assigned].tolist()
    cols = ref.padded_lut_cols(assigned)
    lut = np.full((2, cols), g.null_page, dtype=np.int64)
    lut[1, :assigned] = pages
    lut[1, assigned:] = SENTINEL  # poison the padding: reading it must not break the assigned rows
    n = max(1, bn // p)
    for base in range(0, assigned * p, align):
        rows = ref.populate(g, lut, 1, base, bn, align)
        assert len(rows) == n
        first = base // p
        for i, r in enumerate(rows):
            assert r // g.stride == lut[1, first + i]
            if first + i < assigned:
                assert r // g.stride == pages[first + i]
            else:
                assert r // g.stride == SENTINEL
        if n > 1:
            assert all(r % g.stride == 0 for r in rows)
        elif align % p == 0:
            assert rows[0] % g.stride == 0
        else:
            assert rows[0] % g.stride == base % p  # a sub-page tile starts mid-page


@pytest.mark.parametrize(("p", "bn"), [(16, 64), (16, 256), (32, 128), (64, 256), (1, 16), (2, 32), (4, 64), (8, 128)])
def test_populate_needs_lut_padding(p: int, bn: int) -> None:
    assigned = 10
    g = ref.Geometry(kv_dim=2, num_layers=1, page_size=p, num_blocks=32)
    pages = list(range(assigned))
    bare = ref.make_lookup_table([pages], g.null_page, assigned)  # no 16-column tail
    padded = ref.make_lookup_table([pages], g.null_page, ref.padded_lut_cols(assigned))
    last = (assigned - 1) * p
    with pytest.raises(IndexError):
        ref.populate(g, bare, 0, last, bn, bn)
    rows = ref.populate(g, padded, 0, last, bn, bn)
    assert rows[0] == pages[-1] * g.stride
    assert all(r == g.null_page * g.stride for r in rows[1:])


def test_populate_rejects_misaligned_multi_page_tile() -> None:
    g = ref.Geometry(kv_dim=2, num_layers=1, page_size=16, num_blocks=8)
    lut = ref.make_lookup_table([[0, 1, 2, 3]], g.null_page, ref.padded_lut_cols(4))
    with pytest.raises(ValueError):
        ref.populate(g, lut, 0, 8, bn=64, base_alignment=8)


@pytest.mark.parametrize(("p", "bn"), [(16, 64), (64, 64), (128, 64), (256, 128)])
def test_populate_null_page(p: int, bn: int) -> None:
    g = ref.Geometry(kv_dim=2, num_layers=2, page_size=p, num_blocks=6)
    lut = ref.make_lookup_table([[1, 3]], g.null_page, ref.padded_lut_cols(2))
    assert (lut[0, 2:] == g.null_page).all()
    base = 2 * p  # the first unassigned page
    rows = ref.populate(g, lut, 0, base, bn, bn if bn >= p else p)
    nkv = ref.num_kv_rows(g)
    for r in rows:
        assert r == g.null_page * g.stride
        assert r < nkv
        assert r + min(bn, p) <= nkv  # the whole box stays inside the view


# ---- quantization -------------------------------------------------------------------------------------
def _e4m3_half_ulp(y: np.ndarray) -> np.ndarray:
    a = np.abs(y.astype(np.float64))
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    e = np.maximum(np.where(a > 0, e, -6), -6)
    return 0.5 * 2.0 ** (e - 3)


@pytest.mark.parametrize("g", [32, 64, 128])
def test_quantize_float32_scales(g: int) -> None:
    rng = np.random.default_rng(g)
    x = (rng.standard_normal((5, 3, 128)) * rng.uniform(0.01, 50, (5, 3, 1))).astype(np.float32)
    x[0, 0, :g] = 0.0  # an all-zero group
    q, s = ref.quantize(x, "float8_e4m3fn", g, "float32")
    assert q.dtype == DTYPES["float8_e4m3fn"].numpy and s.dtype == np.float32
    assert s.shape == (5, 3, 128 // g)
    amax = np.abs(x.reshape(5, 3, 128 // g, g)).max(-1)
    expect = np.where(amax > 0, amax / np.float32(448.0), np.float32(1.0)).astype(np.float32)
    np.testing.assert_array_equal(s, expect)
    assert s[0, 0, 0] == 1.0
    # the group maximum lands on the FP8 maximum
    qf = q.astype(np.float32).reshape(5, 3, 128 // g, g)
    np.testing.assert_array_equal(np.abs(qf).max(-1)[amax > 0], 448.0)
    y = x / np.repeat(s, g, axis=-1)
    deq = ref.dequantize(q, s, g, "float32")
    bound = _e4m3_half_ulp(y) * np.repeat(s, g, axis=-1) * (1 + 1e-5) + 1e-30
    assert (np.abs(deq.astype(np.float64) - x) <= bound).all()


def test_quantize_e8m0_scales() -> None:
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((6, 128)) * np.logspace(-3, 4, 6)[:, None]).astype(np.float32)
    x[0, :64] = 0.0
    x[1, :64] = 448.0 * 4  # amax / 448 exactly a power of two: the scale must not round up
    stored, sf = ref.group_scale(np.abs(x.reshape(6, 2, 64)).max(-1), 448.0, "float8_e8m0fnu")
    q, s = ref.quantize(x, "float8_e4m3fn", 64, "float8_e8m0fnu")
    np.testing.assert_array_equal(s, stored)
    assert s.dtype == np.uint8
    sf = ref.e8m0_to_float(s)
    amax = np.abs(x.reshape(6, 2, 64)).max(-1)
    assert np.all(np.log2(sf) == np.round(np.log2(sf))), "e8m0 scales are powers of two"
    assert np.all(sf >= amax / np.float32(448.0))
    nz = amax > 0
    assert np.all(sf[nz] < 2 * amax[nz] / 448.0), "the smallest power of two that fits"
    assert sf[0, 0] == 1.0 and s[0, 0] == 127
    assert sf[1, 0] == 4.0
    deq = ref.dequantize(q, s, 64, "float8_e8m0fnu")
    assert np.isfinite(deq).all()
    assert np.all(np.abs(q.astype(np.float32)) <= 448.0)


def test_e8m0_decoding() -> None:
    np.testing.assert_array_equal(ref.e8m0_to_float(np.array([127, 128, 126, 254], np.uint8)),
                                  np.array([1.0, 2.0, 0.5, 2.0 ** 127], np.float32))


@pytest.mark.parametrize(("dtype", "fmax"), [("float8_e4m3fn", 448.0), ("float8_e5m2", 57344.0)])
def test_fp8_saturation(dtype: str, fmax: float) -> None:
    out = ref.to_cache_dtype(np.array([1e9, -1e9, np.inf, -np.inf, fmax * 1.01, 1.0], np.float32), dtype)
    assert out.dtype == DTYPES[dtype].numpy
    f = out.astype(np.float32)
    assert not np.isnan(f).any() and np.isfinite(f).all()
    np.testing.assert_array_equal(f, [fmax, -fmax, fmax, -fmax, fmax, 1.0])


def test_to_cache_dtype_rounds_to_nearest_even() -> None:
    # 1 + 2^-8 is exactly between two bf16 values (1 and 1 + 2^-7): ties go to the even mantissa (1.0)
    x = np.array([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8], np.float32)
    np.testing.assert_array_equal(ref.to_cache_dtype(x, "bfloat16").astype(np.float32), [1.0, 1 + 2.0 ** -6])


# ---- store / load / copy_pages ------------------------------------------------------------------------
def _state(nb: int, p: int, h: int, d: int, pages: list[list[int]], lengths: list[int], dtype: str = "bfloat16",
           groups: int | None = None, layers: int = 2) -> ref.CacheState:
    blocks = np.zeros((nb, 2, layers, p, h, d), dtype=DTYPES[dtype].numpy)
    scales = np.zeros((nb, 2, layers, p, h, groups), np.float32) if groups else None
    lut = ref.make_lookup_table(pages, nb - 1, ref.padded_lut_cols(max(len(x) for x in pages)))
    return ref.CacheState(blocks, scales, lut, np.array(lengths, np.uint32))


def test_store_load_roundtrip_bf16_and_refusal() -> None:
    p, h, d = 16, 2, 32
    st = _state(nb=8, p=p, h=h, d=d, pages=[[5, 2], [0, 1, 3]], lengths=[20, 3])
    rng = np.random.default_rng(0)
    offsets = np.array([0, 20, 30], np.uint32)  # batch 0: 20 new tokens at 20..39 (only 20..31 assigned)
    k = rng.standard_normal((30, h, d)).astype(ml_dtypes.bfloat16).astype(np.float32)
    v = rng.standard_normal((30, h, d)).astype(ml_dtypes.bfloat16).astype(np.float32)
    refused = ref.store(st, 1, [k, v], offsets, "bfloat16")
    assert refused == 8
    assert not st.blocks[st.geometry.null_page].astype(np.float32).any(), "refused tokens touched the null page"
    assert not st.blocks[:, :, 0].astype(np.float32).any(), "another layer was written"
    assert not st.blocks[[4, 6]].astype(np.float32).any(), "unassigned pages were written"
    start = st.cache_lengths.copy()
    kk, vv = ref.load(st, 1, offsets, start)
    np.testing.assert_array_equal(kk[:12], k[:12])
    np.testing.assert_array_equal(vv[:12], v[:12])
    np.testing.assert_array_equal(kk[12:20], 0.0)  # refused positions read back as zeros
    np.testing.assert_array_equal(kk[20:], k[20:])
    np.testing.assert_array_equal(vv[20:], v[20:])
    # positions land where row_idx says they do
    np.testing.assert_array_equal(st.blocks[2, 0, 1, 31 - 16].astype(np.float32), k[11])
    np.testing.assert_array_equal(st.blocks[0, 1, 1, 3 + 9].astype(np.float32), v[29])


def test_store_quantized_roundtrip_within_bound() -> None:
    p, h, d, g = 16, 1, 64, 32
    st = _state(nb=4, p=p, h=h, d=d, pages=[[0, 2]], lengths=[0], dtype="float8_e4m3fn", groups=d // g)
    rng = np.random.default_rng(1)
    k = rng.standard_normal((20, h, d)).astype(np.float32) * 3
    v = rng.standard_normal((20, h, d)).astype(np.float32)
    assert ref.store(st, 0, [k, v], np.array([0, 20], np.uint32), "float8_e4m3fn", g, "float32") == 0
    kk, vv = ref.load(st, 0, np.array([0, 20], np.uint32), np.array([0], np.uint32), g, "float32")
    for orig, back in ((k, kk), (v, vv)):
        scale = np.abs(orig.reshape(20, h, d // g, g)).max(-1) / 448.0
        assert np.all(np.abs(back - orig) <= np.repeat(scale, g, -1) * 16 + 1e-7)  # <= half ulp at 448 (32/2)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_store_static_scales_per_head(dtype: str) -> None:
    """Static scales: each (K|V, layer, head) row is stored as x * (1 / scale) (one float32 reciprocal, then float32
    multiplies), saturating without NaN, and loads back as value * scale."""
    p, h, d = 16, 2, 32
    st = _state(nb=4, p=p, h=h, d=d, pages=[[0, 2]], lengths=[0], dtype=dtype)
    st.static_scales = np.array([[[0.5, 0.01]] * 2, [[2.0, 0.25]] * 2], np.float32)  # [KVD, L, H]
    rng = np.random.default_rng(3)
    k = rng.standard_normal((20, h, d)).astype(np.float32) * 4
    v = rng.standard_normal((20, h, d)).astype(np.float32)
    k[0, 1, 0] = np.inf  # saturates, never NaN
    assert ref.store(st, 1, [k, v], np.array([0, 20], np.uint32), dtype) == 0
    info = DTYPES[dtype]
    for kv, x in enumerate((k, v)):
        inv = (np.float32(1) / st.static_scales[kv, 1]).astype(np.float32)
        want = np.clip(x * inv[None, :, None], -info.fp8_max, info.fp8_max).astype(info.numpy)
        got = np.concatenate([st.blocks[0, kv, 1], st.blocks[2, kv, 1, :4]])
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    assert not np.isnan(st.blocks.astype(np.float32)).any()
    kk, vv = ref.load(st, 1, np.array([0, 20], np.uint32), np.array([0], np.uint32))
    np.testing.assert_array_equal(kk, st.blocks[[0] * 16 + [2] * 4, 0, 1, list(range(16)) + list(range(4))]
                                  .astype(np.float32) * st.static_scales[0, 1][None, :, None])
    finite = np.isfinite(k) & (np.abs(k) * (np.float32(1) / st.static_scales[0, 1])[None, :, None] < info.fp8_max)
    rtol = 2.0 ** -4 if dtype == "float8_e4m3fn" else 2.0 ** -3  # half an ulp of a 3- / 2-bit mantissa
    scale = np.broadcast_to(st.static_scales[0, 1][None, :, None], k.shape)
    assert np.all(np.abs(kk - k)[finite] <= rtol * np.abs(k[finite]) + scale[finite] * 2.0 ** -6)


def test_store_slots_writes_where_the_slots_say() -> None:
    p, h, d = 16, 2, 32
    st = _state(nb=4, p=p, h=h, d=d, pages=[[0]], lengths=[0])
    rng = np.random.default_rng(4)
    k = rng.standard_normal((5, h, d)).astype(ml_dtypes.bfloat16).astype(np.float32)
    slots = np.array([2 * p + 3, -1, 7, 3 * p, 4 * p + 1])  # page 2, padding, page 0, the null page, past the end
    assert ref.store_slots(st, 1, [k, -k], slots, "bfloat16") == 2
    np.testing.assert_array_equal(st.blocks[2, 0, 1, 3].astype(np.float32), k[0])
    np.testing.assert_array_equal(st.blocks[0, 1, 1, 7].astype(np.float32), -k[2])
    assert np.count_nonzero(st.blocks.astype(np.float32)) == 2 * 2 * h * d  # nothing else written


def test_copy_pages_copies_blocks_and_scales() -> None:
    st = _state(nb=6, p=16, h=1, d=32, pages=[[0, 1]], lengths=[0], dtype="float8_e4m3fn", groups=1)
    rng = np.random.default_rng(2)
    st.blocks[...] = rng.uniform(-100, 100, st.blocks.shape).astype(st.blocks.dtype)
    st.scales[...] = rng.uniform(0.1, 2, st.scales.shape).astype(np.float32)
    before_b, before_s = st.blocks.copy(), st.scales.copy()
    ref.copy_pages(st, [0, 1], [3, 4])
    np.testing.assert_array_equal(st.blocks[3].view(np.uint8), before_b[0].view(np.uint8))
    np.testing.assert_array_equal(st.blocks[4].view(np.uint8), before_b[1].view(np.uint8))
    np.testing.assert_array_equal(st.scales[[3, 4]], before_s[[0, 1]])
    for untouched in (0, 1, 2, 5):
        np.testing.assert_array_equal(st.blocks[untouched].view(np.uint8), before_b[untouched].view(np.uint8))
        np.testing.assert_array_equal(st.scales[untouched], before_s[untouched])


def test_view_rows_matches_row_idx() -> None:
    st = _state(nb=5, p=16, h=2, d=8, pages=[[3, 1]], lengths=[0], layers=3)
    st.blocks[...] = np.arange(st.blocks.size, dtype=np.float32).reshape(st.blocks.shape).astype(st.blocks.dtype)
    g = st.geometry
    for kv, layer in ((0, 0), (1, 2)):
        rows = ref.view_rows(st.blocks, kv, layer)
        assert rows.shape[0] == ref.num_kv_rows(g)
        for t in (0, 5, 17, 31):
            blk, tok = st._locate(0, t)
            np.testing.assert_array_equal(rows[ref.row_idx(g, st.lut, 0, t)], st.blocks[blk, kv, layer, tok])


@pytest.mark.parametrize("scale_dtype", ["float32", "float8_e8m0fnu"])
def test_group_with_inf_quantizes_without_nan(scale_dtype: str) -> None:
    # amax = inf would give scale inf and inf * (1 / inf) = NaN; the scale is clamped finite instead.
    x = np.ones((2, 64), np.float32)
    x[0, 5], x[1, 9] = np.inf, -np.inf
    q, s = ref.quantize(x, "float8_e4m3fn", 64, scale_dtype)
    qf = q.astype(np.float32)
    assert not np.isnan(qf).any()
    assert qf[0, 5] == 448.0 and qf[1, 9] == -448.0
    sf = ref.e8m0_to_float(s) if scale_dtype == "float8_e8m0fnu" else s
    assert np.isfinite(sf).all()
    assert not np.isnan(ref.dequantize(q, s, 64, scale_dtype)).any()


def test_one_token_pages_row_math_and_roundtrip() -> None:
    """Pages of one token (SGLang's default): every position is its own page, in the lookup table's order."""
    g = ref.Geometry(kv_dim=2, num_layers=3, page_size=1, num_blocks=7)
    lut = np.array([[4, 0, 5, 2]], dtype=np.uint32)
    assert g.stride == 6 and ref.num_kv_rows(g) == 6 * 6 + 1
    assert [ref.row_idx(g, lut, 0, t) for t in range(4)] == [24, 0, 30, 12]
    assert ref.get_tma_row(g, 5) == 30  # enc = page * P + offset = page
    st = _state(nb=7, p=1, h=3, d=16, pages=[[4, 0, 5], [2, 1]], lengths=[0, 0], layers=3)
    rng = np.random.default_rng(2)
    k, v = (rng.standard_normal((5, 3, 16)).astype(ml_dtypes.bfloat16).astype(np.float32) for _ in range(2))
    assert ref.store(st, 2, [k, v], np.array([0, 3, 5], np.uint32), "bfloat16") == 0
    np.testing.assert_array_equal(st.blocks[5, 1, 2, 0].astype(np.float32), v[2])  # request 0, position 2: page 5
    kk, vv = ref.load(st, 2, np.array([0, 3, 5], np.uint32), np.zeros(2, np.uint32))
    np.testing.assert_array_equal(kk, k)
    np.testing.assert_array_equal(vv, v)
