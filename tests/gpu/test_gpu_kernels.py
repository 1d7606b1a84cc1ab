"""GPU tests: every kernel of every variant of configs/gpu_grid.yaml against the NumPy reference.

Run with `pytest -m gpu` on a machine with an sm_90 GPU; skipped (with the reason) elsewhere.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from kvgen import reference as ref
from kvgen.build import build, import_package
from kvgen.derive import small_store_tokens_per_block, store_split, tma_geometry
from kvgen.dtypes import DTYPES
from kvgen.errors import LaunchError
from kvgen.grid import load_config

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible", allow_module_level=True)

from kvgen.runtime.kvcache import KVCache  # noqa: E402  (the runtime is only imported where a GPU is)

ROOT = Path(__file__).resolve().parents[2]
GRID = load_config(ROOT / "configs" / "gpu_grid.yaml")
NAMES = [v.name for v in GRID.variants]
ROPE = [n for n in NAMES if "_rope" in n]
NAMES = [n for n in NAMES if n not in ROPE]
CANARY = {"float8_e4m3fn": 0x7F, "float8_e5m2": 0x7C}  # NaN / +inf bytes; wider floats use +inf


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("gen") / "gpu_grid"
    build(GRID, out=out, jobs=8)
    return import_package(out, "kvgen_gpu_grid")


def to_np(t: torch.Tensor, dtype: str) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if dtype in ("float8_e4m3fn", "float8_e5m2"):
        return t.view(torch.uint8).numpy().view(DTYPES[dtype].numpy)
    if dtype == "uint32":
        return t.numpy().view(np.uint32)
    return t.numpy()


def from_np(a: np.ndarray, dtype: str, device: str = "cuda") -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).to(device)
    if dtype in ("float8_e4m3fn", "float8_e5m2"):
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint8)).view(getattr(torch, dtype)).to(device)
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def poison(cache) -> None:
    """+inf (or FP8 NaN/inf bytes) in every element, so anything read from an unreferenced page shows."""
    b = cache.blocks
    if cache.dtype in CANARY:
        b.view(torch.uint8).fill_(CANARY[cache.dtype])
    else:
        b.fill_(float("inf"))


def layout(cache, new_lengths: list[int], cached: list[int], rng: np.random.Generator) -> list[list[int]]:
    """Random, permuted page ids covering cached + new tokens of each request (pages never shared)."""
    p = cache.page_rows
    need = [(c + n + p - 1) // p for c, n in zip(cached, new_lengths)]
    perm = rng.permutation(cache.null_page)
    pages, at = [], 0
    for k in need:
        pages.append([int(x) for x in perm[at: at + k]])
        at += k
    assert at <= cache.null_page, "test layout needs more pages"
    return pages


def make_cache(mod, name: str, rng: np.random.Generator, cached: list[int], new: list[int], num_layers: int = 2):
    v = mod.VARIANTS[name]
    spec = v.spec()
    if spec.cache.kind == "paged":
        p = spec.cache.page_size
        pages_needed = sum((c + n + p - 1) // p for c, n in zip(cached, new)) + 3
        cache = v.cache(max_batch=len(new), num_pages=pages_needed, max_pages_per_request=max(
            (c + n + p - 1) // p for c, n in zip(cached, new)) + 1, num_layers=num_layers)
        poison(cache)
        cache.set_pages(layout(cache, new, cached, rng))
    else:
        cache = v.cache(max_batch=len(new), num_slots=len(new) + 1, tokens_per_slot=max(c + n for c, n in zip(cached, new)) + 5,
                        num_layers=num_layers)
        poison(cache)
        cache.set_slots(list(rng.permutation(len(new) + 1)[: len(new)]))
    cache.set_cache_lengths(cached)
    randomize_static_scales(cache, rng)
    return v, spec, cache


def seed_of(name: str) -> int:
    """A test's random seed from its variant name, the same in every run (str hashes are salted per process)."""
    return zlib.crc32(name.encode())


def randomize_static_scales(cache, rng: np.random.Generator) -> None:
    """Static-scales variants: a different scale per (K|V, layer, head), small enough that the random test rows
    (|x| up to ~15) saturate e4m3 in some heads: x / 0.01 = 1500 > 448."""
    if cache.static_scales is None:
        return
    for layer in range(cache.num_layers):
        scales = [rng.uniform(0.01, 0.08, cache.num_heads) for _ in range(cache.kv_dim)]  # an MLA cache: K only
        cache.set_static_scales(layer, *scales)


def state_of(cache, spec) -> ref.CacheState:
    scales = None
    if cache.scales is not None:
        scales = to_np(cache.scales, "float32" if spec.quantization.scale_dtype == "float32" else "uint8").copy()
    static = to_np(cache.static_scales, "float32").copy() if cache.static_scales is not None else None
    return ref.CacheState(blocks=to_np(cache.blocks, spec.cache.dtype).copy(), scales=scales,
                          lut=cache.host_lut.copy(), cache_lengths=cache.host_lengths.copy(), paged=cache.paged,
                          static_scales=static, null_page=cache.null_page if cache.paged else None)


def random_rows(rng: np.random.Generator, shape: tuple[int, ...], io: str, scale: float = 3.0) -> np.ndarray:
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    return x.astype(DTYPES[io].numpy)  # values exactly representable in the input dtype


def edge_lengths(p: int) -> tuple[list[int], list[int]]:
    """cached and new lengths covering 0, 1, P-1, P, P+1 and a long request."""
    cached = [0, 1, p - 1, p, 0, 3, p + 1, 2 * p]
    new = [1, p, 1, 1, p + 1, 0, p - 1, 2 * p + 3]
    return cached, new


def q_args(spec):
    q = spec.quantization
    if spec.rope_layout is not None:
        return None, None
    return (q.granularity, q.scale_dtype) if q else (None, None)


def store_matches_reference(cache, spec, new: list[int], layer: int, rng: np.random.Generator):
    """Store random rows for a step of `new` tokens per request and check the whole cache bit for bit against the
    reference: written rows equal it, every other byte (canaries, other layers, the null page) is unchanged.
    Returns (state before the store, the rows stored)."""
    io = spec.cache.io_dtype
    H, D = spec.cache.num_kv_heads, spec.cache.head_size
    before = state_of(cache, spec)
    kv_in = [random_rows(rng, (sum(new), H, D), io) for _ in range(spec.cache.kv_dim)]
    cache.begin_step(new)
    cache.store(layer, *[from_np(x, io) for x in kv_in])
    g, sd = q_args(spec)
    refused = ref.store(before, layer, [x.astype(np.float32) for x in kv_in], np.cumsum([0, *new]), spec.cache.dtype, g, sd)
    assert refused == 0
    after = state_of(cache, spec)
    np.testing.assert_array_equal(after.blocks.view(np.uint8), before.blocks.view(np.uint8))
    if before.scales is not None:
        np.testing.assert_array_equal(after.scales, before.scales)
    assert cache.errors() == []
    return before, kv_in


