"""Variant names and digests, and grid expansion."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, base_config, subprocess_env

from kvgen.dtypes import DTYPES
from kvgen.grid import expand, load_config

NAME_RE = re.compile(r"^[a-z0-9_]+$")
DIGEST_RE = re.compile(r"_([0-9a-f]{8})$")

# (path, value): each changes exactly one field of base_config() and stays valid
SINGLE_FIELD_CHANGES = [
    ("name", "u"),
    ("description", "another description"),
    ("cache.dtype", "float16"),
    ("cache.num_kv_heads", 4),
    ("cache.head_size", 256),
    ("cache.page_size", 64),
    ("cache.num_layers", 32),
    ("cache.input_dtype", "float32"),
    ("tma.swizzle", "64B"),
    ("tma.bn", 128),
    ("tma.bk", 64),
    ("tma.base_alignment", 128),
    ("archs", ["sm_90a", "sm_100a"]),
    ("kernels", ["store", "load"]),
    ("sources", ["user.cu"]),
]


def _with(path: str, value: object) -> dict:
    d = base_config()
    *parents, last = path.split(".")
    cur = d
    for k in parents:
        cur = cur.setdefault(k, {})
    cur[last] = value
    return d


def test_single_field_changes_give_distinct_names_and_digests() -> None:
    (base,) = expand(base_config())
    names, digests = [base.name], [base.digest]
    for path, value in SINGLE_FIELD_CHANGES:
        (v,) = expand(_with(path, value))
        names.append(v.name)
        digests.append(v.digest)
    assert len(set(names)) == len(names) == len(SINGLE_FIELD_CHANGES) + 1
    assert len(set(digests)) == len(digests)


def test_identical_input_gives_identical_name() -> None:
    a, b = expand(base_config())[0], expand(base_config())[0]
    assert a.name == b.name and a.digest == b.digest
    # key order and defaults written out do not matter: the digest is over the canonical spec
    d = base_config()
    d["tma"] = {"bn": 64, "swizzle": "128B"}
    d["cache"] = dict(reversed(list(d["cache"].items())))
    assert expand(d)[0].name == a.name


@pytest.mark.parametrize("cfg", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_names_are_symbol_safe_and_carry_digest(cfg: Path) -> None:
    variants = load_config(cfg).variants
    assert variants
    for v in variants:
        assert NAME_RE.match(v.name), v.name
        m = DIGEST_RE.search(v.name)
        assert m and m.group(1) == v.digest, v.name
        assert v.name.startswith(v.spec.name + "_")
        assert DTYPES[v.spec.cache.dtype].short in v.name
    assert len({v.name for v in variants}) == len(variants)


def test_names_stable_across_processes(tmp_path: Path) -> None:
    code = (
        "import json, sys; from kvgen.grid import load_config; "
        "print(json.dumps([v.name for p in sys.argv[1:] for v in load_config(p).variants]))"
    )
    cfgs = [str(p) for p in sorted((ROOT / "configs").glob("*.yaml"))]
    here = [v.name for p in cfgs for v in load_config(p).variants]
    for seed in ("0", "12345"):
        env = subprocess_env(tmp_path, PYTHONHASHSEED=seed)
        res = subprocess.run([sys.executable, "-c", code, *cfgs], env=env, capture_output=True, text=True,
                             check=True, timeout=120)
        assert json.loads(res.stdout) == here


def test_two_block_grid_counts() -> None:
    d = base_config()
    d["grid"] = [
        {"cache.page_size": [16, 32, 64], "cache.dtype": ["bfloat16", "float16"]},  # 6
        {"cache.num_kv_heads": [1, 2, 4, 8, 16]},  # 5, none equal to a block-0 point
    ]
    vs = expand(d)
    assert len(vs) == 6 + 5
    assert {(v.spec.cache.page_size, v.spec.cache.dtype) for v in vs[:6]} == {
        (p, t) for p in (16, 32, 64) for t in ("bfloat16", "float16")}


def test_single_block_mapping_grid_is_product() -> None:
    d = base_config()
    d["grid"] = {"cache.page_size": [16, 128], "tma.swizzle": ["NONE", "32B", "64B"]}
    assert len(expand(d)) == 6


def test_duplicate_points_across_blocks_collapse() -> None:
    d = base_config()
    d["grid"] = [
        {"cache.page_size": [16, 64, 128]},
        {"cache.page_size": [64, 128, 256]},  # 64 and 128 repeat block 0's points
        {"cache.page_size": [128], "cache.dtype": ["bfloat16"]},  # the base value set explicitly: same spec
    ]
    vs = expand(d)
    assert sorted(v.spec.cache.page_size for v in vs) == [16, 64, 128, 256]
    assert len({v.name for v in vs}) == len(vs)


def test_grid_null_clears_a_base_field() -> None:
    d = base_config()
    d["grid"] = {"cache.kind": ["continuous"], "cache.page_size": [None]}
    (v,) = expand(d)
    assert v.spec.cache.kind == "continuous" and v.spec.cache.page_size is None
    assert "_cont_" in v.name


CI_GRID = ROOT / "configs" / "ci_grid.yaml"


def test_ci_grid_coverage() -> None:
    if not CI_GRID.exists():
        pytest.fail(f"{CI_GRID} is missing (the CI coverage grid)")
    vs = load_config(CI_GRID).variants
    specs = [v.spec for v in vs]
    assert len(vs) >= 48
    assert {s.cache.dtype for s in specs} >= {"float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}
    assert {s.cache.page_size for s in specs if s.cache.kind == "paged"} >= {1, 4, 16, 64, 128, 256}
    assert {s.cache.head_size for s in specs} >= {64, 128, 256}
    assert any(s.quantization is None and DTYPES[s.cache.dtype].is_fp8 for s in specs), "FP8 without scales"
    assert {s.quantization.granularity for s in specs if s.quantization} >= {32, 64, 128}
    assert {s.cache.kind for s in specs} == {"paged", "continuous"}
    assert {s.tma.swizzle for s in specs} >= {"NONE", "32B", "64B", "128B"}

