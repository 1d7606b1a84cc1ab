"""Pages of 1-4 tokens (SGLang's default is 1): the config's tile default and refusals, the decode loader, the
run-time TMA tile checks and the lookup-table tail shared by Python and the kernels (no GPU needed)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from conftest import ROOT, base_config

from kvgen import derive
from kvgen.config import CacheParams, TmaParams, VariantSpec
from kvgen.errors import ConfigError, LaunchError
from kvgen.grid import expand
from kvgen.reference import LUT_TAIL_COLUMNS


def _spec(page: int, **extra) -> VariantSpec:
    d = base_config()
    d["cache"]["page_size"] = page
    d.update(extra)
    (v,) = expand(d)
    return v.spec


@pytest.mark.parametrize(("page", "bn"), [(1, 16), (2, 32), (4, 64), (8, 64), (128, 64)])
def test_small_pages_get_a_tile_their_lookup_table_tail_covers(page: int, bn: int) -> None:
    """populate reads bn / P lookup-table columns ahead and the table's tail holds 16: pages of 1-2 tokens default
    to bn = 16 P instead of 64."""
    assert _spec(page).tma.bn == bn


def test_the_tile_default_also_applies_to_model_objects() -> None:
    cache = CacheParams(dtype="bfloat16", num_kv_heads=8, head_size=128, page_size=1)
    assert VariantSpec(name="t", cache=cache).tma.bn == 16
    assert VariantSpec(name="t", cache=cache, tma=TmaParams(swizzle="128B")).tma.bn == 16
    with pytest.raises(ConfigError, match=r"tma\.bn.*reads bn / page_size lookup-table columns ahead"):
        VariantSpec(name="t", cache=cache, tma=TmaParams(bn=64))  # an explicit bn is checked, not replaced


def test_a_refused_page_size_reports_only_itself() -> None:
    with pytest.raises(ConfigError) as info:
        _spec(3)
    assert [p.field for p in info.value.problems] == ["cache.page_size"]


def test_a_narrow_row_is_not_told_to_widen_its_swizzle() -> None:
    """FP8 head size 64 (64-byte rows) cannot take the 128B swizzle, so the fix names what it can do."""
    with pytest.raises(ConfigError) as info:
        _spec(1, cache={**base_config()["cache"], "page_size": 1, "dtype": "float8_e4m3fn", "head_size": 64},
              tma={"swizzle": "64B"})
    (problem,) = [p for p in info.value.problems if p.field == "tma.swizzle"]
    assert "128B" not in problem.fix and "pages of at least 2 tokens" in problem.fix and "tma_tile_load" in problem.fix


def test_small_pages_decode_with_cp_async_even_if_the_table_said_tma(monkeypatch) -> None:
    """The config refuses loader: tma below 8-token pages; decode_loader also never picks it there."""
    spec = _spec(4, kernels=["store", "decode"], attention={"num_q_heads": 32})
    monkeypatch.setitem(derive.DECODE_AUTO_LOADER, derive.decode_auto_key(spec), "tma")
    assert derive.decode_loader(spec, "sm_90a") == "cp_async"
    big = _spec(64, kernels=["store", "decode"], attention={"num_q_heads": 32})
    monkeypatch.setitem(derive.DECODE_AUTO_LOADER, derive.decode_auto_key(big), "tma")
    assert derive.decode_loader(big, "sm_90a") == "tma"


@pytest.mark.parametrize(("page", "bn", "span", "rows"), [
    (1, 16, 128, 1), (1, 32, 128, "BN"), (4, 64, 32, 4), (2, 32, 32, "swizzle"), (1, 16, 64, "swizzle"),
    (16, 64, 16, 16), (128, 64, 16, 64)])
def test_run_time_tile_overrides_keep_the_small_page_rules(page: int, bn: int, span: int, rows: int | str) -> None:
    """Box rows of a run-time tile (one page per box below the tile), or the argument the refusal names."""
    from kvgen.runtime.tma import _tile_box_rows

    cache = SimpleNamespace(page_size=page, head_size=128, spec=SimpleNamespace(cache=SimpleNamespace(dtype="bfloat16")))
    if isinstance(rows, int):
        assert _tile_box_rows(cache, "create_tma_tile", 1000, bn, span) == rows
    else:
        with pytest.raises(LaunchError, match=rows):
            _tile_box_rows(cache, "create_tma_tile", 1000, bn, span)


def test_the_kernels_and_python_agree_on_the_lookup_table_tail() -> None:
    header = (ROOT / "kvgen" / "include" / "kvgen" / "common.cuh").read_text()
    (value,) = re.findall(r"constexpr uint32_t kLutTailColumns = (\d+);", header)
    assert int(value) == LUT_TAIL_COLUMNS
    assert (ROOT / "kvgen" / "include" / "kvgen" / "block_table.cuh").read_text().count("kLutTailColumns =") == 0