@pytest.mark.parametrize("name", NAMES)
def test_store_then_load_matches_reference(generated, name: str) -> None:
    rng = np.random.default_rng(seed_of(name))
    spec = generated.VARIANTS[name].spec()
    p = spec.cache.page_size or 16
    cached, new = edge_lengths(p)
    v, spec, cache = make_cache(generated, name, rng, cached, new)
    io = spec.cache.io_dtype
    H, D = spec.cache.num_kv_heads, spec.cache.head_size
    layer = 1
    g, sd = q_args(spec)
    before, kv_in = store_matches_reference(cache, spec, new, layer, rng)

    # Load everything each request now holds (cached + new) back out, dequantized.
    full = [c + n for c, n in zip(cached, new)]
    starts = torch.zeros(len(full), dtype=torch.int32, device="cuda")
    offs = torch.tensor(np.cumsum([0, *full]), dtype=torch.int32, device="cuda")
    outs = [torch.full((sum(full), H, D), float("nan"), dtype=getattr(torch, io), device="cuda")
            for _ in range(spec.cache.kv_dim)]
    cache.load(layer, outs[0], outs[1] if len(outs) > 1 else None, starts, row_offsets=offs)
    expect = ref.load(before, layer, np.cumsum([0, *full]), np.zeros(len(full), np.int64), g, sd)
    for kv, (o, e, x) in enumerate(zip(outs, expect, kv_in)):
        got = to_np(o, io).astype(np.float32)
        np.testing.assert_array_equal(got, e.astype(DTYPES[io].numpy).astype(np.float32))
        # New rows only: the dequantized error of FP8 is bounded by half an FP8 step times the scale.
        newrows = np.concatenate([got[sum(full[:b]) + cached[b]: sum(full[:b + 1])] for b in range(len(full))])
        if not DTYPES[spec.cache.dtype].is_fp8:  # exact, after the cache dtype's rounding (f32 in -> bf16 narrows)
            np.testing.assert_array_equal(newrows, x.astype(DTYPES[spec.cache.dtype].numpy).astype(np.float32))
        else:
            mant = 3 if spec.cache.dtype == "float8_e4m3fn" else 2
            rel = np.abs(newrows - x.astype(np.float32)) / np.maximum(np.abs(x.astype(np.float32)), 1e-3)
            big = np.abs(x.astype(np.float32)) > 0.5
            if before.static_scales is not None:  # saturated values (|x| / scale past the FP8 range) are clamped
                inv = np.float32(1) / before.static_scales[kv, layer][None, :, None]
                big &= np.abs(x.astype(np.float32)) * inv <= DTYPES[spec.cache.dtype].fp8_max
                assert big.sum() > big.size // 4, "at least a quarter of the values fit the FP8 range"
            assert np.max(rel[big]) <= 2.0 ** -mant + 1e-6 + (2.0 ** -7 if spec.quantization else 0.0)
    # Cached rows were canaries (never written): load must reproduce them faithfully; new rows are finite.
    assert cache.errors() == []


def _small_split_cases() -> list[str]:
    return [v.name for v in GRID.variants if v.name in NAMES and small_store_tokens_per_block(v.spec, store_split(v.spec))
            and ("_p16_" in v.name or "_cont_" in v.name)]


def test_the_small_step_split_has_variants_to_run_on() -> None:
    # An empty parameter list would skip the test below without a failure.
    assert _small_split_cases(), "no GPU-grid variant takes the small-step store split"


@pytest.mark.parametrize("name", _small_split_cases())
def test_store_with_the_small_step_split(generated, name: str) -> None:
    """Store launches choose tokens per block per call (KVCache.store_tokens_per_block): one item per thread for a
    small step. The split is forced here on a ragged step of edge lengths, so blocks straddle requests and pages;
    the result must still be bit-exact."""
    rng = np.random.default_rng(seed_of(name + "small"))
    spec = generated.VARIANTS[name].spec()
    p = spec.cache.page_size or 16
    cached, new = edge_lengths(p)
    new = [3 * n + 1 for n in new]
    v, spec, cache = make_cache(generated, name, rng, cached, new)
    default = cache._tpb
    small = cache.store_tokens_per_block(1)
    assert small < default, "a one-token step should take fewer tokens per block"
    assert cache.store_tokens_per_block(cache._small_store_below) >= default
    cache._small_store_below = 10**9  # every store of this cache: the small split
    assert cache.store_tokens_per_block(sum(new)) == small
    store_matches_reference(cache, spec, new, 0, rng)


@pytest.mark.parametrize("name", [n for n in NAMES if "e4m3" in n or "e5m2" in n])
def test_fp8_saturation_never_nan(generated, name: str) -> None:
    rng = np.random.default_rng(7)
    v, spec, cache = make_cache(generated, name, rng, [0, 0], [5, 9])
    io = spec.cache.io_dtype
    H, D = spec.cache.num_kv_heads, spec.cache.head_size
    x = random_rows(rng, (14, H, D), io, scale=1e4)
    x.reshape(-1)[::7] = np.float32(np.inf).astype(DTYPES[io].numpy)
    x.reshape(-1)[3::11] = np.float32(-3e38 if io == "float32" else -6e4).astype(DTYPES[io].numpy)
    cache.begin_step([5, 9])
    cache.store(0, from_np(x, io), from_np(x, io) if spec.cache.kv_dim == 2 else None)
    offs = torch.tensor([0, 5, 14], dtype=torch.int32, device="cuda")
    out = torch.empty((14, H, D), dtype=getattr(torch, io), device="cuda")
    out2 = torch.empty_like(out)
    cache.load(0, out, out2 if spec.cache.kv_dim == 2 else None, torch.zeros(2, dtype=torch.int32, device="cuda"), offs)
    got = out.float()
    if spec.quantization is None:
        assert not torch.isnan(got).any(), "saturating store produced NaN"
        assert torch.isfinite(got).all()
    else:
        finite = torch.from_numpy(np.isfinite(x.astype(np.float32))).cuda()
        groups = finite.view(14, H, -1, spec.quantization.granularity).all(-1)
        # No value is NaN, not even in a group holding +-inf (its scale is clamped finite); groups without an
        # inf input dequantize to finite values.
        assert not torch.isnan(got).any(), "a group with an inf input produced NaN"
        assert torch.isfinite(got.view(14, H, -1, spec.quantization.granularity)[groups]).all()


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_copy_pages_exact(generated, name: str, num_layers: int) -> None:
    """Pages and their scales copied exactly. One and three layers: a scales page is KVD x L x P x H x G scale
    elements, which at small pages and odd head counts is not whole 16-byte vectors (1-token pages, 3 heads: 24 or
    72 bytes of float32 scales, 6 or 18 of e8m0), so consecutive pages start off a vector."""
    rng = np.random.default_rng(3)
    v, spec, cache = make_cache(generated, name, rng, [0, 0, 0], [20, 33, 7], num_layers=num_layers)
    io = spec.cache.io_dtype
    x = [random_rows(rng, (60, *cache._io_shape()[1:]), io) for _ in range(spec.cache.kv_dim)]
    cache.begin_step([20, 33, 7])
    cache.store(0, *[from_np(a, io) for a in x])
    before = state_of(cache, spec)
    if not cache.paged:  # slots: a continuous cache has no null page, so any slot may be written (here request 0's)
        src, dst = [int(cache.host_lut[1])], [int(cache.host_lut[0])]
        cache.copy_pages(torch.tensor(src, dtype=torch.int32, device="cuda"), torch.tensor(dst, dtype=torch.int32, device="cuda"))
        ref.copy_pages(before, src, dst)
        np.testing.assert_array_equal(state_of(cache, spec).blocks.view(np.uint8), before.blocks.view(np.uint8))
        assert cache.errors() == []
        return
    src = [int(a) for a in cache.host_lut[1, :2]]
    free = sorted(set(range(cache.null_page)) - set(int(a) for a in cache.host_lut.ravel()))
    dst = free[:2]
    cache.copy_pages(torch.tensor(src, dtype=torch.int32, device="cuda"), torch.tensor(dst, dtype=torch.int32, device="cuda"))
    ref.copy_pages(before, src, dst)
    after = state_of(cache, spec)
    np.testing.assert_array_equal(after.blocks.view(np.uint8), before.blocks.view(np.uint8))
    if before.scales is not None:
        np.testing.assert_array_equal(after.scales, before.scales)
    # A write to the null page or past the allocation is refused in the kernel and flagged.
    cache.copy_pages(torch.tensor([src[0]], dtype=torch.int32, device="cuda"),
                     torch.tensor([cache.null_page], dtype=torch.int32, device="cuda"))
    cache.copy_pages(torch.tensor([cache.num_blocks + 5], dtype=torch.int32, device="cuda"),
                     torch.tensor([dst[0]], dtype=torch.int32, device="cuda"))
    np.testing.assert_array_equal(state_of(cache, spec).blocks.view(np.uint8), before.blocks.view(np.uint8))
    assert cache.errors() != []


