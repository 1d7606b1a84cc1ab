"""Invalid configs: every one is rejected with the field, the rule and a fix, and the CLI writes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import base_config, subprocess_env

from kvgen.config import MAX_TILE_SMEM_BYTES, validate_variant
from kvgen.errors import ConfigError
from kvgen.grid import expand, load_config

DEL = object()  # mutation value: remove the field

ROPE = {"cache.dtype": "float8_e4m3fn", "cache.is_mla": True, "cache.num_kv_heads": 1, "cache.head_size": 640,
        "rope_layout": {"padded_depth": 512, "rope_dim": 64}, "tma.swizzle": "64B"}
FP8 = {"cache.dtype": "float8_e4m3fn"}
CONT = {"cache.kind": "continuous", "cache.page_size": DEL}


def mutate(mutation: dict[str, Any]) -> dict[str, Any]:
    d = base_config()
    for dotted, value in mutation.items():
        *parents, last = dotted.split(".")
        cur = d
        for k in parents:
            cur = cur.setdefault(k, {})
        if value is DEL:
            cur.pop(last, None)
        else:
            cur[last] = value
    return d


# (id, mutation dict | raw YAML text, expected field substring, expected rule substring)
CASES: list[tuple[str, Any, str, str]] = [
    ("unknown_top_level_field", {"colour": "red"}, "colour", "unknown field"),
    ("unknown_nested_field", {"cache.pagesize": 16}, "cache.pagesize", "unknown field"),
    ("bad_dtype_literal", {"cache.dtype": "int8"}, "cache.dtype", "Input should be"),
    ("missing_cache_dtype", {"cache.dtype": DEL}, "cache.dtype", "required field is missing"),
    ("missing_name", {"name": DEL}, "name", "required field is missing"),
    ("bad_name_pattern", {"name": "Llama-3"}, "name", "should match pattern"),
    ("num_kv_heads_zero", {"cache.num_kv_heads": 0}, "cache.num_kv_heads", "greater than or equal to 1"),
    ("fp8_head_size_not_16_bytes", {**FP8, "cache.head_size": 40}, "cache.head_size", "multiple of 16 B"),
    ("page_size_missing_for_paged", {"cache.page_size": DEL}, "cache.page_size", "a paged cache needs a page size"),
    ("page_size_on_continuous", {"cache.kind": "continuous"}, "cache.page_size", "a continuous cache has no pages"),
    ("page_size_not_pow2", {"cache.page_size": 48}, "cache.page_size", "power of two"),
    ("page_size_zero", {"cache.page_size": 0}, "cache.page_size", "greater than or equal to 1"),
    ("page_size_three", {"cache.page_size": 3}, "cache.page_size", "power of two in [1, 1024]"),
    ("tile_reads_past_lut_tail", {"cache.page_size": 1, "tma.bn": 64}, "tma.bn",
     "reads bn / page_size lookup-table columns ahead"),
    ("tile_of_32_small_pages", {"cache.page_size": 8, "tma.bn": 256}, "tma.bn", "the table's tail holds 16"),
    ("small_page_box_misaligned", {"cache.page_size": 1, "tma.swizzle": "64B"}, "tma.swizzle",
     "128-byte aligned destinations"),
    ("small_page_box_unswizzled", {"cache.page_size": 4, "tma.swizzle": "NONE"}, "tma.swizzle",
     "at multiples of 64 B"),
    ("tma_decode_on_small_pages", {"cache.page_size": 4, "kernels": ["store", "decode"],
                                   "attention": {"num_q_heads": 32, "loader": "tma"}},
     "attention.loader", "pages of 8+ tokens"),
    ("quantization_on_bf16", {"quantization": {"granularity": 64}}, "quantization", "only defined for FP8"),
    ("quantization_on_continuous", {**CONT, **FP8, "quantization": {"granularity": 64}}, "quantization",
     "continuous cache is never quantized"),
    ("granularity_not_divisor", {**FP8, "quantization": {"granularity": 48}}, "quantization.granularity",
     "must divide head_size"),
    ("granularity_not_multiple_of_16", {**FP8, "quantization": {"granularity": 8}}, "quantization.granularity",
     "multiple of 16"),
    ("rope_on_bf16", {**ROPE, "cache.dtype": "bfloat16"}, "rope_layout", "FP8 e4m3"),
    ("rope_without_mla", {**ROPE, "cache.is_mla": False}, "rope_layout", "is an MLA layout"),
    ("rope_head_size_mismatch", {**ROPE, "cache.head_size": 576}, "cache.head_size", "padded_depth + 2 * rope_dim"),
    ("rope_on_continuous", {**ROPE, **CONT}, "rope_layout", "continuous cache has no rope-aware layout"),
    ("rope_padded_depth_not_64", {**ROPE, "cache.head_size": 608, "rope_layout": {"padded_depth": 480, "rope_dim": 64}},
     "rope_layout.padded_depth", "multiple of 64 bytes"),
    ("rope_granularity_not_head_size", {**ROPE, "quantization": {"granularity": 64}}, "quantization.granularity",
     "one scale per token"),
    ("mla_with_8_heads", {"cache.is_mla": True}, "cache.num_kv_heads", "single latent head"),
    ("tma_kernel_on_sm80_only", {"archs": ["sm_80"], "kernels": ["store", "tma_tile_load"]}, "kernels",
     "tma_tile_load needs TMA"),
    ("gather4_without_sm100a", {"kernels": ["store", "gather4_tile_load"]}, "kernels", "needs sm_100a"),
    ("e5m2_with_tma_kernel", {"cache.dtype": "float8_e5m2", "kernels": ["store", "tma_tile_load"]}, "cache.dtype",
     "TMA has no data type for float8_e5m2"),
    ("swizzle_wider_than_row", {**FP8, "cache.head_size": 64}, "tma.swizzle", "must fit in one head row (64 B)"),
    ("bn_not_pow2", {"tma.bn": 48}, "tma.bn", "power of two in [8, 256]"),
    ("bn_too_large", {"tma.bn": 512}, "tma.bn", "less than or equal to 256"),
    ("bk_not_granule_multiple", {"tma.bk": 72}, "tma.bk", "multiple of the swizzle granule"),
    ("bk_exceeds_padded_depth", {"tma.bk": 256}, "tma.bk", "must not exceed the padded depth"),
    ("tile_exceeds_smem", {"cache.dtype": "float32", "cache.head_size": 1024, "tma.bn": 256}, "tma.bn",
     f"must fit in {MAX_TILE_SMEM_BYTES} B of shared memory"),
    ("base_alignment_below_page", {"cache.page_size": 16, "tma.bn": 64, "tma.base_alignment": 8},
     "tma.base_alignment", "start on a page"),
    ("base_alignment_not_pow2", {"tma.base_alignment": 48}, "tma.base_alignment", "must be a power of two"),
    ("duplicate_archs", {"archs": ["sm_90a", "sm_90a"]}, "archs", "each arch may appear once"),
    ("duplicate_kernels", {"kernels": ["store", "store"]}, "kernels", "each kernel may appear once"),
    ("empty_archs", {"archs": []}, "archs", "at least 1 item"),
    ("unknown_arch", {"archs": ["sm_70"]}, "archs", "'sm_80', 'sm_86', 'sm_89', 'sm_90a' or 'sm_100a'"),
    ("unknown_kernel", {"kernels": ["attention"]}, "kernels", "Input should be 'store'"),
    ("f32_cache_bf16_input", {"cache.dtype": "float32", "cache.input_dtype": "bfloat16"}, "cache.input_dtype",
     "float32 cache is fed float32"),
    ("grid_value_not_list", {"grid": {"cache.page_size": 16}}, "grid[0].cache.page_size", "must be a non-empty list"),
    ("grid_empty_block", {"grid": [{}]}, "grid[0]", "non-empty mapping"),
    ("grid_path_through_scalar", {"grid": {"name.x": [1]}}, "grid.name.x", "non-mapping field"),
    ("grid_point_invalid", {"grid": {"cache.page_size": [16, 48, 64]}}, "cache.page_size", "power of two"),
    ("yaml_syntax_error", "name: t\ncache: {dtype: bfloat16, head_size: [128\n", "<file>", "not valid YAML"),
    ("top_level_not_mapping", "- name: t\n- cache: {}\n", "<config>", "top level must be a mapping"),
    ("empty_kernels", {"kernels": []}, "kernels", "at least 1"),
    ("bool_as_int", {"cache.num_kv_heads": True}, "cache.num_kv_heads", "integer"),
    ("static_scales_on_bf16", {"cache.static_scales": True}, "cache.static_scales", "only defined for FP8 caches"),
    ("static_scales_with_quantization", {**FP8, "cache.static_scales": True, "quantization": {"granularity": 64}},
     "cache.static_scales", "either per-row scales (quantization) or static scales"),
    ("static_scales_with_rope_layout", {**ROPE, "cache.static_scales": True}, "cache.static_scales",
     "rope-aware layout has its own scales"),
    ("decode_e8m0_two_heads", {**FP8, "kernels": ["store", "decode"], "cache.num_kv_heads": 2,
                               "attention": {"num_q_heads": 8},
                               "quantization": {"scale_dtype": "float8_e8m0fnu", "granularity": 128}},
     "cache.num_kv_heads", "4-byte words"),
    ("decode_e8m0_one_head_two_groups", {**FP8, "kernels": ["store", "decode"], "cache.num_kv_heads": 1,
                                         "attention": {"num_q_heads": 8},
                                         "quantization": {"scale_dtype": "float8_e8m0fnu", "granularity": 64}},
     "cache.num_kv_heads", "4-byte words"),
    ("ctas_per_sm_zero", {"kernels": ["store", "decode"], "attention": {"num_q_heads": 32, "ctas_per_sm": 0}},
     "attention.ctas_per_sm", "greater than or equal to 1"),
    ("ctas_per_sm_too_many", {"kernels": ["store", "decode"], "attention": {"num_q_heads": 32, "ctas_per_sm": 9}},
     "attention.ctas_per_sm", "less than or equal to 8"),
]


def _case_id(c: Any) -> str:
    return c.values[0] if hasattr(c, "values") else c[0]


def _raise_for(tmp_path: Path, mutation: Any, source: str | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        if isinstance(mutation, str):
            p = tmp_path / "cfg.yaml"
            p.write_text(mutation)
            load_config(p)
        else:
            expand(mutate(mutation), source)
    return info.value


def test_at_least_32_distinct_cases() -> None:
    ids = [_case_id(c) for c in CASES]
    assert len(set(ids)) == len(ids) >= 32
    keys = [repr(c.values[1] if hasattr(c, "values") else c[1]) for c in CASES]
    assert len(set(keys)) == len(keys), "two cases share the same mutation"


def test_base_config_is_valid() -> None:
    (v,) = expand(base_config())
    assert v.spec.cache.page_size == 128 and v.spec.cache.num_kv_heads == 8


@pytest.mark.parametrize(("case_id", "mutation", "field", "rule"), CASES, ids=[_case_id(c) for c in CASES])
def test_invalid_config_rejected(tmp_path: Path, case_id: str, mutation: Any, field: str, rule: str) -> None:
    err = _raise_for(tmp_path, mutation)
    text = str(err)
    assert field in text, text
    assert rule in text, text
    assert err.problems, "a ConfigError must carry at least one Problem"
    for p in err.problems:
        assert p.field and p.rule and p.fix, p
    # the named field is the field of one of the problems, with that problem's rule
    assert any(field in p.field and rule in f"{p.rule} (got {p.value!r})" for p in err.problems), err.problems


def test_grid_point_error_names_the_point() -> None:
    err = _raise_for(Path("."), {"grid": {"cache.page_size": [16, 48, 64]}}, source="cfg.yaml")
    assert "cache.page_size=48" in str(err)
    assert err.source is not None and "grid[0]" in err.source and "cfg.yaml" in err.source


def test_one_bad_grid_point_rejects_whole_config() -> None:
    good = mutate({"grid": {"cache.page_size": [16, 64]}})
    assert len(expand(good)) == 2
    with pytest.raises(ConfigError):
        expand(mutate({"grid": {"cache.page_size": [16, 64, 48]}}))


def test_smem_fix_suggests_a_valid_bn() -> None:
    err = _raise_for(Path("."), {"cache.dtype": "float32", "cache.head_size": 1024, "tma.bn": 256})
    (p,) = [p for p in err.problems if p.field == "tma.bn"]
    suggested = int(p.fix.split()[2])
    assert suggested & (suggested - 1) == 0
    expand(mutate({"cache.dtype": "float32", "cache.head_size": 1024, "tma.bn": suggested}))


CLI_CASES = ["unknown_top_level_field", "page_size_not_pow2", "tile_exceeds_smem", "grid_point_invalid",
             "yaml_syntax_error", "top_level_not_mapping", "rope_without_mla"]


@pytest.mark.parametrize("case_id", CLI_CASES)
def test_cli_rejects_invalid_config(tmp_path: Path, case_id: str) -> None:
    (_, mutation, field, rule) = next(c for c in CASES if _case_id(c) == case_id)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(mutation if isinstance(mutation, str) else yaml.safe_dump(mutate(mutation)))
    out = tmp_path / "OUT"
    res = subprocess.run([sys.executable, "-m", "kvgen.cli", "build", "cfg.yaml", "--out", "OUT"], cwd=tmp_path,
                         env=subprocess_env(tmp_path / "cache"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert field in res.stderr and rule in res.stderr, res.stderr
    assert "Fix:" in res.stderr
    assert res.stdout == ""
    assert not out.exists()
    assert not (tmp_path / "generated").exists()


def test_decode_that_cannot_fit_an_arch_is_refused_by_name() -> None:
    """bf16 decode at head size 256 needs 129 KB for its smallest pipeline (2 stages of 64-row K and V tiles): an
    Ada or Ampere GA10x GPU (99 KB per CTA) is refused with the arch, the sizes and a fix; FP8 (half the bytes) fits."""
    d = base_config()
    d["cache"].update(dtype="bfloat16", head_size=256, page_size=16)
    d["kernels"] = ["store", "decode"]
    d["attention"] = {"num_q_heads": 32}
    d["archs"] = ["sm_89", "sm_90a"]
    with pytest.raises(ConfigError) as e:
        validate_variant(d)
    text = str(e.value)
    assert "archs" in text and "sm_89 leaves it 92 KB" in text and "needs 129 KB" in text and "FP8" in text
    assert "sm_90a leaves" not in text  # the H100 fits it
    d["cache"]["dtype"] = "float8_e4m3fn"
    d["quantization"] = {"scale_dtype": "float32", "granularity": 256}
    assert validate_variant(d).archs == ["sm_89", "sm_90a"]
