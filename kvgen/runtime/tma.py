"""TMA descriptors of the KVCacheT trait, encoded with cuTensorMapEncodeTiled.

Shapes follow the semantics reference (MAX types.mojo): dims, strides and boxes are written here in
row-major order and reversed for the driver (innermost first). Every rule the driver checks is checked
first, so a bad request fails with a message naming the rule instead of CUDA_ERROR_INVALID_VALUE.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import SWIZZLE_BYTES, small_page_tile_problems
from ..derive import decode_block_row_bytes
from ..dtypes import DTYPES
from ..errors import LaunchError
from .driver import check, cu

if TYPE_CHECKING:
    from .kvcache import KVCache

_TMA_TYPES = {"UINT8": 1, "UINT16": 2, "FLOAT16": 2, "BFLOAT16": 2, "FLOAT32": 4, "INT64": 8, "UINT64": 8}
_L2 = {"NONE": "CU_TENSOR_MAP_L2_PROMOTION_NONE", "64B": "CU_TENSOR_MAP_L2_PROMOTION_L2_64B",
       "128B": "CU_TENSOR_MAP_L2_PROMOTION_L2_128B", "256B": "CU_TENSOR_MAP_L2_PROMOTION_L2_256B"}


@dataclass
class TmaTile:
    """An encoded descriptor plus the geometry a kernel needs to issue copies against it."""

    kind: str
    tensor_map: Any  # cuda.bindings.driver.CUtensorMap
    dims: tuple[int, ...]  # row-major
    strides_bytes: tuple[int, ...]  # row-major, outer dims only
    box: tuple[int, ...]  # row-major
    swizzle: str
    data_type: str
    base_address: int
    raw: np.ndarray  # the 128 descriptor bytes, for kernel-parameter packing

    @property
    def param_address(self) -> int:
        return int(self.raw.ctypes.data)


def _fail(kind: str, arg: str, rule: str, value: Any, fix: str) -> None:
    raise LaunchError(kind, arg, rule, value, fix)


def encode(kind: str, address: int, data_type: str, dims: tuple[int, ...], strides_bytes: tuple[int, ...],
           box: tuple[int, ...], swizzle: str = "NONE", l2_promotion: str = "NONE") -> TmaTile:
    """Validate and encode a tiled tensor map. dims/box row-major; strides_bytes for dims[:-1]."""
    esz = _TMA_TYPES[data_type]
    rank = len(dims)
    if not 1 <= rank <= 5:
        _fail(kind, "rank", "a tensor map has 1 to 5 dimensions", rank, "fold dimensions together")
    if len(box) != rank or len(strides_bytes) != rank - 1:
        _fail(kind, "box", "box needs one entry per dimension and strides one per outer dimension", (box, strides_bytes),
              "pass row-major dims, strides and box of the same rank")
    if address % 16:
        _fail(kind, "globalAddress", "must be 16-byte aligned", hex(address), "allocate the cache with 16-byte alignment")
    for i, d in enumerate(dims):
        if not 1 <= d <= 2**31:
            _fail(kind, f"dims[{i}]", "each dimension is in [1, 2^31]", d, "use a smaller cache view")
    for i, s in enumerate(strides_bytes):
        if s % 16 or s >= 2**40:
            _fail(kind, f"strides[{i}]", "strides are multiples of 16 bytes below 2^40", s, "pad rows to 16 bytes")
    for i, b in enumerate(box):
        if not 1 <= b <= 256:
            _fail(kind, f"box[{i}]", "box sizes are in [1, 256]", b, "use a smaller tile")
    inner = box[-1] * esz
    if inner % 16:
        _fail(kind, "box[-1]", "the inner box must be a multiple of 16 bytes", inner, "widen the inner box")
    if swizzle != "NONE" and inner > SWIZZLE_BYTES[swizzle]:
        _fail(kind, "box[-1]", f"the inner box ({inner} B) must fit the swizzle span ({SWIZZLE_BYTES[swizzle]} B)",
              inner, "use a larger swizzle or a narrower box")
    d = cu()
    u64 = [d.cuuint64_t(int(v)) for v in reversed(dims)]
    st = [d.cuuint64_t(int(v)) for v in reversed(strides_bytes)]
    bx = [d.cuuint32_t(int(v)) for v in reversed(box)]
    es = [d.cuuint32_t(1)] * rank
    swz = getattr(d.CUtensorMapSwizzle, "CU_TENSOR_MAP_SWIZZLE_NONE" if swizzle == "NONE" else f"CU_TENSOR_MAP_SWIZZLE_{swizzle}")
    tmap = check(d.cuTensorMapEncodeTiled(
        getattr(d.CUtensorMapDataType, f"CU_TENSOR_MAP_DATA_TYPE_{data_type}"), rank, address, u64, st, bx, es,
        d.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE, swz,
        getattr(d.CUtensorMapL2promotion, _L2[l2_promotion]),
        d.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE))  # OOB elements read as zero
    raw = np.array([int(v) for v in tmap.opaque], dtype=np.uint64)
    assert raw.nbytes == 128, "CUtensorMap is 128 bytes"
    return TmaTile(kind, tmap, tuple(dims), tuple(strides_bytes), tuple(box), swizzle, data_type, address, raw)


def _view_geometry(cache: KVCache, kv: int, layer: int) -> tuple[int, int, int, int]:
    """(view base address, element bytes, num_kv_rows, H*D) of one (kv, layer) slice."""
    if not 0 <= kv < cache.kv_dim:
        _fail("tma", "kv", f"must be in [0, {cache.kv_dim})", kv, "use 0 for K, 1 for V")
    if not 0 <= layer < cache.num_layers:
        _fail("tma", "layer", f"must be in [0, {cache.num_layers})", layer, "pass a layer of this cache")
    nb = DTYPES[cache.spec.cache.dtype].nbytes
    row = cache.num_heads * cache.head_size
    return cache.slice_address(kv, layer), nb, cache.num_kv_rows(), row


def _tma_dtype(cache: KVCache) -> str:
    t = DTYPES[cache.spec.cache.dtype].tma_type
    if t is None:
        _fail("tma", "dtype", "TMA has no data type for this cache dtype", cache.spec.cache.dtype, "use float8_e4m3fn")
    return t


def _tile_box_rows(cache: KVCache, kind: str, rows: int, bn: int, span: int) -> int:
    """Rows per box of a BN-row tile over the [num_kv_rows, H, D] view: min(BN, P), so a box never crosses a page
    (a paged tile is one box per page); checks that the row index stays below the zero-fill row 2^30, and for
    pages smaller than the tile the config's rules (config.small_page_tile_problems) on run-time BN and swizzle."""
    if rows >= 2**30:
        _fail(kind, "num_kv_rows", "must stay below 2^30 (row 2^30 is the zero-fill row)", rows, "use fewer pages per cache")
    p = cache.page_size or 0
    row_bytes = cache.head_size * DTYPES[cache.spec.cache.dtype].nbytes
    for field, rule, value, fix in small_page_tile_problems(p, bn, span, row_bytes) if p else ():
        _fail(kind, field.upper() if field == "bn" else field, rule, value, fix)
    return bn if (p == 0 or p >= bn) else p


