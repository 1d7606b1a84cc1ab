"""NumPy reference of the KVCacheT semantics: the oracle of kvgen's CPU and GPU tests.

Layouts follow MAX (see DESIGN.md): blocks `[num_blocks, KVD, L, P, H, D]` (num_blocks includes the null
page, the last one unless CacheState.null_page says otherwise; K/V-plane and per-layer caches are compared after
rearranging into this layout), scales `[num_blocks, KVD, L, P, H, G]`, lookup table `uint32 [B, cols]` with
unassigned entries equal to the null page id. Every function is written for clarity, not speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dtypes import DTYPES

LUT_TAIL_COLUMNS = 16  # MAX's lookup-table contract: columns past a request's last page that populate may read


def padded_lut_cols(max_pages_per_request: int) -> int:
    """MAX _padded_lut_cols: round up to 8, plus a 16-column tail so vector over-reads stay in bounds."""
    return ((max_pages_per_request + 7) // 8) * 8 + LUT_TAIL_COLUMNS


def make_lookup_table(pages: list[list[int]], null_page: int, cols: int) -> np.ndarray:
    lut = np.full((len(pages), cols), null_page, dtype=np.uint32)
    for b, ids in enumerate(pages):
        lut[b, : len(ids)] = ids
    return lut


@dataclass(frozen=True)
class Geometry:
    """The shape facts the row math needs."""

    kv_dim: int
    num_layers: int
    page_size: int  # P; for a continuous cache, the slot length S
    num_blocks: int  # including the null page (paged) / number of slots (continuous)
    paged: bool = True
    null_block: int | None = None  # the page no request owns; None: the last (vLLM's null block is 0)

    @property
    def stride(self) -> int:
        return self.kv_dim * self.num_layers * self.page_size

    @property
    def null_page(self) -> int:
        return self.num_blocks - 1 if self.null_block is None else self.null_block

    def refuses(self, page: int) -> bool:
        """A page no token may be written to: past the allocation, or the null page."""
        return page >= self.num_blocks or page == self.null_page


def row_idx(g: Geometry, lut: np.ndarray, b: int, t: int) -> int:
    if not g.paged:
        return int(lut[b]) * g.stride + t
    return int(lut[b, t // g.page_size]) * g.stride + t % g.page_size


def num_kv_rows(g: Geometry) -> int:
    return (g.num_blocks - 1) * g.stride + g.page_size


def get_tma_row(g: Geometry, enc: int) -> int:
    if not g.paged:
        return enc
    return (enc // g.page_size) * g.stride + enc % g.page_size


def populate(g: Geometry, lut: np.ndarray, b: int, base_kv_row: int, bn: int, base_alignment: int) -> list[int]:
    """PagedRowIndices.rows for the BN tile starting at base_kv_row (MAX PagedKVCache.populate)."""
    if not g.paged:
        return [row_idx(g, lut, b, base_kv_row)]
    p = g.page_size
    eff = bn if p >= bn else p
    n = bn // eff
    if n == 1:
        if base_alignment % p == 0:
            return [int(lut[b, base_kv_row // p]) * g.stride]
        return [row_idx(g, lut, b, base_kv_row)]
    if base_kv_row % p or base_alignment < p:
        raise ValueError("a multi-page tile must start on a page boundary")
    first = base_kv_row // p
    if first + n > lut.shape[1]:
        raise IndexError("populate would read past the lookup-table row (missing tail padding)")
    return [int(lut[b, first + i]) * g.stride for i in range(n)]


# ---- quantization ------------------------------------------------------------------------------------
def group_scale(amax: np.ndarray, fp8_max: float, scale_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(stored scale, scale as float32) for group amax values; same bit rule as kvgen::make_scale."""
    amax = np.asarray(amax, dtype=np.float32)
    if scale_dtype == "float32":
        amax = np.minimum(amax, np.finfo(np.float32).max)  # an inf in the group must not make the scale inf
        s = np.where(amax > 0, amax / np.float32(fp8_max), np.float32(1.0)).astype(np.float32)
        return s, s
    r = (amax / np.float32(fp8_max)).astype(np.float32)
    bits = r.view(np.uint32)
    e = (bits >> 23) & 0xFF
    m = bits & 0x7FFFFF
    out = np.where(~(r > 0), 127, np.where(e == 0, 1, e + (m != 0))).astype(np.int64)
    out = np.minimum(out, 254).astype(np.uint8)
    return out, e8m0_to_float(out)


