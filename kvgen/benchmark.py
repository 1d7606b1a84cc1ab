"""GPU benchmarks of generated kernels: timing helpers shared with bench/, and `kvgen bench` for a config.

Method: every op is captured N times over disjoint buffer sets (rotated working set >= 256 MB, so L2 cannot
serve repeats) in one CUDA graph; the median of 30 replays divided by N is the time per call. Bandwidth is
reported against a 256 MiB device-to-device copy measured in the same run (bytes read + written).
Needs PyTorch and a CUDA GPU; imported lazily by the CLI.
"""

from __future__ import annotations

import csv
import datetime
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .dtypes import DTYPES

Launch = Callable[[], None]
DEFAULT_SHAPES: tuple[tuple[int, int], ...] = tuple((b, c) for b in (16, 64, 128) for c in (1024, 4096, 16384))


def _torch() -> Any:
    import torch

    return torch


# ---- timing ------------------------------------------------------------------------------------------------
def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 30, rounds: int = 5, warmup_s: float = 0.5) -> float:
    """Device-to-device copy_ of nbytes, bytes read + written per second: the best of `rounds` medians of `reps`
    copies, after `warmup_s` seconds of copies. A single median once read 1.87 TB/s on a freshly started H100
    that copies at 2.85-2.87 TB/s (kernels timed in the same process were unaffected), which would have
    inflated every percentage by half; the best round is the device's sustained copy rate."""
    torch = _torch()
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    t_end = time.perf_counter() + warmup_s
    while time.perf_counter() < t_end:  # clocks and memory state settle under load
        for _ in range(20):
            b.copy_(a)
        torch.cuda.synchronize()
    best = 0.0
    for _ in range(rounds):
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            b.copy_(a)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1e-3)
        best = max(best, 2 * nbytes / statistics.median(times))
    return best


def graph_time(launches: Sequence[Launch], replays: int = 30) -> float:
    """Median seconds per launch: all launches (each on its own buffers) captured in one CUDA graph, replayed;
    Python launch cost stays out of the number."""
    return graph_times([launches], replays)[0]


def graph_times(launch_sets: Sequence[Sequence[Launch]], replays: int = 30) -> list[float]:
    """graph_time of several ops measured together: one graph per op, replayed round-robin, so every op sees the
    same clocks, temperature and neighbours. Timing ops one after the other let the first op of a series read up
    to 10% slow in one run and not in the next. Each round starts one op later (A B C, B C A, C A B, ...): with a
    fixed order the op in first place read 1-1.5% slow at some decode shapes (session 8: the same kernel timed
    first and last in one round). An op whose capture fails gets NaN (and the error is printed); the others are
    still timed."""
    torch = _torch()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graphs: list[Any] = []
    for launches in launch_sets:
        try:
            with torch.cuda.stream(s):
                for fn in launches:  # warm-up on the capture stream: lazy init, JIT, module loads
                    fn()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=s):
                for fn in launches:
                    fn()
            g.replay()
            torch.cuda.synchronize()
            graphs.append(g)
        except Exception as e:  # noqa: BLE001 - one op failing to capture must not lose the others' numbers
            print(f"graph capture failed: {type(e).__name__}: {str(e)[:200]}")
            torch.cuda.synchronize()
            graphs.append(None)
    times: list[list[float]] = [[] for _ in graphs]
    n = len(graphs)
    for r in range(replays):
        for i in ((r + k) % n for k in range(n)):
            g = graphs[i]
            if g is None:
                continue
            st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            st.record()
            g.replay()
            en.record()
            en.synchronize()
            times[i].append(st.elapsed_time(en) * 1e-3 / len(launch_sets[i]))
    return [statistics.median(t) if t else float("nan") for t in times]


