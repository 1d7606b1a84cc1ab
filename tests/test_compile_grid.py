"""Tier 2: every variant of configs/ci_grid.yaml compiles with NVRTC for each of its archs, every kernel
symbol is in its cubin, and the hot kernels (store, load) spill nothing."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest

from kvgen.build import compile_all
from kvgen.derive import decode_geometry, kernel_symbol
from kvgen.grid import load_config
from kvgen.nvrtc import compile_cubin, compile_ptx
from kvgen.render import render_source

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
CI_GRID = load_config(ROOT / "configs" / "ci_grid.yaml")
# KVGEN_GRID_SHARD="i/n" compiles every n-th variant starting at i (the GitHub Actions matrix splits the grid).
_SHARD = os.environ.get("KVGEN_GRID_SHARD", "0/1")
_I, _N = (int(x) for x in _SHARD.split("/"))
SHARD_VARIANTS = CI_GRID.variants[_I::_N]


@pytest.fixture(scope="module")
def grid_builds():
    return compile_all(CI_GRID, SHARD_VARIANTS, None, jobs=2)


def test_every_variant_compiles_for_each_arch(grid_builds) -> None:
    assert len(CI_GRID.variants) >= 48
    assert len(grid_builds) == len(SHARD_VARIANTS) > 0
    for vb in grid_builds:
        assert sorted(a.arch for a in vb.archs) == sorted(vb.variant.spec.archs), vb.variant.name
        for ab in vb.archs:
            assert ab.cubin.startswith(b"\x7fELF") and len(ab.cubin) > 1024
            wanted = vb.variant.spec.kernels_for_arch(ab.arch)
            assert set(ab.kernels) == set(wanted)
            for symbol in ab.kernels.values():
                assert symbol.encode() + b"\0" in ab.cubin, f"{symbol} missing from the {ab.arch} cubin"
                assert symbol in ab.resources, f"no ptxas report for {symbol}"


def test_arch_specific_kernels(grid_builds) -> None:
    for vb in grid_builds:
        for ab in vb.archs:
            names = set(ab.kernels)
            if ab.arch == "sm_80":
                assert "tma_tile_load" not in names and "gather4_tile_load" not in names
            if ab.arch == "sm_90a":
                assert "gather4_tile_load" not in names
            if ab.arch == "sm_100a" and "gather4_tile_load" in vb.variant.spec.effective_kernels:
                assert "gather4_tile_load" in names
    # The grid as a whole (every shard builds a part) covers sm_80 and a gather4 kernel for sm_100a.
    assert any("sm_80" in v.spec.archs for v in CI_GRID.variants)
    assert any("sm_100a" in v.spec.archs and "gather4_tile_load" in v.spec.effective_kernels for v in CI_GRID.variants)


def test_hot_kernels_do_not_spill(grid_builds) -> None:
    for vb in grid_builds:
        for ab in vb.archs:
            for kernel in ("store", "load", "copy_pages"):
                if kernel in ab.kernels:
                    r = ab.resources[ab.kernels[kernel]]
                    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (vb.variant.name, ab.arch, kernel, r)
                    assert 0 < r["registers"] <= 128


def test_cold_compile_time_median_under_a_second(grid_builds, capsys) -> None:
    cold = [ab.seconds for vb in grid_builds for ab in vb.archs if not ab.cache_hit]
    if len(cold) < 10:
        pytest.skip("cubins came from a warm cache; cold timings need an empty KVGEN_CACHE_DIR")
    med = statistics.median(cold)
    with capsys.disabled():
        print(f"\n[compile] {len(cold)} cold NVRTC compiles: median {med:.3f} s, max {max(cold):.3f} s")
    assert med < 1.5  # target 1 s on the 2-core machine; headroom for a loaded CI runner


# The decode-attention grid of the GPU tests (GQA groups, head sizes 64-256, FP8 with and without scales,
# window / soft cap / sinks, continuous cache): it must compile on every CI run, not only on the GPU machine.
DECODE_GRID = load_config(ROOT / "configs" / "gpu_decode.yaml")


def test_decode_grid_compiles_with_few_spilled_words() -> None:
    variants = DECODE_GRID.variants[_I::_N]
    builds = compile_all(DECODE_GRID, variants, None, jobs=2)
    assert len(builds) == len(variants) > 0
    for vb in builds:
        for ab in vb.archs:
            assert set(ab.kernels) == set(vb.variant.spec.kernels_for_arch(ab.arch))
            r = ab.resources[ab.kernels["decode"]]
            # ptxas may park a few 64-bit values outside the tile loop (FP8 at the 128-register cap of 4 CTAs
            # per SM); more than that would mean the accumulators spilled.
            assert r["spill_stores"] <= 32 and r["spill_loads"] <= 32, (vb.variant.name, r)
            # The static shared memory the geometry's CTAs-per-SM fit counted covers what the kernel declares.
            assert r["smem"] <= decode_geometry(vb.variant.spec, ab.arch).static_bytes, (vb.variant.name, ab.arch, r)


def test_decode_variant_compiles_in_under_a_second_and_a_bit() -> None:
    """Timed straight through NVRTC (never the cubin cache, so a warm cache cannot skip it): decode variants took
    1.3-1.4 s each while decode.cuh included <cuda/std/type_traits> (1.1 s of C++ front end), 0.65-1.05 s
    without it on this 2-core machine, depending on its load. Each variant is compiled three times and its fastest
    time counts (a busy neighbour only ever adds time; best of 2 failed a full local run in session 17, right
    after the parallel grid build); 1.2 s leaves headroom for a loaded CI runner."""
    variants = [v for v in DECODE_GRID.variants if "_bf16_" in v.name or "_e4m3_" in v.name][:3]
    times = [min(compile_cubin(render_source(v, "sm_90a"), "sm_90a").seconds for _ in range(3)) for v in variants]
    print(f"\n[compile] decode variants, no cache (best of 3): {', '.join(f'{t:.3f}' for t in times)} s")
    assert len(times) == 3 and statistics.median(times) < 1.2


def test_sm80_source_compiles_to_ptx_without_sm90_instructions() -> None:
    """compile_ptx (what the GPU tests run the sm_80 path through on an sm_90 GPU): PTX for compute_80, NUL-ended
    for cuModuleLoadData, with cp.async copies and none of sm_90's griddepcontrol or bulk (TMA) copies."""
    v = next(v for v in DECODE_GRID.variants if "_ldcpa_" in v.name and "_e4m3_" in v.name)
    ptx = compile_ptx(render_source(v, "sm_80"), "sm_80")
    assert ptx.endswith(b"\0") and b".target sm_80" in ptx
    assert b"cp.async." in ptx and b"griddepcontrol" not in ptx and b"cp.async.bulk" not in ptx
    assert f"{v.name}_decode".encode() in ptx


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89"])
def test_e5m2_decode_builds_for_archs_without_tma(arch: str) -> None:
    """e5m2 decode for an A100 (sm_80), an A10 (sm_86) and an L4 / L40S (sm_89). The f16x2 conversions of FP8 pairs
    exist in hardware from sm_89 only, so sm_80 and sm_86 take cuda_fp8.h's emulation (ptxas refused every FP8 decode
    cubin for sm_80 before, unnoticed until session 17: no grid compiled FP8 decode for sm_80). e4m3 builds for the
    same archs in test_cli.py's test_a_package_for_every_arch_before_sm90."""
    v = next(v for v in DECODE_GRID.variants if "_ldcpa_" in v.name and "_e5m2_" in v.name)
    r = compile_cubin(render_source(v, arch), arch)
    assert r.cubin.startswith(b"\x7fELF") and kernel_symbol(v, "decode") in r.resources