def e8m0_to_float(bits: np.ndarray) -> np.ndarray:
    bits = np.asarray(bits, dtype=np.uint32)
    f = (bits << 23).view(np.float32)
    return np.where(bits == 0, np.uint32(0x00400000).view(np.float32), f).astype(np.float32)


def to_cache_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> cache dtype with round-to-nearest-even; FP8 saturates to the finite range (NaN stays NaN)."""
    info = DTYPES[dtype]
    x = np.asarray(x, dtype=np.float32)
    if info.is_fp8:
        x = np.clip(x, -info.fp8_max, info.fp8_max)
    return x.astype(info.numpy)


def quantize(x: np.ndarray, cache_dtype: str, granularity: int | None, scale_dtype: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows [..., D] of float32 -> (cache values, scales [..., D/g] or None)."""
    x = np.asarray(x, dtype=np.float32)
    if granularity is None:
        return to_cache_dtype(x, cache_dtype), None
    d = x.shape[-1]
    groups = x.reshape(*x.shape[:-1], d // granularity, granularity)
    amax = np.max(np.abs(groups), axis=-1)
    stored, sf = group_scale(amax, DTYPES[cache_dtype].fp8_max, scale_dtype or "float32")
    # One float32 reciprocal per group, then float32 multiplies: the kernels round the same two ways.
    inv = (np.float32(1.0) / sf).astype(np.float32)
    q = to_cache_dtype(groups * inv[..., None], cache_dtype).reshape(x.shape)
    return q, stored


def quantize_static(x: np.ndarray, cache_dtype: str, scale: np.ndarray) -> np.ndarray:
    """Rows [..., H, D] of float32 -> FP8 values of x / scale[h] for static (per tensor / per head) scales [H]: one
    float32 reciprocal per head, then float32 multiplies and a saturating cast, as the store kernel rounds."""
    inv = (np.float32(1.0) / np.asarray(scale, np.float32)).astype(np.float32)
    return to_cache_dtype(np.asarray(x, np.float32) * inv[:, None], cache_dtype)


def dequantize(q: np.ndarray, scales: np.ndarray | None, granularity: int | None, scale_dtype: str | None) -> np.ndarray:
    qf = np.asarray(q).astype(np.float32)
    if scales is None or granularity is None:
        return qf
    sf = e8m0_to_float(scales) if scale_dtype == "float8_e8m0fnu" else np.asarray(scales, np.float32)
    return qf * np.repeat(sf, granularity, axis=-1)


# ---- store / load / copy_pages over the 6-D layout ------------------------------------------------------
@dataclass
class CacheState:
    """A whole cache collection in NumPy: what the GPU tensors hold."""

    blocks: np.ndarray  # [num_blocks, KVD, L, P, H, D] in the cache dtype
    scales: np.ndarray | None  # [num_blocks, KVD, L, P, H, G]
    lut: np.ndarray  # [B, cols] (paged) or [B] (continuous)
    cache_lengths: np.ndarray  # uint32 [B]
    paged: bool = True
    static_scales: np.ndarray | None = None  # float32 [KVD, L, H] (cache.static_scales), else None
    null_page: int | None = None  # None: the last page (KVCache's null_page)

    @property
    def geometry(self) -> Geometry:
        nb, kvd, L, P = self.blocks.shape[:4]
        return Geometry(kv_dim=kvd, num_layers=L, page_size=P, num_blocks=nb, paged=self.paged, null_block=self.null_page)

    def _locate(self, b: int, pos: int) -> tuple[int, int] | None:
        """(block, token-in-block) of a position, or None when unassigned (null page / past the LUT)."""
        g = self.geometry
        if not self.paged:
            slot = int(self.lut[b])
            return (slot, pos) if slot < g.num_blocks and pos < g.page_size else None
        col = pos // g.page_size
        if col >= self.lut.shape[1]:
            return None
        page = int(self.lut[b, col])
        if g.refuses(page):
            return None
        return page, pos % g.page_size


def store(state: CacheState, layer: int, new: list[np.ndarray], row_offsets: np.ndarray, cache_dtype: str,
          granularity: int | None = None, scale_dtype: str | None = None) -> int:
    """Write new K (and V) rows [T, H, D] at cache_length(b) + t. Returns how many tokens were refused."""
    refused = 0
    for b in range(len(row_offsets) - 1):
        for t in range(int(row_offsets[b]), int(row_offsets[b + 1])):
            loc = state._locate(b, int(state.cache_lengths[b]) + t - int(row_offsets[b]))
            if loc is None:
                refused += 1
                continue
            _write_row(state, layer, *loc, [x[t] for x in new], cache_dtype, granularity, scale_dtype)
    return refused


def _write_row(state: CacheState, layer: int, blk: int, tok: int, rows: list[np.ndarray], cache_dtype: str,
               granularity: int | None, scale_dtype: str | None) -> None:
    """One token's K (and V) rows [H, D], converted (quantized) as the store kernel does, into (blk, tok)."""
    for kv, x in enumerate(rows):
        if state.static_scales is not None:
            state.blocks[blk, kv, layer, tok] = quantize_static(x, cache_dtype, state.static_scales[kv, layer])
            continue
        q, s = quantize(x, cache_dtype, granularity, scale_dtype)
        state.blocks[blk, kv, layer, tok] = q
        if s is not None:
            state.scales[blk, kv, layer, tok] = s


def store_slots(state: CacheState, layer: int, new: list[np.ndarray], slots: np.ndarray, cache_dtype: str,
                granularity: int | None = None, scale_dtype: str | None = None) -> int:
    """vLLM's slot mapping: row t -> slot page * P + offset (negative: skipped). Slots on the null page or past the
    allocation are refused. Returns how many were refused."""
    g = state.geometry
    refused = 0
    for t, slot in enumerate(np.asarray(slots, np.int64)):
        if slot < 0:
            continue
        blk, tok = divmod(int(slot), g.page_size)
        if g.refuses(blk):
            refused += 1
            continue
        _write_row(state, layer, blk, tok, [x[t] for x in new], cache_dtype, granularity, scale_dtype)
    return refused


def load(state: CacheState, layer: int, row_offsets: np.ndarray, start_pos: np.ndarray,
         granularity: int | None = None, scale_dtype: str | None = None) -> list[np.ndarray]:
    """Read ragged ranges back as float32 [T, H, D] per K/V (zeros where unassigned)."""
    kvd, H, D = state.blocks.shape[1], state.blocks.shape[4], state.blocks.shape[5]
    T = int(row_offsets[-1])
    out = [np.zeros((T, H, D), np.float32) for _ in range(kvd)]
    for b in range(len(row_offsets) - 1):
        for t in range(int(row_offsets[b]), int(row_offsets[b + 1])):
            loc = state._locate(b, int(start_pos[b]) + t - int(row_offsets[b]))
            if loc is None:
                continue
            blk, tok = loc
            for kv in range(kvd):
                s = state.scales[blk, kv, layer, tok] if state.scales is not None else None
                out[kv][t] = dequantize(state.blocks[blk, kv, layer, tok], s, granularity, scale_dtype)
                if state.static_scales is not None:
                    out[kv][t] *= state.static_scales[kv, layer][:, None]
    return out


def copy_pages(state: CacheState, src: list[int], dst: list[int]) -> None:
    for s, d in zip(src, dst):
        state.blocks[d] = state.blocks[s]
        if state.scales is not None:
            state.scales[d] = state.scales[s]


def view_rows(blocks: np.ndarray, kv: int, layer: int) -> np.ndarray:
    """The [rows, H, D] matrix a TMA descriptor of one (kv, layer) view sees (rows = num_kv_rows)."""
    nb, kvd, L, P, H, D = blocks.shape
    flat = blocks.reshape(-1, H, D)  # every token row of the collection, in memory order
    start = (kv * L + layer) * P
    g = Geometry(kvd, L, P, nb)
    return flat[start: start + num_kv_rows(g)]
