"""The host-side mirror of kvgen::CacheArgs (include/kvgen/common.cuh). Keep both layouts identical."""

from __future__ import annotations

import ctypes


class CacheArgs(ctypes.Structure):
    _fields_ = [
        ("blocks", ctypes.c_uint64),
        ("scales", ctypes.c_uint64),
        ("cache_lengths", ctypes.c_uint64),
        ("lookup_table", ctypes.c_uint64),
        ("error_word", ctypes.c_uint64),
        ("static_scales", ctypes.c_uint64),
        ("batch_size", ctypes.c_uint32),
        ("lut_row_stride", ctypes.c_uint32),
        ("num_blocks", ctypes.c_uint32),
        ("num_layers", ctypes.c_uint32),
        ("max_seq_length", ctypes.c_uint32),
        ("max_cache_length", ctypes.c_uint32),
        ("tokens_per_slot", ctypes.c_uint32),
        ("null_page", ctypes.c_uint32),
        ("page_stride", ctypes.c_uint32),
        ("kv_offset", ctypes.c_uint32),
        ("v_blocks", ctypes.c_uint64),
        ("v_scales", ctypes.c_uint64),
    ]


assert ctypes.sizeof(CacheArgs) == 104, "must match static_assert(sizeof(CacheArgs) == 104) in common.cuh"

ERR_UNASSIGNED_PAGE = 1 << 0
ERR_PAGE_OUT_OF_RANGE = 1 << 1
ERR_BAD_RANGE = 1 << 2
ERROR_NAMES = {
    ERR_UNASSIGNED_PAGE: "a token mapped to an unassigned page (null page or past the lookup-table row)",
    ERR_PAGE_OUT_OF_RANGE: "a page or slot id is past the allocation",
    ERR_BAD_RANGE: "row offsets were not a valid CSR over the token count",
}

NO_NULL_PAGE = 0xFFFFFFFF
"""CacheArgs.null_page of a continuous cache: no slot is refused as the null page."""

DECODE_EARLY_READS = 1 << 0
"""decode_partial's flags bit (kDecodeEarlyReads in decode.cuh): KVCache.decode(early_cache_reads=True)."""