def create_tma_tile(cache: KVCache, kv: int, layer: int, swizzle: str | None = None, bn: int | None = None,
                    bk: int | None = None, data_type: str | None = None) -> TmaTile:
    """Rank-3 [num_kv_rows, H, D] map with box [min(BN, P), 1, granule]: one issue per page and swizzle atom.
    data_type: a CUtensorMapDataType suffix to move the elements as (default: the cache dtype's TMA type)."""
    geo = cache.tma_geometry
    swizzle = swizzle or geo.swizzle
    bn = bn or geo.bn
    base, nb, rows, row = _view_geometry(cache, kv, layer)
    gran = SWIZZLE_BYTES[swizzle] // nb
    bk = bk or geo.bk
    if bk % gran:
        _fail("create_tma_tile", "BK", f"must be a multiple of the swizzle granule ({gran})", bk, f"use {gran}")
    box_rows = _tile_box_rows(cache, "create_tma_tile", rows, bn, SWIZZLE_BYTES[swizzle])
    return encode("create_tma_tile", base, data_type or _tma_dtype(cache), (rows, cache.num_heads, cache.head_size),
                  (row * nb, cache.head_size * nb), (box_rows, 1, gran), swizzle)


def decode_tile(cache: KVCache, kv: int, layer: int, bn: int) -> TmaTile:
    """The decode's K or V map: create_tma_tile with BN = `bn`, BK = D and the swizzle as wide as one column block of
    decode.cuh's TileLayout (128 bytes, or 64 for 64-byte rows), so each box [min(BN, P), 1, block] lands as one
    block and the hardware swizzle is the layout's XOR. Raw 1- or 2-byte elements (e5m2 has no TMA float type)."""
    nb = DTYPES[cache.spec.cache.dtype].nbytes
    block = decode_block_row_bytes(cache.head_size, nb)
    tile = create_tma_tile(cache, kv, layer, f"{block}B", bn, cache.head_size, data_type={1: "UINT8", 2: "UINT16"}[nb])
    return replace(tile, kind="decode_tile")  # not a tile_load map, even where box and swizzle happen to match


