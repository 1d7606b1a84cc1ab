"""The decode K/V tile layout (decode.cuh TileLayout), mirrored in Python for every decode row width (16-bit and FP8,
head sizes 64, 128 and 256): the cp.async copy side, what a swizzled TMA box writes (the same bytes at the same
places), the fragment address math of both dtypes (one lane offset, then TileLayout::step per k-step or chunk),
the bank spread of every 8-address shared-memory phase, and that no warp's copy splits a 128-byte global line
across two shared-memory lines (the reason the rows are unpadded). If decode.cuh's formulas change, change them
here too."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_decode_plan import _decode_spec

from kvgen.derive import decode_block_row_bytes, decode_geometry

BN, THREADS = 64, 128


class Layout:
    """TileLayout<CPR, BN>."""

    def __init__(self, cpr: int) -> None:
        self.cpr = cpr
        self.cpb = min(cpr, 8)
        self.rp = self.cpb * 16
        self.block = BN * self.rp

    def row_xor(self, row: int) -> int:
        return row & 7 if self.cpb == 8 else (row >> 1) & 3

    def offset(self, row: int, chunk: int) -> int:
        return (chunk // self.cpb) * self.block + row * self.rp + ((chunk % self.cpb) ^ self.row_xor(row)) * 16

    def step(self, lane_addr: int, chunk: int) -> int:
        return (lane_addr ^ ((chunk % self.cpb) * 16)) + (chunk // self.cpb) * self.block


def tma_swizzle(addr: int, span: int) -> int:
    """tma.cuh swizzle_offset: SWIZZLE_{64,128}B XOR address bits [7, ...) into the chunk bits."""
    return addr ^ (((addr >> 7) & (span // 16 - 1)) << 4)


def cp_async_tile(lay: Layout, base: int) -> dict[int, tuple[int, int]]:
    """Address -> (row, chunk) written by decode.cuh's cp.async copies (copy_off0 + copy_delta(j))."""
    cpr = lay.cpr
    rows_per_pass, passes = THREADS // cpr, BN * cpr // THREADS
    written: dict[int, tuple[int, int]] = {}
    lines: dict[tuple[int, int, int, int], set[int]] = {}
    for tid in range(THREADS):
        chunk, row0 = tid % cpr, tid // cpr
        off0 = lay.offset(row0, chunk)
        swz_odd = 0 if rows_per_pass % 8 == 0 else lay.offset(row0 + rows_per_pass, chunk) - off0 - rows_per_pass * lay.rp
        for j in range(passes):
            row = row0 + j * rows_per_pass
            addr = base + off0 + j * rows_per_pass * lay.rp + (swz_odd if j % 2 else 0)
            assert addr not in written and base <= addr < base + BN * cpr * 16
            written[addr] = (row, chunk)
            lines.setdefault((tid // 32, j, row, chunk * 16 // 128), set()).add(addr // 128)
    assert len(written) == BN * cpr
    assert all(len(v) == 1 for v in lines.values()), "a 128-byte global line split across shared-memory lines"
    return written


def tma_tile(lay: Layout, base: int, page_rows: int, elem_bytes: int) -> dict[int, tuple[int, int]]:
    """Address -> (row, chunk) written by the TMA boxes of one tile: page p, block column blk lands at
    tile + blk * BLOCK + p * EFF * RP, box rows RP bytes apart, then the hardware swizzle of the box width."""
    block_bytes = decode_block_row_bytes(lay.cpr * 16 // elem_bytes, elem_bytes)
    assert block_bytes == lay.rp
    written: dict[int, tuple[int, int]] = {}
    for p in range(BN // page_rows):
        for blk in range(lay.cpr // lay.cpb):
            dst = base + blk * lay.block + p * page_rows * lay.rp
            for i in range(page_rows):
                for c in range(lay.cpb):
                    addr = tma_swizzle(dst + i * lay.rp + c * 16, block_bytes)
                    assert addr not in written
                    written[addr] = (p * page_rows + i, blk * lay.cpb + c)
    return written


def slot_row(slot: int, aligned: bool) -> int:
    """DecodeSwizzle::slot_row: the tile row (within a warp's 16) of MMA token slot `slot`."""
    return (slot & 8) | ((slot & 1) << 2) | ((slot & 7) >> 1) if aligned else slot


def check_v_fragments(lay: Layout, base: int, written: dict[int, tuple[int, int]], warp: int,
                      aligned: bool = False) -> None:
    """V of both dtypes: ldmatrix.x4.trans of chunk c + lane / 16 for even c (16-bit: n-tiles dn = c, 8 elements
    a chunk; FP8: chunk pairs), rows warp * 16 + slot_row((lane / 8 % 2) * 8 + lane % 8), one lane offset +
    TileLayout::step."""
    for c in range(0, lay.cpr, 2):
        phases: dict[int, list[int]] = {}
        for lane in range(32):
            lrow = warp * 16 + slot_row((lane // 8 % 2) * 8 + lane % 8, aligned)
            addr = lay.step(base + lay.offset(lrow, lane // 16), c)
            assert written.get(addr) == (lrow, c + lane // 16)
            phases.setdefault(lane // 8, []).append(addr // 16 % 8)
        assert all(len(set(u)) == 8 for u in phases.values()), "V ldmatrix bank conflict"


def check_16bit_fragments(lay: Layout, base: int, written: dict[int, tuple[int, int]]) -> None:
    ks = lay.cpr // 2  # k-steps of 16 elements
    for warp in range(4):
        for nt in range(2):  # K: ldmatrix.x4, matrix lane / 8 = chunk 2kk + lane / 8 of row lrow
            for kk in range(0, ks, 2):
                phases: dict[int, list[int]] = {}
                for lane in range(32):
                    lrow = warp * 16 + nt * 8 + lane % 8
                    addr = lay.step(base + lay.offset(lrow, lane // 8), 2 * kk)
                    assert written.get(addr) == (lrow, 2 * kk + lane // 8)
                    phases.setdefault(lane // 8, []).append(addr // 16 % 8)
                assert all(len(set(u)) == 8 for u in phases.values()), "K ldmatrix bank conflict"
        check_v_fragments(lay, base, written, warp)


def check_fp8_fragments(lay: Layout, base: int, written: dict[int, tuple[int, int]], aligned: bool = False) -> None:
    """FP8 K loads and V ldmatrix. aligned: DecodeSwizzle's ALIGNED (per-group scales of 64+ dims), where load j of
    lane column tq is chunk 4j + tq (a k-step's 4 lanes in one scale group) and token slots read permuted rows."""
    cpr = lay.cpr

    def k_chunk(tq: int, j: int) -> int:
        if aligned:
            return 4 * j + tq
        return tq if cpr == 4 else 8 * (j // 2) + 2 * tq + j % 2

    for warp in range(4):
        for nt in range(2):  # K: lane (gq, tq) reads chunk k_chunk(tq, j) of row warp * 16 + slot_row(nt * 8 + gq)
            for j in range(cpr // 4):
                phases: dict[int, list[int]] = {}
                for lane in range(32):
                    gq, tq = lane // 4, lane % 4
                    row = warp * 16 + slot_row(nt * 8 + gq, aligned)
                    lane_addr = base + nt * 8 * lay.rp + lay.offset(warp * 16 + slot_row(gq, aligned), k_chunk(tq, 0))
                    step = 4 * j if aligned else 8 * (j // 2) + j % 2
                    addr = lane_addr if cpr == 4 else lay.step(lane_addr, step)
                    assert written.get(addr) == (row, k_chunk(tq, j))
                    phases.setdefault(lane // 8, []).append(addr // 16 % 8)
                assert all(len(set(u)) == 8 for u in phases.values()), "FP8 K load bank conflict"
        check_v_fragments(lay, base, written, warp, aligned)
    check_k_order(k_chunk, cpr, aligned)


def check_k_order(k_chunk, cpr: int, aligned: bool) -> None:  # noqa: ANN001 - the mirror's k_chunk(tq, j)
    """Q's permuted k order (DecodeSwizzle::k_dim: the first of the 4 dims of k-step kk in lane column tq) covers
    every dim once, and (aligned) each k-step's 16 dims lie in one 64-dim scale group."""
    def k_dim(tq: int, kk: int) -> int:
        return 16 * k_chunk(tq, kk // 4) + 4 * (kk % 4)

    dims = [k_dim(tq, kk) + e for kk in range(cpr) for tq in range(4) for e in range(4)]
    assert sorted(dims) == list(range(16 * cpr)), "Q's k order misses or repeats a dim"
    if aligned:
        for kk in range(cpr):
            groups = {k_dim(tq, kk) // 64 for tq in range(4)}
            assert len(groups) == 1, f"k-step {kk} spans scale groups {groups}"


@pytest.mark.parametrize("loader", ["cp_async", "tma"])
@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_tiles_round_trip_without_conflicts(dtype: str, head_size: int, loader: str) -> None:
    spec = _decode_spec(dtype, head_size=head_size, loader=loader)
    geo = decode_geometry(spec, "sm_90a")
    assert geo.tma == (loader == "tma")
    elem = 1 if dtype.startswith("float8") else 2
    lay = Layout(head_size * elem // 16)
    tile = BN * head_size * elem
    align = 1024 if geo.tma else head_size * elem  # ALIGN_SLACK
    window = 3 * 4096 + 48  # any 16-byte aligned start of the dynamic shared memory
    cta = window + (align - window % align) % align
    for group in sorted({0, geo.max_groups - 1}):
        for stage in range(geo.stages):
            for kv in range(2):  # K tile, then V tile of each stage
                # decode.cuh k_tile_off: cp.async keeps [K, V, scales] per stage, TMA puts every stage's tiles first
                base = cta + group * geo.smem_bytes + stage * (2 * tile if geo.tma else geo.stage_bytes) + kv * tile
                written = cp_async_tile(lay, base)
                if geo.tma:
                    for page_rows in (8, 16, 64):
                        assert tma_tile(lay, base, page_rows, elem) == written, "TMA boxes and cp.async disagree"
                if elem == 2:
                    check_16bit_fragments(lay, base, written)
                else:
                    for aligned in (False, True) if head_size >= 128 else (False,):
                        check_fp8_fragments(lay, base, written, aligned)


def test_a_wrong_row_xor_fails_the_mirror() -> None:
    """The checks can fail: a layout without the XOR puts every row's chunk in the same bank group."""

    class Unswizzled(Layout):
        def row_xor(self, row: int) -> int:
            return 0

    lay = Unswizzled(16)
    with pytest.raises(AssertionError, match="bank conflict"):
        check_16bit_fragments(lay, 0, cp_async_tile(lay, 0))


def test_the_default_k_order_mixes_scale_groups() -> None:
    """The group check can fail: the default FP8 K order (chunks 0, 2, 4, 6 in one k-step) spans two 64-dim
    groups, which is why per-group scales of 64+ dims take the aligned order."""
    with pytest.raises(AssertionError, match="spans scale groups"):
        check_k_order(lambda tq, j: 8 * (j // 2) + 2 * tq + j % 2, 8, aligned=True)


def test_aligned_k_steps_need_the_permuted_token_rows(monkeypatch) -> None:
    """Group-aligned FP8 K loads with token slots on their own rows: the two rows of a quarter-warp would read the
    same 4 chunks under XORs that differ in bit 0, a 2-way bank conflict; slot_row is what removes it."""
    lay = Layout(8)
    monkeypatch.setattr(__name__ + ".slot_row", lambda slot, aligned: slot)
    with pytest.raises(AssertionError, match="bank conflict"):
        check_fp8_fragments(lay, 0, cp_async_tile(lay, 0), aligned=True)


@pytest.mark.parametrize("page_size", [16, 64, 256])
@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e5m2"])
@pytest.mark.parametrize("kv_layout", ["pages", "split"])
def test_decode_tile_boxes_are_one_page_by_one_block(monkeypatch, dtype: str, head_size: int, page_size: int,
                                                      kv_layout: str) -> None:
    """runtime/tma.py decode_tile: the arguments it hands cuTensorMapEncodeTiled (encode stubbed): the layer's
    [rows, H, D] view, box [min(64, P), 1, one TileLayout block] with the swizzle of that width, raw elements; with
    kv_layout "split" (per-layer K and V tensors of their own) V's map starts at that layer's V tensor."""
    from functools import partial
    from types import SimpleNamespace

    from kvgen.derive import tma_geometry
    from kvgen.runtime import tma
    from kvgen.runtime.kvcache import KVCache

    spec = _decode_spec(dtype, head_size=head_size, loader="tma")
    nb = 1 if dtype.startswith("float8") else 2
    heads, layers, rows = spec.cache.num_kv_heads, 2, 40 * page_size
    cache = SimpleNamespace(spec=spec, tma_geometry=tma_geometry(spec), kv_dim=2, num_layers=layers, num_heads=heads,
                            head_size=head_size, blocks_ptr=1 << 20, page_rows=rows, num_kv_rows=lambda: rows,
                            page_size=page_size, per_layer=kv_layout == "split", dtype=dtype, kv_layout=kv_layout,
                            # "pages": K and V of a page together; "split": V is a tensor of its own per layer
                            args=SimpleNamespace(kv_offset=layers * rows if kv_layout == "pages" else 0),
                            # (blocks, scales, static scales) per layer tensor: one whole-cache entry for "pages"
                            _layer_ptrs=[(1 << 20, 0, 0)] if kv_layout == "pages" else
                            [(7 << 30 | layer << 24, 0, 0) for layer in range(layers)],
                            _layer_v_ptrs=[(9 << 30 | layer << 24, 0) for layer in range(layers)])
    cache.slice_address = partial(KVCache.slice_address, cache)  # the real address math, on this stand-in
    seen = []

    def fake_encode(kind, address, data_type, dims, strides, box, swizzle="NONE"):
        seen.append((kind, address, data_type, dims, strides, box, swizzle))
        return tma.TmaTile(kind, None, dims, strides, box, swizzle, data_type, address, None)

    monkeypatch.setattr(tma, "encode", fake_encode)
    tile = tma.decode_tile(cache, 1, 1, 64)
    kind, address, data_type, dims, strides, box, swizzle = seen[0]
    block = min(128, head_size * nb)
    assert (tile.kind, data_type, swizzle) == ("decode_tile", {1: "UINT8", 2: "UINT16"}[nb], f"{block}B")
    assert dims == (rows, heads, head_size) and strides == (heads * head_size * nb, head_size * nb)
    assert box == (min(64, page_size), 1, block // nb)
    if kv_layout == "pages":
        assert address == (1 << 20) + (1 * layers + 1) * rows * heads * head_size * nb  # V of layer 1
    else:
        assert address == 9 << 30 | 1 << 24  # layer 1's V tensor
        tma.decode_tile(cache, 0, 1, 64)
        assert seen[1][1] == 7 << 30 | 1 << 24  # layer 1's K tensor


def test_the_mirrors_follow_decode_cuh() -> None:
    """slot_row and the K chunk order above are hand-written mirrors of DecodeSwizzle (decode.cuh): this pins the
    CUDA expressions they mirror, so a change there fails here until the mirror is changed with it."""
    src = (Path(__file__).resolve().parents[1] / "kvgen" / "include" / "kvgen" / "decode.cuh").read_text()
    assert "return ALIGNED ? 4 * j + tq : CPR == 4 ? tq : 8 * (j / 2) + 2 * tq + (j % 2);" in src
    assert "return ALIGNED ? (slot & 8) | ((slot & 1) << 2) | ((slot & 7) >> 1) : slot;" in src
