"""Decode attention against a float64 reference on the dequantized cache (GPU)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from kvgen import reference as ref
from kvgen.benchmark import permuted_pages
from kvgen.build import build, import_package
from kvgen.derive import kernel_symbol
from kvgen.errors import LaunchError
from kvgen.grid import load_config
from kvgen.nvrtc import compile_ptx
from kvgen.render import render_source
from kvgen.runtime import driver
from kvgen.runtime.abi import DECODE_EARLY_READS
from kvgen.runtime.decode_plan import DecodePlan

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible", allow_module_level=True)

from test_gpu_kernels import randomize_static_scales, seed_of, state_of, to_np, wrap_layer_tensors  # noqa: E402  (same folder: reference state)

ROOT = Path(__file__).resolve().parents[2]
GRID = load_config(ROOT / "configs" / "gpu_decode.yaml")
NAMES = [v.name for v in GRID.variants]


@pytest.fixture(scope="session")
def gen(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("gen") / "gpu_decode"
    build(GRID, out=out, jobs=8)
    return import_package(out, "kvgen_gpu_decode")


def page_edges(p: int) -> list[int]:
    """Context lengths at a page's edges: 1, P - 1, P, P + 1 (a context holds at least the step's token, so
    P - 1 becomes 2 for pages of 1 token, where 1 and P already coincide)."""
    return [1, p - 1 if p > 1 else 2, p, p + 1]


def setup_cache(v, lengths: list[int], rng: np.random.Generator, v_mult: float = 1.0, check_store: bool = False):
    """A cache holding `lengths[b]` random tokens per request on permuted pages, canaries everywhere else; V is
    standard normal times v_mult. cache_length(b) is lengths[b] - 1: the decode covers cache_length + 1 tokens.
    check_store: also assert that the cache holds the stored rows (assert_rows_hold_the_stored)."""
    spec = v.spec()
    c = spec.cache
    B = len(lengths)
    if c.kind == "paged":
        p = c.page_size
        need = [(n + p - 1) // p for n in lengths]
        cache = v.cache(max_batch=B, num_pages=sum(need) + 2, max_pages_per_request=max(need) + 1, num_layers=2,
                        max_tokens=sum(lengths))
        cache.set_pages(permuted_pages(need, rng))
    else:
        cache = v.cache(max_batch=B, num_slots=B + 1, tokens_per_slot=max(lengths) + 3, num_layers=2,
                        max_tokens=sum(lengths))
        cache.set_slots([int(x) for x in rng.permutation(B + 1)[:B]])
    if cache.dtype.startswith("float8"):
        cache.blocks.view(torch.uint8).fill_(0x7F if cache.dtype == "float8_e4m3fn" else 0x7C)  # NaN / inf bytes
    else:
        cache.blocks.fill_(float("inf"))
    io = getattr(torch, c.io_dtype)
    H, D = c.num_kv_heads, c.head_size
    T = sum(lengths)
    k = (torch.randn(T, H, D, device="cuda") * 2).to(io)
    vv = (torch.randn(T, H, D, device="cuda") * v_mult).to(io)
    randomize_static_scales(cache, rng)
    cache.set_cache_lengths([0] * B)
    cache.begin_step(lengths)
    for layer in range(2):
        cache.store(layer, k, vv)
    cache.end_step()
    ko, vo = cached_rows(cache, spec, lengths, layer=1)
    if check_store:
        assert_rows_hold_the_stored(ko, k.double().cpu(), spec, "K")
        assert_rows_hold_the_stored(vo, vv.double().cpu(), spec, "V")
    cache.set_cache_lengths([n - 1 for n in lengths])
    cache.begin_step([1] * B)  # decode step: one token per request, already stored
    return cache, ko, vo


def cached_rows(cache, spec, lengths: list[int], layer: int):
    """The reference's K and V of `layer`: exactly what the cache holds in the first lengths[b] positions,
    dequantized in float32 by the NumPy oracle from the raw cache bytes and scales (no rounding to the 16-bit input
    dtype on the way), as float64 [sum(lengths), H, D]."""
    return oracle_rows(state_of(cache, spec), spec, lengths, layer)


def oracle_rows(state, spec, lengths: list[int], layer: int):
    """The NumPy oracle's K and V of `layer` from a reference CacheState: each request's first lengths[b] rows,
    dequantized in float32, as float64 torch tensors [sum(lengths), H, D]."""
    qz = spec.quantization
    ko, vo = ref.load(state, layer, np.cumsum([0, *lengths]), np.zeros(len(lengths), np.int64),
                      qz.granularity if qz else None, qz.scale_dtype if qz else None)
    return torch.from_numpy(ko).double(), torch.from_numpy(vo).double()


def reference(q, k, v, lengths, group, scale, window=None, cap=None, sinks=None):
    B, Hq, D = q.shape
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    lse = torch.zeros(B, Hq, dtype=torch.float64)
    at = 0
    for b, n in enumerate(lengths):
        kb, vb = k[at:at + n], v[at:at + n]
        at += n
        start = max(0, n - window) if window else 0
        for hq in range(Hq):
            h = hq // group
            s = (kb[start:, h] @ q[b, hq]) * scale
            if cap:
                s = cap * torch.tanh(s / cap)
            m = s.max()
            if sinks is not None:
                m = torch.maximum(m, sinks[hq])
            w = torch.exp(s - m)
            denom = w.sum() + (torch.exp(sinks[hq] - m) if sinks is not None else 0)
            out[b, hq] = (w[:, None] * vb[start:, h]).sum(0) / denom
            lse[b, hq] = m + torch.log(denom)
    return out, lse


def check(out, ref, name: str, fp8: bool) -> None:
    o = out.double().cpu()
    assert torch.isfinite(o).all(), f"{name}: NaN/inf in output (canary or masking bug)"
    rel = (o - ref).norm() / ref.norm()
    cos = torch.nn.functional.cosine_similarity(o.flatten(), ref.flatten(), dim=0)
    print(f"\n[decode] {name}: rel err {rel:.2e}, cos {cos:.6f}, max abs {float((o - ref).abs().max()):.2e}")
    assert cos >= 0.9995
    assert rel <= 5e-3, rel


def check_splits_holding_rows(plan, request: int, context: int) -> None:
    """Exactly the splits (CTAs) of `request` that the cut gives rows wrote a finite partial LSE (the workspace
    was NaN-poisoned; empty splits write -inf). The context is cut into splits x groups parts of whole 64-row
    tiles: the device's cut (chunk 0) or the host's chunk, so with many parts the last CTAs may get none."""
    parts = plan.splits * plan.groups
    chunk = plan.chunk or -(-context // (parts * 64)) * 64
    want = torch.tensor([i * plan.groups * chunk < context for i in range(plan.splits)])
    got = torch.isfinite(plan.part_lse[request]).all(dim=0).cpu()
    assert want[0] and torch.equal(got, want), f"splits holding rows: {got.tolist()}, expected {want.tolist()}"


# Besides the planner's own plan (grouped CTAs at this batch size): a single split, where the decode kernel writes
# the final output itself (no combine launch); one grouped CTA per (request, KV head), every warp group the SM
# holds, also writing the final output; and a fixed split count of one-group CTAs (plan_decode(splits=3), 16-bit
# kernels cut each request on the device).
# Cover the feature variant (window, soft cap, sinks, f16 output), a plain bf16 one and an FP8 one, both loaders.
SINGLE = {n for n in NAMES if ("h2_d128_p16_s128b" in n or "p16_qf32g128" in n) and ("_bf16_" in n or "_e4m3_" in n)} | \
    {v.name for v in GRID.variants if v.spec.attention.sinks}
CASES = [(n, "plan") for n in NAMES] + [(n, e) for e in ("single_split", "grouped_single", "fixed_splits")
                                        for n in NAMES if n in SINGLE]


@pytest.mark.parametrize(("name", "ending"), CASES, ids=[n if e == "plan" else f"{n}-{e}" for n, e in CASES])
def test_decode_matches_float64(gen, name: str, ending: str) -> None:
    decode_matches_float64(gen, name, ending)


def decode_matches_float64(gen, name: str, ending: str):
    """Store edge-length and long requests on permuted pages, check the cache holds what was stored, decode them with
    `ending`'s plan (see CASES) into NaN-poisoned outputs over a NaN-poisoned workspace, and compare output and LSE
    with the float64 reference on what the cache holds. Returns the cache."""
    rng = np.random.default_rng(seed_of(name))
    torch.manual_seed(seed_of(name))  # Q, K and V are torch draws: the same case draws the same data in any run
    v = gen.VARIANTS[name]
    spec = v.spec()
    p = spec.cache.page_size or 64
    lengths = [*page_edges(p), 700, 2053, 64, 129]
    cache, k, vv = setup_cache(v, lengths, rng, check_store=True)
    att = spec.attention
    group = att.num_q_heads // spec.cache.num_kv_heads
    q = torch.randn(len(lengths), att.num_q_heads, spec.cache.head_size, device="cuda").to(getattr(torch, spec.cache.io_dtype))
    out = torch.full((len(lengths), att.num_q_heads, spec.cache.head_size), float("nan"), device="cuda",
                     dtype=getattr(torch, att.output_dtype))
    lse = torch.full((len(lengths), att.num_q_heads), float("nan"), device="cuda")
    kw, window, cap, sinks = {}, None, None, None
    if att.sliding_window:
        window = kw["window"] = 300
    if att.logits_soft_cap:
        cap = kw["soft_cap"] = 5.0
    if att.sinks:
        sinks = kw["sinks"] = torch.randn(att.num_q_heads, device="cuda")
    scale = spec.cache.head_size ** -0.5
    plan = cache.plan_decode(window=window, splits=3 if ending == "fixed_splits" else None)
    if ending == "single_split":
        plan = cache.decode_plan = DecodePlan(cache, -(-max(lengths) // 64) * 64, 1, len(lengths))
    if ending == "grouped_single":
        geo = cache._decode_geo
        chunk = 0 if geo.balanced else -(-max(lengths) // (geo.max_groups * 64)) * 64
        plan = cache.decode_plan = DecodePlan(cache, chunk, 1, len(lengths), groups=geo.max_groups)
    elif ending == "plan" and cache._decode_geo.max_groups > 1:
        # A batch this small (at most 32 pairs) gets CTAs of every warp group the SM holds, or split-K where its skew
        # (2053 rows against a median of 66) has the time model find split-K faster. Which variants take which plan
        # is pinned on the CPU (tests/test_decode_plan.py: test_gpu_decode_grid_runs_both_plans); both must decode
        # right here.
        assert plan.groups in (1, cache._decode_geo.max_groups), plan.groups
    plan.part_o.fill_(float("nan"))  # poison the workspace: unwritten partials must never be read
    plan.part_lse.fill_(float("nan"))
    cache.decode(1, q, out, lse=lse, **kw)
    torch.cuda.synchronize()
    if ending == "fixed_splits":  # the longest request (2053 rows, or the window)
        check_splits_holding_rows(plan, lengths.index(2053), min(2053, window or 2053))
    ref, ref_lse = reference(q.double().cpu(), k, vv, lengths, group, scale, window, cap,
                             sinks.double().cpu() if sinks is not None else None)
    check(out, ref, name, spec.cache.dtype.startswith("float8"))
    # FP8 tolerances: scores use f16 MMA inputs (per-token scales, and per-group scales of 2-4 groups) or
    # bf16-rounded dequantized values (more than 4 groups), about 2^-9 relative per product. On these inputs that
    # is a score (and a one-token LSE) error of about 3.5e-3 at one standard deviation for the bf16 path, whose
    # largest of 64 LSEs reached 1.1e-2 (H200, session 17, another Q draw); the f16 path's stayed below 6e-3.
    fp8 = spec.cache.dtype.startswith("float8")
    bf16_scores = fp8 and spec.quantization is not None and spec.cache.head_size // spec.quantization.granularity > 4
    atol = 3e-2 if bf16_scores else 1e-2 if fp8 else 2e-3
    torch.testing.assert_close(lse.double().cpu(), ref_lse, rtol=2e-3 if fp8 else 1e-3, atol=atol)
    assert cache.errors() == []
    return cache


# The sm_80 (A100) and sm_89 (L4, L40S) code paths, run on this GPU: each variant's source for the arch compiled to
# PTX (compute_80 / compute_89), which the driver compiles for the GPU at hand, so what `__CUDA_ARCH__ < 900`
# selects (cp.async only, no programmatic launches, no griddepcontrol; FP8 conversions emulated below sm_89) runs
# for real; an sm_80 cubin would not load on sm_90. The cache is told its GPU is that arch (pipelines and grouped CTAs
# sized for its shared memory, plain launches), with this GPU's SM count. bf16 and FP8 (per
# token, MAX's per-64, e5m2 at head size 64), GQA groups 4-16, window + soft cap + sinks with f16 output.
SM80_KINDS = {("bfloat16", None, 128, 4, False), ("bfloat16", None, 128, 8, True), ("float8_e4m3fn", 128, 128, 4, False),
              ("float8_e4m3fn", 64, 128, 4, False), ("float8_e4m3fn", 64, 256, 16, True), ("float8_e5m2", None, 64, 16, False)}


def _sm80_kind(v) -> tuple:
    s = v.spec
    return (s.cache.dtype, s.quantization.granularity if s.quantization else None, s.cache.head_size,
            s.attention.num_q_heads // s.cache.num_kv_heads, bool(s.attention.sinks))


SM80 = list({_sm80_kind(v): v.name for v in reversed(GRID.variants) if "_ldcpa_" in v.name and v.spec.cache.page_size == 16
             and not v.spec.cache.static_scales and _sm80_kind(v) in SM80_KINDS}.values())


@pytest.mark.parametrize("arch", ["sm_80", "sm_89"])  # A100; L4 / L40S (hardware FP8 conversions, 99 KB per CTA)
@pytest.mark.parametrize("name", SM80)
def test_sm80_code_path_stores_and_decodes_on_this_gpu(gen, name: str, arch: str, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    variant = next(x for x in GRID.variants if x.name == name)
    v = gen.VARIANTS[name]
    ptx = tmp_path / f"kernels_{arch}.ptx"
    ptx.write_bytes(compile_ptx(render_source(variant, arch), arch))
    monkeypatch.setattr(driver, "device_arch", lambda device: arch)
    monkeypatch.setitem(v.CUBINS, arch, ptx)
    monkeypatch.setitem(v.KERNELS, arch, {k: kernel_symbol(variant, k) for k in variant.spec.kernels_for_arch(arch)})
    cache = decode_matches_float64(gen, name, "plan")
    assert cache._arch == arch and not cache._programmatic  # plain launches, as on an A100 or an L40S
    text = ptx.read_bytes()
    assert b"griddepcontrol" not in text and b"cp.async." in text and b"cp.async.bulk" not in text


def assert_graph_replay_matches_eager(cache, q, out) -> None:
    """Layer 1's decode captured in a CUDA graph and replayed into a NaN-poisoned `out` gives the eager bits."""
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        cache.decode(1, q, out)
    eager = out.clone()
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager), "graph replay differs from the eager launch"