@pytest.mark.parametrize("name", [n for n in NAMES if "e5m2" not in n])
def test_tma_tiles_match_reference_rows(generated, name: str) -> None:
    rng = np.random.default_rng(11)
    spec = generated.VARIANTS[name].spec()
    geo = tma_geometry(spec)
    p = spec.cache.page_size or geo.bn
    lens = [1, p - 1, p, p + 1, geo.bn + 3, 3 * geo.bn - 1]
    v, spec, cache = make_cache(generated, name, rng, [0] * len(lens), lens)
    io = spec.cache.io_dtype
    x = [random_rows(rng, (sum(lens), *cache._io_shape()[1:]), io) for _ in range(spec.cache.kv_dim)]
    cache.begin_step(lens)
    cache.store(1, *[from_np(a, io) for a in x])
    cache.end_step()
    st = state_of(cache, spec)
    max_tiles = max((n + geo.bn - 1) // geo.bn for n in lens) + 1
    for kv in range(spec.cache.kv_dim):
        tile = cache.create_tma_tile(kv, 1)
        out = torch.empty((len(lens), max_tiles, cache.num_heads, geo.bn, geo.bk), dtype=cache.blocks.dtype, device="cuda")
        out.view(torch.uint8).fill_(0xA5)  # poison: tiles past a sequence must stay untouched
        cache.tile_load(tile, 1, kv, out)
        got = to_np(out, spec.cache.dtype).view(np.uint8)
        rows = ref.view_rows(st.blocks, kv, 1).view(np.uint8).reshape(-1, cache.num_heads, cache.head_size * DTYPES[spec.cache.dtype].nbytes)
        g = st.geometry
        nbk = geo.bk * DTYPES[spec.cache.dtype].nbytes
        eff = geo.box_rows
        for b, n in enumerate(lens):
            for t in range(max_tiles):
                base = t * geo.bn
                if base >= n:
                    assert (got[b, t] == 0xA5).all(), "a tile past the sequence was written"
                    continue
                prs = ref.populate(g, st.lut, b, base, geo.bn, geo.base_alignment)
                valid = min(len(prs), (n - base + eff - 1) // eff)
                for r in range(geo.bn):
                    page = r // eff
                    if page >= valid:
                        assert (got[b, t, :, r] == 0).all(), "OOB sub-page must be zero-filled"
                    else:
                        np.testing.assert_array_equal(got[b, t, :, r], rows[prs[page] + r % eff, :, :nbk])


def test_paged_and_continuous_caches_agree(generated) -> None:
    rng = np.random.default_rng(5)
    paged = next(n for n in NAMES if n.startswith("gpu_paged_bf16_h4_d128_p16"))
    cont = next(n for n in NAMES if n.startswith("gpu_cont_bf16"))
    cached, new = [0, 5, 17], [9, 1, 40]
    full = [c + n for c, n in zip(cached, new)]
    x = [random_rows(rng, (sum(full), 4, 128), "bfloat16") for _ in range(2)]
    outs = []
    for name in (paged, cont):
        v, spec, cache = make_cache(generated, name, rng, [0, 0, 0], full)
        cache.begin_step(full)
        cache.store(0, *[from_np(a, "bfloat16") for a in x])
        o = [torch.empty((sum(new), 4, 128), dtype=torch.bfloat16, device="cuda") for _ in range(2)]
        cache.load(0, o[0], o[1], torch.tensor(cached, dtype=torch.int32, device="cuda"),
                   torch.tensor(np.cumsum([0, *new]), dtype=torch.int32, device="cuda"))
        outs.append([t.float().cpu() for t in o])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
        assert torch.isfinite(a).all()


def test_cuda_graph_capture_and_replay(generated) -> None:
    rng = np.random.default_rng(9)
    name = next(n for n in NAMES if "e4m3" in n and "qf32" in n)
    v, spec, cache = make_cache(generated, name, rng, [3, 0], [4, 12])
    k = from_np(random_rows(rng, (16, 4, 128), "bfloat16"), "bfloat16")
    vv = from_np(random_rows(rng, (16, 4, 128), "bfloat16"), "bfloat16")
    cache.begin_step([4, 12])
    cache.store(0, k, vv)  # eager, first launch loads the module outside the capture
    torch.cuda.synchronize()
    eager = cache.blocks.clone()
    poison(cache)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        cache.store(0, k, vv)
    poison(cache)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(cache.blocks.view(torch.uint8), eager.view(torch.uint8))


def test_bad_launch_arguments_are_refused(generated) -> None:
    rng = np.random.default_rng(1)
    name = next(n for n in NAMES if n.startswith("gpu_paged_bf16_h4_d128_p16"))
    v, spec, cache = make_cache(generated, name, rng, [0, 0], [16, 16])
    before = cache.blocks.clone()
    with pytest.raises(LaunchError, match="exceeds"):
        cache.begin_step([17, 1])  # request 0 owns one page of 16 tokens
    cache.begin_step([16, 16])
    good = torch.zeros((32, 4, 128), dtype=torch.bfloat16, device="cuda")
    with pytest.raises(LaunchError, match="dtype"):
        cache.store(0, good.float(), good.float())
    with pytest.raises(LaunchError, match="shape"):
        cache.store(0, good[:, :2], good[:, :2])
    with pytest.raises(LaunchError, match="shape"):  # right element count, wrong rank
        cache.store(0, good.view(32, 512), good.view(32, 512))
    with pytest.raises(LaunchError, match="shape"):  # right rank, only the free first dim right
        cache.store(0, good.view(32, 8, 64), good.view(32, 8, 64))
    with pytest.raises(LaunchError, match="contiguous"):
        cache.store(0, good.transpose(0, 1).contiguous().transpose(0, 1), good)
    with pytest.raises(LaunchError, match="layer"):
        cache.store(5, good, good)
    with pytest.raises(LaunchError, match="aligned"):
        big = torch.zeros(32 * 4 * 128 + 1, dtype=torch.bfloat16, device="cuda")
        cache.store(0, big[1:].view(32, 4, 128), good)
    with pytest.raises(LaunchError, match="page ids"):
        cache.set_pages([[cache.null_page], [0]])
    with pytest.raises(LaunchError, match="CUDA tensor"):
        cache.store(0, good.cpu(), good)
    # Explicit CSR offsets that run past the assigned pages: the kernel refuses the writes and flags them.
    cache.store(0, torch.ones((40, 4, 128), dtype=torch.bfloat16, device="cuda"),
                torch.ones((40, 4, 128), dtype=torch.bfloat16, device="cuda"),
                row_offsets=torch.tensor([0, 30, 40], dtype=torch.int32, device="cuda"))
    assert any("unassigned" in e for e in cache.errors())
    changed = (cache.blocks.view(torch.uint8) != before.view(torch.uint8)).reshape(cache.num_blocks, -1).any(-1)
    assert not changed[cache.null_page], "the null page was written"


def test_corrupt_token_map_is_refused_on_the_device(generated) -> None:
    # begin_step resolves each new token to (page, offset) on the host; the kernel re-checks every entry, so a
    # stale or corrupt map can never write the null page, past the allocation, or past a page.
    rng = np.random.default_rng(4)
    name = next(n for n in NAMES if n.startswith("gpu_paged_bf16_h4_d128_p16"))
    v, spec, cache = make_cache(generated, name, rng, [0, 0], [16, 16])
    before = cache.blocks.clone()
    cache.begin_step([3, 0])
    bad = torch.tensor([cache.null_page, 0, cache.num_blocks + 7, 0, 0, 16], dtype=torch.int32, device="cuda")
    cache._token_map[:6].copy_(bad)
    x = torch.ones((3, 4, 128), dtype=torch.bfloat16, device="cuda")
    cache.store(0, x, x)
    errs = cache.errors()
    assert any("unassigned" in e for e in errs) and any("past the allocation" in e for e in errs)
    assert torch.equal(cache.blocks.view(torch.uint8), before.view(torch.uint8)), "a refused token was written"


def test_changing_the_page_table_after_begin_step_requires_a_new_plan(generated) -> None:
    # The step's token map holds pages resolved at begin_step: after set_pages it could point at a page another
    # request now owns, so a store without a fresh begin_step is refused instead of writing there.
    rng = np.random.default_rng(8)
    name = next(n for n in NAMES if n.startswith("gpu_paged_bf16_h4_d128_p16"))
    v, spec, cache = make_cache(generated, name, rng, [0, 0], [16, 16])
    x = from_np(random_rows(rng, (32, 4, 128), "bfloat16"), "bfloat16")
    cache.begin_step([16, 16])
    swapped = [[int(cache.host_lut[1, 0])], [int(cache.host_lut[0, 0])]]
    cache.set_pages(swapped)
    with pytest.raises(LaunchError, match="begin_step"):
        cache.store(0, x, x)
    before = state_of(cache, spec)
    cache.begin_step([16, 16])
    cache.store(0, x, x)
    assert ref.store(before, 0, [to_np(x, "bfloat16").astype(np.float32)] * 2, np.array([0, 16, 32]), "bfloat16") == 0
    np.testing.assert_array_equal(state_of(cache, spec).blocks.view(np.uint8), before.blocks.view(np.uint8))
    assert cache.errors() == []


def test_wrap_adopts_existing_tensors(generated) -> None:
    rng = np.random.default_rng(6)
    name = next(n for n in NAMES if "e4m3" in n and "qf32" in n and n.startswith("gpu_paged"))
    v, spec, owner = make_cache(generated, name, rng, [3, 20], [5, 9])
    cache = type(owner).wrap(v, owner.blocks, owner.scales, owner.lookup_table, owner.cache_lengths, num_layers=2)
    np.testing.assert_array_equal(cache.host_lut, owner.host_lut)
    np.testing.assert_array_equal(cache.host_lengths, owner.host_lengths)
    before = state_of(owner, spec)
    io = spec.cache.io_dtype
    kv_in = [random_rows(rng, (14, spec.cache.num_kv_heads, spec.cache.head_size), io) for _ in range(2)]
    cache.begin_step([5, 9])
    cache.store(1, *[from_np(x, io) for x in kv_in])
    g, sd = q_args(spec)
    assert ref.store(before, 1, [x.astype(np.float32) for x in kv_in], np.cumsum([0, 5, 9]), spec.cache.dtype, g, sd) == 0
    after = state_of(owner, spec)  # written through the wrapper, seen through the owner's tensors
    np.testing.assert_array_equal(after.blocks.view(np.uint8), before.blocks.view(np.uint8))
    np.testing.assert_array_equal(after.scales, before.scales)
    assert cache.errors() == []


def test_all_five_tma_descriptors_encode(generated) -> None:
    rng = np.random.default_rng(2)
    name = next(n for n in NAMES if n.startswith("gpu_paged_e4m3_h4_d128_p64"))
    v, spec, cache = make_cache(generated, name, rng, [0], [64])
    t = cache.create_tma_tile(0, 0)
    assert t.box == (64, 1, 128)
    r = cache.create_ragged_tma_tile(1, 1, "64B", 64, 128)
    assert r.dims[0] == cache.num_kv_rows() + 1 and r.box == (1, 1, 64, 64)
    g4 = cache.create_gather4_tma_tile(0, 0, 128, tma_dtype="UINT8")
    assert g4.box == (1, 128)
    with pytest.raises(LaunchError, match="swizzle span"):
        from kvgen.runtime.tma import encode
        encode("x", cache.blocks_ptr, "BFLOAT16", (10, 128), (256,), (8, 128), "128B")
    with pytest.raises(LaunchError, match="rope"):
        cache.create_rope_tma_tile(0, 64)


@pytest.mark.parametrize("name", ROPE)
def test_rope_aware_mla_store_load_and_descriptors(generated, name: str) -> None:
    rng = np.random.default_rng(4)
    v, spec, cache = make_cache(generated, name, rng, [0, 0], [65, 3])
    r = spec.rope_layout
    x = random_rows(rng, (68, r.padded_depth + r.rope_dim), "bfloat16")
    cache.begin_step([65, 3])
    cache.store(0, from_np(x, "bfloat16"))
    out = torch.empty((68, r.padded_depth + r.rope_dim), dtype=torch.bfloat16, device="cuda")
    cache.load(0, out, None, torch.zeros(2, dtype=torch.int32, device="cuda"),
               torch.tensor([0, 65, 68], dtype=torch.int32, device="cuda"))
    got = to_np(out, "bfloat16").astype(np.float32)
    xf = x.astype(np.float32)
    content, rope = xf[:, : r.padded_depth], xf[:, r.padded_depth:]
    q, s = ref.quantize(content, "float8_e4m3fn", r.padded_depth, "float32")
    expect_content = (q.astype(np.float32) * s).astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(got[:, : r.padded_depth], expect_content)
    np.testing.assert_array_equal(got[:, r.padded_depth:], rope)  # rope stays bf16, bit-exact
    assert cache.errors() == []
    rt = cache.create_rope_tma_tile(0, 64)
    assert rt.box == (64, 1, 64) and rt.dims[2] == (r.padded_depth + 128) // 2
    rg = cache.create_rope_gather4_tma_tile(0)
    assert rg.dims[1] == (r.padded_depth + 2 * r.rope_dim) // 2 and rg.box == (1, 64)
    g4 = cache.create_gather4_tma_tile(0, 0, 64, tile_stride=80, tma_dtype="INT64", swizzle="NONE")
    assert g4.box == (1, 64)


def test_cupy_arrays_on_a_cupy_stream(generated) -> None:
    """The same store through CuPy arrays (zero-copy DLPack views) on a CuPy stream gives identical bytes."""
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(21)
    name = next(n for n in NAMES if n.startswith("gpu_paged_f16_h4_d128_p16"))
    results = []
    for use_cupy in (False, True):
        rng = np.random.default_rng(21)
        v, spec, cache = make_cache(generated, name, rng, [2, 0], [7, 18])
        k = from_np(random_rows(rng, (25, 4, 128), "float16"), "float16")
        vv = from_np(random_rows(rng, (25, 4, 128), "float16"), "float16")
        offs = torch.tensor([0, 7, 25], dtype=torch.int32, device="cuda")
        if use_cupy:
            stream = cp.cuda.Stream(non_blocking=True)
            with stream:
                cache.store(0, cp.from_dlpack(k), cp.from_dlpack(vv), row_offsets=cp.from_dlpack(offs), stream=stream)
            stream.synchronize()
        else:
            cache.store(0, k, vv, row_offsets=offs)
            torch.cuda.synchronize()
        assert cache.errors() == []
        results.append(cache.blocks.view(torch.uint8).clone())
    assert torch.equal(results[0], results[1])


def test_eager_store_host_cost(generated) -> None:
    """Host time of one eager store (validation + launch), reported; the bound catches regressions."""
    from kvgen.benchmark import eager_host_cost

    rng = np.random.default_rng(8)
    name = next(n for n in NAMES if n.startswith("gpu_paged_bf16_h4_d128_p16"))
    v, spec, cache = make_cache(generated, name, rng, [0] * 8, [1] * 8)
    k = torch.randn(8, 4, 128, device="cuda", dtype=torch.bfloat16)
    cache.begin_step([1] * 8)
    per_call = eager_host_cost(lambda: cache.store(0, k, k))
    print(f"\n[host] eager store: {per_call * 1e6:.2f} us/call")
    assert per_call < 60e-6  # a regression guard; the measured value is what bench/RESULTS.md reports


@pytest.mark.parametrize("kind", ["paged", "continuous"])
def test_host_trait_members(generated, kind: str) -> None:
    """The host mirrors of the trait's members agree with what the kernels do on the device."""
    rng = np.random.default_rng(11)
    prefix = "gpu_paged_bf16_h4_d128_p16" if kind == "paged" else "gpu_cont_bf16"
    name = next(n for n in NAMES if n.startswith(prefix))
    cached, new = [0, 5, 17], [3, 0, 20]
    v, spec, cache = make_cache(generated, name, rng, cached, new)
    assert cache.get_type_name() == f"{'PagedKVCache' if kind == 'paged' else 'ContinuousKVCache'}<{v.NAME}>"
    assert cache.max_tile_size() == (spec.cache.page_size if kind == "paged" else -1)
    lengths = cache.cache_lengths_nd()
    assert lengths.data_ptr() == cache.cache_lengths.data_ptr(), "cache_lengths_nd is the device tensor itself"
    assert to_np(lengths, "uint32")[:3].tolist() == cached
    assert [cache.cache_length(b) for b in range(3)] == cached
    cache.begin_step(new)
    assert cache.max_prompt_length() == 20 and cache.max_context_length() == 37 and not cache.empty_cache()
    # row_idx on the host names the row the store kernel writes: store distinct rows, read them back by row_idx.
    x = from_np(random_rows(rng, (sum(new), 4, spec.cache.head_size), "bfloat16"), "bfloat16")
    cache.store(1, x, x)
    flat = cache.blocks.reshape(-1, 4, spec.cache.head_size)  # the whole allocation as [rows, H, D]
    base = (0 * cache.num_layers + 1) * cache.page_rows  # view offset of (K, layer 1) in rows
    t = 0
    for b, n in enumerate(new):
        for i in range(n):
            row = cache.row_idx(b, cached[b] + i)
            assert row < cache.num_kv_rows()
            assert torch.equal(flat[base + row], x[t]), f"request {b} token {i}: row_idx {row} is not where it was stored"
            t += 1
    # raise_if_error: clean so far; a refused write raises once, names the reason, and clears the word.
    cache.raise_if_error()
    bad = torch.tensor([cache.num_blocks + 3, 0], dtype=torch.int32, device="cuda")
    cache._token_map[:2].copy_(bad)
    cache.store(0, x, x)
    with pytest.raises(RuntimeError, match="past the allocation"):
        cache.raise_if_error()
    cache.raise_if_error()  # the word was cleared


STATIC = [n for n in NAMES if "_ss_" in n]


def test_static_scales_grid_is_covered() -> None:
    assert {n.split("_")[2] for n in STATIC} == {"e4m3", "e5m2"} and any("_cont_" in n for n in STATIC)


def test_static_scales_wrap_and_validation(generated) -> None:
    """A static-scales cache adopted with vLLM-style per-tensor scales (a [1] device tensor per layer, expanded over
    the heads) stores x / scale; bad scales, and scales for a variant without them, are refused by name."""
    rng = np.random.default_rng(11)
    name = next(n for n in STATIC if n.startswith("gpu_paged_e4m3"))
    v, spec, owner = make_cache(generated, name, rng, [3, 20], [5, 9])
    H = spec.cache.num_kv_heads
    k_scale, v_scale = torch.tensor([0.05], device="cuda"), torch.tensor([0.02], device="cuda")  # vLLM's layer._k_scale
    static = torch.stack([k_scale.expand(2, H), v_scale.expand(2, H)]).contiguous()  # [KVD, L, H]
    cache = type(owner).wrap(v, owner.blocks, None, owner.lookup_table, owner.cache_lengths, num_layers=2,
                             static_scales=static)
    before = state_of(cache, spec)
    np.testing.assert_array_equal(before.static_scales[0], np.float32(0.05))
    io = spec.cache.io_dtype
    kv_in = [random_rows(rng, (14, H, spec.cache.head_size), io) for _ in range(2)]
    cache.begin_step([5, 9])
    cache.store(1, *[from_np(x, io) for x in kv_in])
    assert ref.store(before, 1, [x.astype(np.float32) for x in kv_in], np.cumsum([0, 5, 9]), spec.cache.dtype) == 0
    np.testing.assert_array_equal(state_of(owner, spec).blocks.view(np.uint8), before.blocks.view(np.uint8))
    cache.set_static_scales(0, k_scale, [0.5] * H)  # a device tensor and a per-head list
    np.testing.assert_array_equal(to_np(static, "float32")[:, 0], np.array([[0.05] * H, [0.5] * H], np.float32))
    for bad, rule in ((0.0, "finite and positive"), (float("nan"), "finite and positive"), (-1.0, "finite and positive"),
                      (1e39, "finite and positive"), (2.9e-39, "finite reciprocal"), ([1.0] * (H + 1), "1 value or"),
                      ("x", "number"), ("0.5", "number"), (True, "number")):
        with pytest.raises(LaunchError, match=rule):
            cache.set_static_scales(0, bad, 1.0)
    with pytest.raises(LaunchError, match="v_scale"):
        cache.set_static_scales(0, 1.0)
    with pytest.raises(LaunchError, match="layer"):
        cache.set_static_scales(2, 1.0, 1.0)
    with pytest.raises(LaunchError, match="needs its scales tensor"):
        type(owner).wrap(v, owner.blocks, None, owner.lookup_table, owner.cache_lengths, num_layers=2)
    with pytest.raises(LaunchError, match="static_scales"):
        type(owner).wrap(v, owner.blocks, None, owner.lookup_table, owner.cache_lengths, num_layers=2,
                         static_scales=static[:, :, :1].contiguous())
    plain = generated.VARIANTS[next(n for n in NAMES if "_bf16_" in n and n.startswith("gpu_paged"))]
    pc = plain.cache(max_batch=1, num_pages=4, max_pages_per_request=2)
    with pytest.raises(LaunchError, match="has no static scales"):
        pc.set_static_scales(0, 1.0, 1.0)
    with pytest.raises(LaunchError, match="has no static scales"):
        type(pc).wrap(plain, pc.blocks, None, pc.lookup_table, pc.cache_lengths, num_layers=2, static_scales=static)


SLOT_CASES = [n for n in NAMES if n.startswith("gpu_paged") and ("_p16_" in n or "_p128_" in n)
              and any(t in n for t in ("_bf16_", "_f32_", "qf32g32", "qe8m0g64", "_ss_"))]


@pytest.mark.parametrize("name", SLOT_CASES)
def test_store_slots_matches_reference(generated, name: str) -> None:
    """vLLM's slot-mapping contract (store_slots): row t lands at slot_mapping[t]; -1 rows are skipped; the K/V
    inputs have more rows than slots (CUDA-graph padding); every other byte, canaries included, is unchanged. A slot
    on the null page or past the allocation is refused and reported, and writes nothing."""
    rng = np.random.default_rng(21)
    v, spec, cache = make_cache(generated, name, rng, [0, 0], [40, 30])
    p, io = spec.cache.page_size, spec.cache.io_dtype
    H, D = spec.cache.num_kv_heads, spec.cache.head_size
    pages = sorted({int(x) for x in cache.host_lut.ravel() if x != cache.null_page})
    free = np.array([pg * p + o for pg in pages for o in range(p)])
    slots = rng.choice(free, size=50, replace=False)
    slots[[3, 17, 40]] = -1  # padding tokens
    kv_in = [random_rows(rng, (56, H, D), io) for _ in range(2)]  # 6 rows of graph padding past the slots
    before = state_of(cache, spec)
    cache.store_slots(1, *[from_np(x, io) for x in kv_in], torch.from_numpy(slots).cuda())
    g, sd = q_args(spec)
    assert ref.store_slots(before, 1, [x.astype(np.float32) for x in kv_in], slots, spec.cache.dtype, g, sd) == 0
    after = state_of(cache, spec)
    np.testing.assert_array_equal(after.blocks.view(np.uint8), before.blocks.view(np.uint8))
    if before.scales is not None:
        np.testing.assert_array_equal(after.scales.view(np.uint8), before.scales.view(np.uint8))
    assert cache.errors() == []
    bad = np.array([cache.null_page * p + 1, cache.num_blocks * p + 5, 2**40], np.int64)
    cache.store_slots(0, *[from_np(x[:3], io) for x in kv_in], torch.from_numpy(bad).cuda())
    refused = state_of(cache, spec)
    np.testing.assert_array_equal(refused.blocks.view(np.uint8), after.blocks.view(np.uint8))
    if after.scales is not None:  # nor a scale
        np.testing.assert_array_equal(refused.scales.view(np.uint8), after.scales.view(np.uint8))
    errs = " ".join(cache.errors())
    assert "null page" in errs and "past the allocation" in errs


def test_store_slots_refuses_bad_arguments(generated) -> None:
    name = next(n for n in SLOT_CASES if "_bf16_" in n)
    _, spec, cache = make_cache(generated, name, np.random.default_rng(2), [0], [4])
    k = torch.zeros(4, spec.cache.num_kv_heads, spec.cache.head_size, dtype=torch.bfloat16, device="cuda")
    for slots, rule in ((torch.zeros(4, dtype=torch.int32, device="cuda"), "dtype must be int64"),
                        (torch.zeros(5, dtype=torch.int64, device="cuda"), "at most k's 4 rows"),
                        (torch.zeros(2, 2, dtype=torch.int64, device="cuda"), "must be 1-D"),
                        (torch.zeros(4, dtype=torch.int64), "CUDA")):
        with pytest.raises(LaunchError, match=rule):
            cache.store_slots(0, k, k, slots)
    cont = next(n for n in NAMES if n.startswith("gpu_cont"))
    _, _, ccache = make_cache(generated, cont, np.random.default_rng(2), [0], [4])
    with pytest.raises(LaunchError, match="paged"):
        ccache.store_slots(0, k, k, torch.zeros(4, dtype=torch.int64, device="cuda"))


def test_adopt_a_vllm_layer_cache(generated) -> None:
    """A vLLM layer's FP8 cache ([num_blocks, 2, block_size, H, D], NHD; vLLM's null block 0 as kvgen's null page)
    and its per-tensor k_scale / v_scale, adopted without a copy: kv_cache.unsqueeze(2) is kvgen's
    [n, KVD, L = 1, P, H, D]. store_slots on vLLM's slot mapping writes what the reference's slot store does, in
    the vLLM tensor itself (the last block included: it is an ordinary block here), refuses block 0, and load reads
    it back dequantized."""
    name = next(n for n in STATIC if n.startswith("gpu_paged_e4m3") and "_p16_" in n)
    v = generated.VARIANTS[name]
    spec = v.spec()
    P, H, D = spec.cache.page_size, spec.cache.num_kv_heads, spec.cache.head_size
    nb = 9
    kv_cache = torch.full((nb, 2, P, H, D), 0x7F, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)  # canaries
    k_scale, v_scale = torch.tensor([0.04], device="cuda"), torch.tensor([0.03], device="cuda")
    static = torch.stack([k_scale.expand(1, H), v_scale.expand(1, H)]).contiguous()  # [KVD, L = 1, H]
    lut = torch.zeros((1, ref.padded_lut_cols(2)), dtype=torch.int32, device="cuda")
    cache = KVCache.wrap(v, kv_cache.unsqueeze(2), None, lut, torch.zeros(1, dtype=torch.int32, device="cuda"),
                         num_layers=1, static_scales=static, null_page=0)
    rng = np.random.default_rng(8)
    kv_in = [random_rows(rng, (20, H, D), spec.cache.io_dtype) for _ in range(2)]
    slots = np.array([3 * P + t if t < P else 8 * P + t - P for t in range(20)], np.int64)  # request pages [3, 8]
    slots = np.r_[slots, 5, -1]  # a slot on vLLM's null block (refused, reported) and a padding slot
    rows = [from_np(np.concatenate([x, x[:2]]), spec.cache.io_dtype) for x in kv_in]
    before = state_of(cache, spec)
    cache.store_slots(0, *rows, torch.from_numpy(slots).cuda())
    assert ref.store_slots(before, 0, [np.concatenate([x, x[:2]]).astype(np.float32) for x in kv_in], slots,
                           spec.cache.dtype) == 1
    got = to_np(kv_cache, spec.cache.dtype)  # the vLLM tensor, [nb, 2, P, H, D]
    np.testing.assert_array_equal(got.view(np.uint8), before.blocks[:, :, 0].view(np.uint8))
    assert len(cache.errors()) == 1
    cache.error_word.zero_()
    cache.set_pages([[3, 8]])
    cache.set_cache_lengths([0])
    outs = [torch.empty(20, H, D, dtype=getattr(torch, spec.cache.io_dtype), device="cuda") for _ in range(2)]
    cache.load(0, outs[0], outs[1], torch.zeros(1, dtype=torch.int32, device="cuda"),
               row_offsets=torch.tensor([0, 20], dtype=torch.int32, device="cuda"))
    expect = ref.load(state_of(cache, spec), 0, np.array([0, 20]), np.zeros(1, np.int64))  # through the new page table
    for o, e in zip(outs, expect):
        np.testing.assert_array_equal(to_np(o, spec.cache.io_dtype).astype(np.float32),
                                      e.astype(DTYPES[spec.cache.io_dtype].numpy).astype(np.float32))
    assert cache.errors() == []


def empty_tables(pages_per_request: int, batch: int = 2) -> tuple:
    """A zeroed lookup table (with MAX's padding columns) and zeroed cache lengths, for wrap / wrap_layers."""
    return (torch.zeros((batch, ref.padded_lut_cols(pages_per_request)), dtype=torch.int32, device="cuda"),
            torch.zeros(batch, dtype=torch.int32, device="cuda"))


def wrap_layer_tensors(v, blocks: list, scales: list | None, tables: tuple, kv_layout: str, **kwargs) -> KVCache:
    """wrap_layers over per-layer [nb, 2, 1, ...] ("pages") or [2, nb, 1, ...] ("planes", "split") tensors. "split"
    (SGLang's k_buffer / v_buffer): plane 1 is each layer's K and plane 0 its V, [nb, P, H, D] views handed over as
    blocks and v_blocks, so V lies below K (a negative K-to-V distance) and kv_offset (0) cannot reach it. kwargs go
    to wrap_layers (static_scales)."""
    if kv_layout != "split":
        return KVCache.wrap_layers(v, blocks, scales, *tables, null_page=0, kv_layout=kv_layout, **kwargs)
    plane = lambda ts, i: None if ts is None else [t[i, :, 0] for t in ts]  # noqa: E731
    return KVCache.wrap_layers(v, plane(blocks, 1), plane(scales, 1), *tables, null_page=0, v_blocks=plane(blocks, 0),
                               v_scales=plane(scales, 0), **kwargs)


@pytest.mark.parametrize("kv_layout", ["pages", "planes", "split"])
def test_copy_pages_of_per_layer_caches_copies_every_layer(generated, kv_layout: str) -> None:
    """copy_pages on a wrap_layers cache (one tensor per layer, vLLM's block 0 as the null page; K and V of a page
    together, in planes, or in tensors of their own) copies the page and its scales in every layer's tensors,
    touches no other page, and refuses a copy onto the null page."""
    name = next(n for n in NAMES if n.startswith("gpu_paged_e4m3") and "_qf32" in n)
    v = generated.VARIANTS[name]
    spec = v.spec()
    c = spec.cache
    nb, L, G = 6, 3, -(-c.head_size // spec.quantization.granularity)
    lead = (nb, 2) if kv_layout == "pages" else (2, nb)
    blocks = [torch.randint(0, 126, (*lead, 1, c.page_size, c.num_kv_heads, c.head_size), dtype=torch.uint8,
                            device="cuda").view(getattr(torch, c.dtype)) for _ in range(L)]
    scales = [torch.rand((*lead, 1, c.page_size, c.num_kv_heads, G), device="cuda") + 0.5 for _ in range(L)]
    cache = wrap_layer_tensors(v, blocks, scales, empty_tables(2), kv_layout)
    if kv_layout != "pages":  # compare through [num_blocks, 2, ...] views
        blocks, scales = [b.transpose(0, 1) for b in blocks], [s.transpose(0, 1) for s in scales]
    before = [(b.view(torch.uint8).clone(), s.clone()) for b, s in zip(blocks, scales)]
    ids = lambda *x: torch.tensor(x, dtype=torch.int32, device="cuda")  # noqa: E731
    cache.copy_pages(ids(2, 2), ids(4, 0))  # 2 -> 4 in every layer; 2 -> 0 (the null page) refused
    torch.cuda.synchronize()
    for b, s, (b0, s0) in zip(blocks, scales, before):
        want_b, want_s = b0.clone(), s0.clone()
        want_b[4], want_s[4] = b0[2], s0[2]
        assert torch.equal(b.view(torch.uint8), want_b) and torch.equal(s, want_s)
    assert len(cache.errors()) == 1


@pytest.mark.parametrize("kv_layout", ["pages", "planes", "split"])
def test_tma_tiles_of_per_layer_caches_read_that_layer(generated, kv_layout: str) -> None:
    """create_tma_tile / tile_load on a wrap_layers cache read the layer's own tensor: each layer's tiles equal the
    tiles of the same data adopted alone as a one-layer cache with K and V of a page together (the address math of
    slice_address, for both kv layouts)."""
    name = next(n for n in NAMES if n.startswith("gpu_paged_e4m3") and "_qf32" in n)
    v = generated.VARIANTS[name]
    spec = v.spec()
    c, geo = spec.cache, tma_geometry(spec)
    nb, L, G = 7, 3, -(-c.head_size // spec.quantization.granularity)
    lead = (nb, 2) if kv_layout == "pages" else (2, nb)
    blocks = [torch.randint(0, 126, (*lead, 1, c.page_size, c.num_kv_heads, c.head_size), dtype=torch.uint8,
                            device="cuda").view(getattr(torch, c.dtype)) for _ in range(L)]
    scales = [torch.ones((*lead, 1, c.page_size, c.num_kv_heads, G), device="cuda") for _ in range(L)]
    pages, lens = [[3, 1, 5], [6, 2]], [2 * c.page_size + 5, c.page_size + 1]
    multi = wrap_layer_tensors(v, blocks, scales, empty_tables(3), kv_layout)
    if kv_layout != "pages":  # the singles get the same data with K and V of a page together ("split": K is plane 1)
        kv_first = (lambda t: t.flip(0)) if kv_layout == "split" else (lambda t: t)  # noqa: E731
        blocks = [kv_first(b).transpose(0, 1).contiguous() for b in blocks]
        scales = [kv_first(s).transpose(0, 1).contiguous() for s in scales]
    singles = [KVCache.wrap(v, b, s, *empty_tables(3), num_layers=1, null_page=0) for b, s in zip(blocks, scales)]
    max_tiles = max(-(-n // geo.bn) for n in lens) + 1
    for cache in (multi, *singles):
        cache.set_pages(pages)
        cache.set_cache_lengths(lens)
        cache.begin_step([0, 0])
    for layer in range(L):
        for kv in range(2):
            got, want = (torch.full((2, max_tiles, c.num_kv_heads, geo.bn, geo.bk), 0xA5,
                                    dtype=torch.uint8, device="cuda").view(blocks[0].dtype) for _ in range(2))
            multi.tile_load(multi.create_tma_tile(kv, layer), layer, kv, got)
            singles[layer].tile_load(singles[layer].create_tma_tile(kv, 0), 0, kv, want)
            torch.cuda.synchronize()
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"layer {layer} kv {kv}"
            for b, n in enumerate(lens):  # the tiles holding rows were written (data bytes are < 126, never 0xA5)
                assert (got.view(torch.uint8)[b, : -(-n // geo.bn)] != 0xA5).all(), f"layer {layer} kv {kv}: tile unwritten"
    assert multi.errors() == []


def test_split_kv_layout_refuses_what_it_cannot_serve(generated) -> None:
    """K and V tensors of their own (wrap_layers with v_blocks, SGLang's k_buffer / v_buffer): errors name the
    argument and the rule for a whole-cache tensor, "split" without V tensors, V scales without them, a layout that
    contradicts v_blocks, a V list of the wrong length, a V of another shape or dtype, missing or misshapen V
    scales, and a continuous variant."""
    name = next(n for n in NAMES if n.startswith("gpu_paged_e4m3") and "_qf32" in n)
    v = generated.VARIANTS[name]
    spec = v.spec()
    c = spec.cache
    nb, G = 5, -(-c.head_size // spec.quantization.granularity)
    kv = lambda n=nb: torch.zeros((n, c.page_size, c.num_kv_heads, c.head_size), dtype=torch.uint8,  # noqa: E731
                                  device="cuda").view(getattr(torch, c.dtype))
    sc = lambda g=G: torch.ones((nb, c.page_size, c.num_kv_heads, g), device="cuda")  # noqa: E731
    tables = lambda: empty_tables(2)  # noqa: E731
    with pytest.raises(LaunchError, match="'blocks'.*per-layer lists.*Tensor"):
        KVCache.wrap(v, kv(), sc(), *tables(), num_layers=1, v_blocks=[kv()])
    with pytest.raises(LaunchError, match="'v_blocks'.*needs the V tensors"):
        KVCache.wrap_layers(v, [kv()], [sc()], *tables(), kv_layout="split")
    with pytest.raises(LaunchError, match="'v_scales'.*come with v_blocks"):
        KVCache.wrap_layers(v, [kv()], [sc()], *tables(), v_scales=[sc()])
    with pytest.raises(LaunchError, match="'kv_layout'.*means kv_layout \"split\".*planes"):
        KVCache.wrap_layers(v, [kv()], [sc()], *tables(), kv_layout="planes", v_blocks=[kv()], v_scales=[sc()])
    with pytest.raises(LaunchError, match="v_blocks.*one tensor per layer"):
        KVCache.wrap_layers(v, [kv(), kv()], [sc(), sc()], *tables(), v_blocks=[kv()], v_scales=[sc(), sc()])
    with pytest.raises(LaunchError, match=r"v_blocks\[1\].*shape"):
        KVCache.wrap_layers(v, [kv(), kv()], [sc(), sc()], *tables(), v_blocks=[kv(), kv(nb - 1)], v_scales=[sc(), sc()])
    with pytest.raises(LaunchError, match=r"v_blocks\[0\].*dtype"):
        KVCache.wrap_layers(v, [kv()], [sc()], *tables(), v_blocks=[torch.zeros_like(kv(), dtype=torch.float16)],
                            v_scales=[sc()])
    with pytest.raises(LaunchError, match="v_scales.*V's scales"):
        KVCache.wrap_layers(v, [kv()], [sc()], *tables(), v_blocks=[kv()])
    with pytest.raises(LaunchError, match=r"v_scales\[0\].*shape"):
        KVCache.wrap_layers(v, [kv()], [sc()], *tables(), v_blocks=[kv()], v_scales=[sc(G + 1)])
    with pytest.raises(LaunchError, match=r"blocks\[0\].*shape must be \[num_blocks, P, H, D\]"):
        KVCache.wrap_layers(v, [kv().unsqueeze(1)], [sc()], *tables(), v_blocks=[kv()], v_scales=[sc()])
    cont = generated.VARIANTS[next(n for n in NAMES if n.startswith("gpu_cont_"))]
    with pytest.raises(LaunchError, match="'v_blocks'.*only paged caches"):
        KVCache.wrap(cont, [kv()], None, torch.zeros(2, dtype=torch.int32, device="cuda"),
                     torch.zeros(2, dtype=torch.int32, device="cuda"), num_layers=1, v_blocks=[kv()])
    k_t, v_t, vs = kv(), kv(), sc()
    cache = KVCache.wrap_layers(v, [k_t], [sc()], *tables(), null_page=0, v_blocks=[v_t], v_scales=[vs])
    assert cache.kv_layout == "split" and cache.args.kv_offset == 0
    assert (cache.args.blocks, cache.args.v_blocks, cache.args.v_scales) == (k_t.data_ptr(), v_t.data_ptr(), vs.data_ptr())
