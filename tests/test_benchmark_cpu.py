"""CPU-side checks of `kvgen bench` and the benchmark report (the GPU measurements run in scripts/gpu-check.sh)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from kvgen import benchmark
from kvgen.grid import load_config, make_variant

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvgen.cli", *args], cwd=cwd, env=env, capture_output=True, text=True)


def _env(tmp_path: Path) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env["KVGEN_CACHE_DIR"] = str(tmp_path / "cache")
    return env


def test_bench_rejects_configs_without_attention(tmp_path: Path) -> None:
    r = _cli("bench", str(ROOT / "configs" / "llama3_8b_bf16.yaml"), cwd=tmp_path, env=_env(tmp_path))
    assert r.returncode == 2 and "attention" in r.stderr


def test_bench_rejects_bad_shapes(tmp_path: Path) -> None:
    r = _cli("bench", str(ROOT / "configs" / "bench_decode.yaml"), "--shape", "64by4k", cwd=tmp_path, env=_env(tmp_path))
    assert r.returncode == 2 and "BATCHxCONTEXT" in r.stderr


def test_bench_without_a_gpu_exits_3(tmp_path: Path) -> None:
    r = _cli("bench", str(ROOT / "configs" / "bench_decode.yaml"), cwd=tmp_path, env=_env(tmp_path))
    assert r.returncode == 3, r.stderr
    assert "GPU" in r.stderr or "PyTorch" in r.stderr
    assert not (tmp_path / "bench-results").exists()


def test_decode_bytes_counts_kv_scales_q_and_o() -> None:
    cfg = load_config(ROOT / "configs" / "bench_decode.yaml")
    bf16 = next(v.spec for v in cfg.variants if v.spec.cache.dtype == "bfloat16")
    fp8 = next(v.spec for v in cfg.variants if v.spec.quantization is not None)
    lens = [100, 28]
    qo = 2 * 2 * 32 * 128 * 2
    assert benchmark.decode_bytes(bf16, lens) == 128 * 8 * 128 * 2 * 2 + qo
    assert benchmark.decode_bytes(fp8, lens) == 128 * 8 * 128 * 2 + 128 * 8 * 2 * 1 * 4 + qo
    assert benchmark.decode_bytes(fp8, lens, with_scales=False) == 128 * 8 * 128 * 2 + qo
    e8m0 = fp8.model_copy(update={"quantization": fp8.quantization.model_copy(update={"scale_dtype": "float8_e8m0fnu"})})
    assert benchmark.decode_bytes(e8m0, lens) == 128 * 8 * 128 * 2 + 128 * 8 * 2 * 1 * 1 + qo  # a byte per scale


def test_report_files(tmp_path: Path) -> None:
    rows = [benchmark.Row("v", "bfloat16", 16, "16 x 1024", "kvgen decode", 40e-6, 70_000_000, 2.8e12),
            benchmark.Row("v", "bfloat16", 16, "64 x 4096", "kvgen decode", 400e-6, 1_080_000_000, 2.8e12)]
    table = benchmark.markdown_table(rows, "GPU", 2.8e12)
    assert "| v | bfloat16 | 16 | 16 x 1024 | kvgen decode | 40.0 | 1.750 | 62.5% |" in table
    benchmark.write_csv(rows, tmp_path / "b.csv")
    lines = (tmp_path / "b.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[1].endswith("0.6250")
    assert benchmark.write_plot(rows, tmp_path / "b.png"), "matplotlib is part of the test extra"
    assert (tmp_path / "b.png").read_bytes().startswith(b"\x89PNG")


def test_rotation_and_skew_helpers() -> None:
    assert benchmark.rotations(300 << 20) == 2 and benchmark.rotations(1 << 20, cap=64) == 64
    lens = benchmark.skewed_lengths(np.random.default_rng(0))
    assert len(lens) == 64 and min(lens) >= 16 and max(lens) <= 24576 and 2500 < np.mean(lens) < 6500


def test_page_deals_cover_every_page_once() -> None:
    # The benchmark's permuted pages and decode_bench --page-order-ab's in-order pages: the same ids, each request
    # gets as many pages as its length needs, no page shared; in order, each request's run is ascending and contiguous.
    need = benchmark.pages_needed([1, 16, 17, 33, 64], 16)
    assert need == [1, 1, 2, 3, 4]
    for pages in (benchmark.permuted_pages(need, np.random.default_rng(1)), benchmark.in_order_pages(need)):
        assert [len(p) for p in pages] == need
        assert sorted(x for p in pages for x in p) == list(range(sum(need)))
    assert benchmark.in_order_pages(need) == [[0], [1], [2, 3], [4, 5, 6], [7, 8, 9, 10]]
    assert benchmark.permuted_pages(need, np.random.default_rng(1)) != benchmark.in_order_pages(need)


def test_print_report_prints_and_writes(tmp_path, capsys) -> None:
    out = tmp_path / "report.md"
    text = benchmark.print_report(["| a |", "|---|"], out)
    assert text == "| a |\n|---|\n" and out.read_text() == text and "| a |" in capsys.readouterr().out
    assert benchmark.print_report(["x"], None) == "x\n"


def test_bench_build_spec_keeps_the_granularity_with_e8m0() -> None:
    """decode_bench's per-group e8m0 build: e8m0 scales at the granularity asked for (a bug once kept the config's
    per-token granularity and timed e8m0 per token under the name "e8m0 g64")."""
    fp8 = next(v.spec for v in load_config(ROOT / "configs" / "bench_decode.yaml").variants if v.spec.quantization)
    spec = benchmark.bench_build_spec(fp8, "tma", {"granularity": 64, "stages": 3}, scales="e8m0")
    assert (spec.quantization.granularity, spec.quantization.scale_dtype) == (64, "float8_e8m0fnu")
    assert (spec.attention.loader, spec.attention.stages) == ("tma", 3)
    assert "_qe8m0g64_" in make_variant(spec).name  # the validated variant the bench builds
    static = benchmark.bench_build_spec(fp8, "auto", scales="static")
    assert static.quantization is None and static.cache.static_scales
    assert benchmark.bench_build_spec(fp8, "auto", {"granularity": 64}).quantization.scale_dtype == "float32"