@pytest.mark.parametrize("name", [n for n in NAMES if "_ss_" in n and "p64" in n])
def test_static_scales_change_under_a_captured_graph(gen, name: str) -> None:
    """Static scales are device values: a decode captured once reads the scales current at each replay (no
    recapture), and each replay matches float64 on the cache dequantized with those scales."""
    rng = np.random.default_rng(13)
    v = gen.VARIANTS[name]
    spec = v.spec()
    lengths = [1, 63, 64, 65, 700, 1500]
    cache, _, _ = setup_cache(v, lengths, rng)
    att, H = spec.attention, spec.cache.num_kv_heads
    q = torch.randn(len(lengths), att.num_q_heads, spec.cache.head_size, device="cuda").to(getattr(torch, spec.cache.io_dtype))
    out = torch.empty(len(lengths), att.num_q_heads, spec.cache.head_size, device="cuda", dtype=getattr(torch, att.output_dtype))
    cache.plan_decode()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        cache.decode(1, q, out)
    for i in range(3):
        if i:  # new per-head values, outside the graph
            cache.set_static_scales(1, rng.uniform(0.005, 0.2, H), rng.uniform(0.005, 0.2, H))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ko, vo = cached_rows(cache, spec, lengths, layer=1)
        want, _ = reference(q.double().cpu(), ko, vo, lengths, att.num_q_heads // H, spec.cache.head_size ** -0.5)
        check(out, want, f"{name} replay {i}", True)


def test_decode_large_batch_skewed_and_graph(gen) -> None:
    """Batch 256 with log-normal lengths, split-K plan, captured in a CUDA graph and replayed."""
    rng = np.random.default_rng(3)
    name = next(n for n in NAMES if n.startswith("gdec_paged_bf16_h2_d128_p16"))
    v = gen.VARIANTS[name]
    lengths = [int(x) for x in np.clip(rng.lognormal(6.0, 1.0, 256), 1, 6000)]
    cache, k, vv = setup_cache(v, lengths, rng)
    q = torch.randn(256, 8, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(256, 8, 128, device="cuda", dtype=torch.bfloat16)
    cache.plan_decode()
    cache.decode(1, q, out)
    torch.cuda.synchronize()
    ref, _ = reference(q.double().cpu(), k, vv, lengths, 4, 128 ** -0.5)
    check(out, ref, "batch256-skewed", False)
    assert_graph_replay_matches_eager(cache, q, out)


@pytest.mark.parametrize("name", [v.name for v in GRID.variants if v.name.startswith("gdec_paged_e4m3_h2_d128_p16_s128b_")
                                  and v.spec.attention.num_q_heads == 8 and v.spec.attention.ctas_per_sm is None])
def test_decode_two_group_ctas_between_one_and_two_pairs_per_sm(gen, name: str) -> None:
    """More (request, KV head) pairs than SMs but at most two per SM: CTAs of 2 warp groups, one per pair, one
    split, no combine (decode_plan.grouped_groups), against float64, then in a CUDA graph. The grouped plan is
    taken whatever the skew test says (for these lengths its modelled time is within 2% of split-K's; which plan
    runs is tests/test_decode_plan.py's matter)."""
    from kvgen.derive import decode_geometry
    from kvgen.runtime.decode_plan import grouped_groups, plan_decode

    rng = np.random.default_rng(11)
    v = gen.VARIANTS[name]
    spec = v.spec()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    max_groups = decode_geometry(spec, "sm_90a").max_groups
    assert max_groups == 4, "FP8 at 2 stages: four one-group CTAs per SM"
    batch = (sms + 1 + 2 * sms) // 2 // 2  # pairs (2 KV heads each) between sms and 2 x sms
    p = spec.cache.page_size
    lengths = page_edges(p) + [int(x) for x in rng.integers(1, 900, batch - 4)]
    cache, k, vv = setup_cache(v, lengths, rng)
    cache.plan_decode()
    plan = cache.decode_plan = plan_decode(cache, skew_test=False)
    assert sms < 2 * batch <= 2 * sms and grouped_groups(2 * batch, sms, max_groups) == 2
    assert (plan.groups, plan.splits) == (2, 1), (plan.groups, plan.splits)
    q = torch.randn(batch, 8, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.full((batch, 8, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
    cache.decode(1, q, out)
    torch.cuda.synchronize()
    ref, _ = reference(q.double().cpu(), k, vv, lengths, 4, 128 ** -0.5)
    check(out, ref, f"{name} two-group CTAs, batch {batch}", True)
    assert_graph_replay_matches_eager(cache, q, out)
    assert cache.errors() == []


@pytest.mark.parametrize("name", [v.name for v in GRID.variants if v.spec.attention.sliding_window])
def test_window_variant_without_a_window_is_full_attention(gen, name: str) -> None:
    """A variant generated with sliding_window (and soft cap), called without a window or a cap, attends to the
    whole context without capping (the kernel once received window 0 here and wrote zeros, then cap 1.0)."""
    rng = np.random.default_rng(9)
    v = gen.VARIANTS[name]
    spec = v.spec()
    lengths = [1, 17, 700, 2053]
    cache, k, vv = setup_cache(v, lengths, rng)
    att = spec.attention
    q = torch.randn(len(lengths), att.num_q_heads, spec.cache.head_size, device="cuda").to(getattr(torch, spec.cache.io_dtype))
    out = torch.full((len(lengths), att.num_q_heads, spec.cache.head_size), float("nan"), device="cuda",
                     dtype=getattr(torch, att.output_dtype))
    cache.plan_decode()
    cache.decode(1, q, out)
    torch.cuda.synchronize()
    ref, _ = reference(q.double().cpu(), k, vv, lengths, att.num_q_heads // spec.cache.num_kv_heads,
                       spec.cache.head_size ** -0.5)
    check(out, ref, name + " (no window)", spec.cache.dtype.startswith("float8"))
    with pytest.raises(LaunchError, match="positive"):
        cache.plan_decode(window=0)
    if att.logits_soft_cap:
        for bad in (0.0, -1.0, float("inf"), float("nan"), 1e39, True):  # 1e39: inf as the kernel's float32
            with pytest.raises(LaunchError, match="argument 'soft_cap': must be"):
                cache.decode(1, q, out, soft_cap=bad)


def test_graph_captured_once_serves_later_steps(gen) -> None:
    """A serving loop: one decode step (store the new token, then decode) is captured once and replayed over later
    steps with longer contexts and fresh plans, with an eager prefill chunk larger than the token map in between.
    A plan used to allocate its own workspace and a big step used to reallocate the token map, so replays wrote
    freed memory. Every replay must match the float64 reference; the addresses stay put until step 6 grows the
    workspace (the graph then writes the outgrown one, which the cache keeps alive). Plans fix
    3 splits (the captured grid; the kernel cuts each context into 3 parts from the lengths on the device, so the
    replays stay balanced after the prefill); step 5 lets the planner choose freely (another split count and
    chunk than the graph's: the replay keeps its own, still correct)."""
    rng = np.random.default_rng(11)
    v = gen.VARIANTS[next(n for n in NAMES if n.startswith("gdec_paged_bf16_h2_d128_p16"))]
    spec = v.spec()
    c, att = spec.cache, spec.attention
    H, D, Hq, group = c.num_kv_heads, c.head_size, att.num_q_heads, att.num_q_heads // c.num_kv_heads
    lengths = [1, 15, 16, 17, 100, 64]
    B, pages_per = len(lengths), 40
    cache = v.cache(max_batch=B, num_pages=B * pages_per + 1, max_pages_per_request=pages_per, num_layers=1,
                    max_tokens=16)
    cache.set_pages(permuted_pages([pages_per] * B, rng))
    cache.set_cache_lengths([0] * B)
    kept_k: list[list[torch.Tensor]] = [[] for _ in range(B)]
    kept_v: list[list[torch.Tensor]] = [[] for _ in range(B)]

    def store_step(new: list[int], k: torch.Tensor, vv: torch.Tensor) -> None:
        at = 0
        for b, n in enumerate(new):
            kept_k[b].append(k[at:at + n].double().cpu())
            kept_v[b].append(vv[at:at + n].double().cpu())
            at += n

    def expected(q: torch.Tensor) -> torch.Tensor:
        k = torch.cat([torch.cat(x) for x in kept_k])
        vv = torch.cat([torch.cat(x) for x in kept_v])
        return reference(q.double().cpu(), k, vv, [sum(len(t) for t in x) for x in kept_k], group, D ** -0.5)[0]

    k0, v0 = (torch.randn(sum(lengths), H, D, device="cuda").to(torch.bfloat16) for _ in range(2))
    cache.begin_step(lengths)
    cache.store(0, k0, v0)
    cache.end_step()
    store_step(lengths, k0, v0)
    k_new, v_new = (torch.empty(B, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q = torch.empty(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(B, Hq, D, device="cuda", dtype=torch.bfloat16)

    def new_inputs() -> None:
        for t in (k_new, v_new, q):
            t.copy_(torch.randn(t.shape, device="cuda").to(torch.bfloat16))

    def step() -> None:
        cache.store(0, k_new, v_new)
        cache.decode(0, q, out)

    # Step 1 eager (loads the modules), step 2 captured, then replays; before step 4 an eager 200-token prefill
    # chunk into the last request (more than the 16-token map holds: it goes through the CSR search).
    g = torch.cuda.CUDAGraph()
    addresses = None
    for i in range(1, 7):
        if i == 4:
            chunk = [0] * (B - 1) + [200]
            kp, vp = (torch.randn(200, H, D, device="cuda").to(torch.bfloat16) for _ in range(2))
            cache.begin_step(chunk)
            cache.store(0, kp, vp)
            cache.end_step()
            store_step(chunk, kp, vp)
        new_inputs()
        cache.begin_step([1] * B)
        if i == 6:  # a plan that needs more room grows the workspace; the graph keeps writing the old one
            outgrown = cache.decode_workspace(0)
            cache.decode_workspace(2 * outgrown.pairs + 1)
            assert any(ws is outgrown for ws in cache._retired_ws)
            del outgrown
            torch.cuda.empty_cache()  # were it freed, its memory would now go back to the driver
        plan = cache.plan_decode() if i == 5 else cache.plan_decode(splits=3)
        assert i == 5 or plan.chunk == 0
        now = (plan.part_o.data_ptr(), plan.part_lse.data_ptr(), cache._token_map.data_ptr())
        if i < 6:
            assert addresses is None or now == addresses, "the decode workspace or the token map moved"
            addresses = now
        else:
            assert now[:2] != addresses[:2] and now[2] == addresses[2]
        out.fill_(float("nan"))
        if i == 1:
            step()
        elif i == 2:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
                step()
            g.replay()
        else:
            g.replay()
        torch.cuda.synchronize()
        store_step([1] * B, k_new, v_new)
        check(out, expected(q), f"graph step {i} (plan chunk {plan.chunk}, {plan.splits} splits)", False)
        cache.end_step()
    assert cache.errors() == []


EARLY = [next(n for n in NAMES if n.startswith(prefix) and n.split("_")[-2] == loader)
         for prefix, loader in (("gdec_paged_bf16_h2_d128_p16_s128b", "ldcpa"), ("gdec_paged_bf16_h2_d128_p64", "ldtma"),
                                ("gdec_paged_e4m3_h2_d128_p16_qf32g128", "ldcpa"), ("gdec_paged_e5m2_h2_d128_p16", "ldtma"))]


@pytest.mark.parametrize("name", EARLY)
def test_store_then_decode_with_early_reads(gen, name: str) -> None:
    """The serving order with programmatic launches: per layer, the step's token is stored (right after a store of
    poison into the same rows), then decode(early_cache_reads=True) reads the cached rows before the store has
    finished. Were the step's own row (or Q) read before the store completed, the poison (K 40, V 1000) would
    show. Eager and captured in a CUDA graph (two replays with fresh inputs), against float64 on what the cache
    holds afterwards; plain and PDL launches must agree bit for bit."""
    rng = np.random.default_rng(21)
    v = gen.VARIANTS[name]
    spec = v.spec()
    c, att = spec.cache, spec.attention
    p = c.page_size
    lengths = [*page_edges(p), 700, 2053, 64, 129, 4000]
    cache, _, _ = setup_cache(v, lengths, rng)
    assert cache.programmatic_launch, "sm_90: store and decode launch as programmatic dependents"
    B, H, D, Hq = len(lengths), c.num_kv_heads, c.head_size, att.num_q_heads
    io = getattr(torch, c.io_dtype)
    poison_k, poison_v = torch.full((B, H, D), 40.0, device="cuda").to(io), torch.full((B, H, D), 1000.0, device="cuda").to(io)
    k_new, v_new = (torch.empty(B, H, D, device="cuda", dtype=io) for _ in range(2))
    q = torch.empty(2, B, Hq, D, device="cuda", dtype=io)
    out = torch.empty(2, B, Hq, D, device="cuda", dtype=getattr(torch, att.output_dtype))
    cache.plan_decode()

    def new_inputs() -> None:
        for t in (k_new, v_new, q):
            t.copy_(torch.randn(t.shape, device="cuda").to(io))
        out.fill_(float("nan"))

    def step() -> None:
        for layer in range(2):
            cache.store(layer, poison_k, poison_v)
            cache.store(layer, k_new, v_new)
            cache.decode(layer, q[layer], out[layer], early_cache_reads=True)

    def check_step(what: str) -> None:
        torch.cuda.synchronize()
        for layer in range(2):
            k, vv = cached_rows(cache, spec, lengths, layer)
            ref_o, _ = reference(q[layer].double().cpu(), k, vv, lengths, Hq // H, D ** -0.5)
            check(out[layer], ref_o, f"{name} early reads, {what}, layer {layer}", c.dtype.startswith("float8"))

    new_inputs()
    step()
    assert cache._dec_vals["flags"].value == DECODE_EARLY_READS, "the early-reads bit never reached the kernel"
    check_step("eager")
    early = out.clone()
    cache.programmatic_launch = False  # plain launches, same inputs: the same bits
    step()
    torch.cuda.synchronize()
    assert torch.equal(out, early), "plain launches differ from programmatic ones"
    cache.programmatic_launch = True
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        step()
    for i in range(2):
        new_inputs()
        g.replay()
        check_step(f"graph replay {i + 1}")
    assert cache.errors() == []


@pytest.mark.parametrize("prefix", ["gdec_paged_bf16_h2_d128_p16", "gdec_paged_e4m3_h2_d128_p16_qf32g128"])
def test_fixed_split_count(gen, prefix: str) -> None:
    """plan_decode(splits=S): a 16-bit kernel cuts every request's context into S equal parts on the device (chunk
    0), an FP8 one gets the chunk of the longest request; short requests leave some parts empty. Results match
    float64 for S from 1 to the workspace limit. Bad counts raise an error that names the rule."""
    rng = np.random.default_rng(5)
    v = gen.VARIANTS[next(n for n in NAMES if n.startswith(prefix))]
    fp8 = v.spec().cache.dtype.startswith("float8")
    lengths = [700, 5, 64, 1, 2053]
    cache, k, vv = setup_cache(v, lengths, rng)
    first_pairs = cache.decode_workspace(0).pairs
    for bad in (0, -1, 257, 2.0, True, "4"):
        with pytest.raises(LaunchError, match=r"argument 'splits': must be an int in \[1, 256\]"):
            cache.plan_decode(splits=bad)
    room = first_pairs // len(lengths) + 1  # one more split than the first workspace holds: it grows
    q = torch.randn(len(lengths), 8, 128, device="cuda", dtype=torch.bfloat16)
    ref, _ = reference(q.double().cpu(), k, vv, lengths, 4, 128 ** -0.5)
    for splits in (1, 3, 7, room):
        cache.decode_workspace(0).part_lse.fill_(float("nan"))
        plan = cache.plan_decode(splits=splits)
        # 5 requests x 2 KV heads x splits <= 132 SMs: grouped CTAs, each context cut among splits x groups.
        assert plan.groups == (cache._decode_geo.max_groups if len(lengths) * 2 * splits <= cache.sm_count() else 1)
        assert plan.splits == splits and plan.chunk == (-(-max(lengths) // (splits * plan.groups * 64)) * 64 if fp8 else 0)
        plan.part_o.fill_(float("nan"))
        out = torch.full_like(q, float("nan"))
        cache.decode(1, q, out)
        torch.cuda.synchronize()
        check(out, ref, f"{prefix} fixed {splits} splits", fp8)
        if splits in (3, 7):
            check_splits_holding_rows(plan, lengths.index(2053), 2053)
    assert cache.decode_workspace(0).pairs >= room * len(lengths) > first_pairs


@pytest.mark.parametrize("prefix", ["gdec_paged_bf16_h2_d128_p16", "gdec_paged_e4m3_h2_d128_p16_qf32g128"])
def test_a_nan_query_reaches_its_own_output_under_every_plan(gen, prefix: str) -> None:
    """A NaN in one query head (a model that diverged) makes that head's output and LSE NaN, whichever plan runs
    (grouped and unsplit, one split, split-K with a merge launch), and leaves every other head exact. The merge once
    read a NaN row sum as an empty CTA and wrote zeros, and the split merge dropped the split (session 18 review)."""
    rng = np.random.default_rng(13)
    v = gen.VARIANTS[next(n for n in NAMES if n.startswith(prefix))]
    fp8 = v.spec().cache.dtype.startswith("float8")
    lengths = [700, 2053, 64, 129]
    cache, k, vv = setup_cache(v, lengths, rng)
    q = torch.randn(len(lengths), 8, 128, device="cuda", dtype=torch.bfloat16)
    ref, _ = reference(q.double().cpu(), k, vv, lengths, 4, 128 ** -0.5)
    q[1, 2] = float("nan")  # request 1 (2053 rows: several splits under split-K), query head 2 (KV head 0)
    nan_row = torch.zeros(len(lengths), 8, dtype=torch.bool)
    nan_row[1, 2] = True
    plans = {"planned": lambda: cache.plan_decode(), "3 splits": lambda: cache.plan_decode(splits=3),
             "one split": lambda: setattr(cache, "decode_plan", DecodePlan(cache, -(-max(lengths) // 64) * 64, 1, len(lengths))),
             "split-K": lambda: setattr(cache, "decode_plan", DecodePlan(cache, 256, -(-max(lengths) // 256), len(lengths)))}
    for what, make in plans.items():
        make()
        out = torch.full_like(q, 7.0)
        lse = torch.full((len(lengths), 8), 7.0, device="cuda")
        cache.decode(1, q, out, lse=lse)
        torch.cuda.synchronize()
        assert torch.isnan(out[1, 2]).all() and torch.isnan(lse[1, 2]), f"{prefix} {what}: the NaN query gave {out[1, 2, :4]}, LSE {lse[1, 2]}"
        others = out.float().cpu()[~nan_row]
        assert torch.isfinite(others).all() and torch.isfinite(lse.cpu()[~nan_row]).all(), f"{prefix} {what}: NaN spread"
        got = out.clone()
        got[1, 2] = 0
        want = ref.clone()
        want[1, 2] = 0
        check(got, want, f"{prefix} {what}, the other heads", fp8)


# FP8 variants whose V scales enter the f16 P.V MMA with P (per token, per group, e8m0 groups; both loaders).
# Both FP8 formats (e5m2 scales are 128x smaller), aligned and share-path groups (g32), e8m0 per token and per group.
V_SCALED = [v.name for v in GRID.variants
            if re.match(r"gdec_paged_(e4m3|e5m2)_h\d_d(64|128|256)_p(16|64)_q(f32g(32|64|128)|e8m0g(16|32|64|128))_s128b_ld", v.name)
            and not (v.spec.attention.sliding_window or v.spec.attention.logits_soft_cap or v.spec.attention.sinks)]


@pytest.mark.parametrize("v_mult", [1e-3, 1e3, 3e5])
@pytest.mark.parametrize("name", V_SCALED)
def test_fp8_decode_over_the_range_of_v_scales(gen, name: str, v_mult: float) -> None:
    """V amax about 4e-3 (e4m3 scales near 1e-5, e5m2 near 7e-8: P x scale alone would be an f16 subnormal, hence
    decode.cuh's kPUp) and 4e3 decode within the usual error of float64; V amax about 1.2e6 (past kPUp's exact
    range) saturates but never yields NaN or inf."""
    rng = np.random.default_rng(seed_of(name))
    v = gen.VARIANTS[name]
    spec = v.spec()
    lengths = [1, 63, 64, 65, 700]
    cache, k, vv = setup_cache(v, lengths, rng, v_mult=v_mult)
    att = spec.attention
    q = torch.randn(len(lengths), att.num_q_heads, spec.cache.head_size, device="cuda").to(getattr(torch, spec.cache.io_dtype))
    out = torch.full(q.shape, float("nan"), device="cuda", dtype=getattr(torch, att.output_dtype))
    cache.plan_decode()
    cache.decode(1, q, out)
    torch.cuda.synchronize()
    if v_mult > 1e4:
        assert torch.isfinite(out).all(), f"{name}: NaN/inf from saturated V scales"
        assert out.float().abs().amax() > 0, f"{name}: an all-zero output from saturated V scales"
        return
    ref, _ = reference(q.double().cpu(), k, vv, lengths, att.num_q_heads // spec.cache.num_kv_heads,
                       spec.cache.head_size ** -0.5)
    check(out, ref, f"{name} V x {v_mult:g}", True)


# ---- vLLM's per-layer caches and block tables (KVCache.wrap_layers + adopt_block_table) -------------------------
# bf16 at 16- and 64-token pages, FP8 with per-token scales (per-layer scales tensors) and with static scales (per-
# layer static tensors), each with both loaders: the first variant of each kind (later ones add window or sinks).
VLLM_LAYERS = list({n.rsplit("_", 1)[0]: n for n in reversed(NAMES) if re.match(
    r"gdec_paged_(bf16_h2_d128_p(16|64)|e4m3_h2_d128_p16_(qf32g128|ss))_s128b_ld(cpa|tma)_", n)}.values())
# SGLang's default page of one token ("split": its k_buffer[l] / v_buffer[l] of [slots, H, D] viewed as
# [slots, 1, H, D], req_to_token as the block table, out_cache_loc as the slot mapping): bf16, and FP8 with MAX's
# float32 scales per 64 dims.
SMALL_PAGE_LAYERS = [n for n in NAMES if re.match(r"gdec_paged_(bf16_h2_d128_p1_s128b_ldcpa|e4m3_h2_d128_p1_qf32g64_s128b)_", n)]


def vllm_layer_caches(v, lengths: list[int], rng: np.random.Generator, layers: int = 3, spare: int = 3,
                      kv_layout: str = "pages"):
    """vLLM's side of a decode step: per-layer caches full of canary bytes (block 0 is vLLM's null block), in the
    FlashInfer / Triton backends' [num_blocks, 2, P, H, D] (kv_layout "pages") or the FlashAttention backend's
    [2, num_blocks, P, H, D] ("planes"), or SGLang's K and V tensors of their own per layer ("split": plane 1 of
    such a tensor as K and plane 0 as V, handed over as blocks and v_blocks, so V lies below K and the cache's
    kv_offset, 0, cannot reach it); a block table of randomly permuted blocks (rows and columns past the requests
    hold 0, as vLLM pads them). Returns the cache adopted by kvgen, the block table as a NumPy array, and per layer
    the test's own (K, V) [num_blocks, P, H, D] views and (K scales, V scales) views (None unquantized)."""
    planes = kv_layout != "pages"
    spec = v.spec()
    c = spec.cache
    P, H, D = c.page_size, c.num_kv_heads, c.head_size
    need = [-(-n // P) for n in lengths]
    nb = 1 + sum(need) + spare
    ids = rng.permutation(np.arange(1, nb))
    table = np.zeros((len(lengths) + 2, max(need) + 3), np.int32)
    at = 0
    for b, k in enumerate(need):
        table[b, :k] = ids[at:at + k]
        at += k
    fp8 = c.dtype.startswith("float8")
    k_plane = 1 if kv_layout == "split" else 0

    def kv_views(t):  # (K, V) of one layer's tensor, [num_blocks, P, H, D] (+ G for scales) each
        t = t.squeeze(2) if t.dim() == 6 else t
        return (t[k_plane], t[1 - k_plane]) if planes else (t[:, 0], t[:, 1])

    tensors = []
    for _ in range(layers):
        t = torch.empty((2, nb, P, H, D) if planes else (nb, 2, P, H, D), dtype=getattr(torch, c.dtype), device="cuda")
        t.view(torch.uint8).fill_(0x7F) if fp8 else t.fill_(float("inf"))  # NaN / inf canaries
        tensors.append(t)
    scales = None
    if spec.quantization is not None:
        g = D // spec.quantization.granularity
        scales = [torch.ones((2, nb, 1, P, H, g) if planes else (nb, 2, 1, P, H, g), device="cuda")
                  for _ in range(layers)]  # as allocate makes them
    static = [torch.ones((2, 1, H), device="cuda") for _ in range(layers)] if c.static_scales else None
    lut = torch.empty((len(lengths), ref.padded_lut_cols(max(need) + 1)), dtype=torch.int32, device="cuda")
    lens = torch.empty(len(lengths), dtype=torch.int32, device="cuda")
    kv = [kv_views(t) for t in tensors]
    kv_scales = [kv_views(s) for s in scales] if scales is not None else None
    cache = wrap_layer_tensors(v, [t.unsqueeze(2) for t in tensors], scales, (lut, lens), kv_layout, static_scales=static)
    randomize_static_scales(cache, rng)
    return cache, table, kv, kv_scales


def slots_of(table: np.ndarray, lengths: list[int], page: int) -> np.ndarray:
    """vLLM's slot mapping of every token of every request (block_table[b, t // P] * P + t % P)."""
    return np.concatenate([table[b, np.arange(n) // page].astype(np.int64) * page + np.arange(n) % page
                           for b, n in enumerate(lengths)])


def per_layer_rows(cache, spec, table: np.ndarray, lengths: list[int], layer: int, kv: list, kv_scales: list | None):
    """The reference's dequantized K and V of one layer: the test's own per-layer (K, V) views (vllm_layer_caches)
    stacked into kvgen's one-tensor layout ([nb, 2, L, P, H, D]) and read by the NumPy oracle through the block
    table."""
    stack = torch.cat([torch.stack(pair, dim=1).unsqueeze(2) for pair in kv], dim=2)
    scales = None
    if kv_scales is not None:
        scales = to_np(torch.cat([torch.stack(pair, dim=1).unsqueeze(2) for pair in kv_scales], dim=2), "float32").copy()
    static = to_np(torch.cat(cache.static_scales, dim=1), "float32").copy() if cache.static_scales is not None else None
    lut = np.zeros((len(lengths), cache.lut_cols), np.uint32)
    lut[:, : table.shape[1]] = table[: len(lengths)]
    state = ref.CacheState(blocks=to_np(stack, spec.cache.dtype).copy(), scales=scales, lut=lut,
                           cache_lengths=np.zeros(len(lengths), np.uint32), paged=True, static_scales=static,
                           null_page=cache.null_page)
    return oracle_rows(state, spec, lengths, layer)


def fill_layers(cache, spec, table, lengths, rng) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every token of every request stored into every layer through vLLM's slot mapping (random rows per layer).
    Returns each layer's stored (K, V) rows [sum(lengths), H, D] as float64 on the host, in request order."""
    io = getattr(torch, spec.cache.io_dtype)
    H, D, T = spec.cache.num_kv_heads, spec.cache.head_size, sum(lengths)
    slots = torch.from_numpy(slots_of(table, lengths, spec.cache.page_size)).cuda()
    stored = []
    for layer in range(cache.num_layers):
        k = (torch.randn(T, H, D, device="cuda") * 2).to(io)
        v = torch.randn(T, H, D, device="cuda").to(io)
        cache.store_slots(layer, k, v, slots)
        stored.append((k.double().cpu(), v.double().cpu()))
    return stored


def assert_rows_hold_the_stored(got: torch.Tensor, stored: torch.Tensor, spec, what: str) -> None:
    """The cache's rows, read back by the oracle, are the rows the store was given: exactly for 16-bit caches,
    within FP8's half ulp of the row's largest value (e4m3 2^-4, e5m2 2^-3; scales per row or group). (Static-scale
    variants saturate on purpose, randomize_static_scales: not compared.)"""
    if spec.cache.static_scales:
        return
    if not spec.cache.dtype.startswith("float8"):
        assert torch.equal(got, stored), f"{what}: the rows differ from what was stored"
        return
    half_ulp = 2.0 ** -4 if spec.cache.dtype == "float8_e4m3fn" else 2.0 ** -3
    bound = stored.abs().amax(dim=-1, keepdim=True) * half_ulp + 1e-6
    assert ((got - stored).abs() <= bound).all(), f"{what}: the rows are not the stored ones within FP8's half ulp"


@pytest.mark.parametrize("kv_layout", ["pages", "planes", "split"])
@pytest.mark.parametrize("name", VLLM_LAYERS + SMALL_PAGE_LAYERS)
def test_vllm_per_layer_caches_decode_from_the_block_table(gen, name: str, kv_layout: str) -> None:
    """wrap_layers over vLLM-shaped per-layer caches (null block 0) and adopt_block_table on vLLM's block_table /
    seq_lens: store_slots writes each layer's own tensor, decode of every layer matches float64 on that layer's
    dequantized rows, vLLM's null block and the spare blocks keep their canaries, and the step's tables are what
    the block table says (null padding past each request's pages)."""
    rng = np.random.default_rng(seed_of(name))
    v = gen.VARIANTS[name]
    spec = v.spec()
    P = spec.cache.page_size
    lengths = [*page_edges(P), 3 * P + 5, 700]
    cache, table, kv, kv_scales = vllm_layer_caches(v, lengths, rng, kv_layout=kv_layout)
    initial = [[x.view(torch.uint8).cpu() for x in pair] for pair in kv]  # canaries everywhere
    initial_scales = [[x.cpu() for x in pair] for pair in kv_scales] if kv_scales is not None else []
    stored = fill_layers(cache, spec, table, lengths, rng)
    cache.adopt_block_table(torch.from_numpy(table).cuda(), torch.tensor(lengths + [0, 0], dtype=torch.int32, device="cuda"),
                            lengths)
    torch.cuda.synchronize()
    lut = cache.lookup_table.cpu().numpy()
    for b, n in enumerate(lengths):
        k = -(-n // P)
        assert (lut[b, :k] == table[b, :k]).all() and (lut[b, k:] == 0).all(), f"lookup-table row {b}"
    assert cache.cache_lengths.cpu().tolist() == [n - 1 for n in lengths]
    assert cache._row_offsets.cpu().tolist()[: len(lengths) + 1] == list(range(len(lengths) + 1))
    att = spec.attention
    q = torch.randn(len(lengths), att.num_q_heads, spec.cache.head_size, device="cuda").to(getattr(torch, spec.cache.io_dtype))
    cache.plan_decode()
    outs = []
    for layer in range(cache.num_layers):
        out = torch.full(q.shape, float("nan"), device="cuda", dtype=getattr(torch, att.output_dtype))
        cache.decode(layer, q, out)
        outs.append(out)
    torch.cuda.synchronize()
    for layer, out in enumerate(outs):
        ko, vo = per_layer_rows(cache, spec, table, lengths, layer, kv, kv_scales)
        assert_rows_hold_the_stored(ko, stored[layer][0], spec, f"K of layer {layer}")
        assert_rows_hold_the_stored(vo, stored[layer][1], spec, f"V of layer {layer}")
        want, _ = reference(q.double().cpu(), ko, vo, lengths, att.num_q_heads // spec.cache.num_kv_heads,
                            spec.cache.head_size ** -0.5)
        check(out, want, f"{name} layer {layer}", spec.cache.dtype.startswith("float8"))
    used = set(table[: len(lengths)].ravel().tolist()) - {0}
    for pair, befores in zip(kv, initial):
        for x, before in zip(pair, befores):
            raw = x.view(torch.uint8).cpu()
            for blk in set(range(x.shape[0])) - used:  # vLLM's null block 0 and the spare blocks
                assert torch.equal(raw[blk], before[blk]), f"block {blk} was written"
    for pair, befores in zip(kv_scales or [], initial_scales):  # their scales too
        for x, before in zip(pair, befores):
            for blk in set(range(x.shape[0])) - used:
                assert torch.equal(x[blk].cpu(), before[blk]), f"scales of block {blk} were written"
    assert cache.errors() == []


@pytest.mark.parametrize("kv_layout", ["pages", "planes", "split"])
@pytest.mark.parametrize("name", [n for n in VLLM_LAYERS + SMALL_PAGE_LAYERS if "bf16" in n and ("_p16_" in n or "_p1_" in n)])
def test_vllm_step_tables_and_decode_replay_in_one_graph(gen, name: str, kv_layout: str) -> None:
    """adopt_block_table, store_slots and decode of every layer captured once (a fixed split count); each replay
    follows the engine's device tensors: a new block table, a longer context and new rows, and matches float64."""
    rng = np.random.default_rng(31)
    v = gen.VARIANTS[name]
    spec = v.spec()
    P, att = spec.cache.page_size, spec.attention
    lengths = [P + 1, 300, 5, 2 * P]
    cache, table, kv, kv_scales = vllm_layer_caches(v, [n + 2 for n in lengths], rng, kv_layout=kv_layout)  # room for 2 more
    io = getattr(torch, spec.cache.io_dtype)
    B, H, D = len(lengths), spec.cache.num_kv_heads, spec.cache.head_size
    bt = torch.from_numpy(table).cuda()
    seq = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    slot = torch.empty(B, dtype=torch.int64, device="cuda")
    k_new, v_new = torch.empty(B, H, D, dtype=io, device="cuda"), torch.empty(B, H, D, dtype=io, device="cuda")
    q = torch.empty(B, att.num_q_heads, D, dtype=io, device="cuda")
    outs = [torch.empty(B, att.num_q_heads, D, dtype=getattr(torch, att.output_dtype), device="cuda")
            for _ in range(cache.num_layers)]
    fill_layers(cache, spec, table, [n - 1 for n in lengths], rng)  # the history before the step's token
    cache.adopt_block_table(bt, seq, lengths)
    cache.plan_decode(splits=2)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        cache.adopt_block_table(bt, seq, lengths)
        for layer in range(cache.num_layers):
            cache.store_slots(layer, k_new, v_new, slot)
            cache.decode(layer, q, outs[layer])
    for step in range(2):
        now = [n + step for n in lengths]
        if step:  # the engine's next step: request 0's pages moved to spare blocks (old ones poisoned), one more token
            pages = table[0, : -(-now[0] // P)].copy()
            spare = sorted(set(range(1, kv[0][0].shape[0])) - set(table.ravel().tolist()))[: len(pages)]
            for t in (x for pair in kv for x in pair):
                t[spare] = t[pages]
                t.view(torch.uint8)[pages] = t.view(torch.uint8)[0].clone()  # the canaries of vLLM's null block
            table[0, : len(pages)] = spare
            bt.copy_(torch.from_numpy(table))
        seq.copy_(torch.tensor(now, dtype=torch.int32))
        slot.copy_(torch.from_numpy(slots_of(table, now, P)[np.cumsum(now) - 1]))
        k_new.copy_((torch.randn(B, H, D, device="cuda") * 2).to(io))
        v_new.copy_(torch.randn(B, H, D, device="cuda").to(io))
        q.copy_(torch.randn(B, att.num_q_heads, D, device="cuda").to(io))
        for o in outs:
            o.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        for layer, out in enumerate(outs):
            ko, vo = per_layer_rows(cache, spec, table, now, layer, kv, kv_scales)
            want, _ = reference(q.double().cpu(), ko, vo, now, att.num_q_heads // H, D ** -0.5)
            check(out, want, f"{name} replay {step} layer {layer}", False)
    assert cache.errors() == []


def test_adopt_block_table_checks_ids_lengths_and_serves_store(gen) -> None:
    """Host checks name the bad argument; on the device, an id past the allocation becomes the null page and is
    reported, and vLLM's null block inside a request's pages is kept as the null page without an error. A two-token
    step is refused by plan_decode, and a host step by begin_step. After a good table, store() (the step's CSR
    offsets, no host page table) writes each request's token at position cache_length and nothing else."""
    v = gen.VARIANTS[VLLM_LAYERS[-1]]  # bf16, cp.async
    spec = v.spec()
    P, H, D = spec.cache.page_size, spec.cache.num_kv_heads, spec.cache.head_size
    rng = np.random.default_rng(5)
    lengths = [P + 3, 2, 2 * P]
    cache, table, kv, _ = vllm_layer_caches(v, lengths, rng, layers=2)
    bt, seq = torch.from_numpy(table).cuda(), torch.tensor(lengths, dtype=torch.int32, device="cuda")
    with pytest.raises(LaunchError, match="seq_lens_host\\[1\\]"):
        cache.adopt_block_table(bt, seq, [P + 3, 0, 2 * P])  # below the step's new token
    with pytest.raises(LaunchError, match="needs .* pages"):
        cache.adopt_block_table(bt, seq, [P + 3, 2, 40 * P])
    with pytest.raises(LaunchError, match="block_table"):
        cache.adopt_block_table(bt.long(), seq, lengths)
    with pytest.raises(LaunchError, match="new_tokens"):
        cache.adopt_block_table(bt, seq, lengths, new_tokens=0)
    bad = table.copy()
    bad[0, 1] = kv[0][0].shape[0] + 5  # past the allocation: the null page, reported
    bad[2, 0] = 0  # vLLM's null block inside request 2's pages (a skipped window block): kept, not an error
    cache.adopt_block_table(torch.from_numpy(bad).cuda(), seq, lengths)
    lut = cache.lookup_table.cpu().numpy()
    assert lut[0, 1] == 0 and lut[2, 0] == 0 and lut[0, 0] == table[0, 0]
    assert cache.errors() == ["a page or slot id is past the allocation"]
    cache.error_word.zero_()
    cache.adopt_block_table(bt, seq, lengths, new_tokens=2)  # a two-token step: store serves it, decode does not
    with pytest.raises(LaunchError, match="one new token per request"):
        cache.plan_decode()
    with pytest.raises(LaunchError, match="lookup_table"):
        cache.begin_step([1, 1, 1])
    cache.adopt_block_table(bt, seq, lengths)
    io = getattr(torch, spec.cache.io_dtype)
    k, vv = (torch.randn(3, H, D, device="cuda") * 2).to(io), torch.randn(3, H, D, device="cuda").to(io)
    before = [[x.clone() for x in pair] for pair in kv]
    cache.store(1, k, vv)
    torch.cuda.synchronize()
    assert cache.errors() == []
    for b, n in enumerate(lengths):  # the step's token: position n - 1 = cache_length(b)
        page, off = table[b, (n - 1) // P], (n - 1) % P
        assert torch.equal(kv[1][0][page, off], k[b]) and torch.equal(kv[1][1][page, off], vv[b])
        before[1][0][page, off], before[1][1][page, off] = kv[1][0][page, off], kv[1][1][page, off]
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for pa, pb in zip(kv, before) for a, b in zip(pa, pb)), \
        "store wrote something besides the step's tokens of layer 1"


def test_the_readme_example_config_decodes(tmp_path) -> None:
    """README's example, configs/llama3_70b_fp8.yaml (MAX's float32 per-64 FP8 format, 128-token pages, 64 query
    heads on 8 KV heads): built, a history stored, the README's step (set_pages, set_cache_lengths, begin_step,
    store, plan_decode, decode, create_tma_tile) run, and decode matches float64 on the cached rows."""
    build(ROOT / "configs" / "llama3_70b_fp8.yaml", out=tmp_path / "llama3_70b_fp8")
    pkg = import_package(tmp_path / "llama3_70b_fp8", "kvgen_readme_70b")
    Variant = next(iter(pkg.VARIANTS.values()))
    spec = Variant.spec()
    H, D, Hq = spec.cache.num_kv_heads, spec.cache.head_size, spec.attention.num_q_heads
    io = getattr(torch, spec.cache.io_dtype)
    cache = Variant.cache(max_batch=2, num_pages=16, max_pages_per_request=4)
    cache.set_pages([[3, 9], [4]])
    cache.set_cache_lengths([0, 0])
    cache.begin_step([200, 17])  # the history first (README starts from cache lengths 200 and 17)
    cache.store(0, (torch.randn(217, H, D, device="cuda") * 2).to(io), torch.randn(217, H, D, device="cuda").to(io))
    cache.end_step()
    cache.set_cache_lengths([200, 17])
    cache.begin_step([1, 1])
    cache.store(0, (torch.randn(2, H, D, device="cuda") * 2).to(io), torch.randn(2, H, D, device="cuda").to(io))
    q = torch.randn(2, Hq, D, device="cuda").to(io)
    out = torch.full((2, Hq, D), float("nan"), device="cuda", dtype=getattr(torch, spec.attention.output_dtype))
    cache.plan_decode()
    cache.decode(0, q, out)
    tile = cache.create_tma_tile(kv=0, layer=0)
    torch.cuda.synchronize()
    ko, vo = cached_rows(cache, spec, [201, 18], layer=0)
    want, _ = reference(q.double().cpu(), ko, vo, [201, 18], Hq // H, D ** -0.5)
    check(out, want, "README example (llama3_70b_fp8)", True)
    assert tile.kind == "create_tma_tile" and cache.errors() == []