def create_ragged_tma_tile(cache: KVCache, kv: int, layer: int, swizzle: str, bm: int, bk: int) -> TmaTile:
    """Rank-4 [rows+1, H, BM, D] map, strides [H*D, D, H*D, 1], base shifted back by BM rows: rows past a
    ragged end fall outside the BM dimension and read as zeros (MAX create_ragged_tma_tile)."""
    base, nb, rows, row = _view_geometry(cache, kv, layer)
    gran = SWIZZLE_BYTES[swizzle] // nb
    if bk % gran:
        _fail("create_ragged_tma_tile", "BK", f"must be a multiple of the swizzle granule ({gran})", bk, f"use {gran}")
    shifted = base - row * bm * nb
    return encode("create_ragged_tma_tile", shifted, _tma_dtype(cache), (rows + 1, cache.num_heads, bm, cache.head_size),
                  (row * nb, cache.head_size * nb, row * nb), (1, 1, bm, gran), swizzle)


def _rope(cache: KVCache) -> tuple[int, int]:
    r = cache.spec.rope_layout
    if r is None:
        _fail("create_rope_tma_tile", "rope_layout", "needs a variant with the rope-aware FP8 layout", None,
              "add rope_layout to the config")
    return r.padded_depth, r.rope_dim


def create_rope_tma_tile(cache: KVCache, layer: int, bn: int, bk: int = 64) -> TmaTile:
    """BF16 view that starts padded_depth bytes into each row: dims [rows, H, (padded_depth + 2*BK)/2],
    box [BN, 1, 64], SWIZZLE_128B. Its last row overhangs the allocation but is never read (col < BK)."""
    padded, rope_dim = _rope(cache)
    base, nb, rows, row = _view_geometry(cache, 0, layer)
    return encode("create_rope_tma_tile", base + padded, "BFLOAT16", (rows, cache.num_heads, (padded + bk * 2) // 2),
                  (row * nb, cache.head_size * nb), (bn, 1, 64), "128B")


def create_gather4_tma_tile(cache: KVCache, kv: int, layer: int, tile_width: int, tile_stride: int | None = None,
                            swizzle: str = "NONE", tma_dtype: str | None = None, l2_promotion: str = "128B") -> TmaTile:
    """2-D [num_kv_rows, tile_stride] map with a one-row box (gather4 needs exactly one row per box)."""
    base, nb, rows, row = _view_geometry(cache, kv, layer)
    tma_dtype = tma_dtype or _tma_dtype(cache)
    esz = _TMA_TYPES[tma_dtype]
    tile_stride = tile_stride or row * nb // esz
    if tile_stride * esz != row * nb:
        _fail("create_gather4_tma_tile", "tile_stride", "the 2-D view assumes the row pitch is tile_stride elements",
              tile_stride, f"use {row * nb // esz}")
    box_w = tile_width if swizzle == "NONE" else SWIZZLE_BYTES[swizzle] // esz
    return encode("create_gather4_tma_tile", base, tma_dtype, (rows, tile_stride), (tile_stride * esz,),
                  (1, box_w), swizzle, l2_promotion)


def create_rope_gather4_tma_tile(cache: KVCache, layer: int, l2_promotion: str = "128B") -> TmaTile:
    """BF16 2-D map of the whole row starting at the rope: tile width (padded_depth + 2*rope)/2, SWIZZLE_128B."""
    padded, rope_dim = _rope(cache)
    base, nb, rows, row = _view_geometry(cache, 0, layer)
    width = (padded + rope_dim * 2) // 2
    return encode("create_rope_gather4_tma_tile", base + padded, "BFLOAT16", (rows, width), (row * nb,),
                  (1, 64), "128B", l2_promotion)