def eager_host_costs(fns: Sequence[Launch], calls: int = 2000, batch: int = 100) -> list[float]:
    """Host seconds per eager call of each fn: the median over batches of `batch` back-to-back calls, the GPU
    drained between batches (not timed), the fns' batches interleaved round-robin so they share the host's noise
    (one host measured the same kvgen store at 11 and 19 µs in one process, minutes apart). A batch stays far
    below the driver's launch queue, so the host never waits for the GPU."""
    torch = _torch()
    for fn in fns:
        for _ in range(50):
            fn()
    torch.cuda.synchronize()
    per_call: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, calls // batch)):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            per_call[i].append((time.perf_counter() - t0) / batch)
            torch.cuda.synchronize()
    return [statistics.median(t) for t in per_call]


def eager_host_cost(fn: Launch, calls: int = 2000, batch: int = 100) -> float:
    """eager_host_costs of one call."""
    return eager_host_costs([fn], calls, batch)[0]


def rotations(bytes_per_set: int, floor: int = 256 << 20, cap: int = 64) -> int:
    """How many disjoint buffer sets make the rotated working set at least `floor` bytes."""
    return max(2, min(cap, -(-floor // max(1, bytes_per_set))))


# ---- decode ------------------------------------------------------------------------------------------------
def pages_needed(lengths: Sequence[int], page_size: int) -> list[int]:
    """Pages each request of `lengths` tokens occupies."""
    return [-(-n // page_size) for n in lengths]


def _deal_pages(ids: np.ndarray, need: list[int]) -> list[list[int]]:
    bounds = np.cumsum([0, *need])
    return [[int(x) for x in ids[bounds[i]:bounds[i + 1]]] for i in range(len(need))]


def permuted_pages(need: list[int], rng: np.random.Generator) -> list[list[int]]:
    """Page ids for requests needing need[i] pages each: a random permutation of 0..sum(need)-1, never shared."""
    return _deal_pages(rng.permutation(sum(need)), need)


def in_order_pages(need: list[int]) -> list[list[int]]:
    """The same page ids dealt in ascending order: each request's pages contiguous (a fresh allocator's layout)."""
    return _deal_pages(np.arange(sum(need)), need)


STATIC_SCALES = (0.75, 1.25)
"""Per-tensor (k_scale, v_scale) of the benchmark's static-scales FP8 caches (decode_bench.py --static-scales)."""


def static_scale_tensor(num_kv_heads: int, num_layers: int = 1) -> Any:
    """A [2, L, H] float32 device tensor holding STATIC_SCALES (KVCache static_scales)."""
    torch = _torch()
    t = torch.empty((2, num_layers, num_kv_heads), dtype=torch.float32, device="cuda")
    t[0].fill_(STATIC_SCALES[0])
    t[1].fill_(STATIC_SCALES[1])
    return t


def fill_random_scales(scales: Any) -> Any:
    """Per-row scales of a benchmark cache: float32 in [0.5, 1.5), or e8m0 bytes (uint8) 2^-1, 2^0 or 2^1."""
    torch = _torch()
    if scales.dtype == torch.uint8:
        scales.copy_(torch.randint(126, 129, scales.shape, dtype=torch.uint8, device=scales.device))
    else:
        scales.uniform_(0.5, 1.5)
    return scales


def decode_cache(variant: Any, lengths: list[int], rng: np.random.Generator) -> Any:
    """A one-layer cache of `variant` with random contents on randomly permuted pages, cache_length = len - 1,
    a decode step begun and planned."""
    torch = _torch()
    spec = variant.spec()
    p = spec.cache.page_size
    need = pages_needed(lengths, p)
    cache = variant.cache(max_batch=len(lengths), num_pages=sum(need) + 1, max_pages_per_request=max(need),
                          num_layers=1, max_tokens=len(lengths))
    if spec.cache.dtype.startswith("float8"):
        cache.blocks.copy_(torch.randn(cache.blocks.shape, device="cuda", dtype=torch.bfloat16).to(cache.blocks.dtype))
        if cache.scales is not None:
            fill_random_scales(cache.scales)
        if cache.static_scales is not None:
            cache.set_static_scales(0, *STATIC_SCALES)
    else:
        cache.blocks.normal_()
    cache.set_pages(permuted_pages(need, rng))
    cache.set_cache_lengths([n - 1 for n in lengths])
    cache.begin_step([1] * len(lengths))
    cache.plan_decode()
    return cache


def decode_bytes(spec: Any, lengths: list[int], with_scales: bool = True) -> int:
    """K + V of the cached tokens (+ their scales) + Q + O: what a decode step must move."""
    c, a = spec.cache, spec.attention
    es = 1 if c.dtype.startswith("float8") else 2
    tokens = sum(lengths)
    kv = tokens * c.num_kv_heads * c.head_size * 2 * es
    groups = (c.head_size + spec.quantization.granularity - 1) // spec.quantization.granularity if spec.quantization else 0
    scale_bytes = DTYPES[spec.quantization.scale_dtype].nbytes if spec.quantization else 0
    sc = tokens * c.num_kv_heads * 2 * groups * scale_bytes if with_scales else 0
    return kv + sc + 2 * len(lengths) * a.num_q_heads * c.head_size * 2


def skewed_lengths(rng: np.random.Generator, batch: int = 64, mean: int = 4096, cap: int = 24576) -> list[int]:
    sigma = 0.8
    return [int(x) for x in np.clip(rng.lognormal(np.log(mean) - 0.5 * sigma**2, sigma, batch), 16, cap)]


@dataclass
class Row:
    variant: str
    cache: str
    page: int | None
    shape: str
    kernel: str
    seconds: float
    nbytes: int
    copy_bw: float

    @property
    def tbps(self) -> float:
        return self.nbytes / self.seconds / 1e12

    @property
    def fraction(self) -> float:
        return self.nbytes / self.seconds / self.copy_bw


def time_decode(variant: Any, label: str, lengths: list[int], rng: np.random.Generator, copy_bw: float,
                early_reads: bool = False) -> Row:
    """One decode shape, CUDA-graph replays over rotated caches; early_reads: decode(early_cache_reads=True)."""
    torch = _torch()
    spec = variant.spec()
    nbytes = decode_bytes(spec, lengths)
    sets = []
    for _ in range(rotations(nbytes, cap=8)):
        cache = decode_cache(variant, lengths, rng)
        q = torch.randn(len(lengths), spec.attention.num_q_heads, spec.cache.head_size, device="cuda",
                        dtype=getattr(torch, spec.cache.io_dtype))
        out = torch.empty(q.shape, device="cuda", dtype=getattr(torch, spec.attention.output_dtype))
        sets.append((cache, q, out))
    t = graph_time([lambda c=c, q=q, o=o: c.decode(0, q, o, early_cache_reads=early_reads) for c, q, o in sets])
    del sets
    torch.cuda.empty_cache()
    kernel = "kvgen decode (early reads)" if early_reads else "kvgen decode"
    return Row(variant.NAME, spec.cache.dtype, spec.cache.page_size, label, kernel, t, nbytes, copy_bw)


def decode_cases(shapes: Sequence[tuple[int, int]], rng: np.random.Generator, skewed: bool = True) -> list[tuple[str, list[int]]]:
    cases = [(f"{b} x {c}", [c] * b) for b, c in shapes]
    if skewed:
        lens = skewed_lengths(rng)
        cases.append((f"64 x lognormal(mean {int(np.mean(lens))}, max {max(lens)})", lens))
    return cases


# ---- report ------------------------------------------------------------------------------------------------
def markdown_table(rows: list[Row], gpu: str, copy_bw: float) -> str:
    lines = [f"kvgen bench, {gpu}, {datetime.date.today()}; device copy_ bandwidth {copy_bw / 1e12:.3f} TB/s "
             "(256 MiB, read + write)", "",
             "| variant | cache | page | shape | kernel | µs | TB/s | % of copy |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.variant} | {r.cache} | {r.page or '-'} | {r.shape} | {r.kernel} | {r.seconds * 1e6:.1f} | "
                     f"{r.tbps:.3f} | {100 * r.fraction:.1f}% |")
    return "\n".join(lines) + "\n"


def bench_build_spec(spec: Any, loader: str, attention: dict[str, int] | None = None, scales: str | None = None) -> Any:
    """A benchmark build of a decode variant: attention.loader and the `attention` fields replaced (an A/B of the
    loaders, the pipeline depth, the CTAs per SM), "granularity" among them setting quantization.granularity of
    quantized variants; scales "static" (FP8 variants with per-tensor device scales instead of per-row ones) or
    "e8m0" (power-of-two scales, at the granularity set here)."""
    fields = dict(attention or {})
    granularity = fields.pop("granularity", None)
    out: dict[str, Any] = {"attention": spec.attention.model_copy(update={"loader": loader, **fields})}
    quant = spec.quantization
    if granularity is not None and quant is not None:
        quant = out["quantization"] = quant.model_copy(update={"granularity": granularity})
    if scales == "static" and spec.cache.dtype.startswith("float8"):
        out["quantization"] = None
        out["cache"] = spec.cache.model_copy(update={"static_scales": True})
    if scales == "e8m0" and quant is not None:  # on top of the granularity (it was once dropped here)
        out["quantization"] = quant.model_copy(update={"scale_dtype": "float8_e8m0fnu"})
    return spec.model_copy(update=out)


def print_report(lines: Sequence[str], out: Path | None) -> str:
    """A benchmark's markdown report: printed, and written to `out` when given. Returns the text."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out is not None:
        out.write_text(text)
    return text


def write_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "cache", "page", "shape", "kernel", "us", "tbps", "fraction_of_copy"])
        for r in rows:
            w.writerow([r.variant, r.cache, r.page, r.shape, r.kernel, f"{r.seconds * 1e6:.3f}", f"{r.tbps:.4f}",
                        f"{r.fraction:.4f}"])


def write_plot(rows: list[Row], path: Path) -> bool:
    """Bar chart of % of copy bandwidth per shape and variant; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shapes = list(dict.fromkeys(r.shape for r in rows))
    series = list(dict.fromkeys(f"{r.variant} {r.kernel}" for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(shapes)), 4))
    width = 0.8 / max(1, len(series))
    for i, name in enumerate(series):
        vals = [next((100 * r.fraction for r in rows if r.shape == s and f"{r.variant} {r.kernel}" == name), 0.0)
                for s in shapes]
        ax.bar([x + i * width for x in range(len(shapes))], vals, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))], shapes, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("% of device-copy bandwidth")
    ax.axhline(100, color="grey", linewidth=0.5)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(generated: Any, out_dir: Path, shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES, skewed: bool = True,
        echo: Callable[[str], None] = print, early_reads: bool = False) -> list[Row]:
    """Benchmark every decode variant of a generated package; write table, CSV and plot into out_dir. early_reads:
    also time each shape with decode(early_cache_reads=True) (a second row)."""
    torch = _torch()
    if not torch.cuda.is_available():
        raise RuntimeError("kvgen bench needs a CUDA GPU (torch.cuda.is_available() is False)")
    rng = np.random.default_rng(0)
    copy_bw = copy_bandwidth()
    rows: list[Row] = []
    for variant in generated.VARIANTS.values():
        if variant.spec().attention is None:
            continue
        for label, lengths in decode_cases(shapes, rng, skewed):
            for early in (False, True) if early_reads else (False,):
                rows.append(time_decode(variant, label, lengths, rng, copy_bw, early))
                r = rows[-1]
                echo(f"{r.variant} {r.shape} {r.kernel}: {r.seconds * 1e6:.1f} us, {100 * r.fraction:.1f}% of copy")
    if not rows:
        raise RuntimeError("no variant of this config has attention parameters (add attention: to benchmark decode)")
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, torch.cuda.get_device_name(), copy_bw)
    (out_dir / "bench.md").write_text(table)
    write_csv(rows, out_dir / "bench.csv")
    write_plot(rows, out_dir / "bench.png")
    echo(table)
    return rows
