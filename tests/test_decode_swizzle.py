"""The 16-bit decode tile swizzle (decode.cuh SWZ16), mirrored in Python: the cp.async copy side, the ldmatrix
address math of the K and V fragments (one lane offset XORed with a per-step constant on row-aligned tiles), the
bank spread of each 8-row ldmatrix phase, and that no warp's copy splits a 128-byte global line across two
shared-memory lines (the reason the rows are unpadded). If decode.cuh's formulas change, change them here too."""

from __future__ import annotations

import pytest
from test_decode_plan import _decode_spec

from kvgen.derive import decode_geometry, decode_tiles_unpadded

BN, THREADS = 64, 128


def _tile_checks(base: int, head_size: int) -> None:
    row_bytes = 2 * head_size
    cpr = row_bytes // 16
    rows_per_pass, passes = THREADS // cpr, BN * cpr // THREADS
    written: dict[int, tuple[int, int]] = {}
    lines: dict[tuple[int, int, int, int], set[int]] = {}
    for tid in range(THREADS):
        chunk, row0 = tid % cpr, tid // cpr
        for j in range(passes):
            row = row0 + j * rows_per_pass
            # copy_slot (= chunk) + copy_swz16(j), in the row's place
            addr = base + row * row_bytes + chunk * 16 + ((chunk ^ (row & 7)) - chunk) * 16
            assert addr not in written and base + row * row_bytes <= addr < base + (row + 1) * row_bytes
            written[addr] = (row, chunk)
            lines.setdefault((tid // 32, j, row, chunk * 16 // 128), set()).add(addr // 128)
    assert len(written) == BN * cpr
    assert all(len(v) == 1 for v in lines.values()), "a 128-byte global line split across shared-memory lines"
    for warp in range(4):
        for nt in range(2):  # K: ldmatrix.x4, matrix lane / 8 = chunk lane / 8 + 2kk of row lrow
            for kk in range(0, head_size // 16, 2):
                phases: dict[int, list[int]] = {}
                for lane in range(32):
                    lrow = warp * 16 + nt * 8 + lane % 8
                    addr = (base + lrow * row_bytes + ((lane // 8) ^ (lane % 8)) * 16) ^ (kk * 32)
                    assert written.get(addr) == (lrow, lane // 8 + 2 * kk)
                    phases.setdefault(lane // 8, []).append(addr // 16 % 8)
                assert all(len(set(u)) == 8 for u in phases.values()), "K ldmatrix bank conflict"
        for dn in range(0, head_size // 8, 2):  # V: ldmatrix.x4.trans, chunk lane / 16 + dn
            phases = {}
            for lane in range(32):
                lrow = warp * 16 + (lane // 8 % 2) * 8 + lane % 8
                addr = (base + lrow * row_bytes + ((lane // 16) ^ (lane % 8)) * 16) ^ (dn * 16)
                assert written.get(addr) == (lrow, lane // 16 + dn)
                phases.setdefault(lane // 8, []).append(addr // 16 % 8)
            assert all(len(set(u)) == 8 for u in phases.values()), "V ldmatrix bank conflict"


@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("stages", [None, 2])
def test_swizzled_16bit_tiles_round_trip_without_conflicts(head_size: int, stages: int | None) -> None:
    geo = decode_geometry(_decode_spec("bfloat16", head_size=head_size, loader="cp_async", stages=stages), "sm_90a")
    row_bytes = 2 * head_size
    assert decode_tiles_unpadded(_decode_spec("bfloat16", head_size=head_size, loader="cp_async").cache, geo.tma)
    window = 3 * 4096 + 48  # any 16-byte aligned start of the dynamic shared memory
    cta = window + (row_bytes - window % row_bytes) % row_bytes  # ALIGN_SLACK = a row
    tile = BN * row_bytes
    for group in sorted({0, geo.max_groups - 1}):
        for stage in range(geo.stages):
            for kv in range(2):  # K tile, then V tile of each stage
                _tile_checks(cta + group * geo.smem_bytes + stage * 2 * tile + kv * tile, head_size)
