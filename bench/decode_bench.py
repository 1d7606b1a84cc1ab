"""Decode-attention benchmark (issue 4): kvgen vs FlashInfer (CUDA-core and tensor-core decode, XQA) and vLLM's
Triton unified_attention on the same caches, as a fraction of the measured device-copy bandwidth.

Method: CUDA-graph replays (kvgen.benchmark.graph_times: every op of a shape replayed round-robin), median of 30, with enough disjoint caches that the
rotated working set is >= 256 MB. Effective bandwidth = (K+V bytes of the cached tokens + scales + Q + O) / time.
Shapes: 32 query heads, 8 KV heads, head size 128; bf16 and FP8 e4m3 (kvgen: one float32 scale per token and
head; the peers have only per-tensor FP8 scales, so they read no scales); pages 16 and 64.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import math
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402

from kvgen import nvrtc  # noqa: E402
from kvgen.benchmark import (  # noqa: E402
    STATIC_SCALES,
    bench_build_spec,
    copy_bandwidth,
    decode_bytes,
    decode_cache,
    fill_random_scales,
    graph_times,
    in_order_pages,
    pages_needed,
    rotations,
    skewed_lengths,
    static_scale_tensor,
)
from kvgen.build import build, import_package  # noqa: E402
from kvgen.grid import ConfigFile, load_config, make_variant  # noqa: E402
from kvgen.runtime.decode_plan import DecodePlan, host_chunk, plan_decode, split_k_plan  # noqa: E402

HQ, H, D = 32, 8, 128  # the attention shape of --config's variants (set in main; all variants must share it)


DEFAULT_CONFIG = ROOT / "configs" / "bench_decode.yaml"
CONFIG = DEFAULT_CONFIG  # --config: another grid of the same attention shape (e.g. configs/bench_small_pages.yaml)


def load_generated(loader: str = "auto", defines: tuple[str, ...] = (), tag: str = "",
                   attention: dict[str, int] | None = None, scales: str | None = None):
    """The bench config's variants, with attention.loader set to `loader` and the `attention` fields updated (an
    A/B of the K/V loaders, the pipeline depth, the CTAs per SM), the kernels compiled with extra preprocessor
    `defines` (decode.cuh's compile-time knobs). scales: the FP8 variants with "static" per-tensor device scales
    (cache.static_scales) or "e8m0" per-token power-of-two scales instead of float32 per-token ones."""
    cfg = load_config(CONFIG)
    name = f"{loader}{tag}" + ("" if CONFIG == DEFAULT_CONFIG else f"-{CONFIG.stem}")
    if loader != "auto" or defines or attention or scales:
        specs = [bench_build_spec(v.spec, loader, attention, scales) for v in cfg.variants]
        cfg = ConfigFile(path=None, name=f"bench_decode_{name}", variants=[make_variant(s) for s in specs])
    out = Path(f"/tmp/kvgen-bench-decode-{name}")
    with nvrtc.defines(*defines):
        build(cfg, out=out, jobs=8)
    return import_package(out, f"kvgen_bench_decode_{name}")


def add_planned(label: str, views: list, sets: list, nbytes: int, first_views: dict, entries: list, make_plan) -> None:
    """A timed entry on the same caches as `views`, each copy given the plan make_plan(copy, original) instead of
    the planner's; its first copy joins the answers checked against the default build's."""
    planned = [w.copy() for w in views]
    for w, src in zip(planned, views):
        w.decode_plan = make_plan(w, src)
    first_views[label] = planned[0]
    entries.append((label, [lambda c=c, q=q, o=o: c.decode(0, q, o) for c, (_, q, o) in zip(planned, sets)], nbytes))


def run_shape(variants: dict[str, type], lengths: list[int], rng, copy_bw: float, label: str, with_peers: bool,
              pdl_ab: bool = False, plan_ab: bool = False, fixed_splits: tuple[int, ...] = (),
              page_order_ab: bool = False, with_store: bool = False) -> list[tuple]:
    """kvgen (one row per loader in `variants`, all reading the same caches) and the peers on one shape, all
    timed together (kvgen.benchmark.graph_times: graphs replayed round-robin)."""
    variant = next(iter(variants.values()))
    spec = variant.spec()
    fp8 = spec.cache.dtype != "bfloat16"
    nbytes = decode_bytes(spec, lengths)
    n = rotations(nbytes, cap=8)
    sets = []
    for _ in range(n):
        cache = decode_cache(variant, lengths, rng)
        q = torch.randn(len(lengths), HQ, D, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(q)
        sets.append((cache, q, out))
    entries = []  # (name, launches, bytes)
    in_order_luts = []  # --page-order-ab: the in-order lookup tables, so XQA can read the same pages too
    first_views = {}  # kvgen build name -> its view of sets[0]: every build must give the default's answer
    static_views = None  # the per-tensor static-scales build's views (--static-scales), checked against XQA below
    build_views = {}  # kvgen build name -> its views of the sets (--with-store)
    for loader, v in variants.items():
        vspec = v.spec()
        static = vspec.cache.static_scales
        # A static-scales build reads the same FP8 blocks with per-tensor scales STATIC_SCALES instead of the
        # per-token scales: the same bytes of K and V, no scale reads. An e8m0 or per-group build reads them with
        # random scales of its own format (build_scales; e8m0: a byte each, not 4).
        views = [c if v is variant else type(c).wrap(
            v, c.blocks, None if static else build_scales(v, c.scales), c.lookup_table,
            c.cache_lengths, num_layers=1, static_scales=static_scale_tensor(H) if static else None)
            for c, _, _ in sets]
        if static:
            static_views = views
        nbytes = decode_bytes(v.spec(), lengths)  # this build's bytes (a static-scales build reads no scales)
        for w in views:
            w.begin_step([1] * len(lengths))
            w.plan_decode()
        name = "kvgen" if len(variants) == 1 else f"kvgen ({loader})"
        pl = views[0].decode_plan
        ratio = "" if pl.modelled_imbalance is None else f", modelled grouped/split-K {pl.modelled_imbalance:.2f}"
        if pl.modelled_us is not None:
            ratio += f", modelled µs grouped {pl.modelled_us[0]:.1f} split-K {pl.modelled_us[1]:.1f}"
        # The rows that follow belong to this line (bench/fit_decode_model.py reads them so): the lengths in request
        # order, as the planner saw them (each context with the step's token).
        print(f"[plan] {label}, {name}: {pl.splits} splits x {pl.groups} groups, chunk {pl.chunk}{ratio}; "
              f"lengths {list(lengths)}", flush=True)
        build_views[name] = views
        if not static and views[0].scales is sets[0][0].scales:  # other scales: other values, not comparable
            first_views[name] = views[0]
        default_launches = [lambda c=c, q=q, o=o: c.decode(0, q, o) for c, (_, q, o) in zip(views, sets)]
        entries.append((name, default_launches, nbytes))
        if plan_ab:  # same caches, the one-group split-K plan (what small batches ran before grouped CTAs)
            add_planned(f"{name} split-K plan", views, sets, nbytes, first_views, entries,
                        lambda w, src: split_k_plan(w, np.asarray(lengths, dtype=np.int64)))
            if views[0].decode_plan.groups == 1 and views[0].decode_plan.modelled_imbalance is not None:
                # the skew test chose split-K: the grouped plan it turned down
                add_planned(f"{name} grouped plan", views, sets, nbytes, first_views, entries,
                            lambda w, src: plan_decode(w, skew_test=False))
            if views[0].decode_plan.chunk == 0:  # a device-cut plan: the same plan with the host's chunk instead
                def with_host_chunk(w, src):
                    pl, longest = src.decode_plan, int(src.host_lengths[: len(lengths)].max()) + 1
                    return DecodePlan(w, host_chunk(longest, pl.splits, pl.groups), pl.splits, pl.batch, pl.groups,
                                      pl.programmatic)
                add_planned(f"{name} host chunk", views, sets, nbytes, first_views, entries, with_host_chunk)
        for n in fixed_splits:  # same caches, plan_decode(splits=n) instead of the planner's own choice
            add_planned(f"{name} {n} splits", views, sets, nbytes, first_views, entries,
                        lambda w, src, n=n: plan_decode(w, splits=n))
        if page_order_ab and v is variant and spec.cache.page_size is not None:
            # Same blocks, but each request's pages in ascending, contiguous order (a fresh allocator's layout)
            # instead of a random permutation: how much the DRAM locality of the page order costs. The data
            # read differs, so this entry is not checked against the others.
            pages = in_order_pages(pages_needed(lengths, spec.cache.page_size))
            in_order = []
            for c, _, _ in sets:
                w = type(c).wrap(v, c.blocks, c.scales, c.lookup_table.clone(), c.cache_lengths, num_layers=1)
                w.set_pages(pages)
                w.begin_step([1] * len(lengths))
                w.plan_decode()
                in_order.append(w)
                in_order_luts.append(w.lookup_table)
            entries.append((f"{name} pages in order", [lambda c=c, q=q, o=o: c.decode(0, q, o)
                                                       for c, (_, q, o) in zip(in_order, sets)], nbytes))
        if pdl_ab:  # same caches: every kernel launched plainly; and PDL with early cache reads
            plain = [w.copy() for w in views]
            for w in plain:
                w.programmatic_launch = False
            entries.append((f"{name} without PDL", [lambda c=c, q=q, o=o: c.decode(0, q, o)
                                                    for c, (_, q, o) in zip(plain, sets)], nbytes))
            entries.append((f"{name} early reads", [lambda c=c, q=q, o=o: c.decode(0, q, o, early_cache_reads=True)
                                                    for c, (_, q, o) in zip(views, sets)], nbytes))
            # This build's default entry again, last: the spread between the two is the round-robin position's bias.
            entries.append((f"{name} (again)", default_launches, nbytes))
    check = None
    if with_peers:
        peer_bytes = decode_bytes(spec, lengths, with_scales=False)  # the peers read no scales
        kv_dtype = sets[0][0].blocks.dtype
        # With a static-scales build XQA gets the same per-tensor scales, so both compute the same attention.
        xqa_scales = STATIC_SCALES if static_views is not None else (None, None)
        xqa = None
        lens_t = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        for pname, make in (
            ("flashinfer decode (cuda cores)", lambda c, q, lens: peers.make_flashinfer_decode(
                q, c.blocks[:, :, 0], c.lookup_table[: len(lens)], lens, c.page_size, HQ, H, D, False, kv_dtype)),
            ("flashinfer decode (tensor cores)", lambda c, q, lens: peers.make_flashinfer_decode(
                q, c.blocks[:, :, 0], c.lookup_table[: len(lens)], lens, c.page_size, HQ, H, D, True, kv_dtype)),
            ("flashinfer xqa", lambda c, q, lens: peers.make_flashinfer_xqa_decode(
                q, c.blocks[:, :, 0], c.lookup_table[: len(lens)], lens, k_scale=xqa_scales[0], v_scale=xqa_scales[1])),
            ("vllm unified_attention", lambda c, q, lens: peers.make_vllm_unified_attention(
                q, c.blocks[:, :, 0], c.lookup_table[: len(lens)], lens, kv_cache_dtype="fp8" if fp8 else "auto",
                k_scale=1.0, v_scale=1.0)),
        ):
            try:
                fns = [make(c, q, lens_t) for c, q, _ in sets]
                entries.append((pname, fns, peer_bytes))
                if pname == "flashinfer xqa" and in_order_luts:  # the best peer on the pages in order as well
                    entries.append((f"{pname} pages in order", [
                        peers.make_flashinfer_xqa_decode(q, c.blocks[:, :, 0], lut[: len(lengths)], lens_t)
                        for (c, q, _), lut in zip(sets, in_order_luts)], peer_bytes))
                if pname.endswith("(tensor cores)") and not fp8:
                    check = fns[0]
                if pname == "flashinfer xqa":
                    xqa = fns[0]
            except Exception as e:  # noqa: BLE001 - a failing peer is reported, the run goes on
                msg = str(e)  # the cause of a JIT build failure is at the end of ninja's output
                print(f"  {pname} failed on {label}: {type(e).__name__}: {msg[:200]} ... {msg[-1200:] if len(msg) > 200 else ''}")
    if with_store:
        entries += layer_step_entries(build_views, sets, lengths, spec, with_peers, static_views is not None)
    times = graph_times([e[1] for e in entries])
    if len(first_views) > 1:
        check_builds_agree(first_views, sets[0][1], label)
    if check is not None and hasattr(check, "out"):  # same data, same answer: kvgen against FlashInfer
        c, q, o = sets[0]
        c.decode(0, q, o)
        check()
        torch.cuda.synchronize()
        print(f"  {label}: max |kvgen - flashinfer| = {(o.float() - check.out.float()).abs().max().item():.3e}")
    if static_views is not None and xqa is not None and hasattr(xqa, "out"):  # same data and scales as XQA
        q, o = sets[0][1], sets[0][2]
        static_views[0].decode(0, q, o)
        xqa()
        torch.cuda.synchronize()
        err = ((o.float() - xqa.out.float()).norm() / xqa.out.float().norm()).item()
        print(f"  {label}: kvgen static scales against XQA (same scales): relative L2 difference {err:.3e}")
    del sets
    torch.cuda.empty_cache()
    return [(label, name, t * 1e6, b / t / 1e12, b / t / copy_bw) for (name, _, b), t in zip(entries, times)]


def layer_step_entries(build_views: dict, sets: list, lengths: list[int], spec, with_peers: bool,
                       static_build: bool) -> list[tuple]:
    """--with-store: one layer of a decode step as an engine runs it, the step's K/V token stored, then attention over
    the context that ends with it. kvgen: store then decode, PDL-chained (plain, and with early cache reads, which
    are safe after kvgen's store); peers: vLLM's reshape_and_cache_flash (on its slot mapping) or FlashInfer's
    append, then XQA. The bytes are the decode's plus the store's (bf16 K/V read, cache rows written)."""
    B, es = len(lengths), 1 if spec.cache.dtype.startswith("float8") else 2
    new_kv = [tuple(torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)) for _ in sets]
    out = []
    for name, views in build_views.items():
        vspec = views[0].spec
        step_bytes = decode_bytes(vspec, lengths) + B * H * D * 2 * (2 + es)
        for tag, early in (("", False), (" (early reads)", True)):
            out.append((f"{name} store + decode{tag}", [
                lambda c=c, q=q, o=o, kv=kv, early=early: (c.store(0, *kv), c.decode(0, q, o, early_cache_reads=early))
                for c, (_, q, o), kv in zip(views, sets, new_kv)], step_bytes))
    if not with_peers:
        return out
    fp8 = es == 1
    scales = STATIC_SCALES if static_build else (1.0, 1.0)  # vLLM and XQA: per-tensor scales
    peer_bytes = decode_bytes(spec, lengths, with_scales=False) + B * H * D * 2 * (2 + es)
    lens_t = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    xqa = [peers.make_flashinfer_xqa_decode(q, c.blocks[:, :, 0], c.lookup_table[:B], lens_t, k_scale=scales[0],
                                            v_scale=scales[1]) for c, q, _ in sets]
    p = spec.cache.page_size
    slots = [torch.tensor([int(c.host_lut[b, (n - 1) // p]) * p + (n - 1) % p for b, n in enumerate(lengths)],
                          dtype=torch.int64, device="cuda") for c, _, _ in sets]
    try:
        vl = [peers.make_vllm_reshape_and_cache(k, v, c.blocks[:, 0, 0], c.blocks[:, 1, 0], sl, "fp8" if fp8 else "auto",
                                                torch.full((1,), scales[0], device="cuda"),
                                                torch.full((1,), scales[1], device="cuda"))
              for (c, _, _), (k, v), sl in zip(sets, new_kv, slots)]
        out.append(("vllm reshape_and_cache_flash + flashinfer xqa",
                    [lambda a=a, b=b: (a(), b()) for a, b in zip(vl, xqa)], peer_bytes))
    except Exception as e:  # noqa: BLE001 - a failing peer is reported, the run goes on
        print(f"  vllm store unavailable: {type(e).__name__}: {str(e)[:200]}")
    try:
        cast = (lambda x: x.to(sets[0][0].blocks.dtype)) if fp8 else (lambda x: x)  # FlashInfer appends cache-dtype rows
        fi = [peers.make_flashinfer_append(cast(k), cast(v), c.blocks[:, :, 0], c.lookup_table[:B], c.cache_lengths[:B],
                                           [1] * B) for (c, _, _), (k, v) in zip(sets, new_kv)]
        out.append(("flashinfer append + xqa", [lambda a=a, b=b: (a(), b()) for a, b in zip(fi, xqa)], peer_bytes))
        # FlashInfer's tensor-core decode: the fastest bf16 peer at 16-token pages in the decode-only tables
        tc = [peers.make_flashinfer_decode(q, c.blocks[:, :, 0], c.lookup_table[:B], lens_t, p, HQ, H, D, True,
                                           c.blocks.dtype, k_scale=scales[0], v_scale=scales[1]) for c, q, _ in sets]
        out.append(("flashinfer append + decode (tensor cores)", [lambda a=a, b=b: (a(), b()) for a, b in zip(fi, tc)],
                    peer_bytes))
    except Exception as e:  # noqa: BLE001
        print(f"  flashinfer append / decode unavailable: {type(e).__name__}: {str(e)[:200]}")
    return out


def build_scales(variant, default_scales: torch.Tensor) -> torch.Tensor:
    """The scales a build reads next to the default build's FP8 blocks: the default's own where the format is the
    same; else random ones of the build's dtype (e8m0: powers of two) and groups per row
    (kvgen.benchmark.fill_random_scales)."""
    qz = variant.spec().quantization
    if qz is None:  # 16-bit: no scales
        return default_scales
    groups = -(-D // qz.granularity)
    dtype = torch.uint8 if qz.scale_dtype == "float8_e8m0fnu" else torch.float32
    if default_scales.dtype == dtype and default_scales.shape[-1] == groups:
        return default_scales
    return fill_random_scales(torch.empty((*default_scales.shape[:-1], groups), dtype=dtype, device=default_scales.device))


def check_builds_agree(views: dict, q: torch.Tensor, label: str, tol: float = 2e-2) -> None:
    """Every kvgen build (other loader, other header knob) on the same cache and query gives the first build's
    output: a knob that computes garbage is reported as a MISMATCH (gpu-check.sh's `ab` probe refuses it)
    instead of being timed."""
    outs = {}
    for name, cache in views.items():
        outs[name] = torch.full_like(q, float("nan"))
        cache.decode(0, q, outs[name])
    torch.cuda.synchronize()
    base_name, base = next(iter(outs.items()))
    for name, out in list(outs.items())[1:]:
        diff = (out.float() - base.float()).abs().max().item()
        bad = not math.isfinite(diff) or diff > tol
        print(f"  {label}: max |{name} - {base_name}| = {diff:.3e}" + (" MISMATCH" if bad else ""))


def row_line(r: tuple, copy_bw: float) -> str:
    tag, page, label, name, us, tbs = r[:6]
    return f"| {tag} | {page} | {label} | {name} | {us:.1f} | {tbs:.3f} | {100 * tbs * 1e12 / copy_bw:.1f}% |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "decode_bench.md")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--variant", default="*", help="only variants whose name matches this glob")
    ap.add_argument("--pdl-ab", action="store_true", help="also time kvgen launched without PDL, and with PDL and early cache reads")
    ap.add_argument("--plan-ab", action="store_true",
                    help="also time kvgen with the one-group split-K plan (grouped CTAs are the default at small batch)")
    ap.add_argument("--splits", nargs="*", type=int, default=[], metavar="N",
                    help="also time kvgen with plan_decode(splits=N) on the same caches (against the planner's choice)")
    ap.add_argument("--loaders", nargs="+", default=["auto"], choices=["auto", "tma", "cp_async"],
                    help="time kvgen built with each K/V loader, on the same caches (one row each)")
    ap.add_argument("--defines", nargs="*", default=[], metavar="NAME=V[,NAME=V]",
                    help="also time kvgen (first loader) compiled with these -D knobs of decode.cuh, one build each")
    ap.add_argument("--tune", nargs="*", default=[], metavar="FIELD=N[,FIELD=N]",
                    help="also time kvgen (first loader) built with these attention fields (and granularity: quantization."
                         "granularity of the FP8 variants), e.g. stages=2,ctas_per_sm=5")
    ap.add_argument("--page-order-ab", action="store_true",
                    help="also time kvgen on the same blocks with each request's pages in ascending order (not permuted)")
    ap.add_argument("--with-store", action="store_true",
                    help="also time one layer of a decode step: the step's K/V stored, then decode (kvgen: store + "
                         "decode, with and without early reads; peers: vLLM's or FlashInfer's store, then XQA)")
    ap.add_argument("--e8m0-scales", action="store_true",
                    help="also time the FP8 variants built with e8m0 (power-of-two) per-token scales, on the same blocks")
    ap.add_argument("--group-scales", nargs="*", type=int, default=[], metavar="G",
                    help="also time the FP8 variants built with per-group scales of G elements, float32 and e8m0")
    ap.add_argument("--static-scales", action="store_true",
                    help="also time the FP8 variants built with per-tensor static scales (cache.static_scales) on the same "
                         "blocks, and give XQA the same scales")
    ap.add_argument("--shapes", nargs="*", default=None, metavar="BxC",
                    help="only these batch x context shapes, e.g. 16x1024 128x4096; 'skewed' adds the issue's skewed batch "
                         "(64 x log-normal, mean 4096) and 'skewedBxM' a log-normal batch of B requests with mean M")
    ap.add_argument("--lengths", nargs="*", default=[], metavar="L1,L2,...",
                    help="also time these batches of exact context lengths (one case each), e.g. 1,15,16,17,700,2053,64,129")
    ap.add_argument("--seed", type=int, default=0, help="the random lengths, pages and data (another seed: other skewed batches)")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                    help="the variants to time, all of one attention shape (Hq, H, D), e.g. configs/bench_small_pages.yaml")
    args = ap.parse_args()
    global CONFIG, HQ, H, D
    CONFIG = args.config.resolve()
    shapes_in = {(v.spec.attention.num_q_heads, v.spec.cache.num_kv_heads, v.spec.cache.head_size)
                 for v in load_config(CONFIG).variants}
    if len(shapes_in) != 1:
        raise SystemExit(f"{CONFIG}: the variants must share one (num_q_heads, num_kv_heads, head_size), got {shapes_in}")
    (HQ, H, D), = shapes_in
    rng = np.random.default_rng(args.seed)
    mods = {loader: load_generated(loader) for loader in args.loaders}
    for i, text in enumerate(args.defines):
        mods[text] = load_generated(args.loaders[0], tuple(text.split(",")), tag=f"-d{i}")
    for i, text in enumerate(args.tune):
        fields = {k: int(v) for k, v in (item.split("=") for item in text.split(","))}
        mods[text] = load_generated(args.loaders[0], tag=f"-t{i}", attention=fields)
    if args.static_scales:
        mods["static scales"] = load_generated(args.loaders[0], tag="-ss", scales="static")
    if args.e8m0_scales:
        mods["e8m0 scales"] = load_generated(args.loaders[0], tag="-e8", scales="e8m0")
    for g in args.group_scales:  # per-group scales, float32 and e8m0
        mods[f"f32 g{g}"] = load_generated(args.loaders[0], tag=f"-g{g}", attention={"granularity": g})
        mods[f"e8m0 g{g}"] = load_generated(args.loaders[0], tag=f"-e8g{g}", attention={"granularity": g}, scales="e8m0")
    mod = mods[args.loaders[0]]
    copy_bw = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    shapes = [(b, c) for b in (16, 64, 128) for c in (1024, 4096, 16384)]
    if args.quick:
        shapes = [(16, 1024), (64, 4096)]
    with_skewed = args.shapes is None or "skewed" in [t.lower() for t in args.shapes]
    skewed_shapes = [tuple(int(x) for x in t[len("skewed"):].lower().split("x")) for t in args.shapes or []
                     if t.lower().startswith("skewed") and t.lower() != "skewed"]
    if args.shapes is not None:
        shapes = [tuple(int(x) for x in text.lower().split("x")) for text in args.shapes
                  if not text.lower().startswith("skewed")]
    lines = [f"Decode benchmark, {gpu}, {datetime.date.today()}; copy_ bandwidth {copy_bw / 1e12:.3f} TB/s "
             f"(256 MiB, read+write). Hq={HQ}, H={H}, D={D}.", "",
             "| cache | page | batch x context | kernel | µs | TB/s | % of copy |", "|---|---|---|---|---|---|---|"]
    results: list[tuple] = []
    for i, variant in enumerate(mod.VARIANTS.values()):
        if not fnmatch.fnmatch(variant.NAME, args.variant):
            continue
        by_loader = {loader: list(m.VARIANTS.values())[i] for loader, m in mods.items()}  # same grid order
        # --static-scales leaves the bf16 variants as they are: no second build of those
        by_loader = {k: v for k, v in by_loader.items() if k != "static scales" or v.spec().cache.static_scales}
        # --e8m0-scales and --group-scales rebuild only the quantized (FP8) variants: a bf16 row labelled "f32 g64"
        # was the bf16 kernel again (session 15, run 10)
        scale_builds = {"e8m0 scales"} | {f"{f} g{g}" for g in args.group_scales for f in ("f32", "e8m0")}
        by_loader = {k: v for k, v in by_loader.items() if k not in scale_builds or v.spec().quantization is not None}
        spec = variant.spec()
        tag = spec.cache.dtype + (" (scale per token+head)" if spec.quantization else "")
        cases = [(f"{b} x {c}", [c] * b) for b, c in shapes]
        skew = skewed_lengths(rng)
        if with_skewed:
            cases.append((f"64 x lognormal(mean {int(np.mean(skew))}, max {max(skew)})", skew))
        for text in args.lengths:
            lengths = [int(x) for x in text.split(",")]
            cases.append((f"{len(lengths)} x [{text}]", lengths))
        for b, mean in skewed_shapes:
            lengths = skewed_lengths(rng, b, mean)
            cases.append((f"{b} x lognormal(mean {int(np.mean(lengths))}, max {max(lengths)})", lengths))
        for label, lengths in cases:
            try:
                for r in run_shape(by_loader, lengths, rng, copy_bw, label, not args.no_peers, args.pdl_ab, args.plan_ab,
                                   tuple(args.splits), args.page_order_ab, args.with_store):
                    results.append((tag, spec.cache.page_size, *r))
                    print(row_line(results[-1], copy_bw), flush=True)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
            args.out.write_text("\n".join(lines + [row_line(r, copy_bw) for r in results]) + "\n")  # if cut short
    last_bw = copy_bandwidth()
    best = max(copy_bw, last_bw)
    lines[0] = (f"Decode benchmark, {gpu}, {datetime.date.today()}; copy_ bandwidth {best / 1e12:.3f} TB/s (256 MiB, "
                f"read+write; best of {copy_bw / 1e12:.3f} before and {last_bw / 1e12:.3f} after). Hq={HQ}, H={H}, D={D}.")
    lines += [row_line(r, best) for r in results]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
