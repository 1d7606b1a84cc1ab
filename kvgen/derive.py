"""Every number the templates need, computed once in Python from a validated variant.

Templates only print these values; the invariants they rely on are repeated as static_asserts in the
rendered C++ so a wrong number fails at compile time rather than corrupting a cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import (
    DECODE_SMEM_HEADROOM,
    DECODE_TMA_MIN_PAGE,
    SMEM_PER_CTA,
    SMEM_PER_SM,
    SWIZZLE_BYTES,
    TMA_ARCHS,
    VariantSpec,
    padded_depth,
)
from .dtypes import DTYPES
from .grid import Variant

THREADS = 256  # kvgen::kThreads
MAX_TOKENS_PER_BLOCK = 64  # kvgen::kMaxTokensPerBlock


def _largest_pow2_divisor(n: int, cap: int) -> int:
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


ITEMS_PER_THREAD = 2  # store: items per thread per pass (the IPT template argument)
# Quantizing stores: one item per thread per pass. Measured on the H100 against 2 (session 6, run 10, same data):
# 64 tokens 2.79 -> 2.60 µs, 8192 tokens within 0.4%; the IPT = 2 build needs 40 registers and parks 4 bytes,
# IPT = 1 takes 31. (16-bit stores keep 2: at IPT = 1 the 8192-token bf16 store lost 5.6 points.)
QUANTIZED_ITEMS_PER_THREAD = 1
# store __launch_bounds__ minimum CTAs per SM (256 threads each): 6 leaves 40 registers, enough without spills;
# measured on the H100 against 4 and 5 in one run: FP8 8192-token store 25.1 -> 22.8 µs, bf16 27.4 -> 26.9 µs.
STORE_MIN_BLOCKS = 6
# Quantizing stores: input vectors (16 bytes each) one lane takes of its scale group, at least (store_split:
# the group's vectors go to TPG lanes, a power of two of at most 32 and at most vectors / this). The per-item work
# (index math, the row check, the amax shuffles, the scale's division) is then spread over more bytes: the FP8
# store was issue-bound (ncu on the H200: SM throughput 67%, DRAM 31%, warps mostly "not selected"). Measured on
# the H200 (bench/NOTES.md, session 9, same data, FP8 g64, 8192 tokens): 1 -> 2 vectors 17.0 -> 15.2 µs; 4 (48
# registers, 5 CTAs/SM) 15.3 µs, no better.
QUANTIZED_VECTORS_PER_LANE = 2


@dataclass(frozen=True)
class StoreSplit:
    vec: int  # input elements per 16-byte access
    tpg: int  # lanes sharing one scale group (1 when not quantized)
    vpt: int  # vectors per lane per item
    ipt: int  # items per thread per pass of store (independent loads in flight per thread)

    @property
    def elems_per_item(self) -> int:
        return self.vec * self.vpt


def store_split(spec: VariantSpec) -> StoreSplit:
    """Split of a head row into lane work for store/load.

    A 16-byte access of the input dtype is the unit (8 bf16). With quantization each scale group of g
    elements is handled by TPG lanes (a power of two <= 32, so a shuffle butterfly reduces its amax)
    holding VPT vectors each, with TPG * VPT * VEC = g.
    """
    io = DTYPES[spec.cache.io_dtype]
    cache = DTYPES[spec.cache.dtype]
    # The cache side of one vector must also be a legal 1..16-byte access; e.g. f32 in -> f32 cache is 4x4.
    vec = 16 // io.nbytes
    while spec.cache.head_size % vec:
        vec //= 2
    assert vec * cache.nbytes <= 16
    if spec.quantization is None or spec.rope_layout is not None:
        return StoreSplit(vec=vec, tpg=1, vpt=1, ipt=ITEMS_PER_THREAD)
    g = spec.quantization.granularity
    vectors = g // vec
    tpg = _largest_pow2_divisor(vectors, min(32, max(1, vectors // QUANTIZED_VECTORS_PER_LANE)))
    return StoreSplit(vec=vec, tpg=tpg, vpt=vectors // tpg, ipt=QUANTIZED_ITEMS_PER_THREAD)


PASSES_PER_BLOCK = 1  # store/load: passes of IPT items per thread a block makes (more passes, fewer blocks)


def tokens_per_block(spec: VariantSpec, split: StoreSplit, items_per_thread: int | None = None) -> int:
    """Tokens one 256-thread block of store/load handles when each thread takes `items_per_thread` items over the
    block's life (default: PASSES_PER_BLOCK passes of IPT), at most 64."""
    per_thread = split.ipt * PASSES_PER_BLOCK if items_per_thread is None else items_per_thread
    items = spec.cache.kv_dim * spec.cache.num_kv_heads * (spec.cache.head_size // split.elems_per_item)
    return max(1, min(MAX_TOKENS_PER_BLOCK, THREADS * per_thread // max(1, items)))


# A small store step (fewer blocks than SMs with the default split) runs one item per thread instead of IPT: twice
# the blocks, each half as deep. Measured on the H100 (bench/NOTES.md, session 6, run 9; there with an IPT = 1
# build, same data): 64 tokens 2.55 -> 2.40 µs (bf16) and 2.94 -> 2.60 µs (FP8 g64).
SMALL_STORE_ONE_ITEM = 1


def small_store_tokens_per_block(spec: VariantSpec, split: StoreSplit) -> int | None:
    """tokens_per_block of a small store step (one item per thread), or None where it equals the default."""
    if not SMALL_STORE_ONE_ITEM or spec.rope_layout is not None:
        return None
    small = tokens_per_block(spec, split, items_per_thread=1)
    return small if small < tokens_per_block(spec, split) else None


@dataclass(frozen=True)
class TmaGeometry:
    bn: int
    bk: int
    gran: int  # elements per swizzle granule (= inner box)
    span: int  # swizzle span in bytes (16 for NONE)
    swizzle: str
    base_alignment: int
    box_rows: int  # rows per TMA issue: min(BN, page) (one page per issue)
    smem_bytes: int  # dynamic shared memory of the tile-load kernel (1024 B alignment slack included)


def tma_geometry(spec: VariantSpec) -> TmaGeometry:
    dt = DTYPES[spec.cache.dtype]
    span = SWIZZLE_BYTES[spec.tma.swizzle]
    gran = span // dt.nbytes
    bk = spec.tma.bk if spec.tma.bk is not None else padded_depth(spec)
    p = spec.cache.page_size or 0
    box_rows = spec.tma.bn if (p == 0 or p >= spec.tma.bn) else p
    return TmaGeometry(
        bn=spec.tma.bn, bk=bk, gran=gran, span=span, swizzle=spec.tma.swizzle,
        base_alignment=spec.tma.base_alignment or spec.tma.bn, box_rows=box_rows,
        smem_bytes=spec.tma.bn * bk * dt.nbytes + 1024,
    )


@dataclass(frozen=True)
class Gather4Geometry:
    tile_rows: int
    tile_width: int  # elements of one head row that are gathered
    box_w: int


def gather4_geometry(spec: VariantSpec) -> Gather4Geometry:
    dt = DTYPES[spec.cache.dtype]
    width = spec.rope_layout.padded_depth // dt.nbytes if spec.rope_layout else spec.cache.head_size
    box_w = width
    while box_w > 256 or (box_w * dt.nbytes) % 16 or width % box_w:
        box_w //= 2
    return Gather4Geometry(tile_rows=16, tile_width=width, box_w=box_w)


DECODE_TILE = 64  # kvgen::kDecodeTile
SMEM_RESERVED_PER_CTA = 1024  # the driver's own shared memory per CTA


@dataclass(frozen=True)
class DecodeGeometry:
    group: int  # query heads per KV head
    stages: int  # K/V pipeline depth actually used (reduced until it fits shared memory)
    stage_bytes: int
    smem_bytes: int
    out_c: str
    window: bool
    softcap: bool
    min_blocks: int  # __launch_bounds__ minimum CTAs per SM: as many as shared memory allows, at most 4 (or attention.ctas_per_sm)
    tma: bool  # K/V tiles by TMA (swizzled block-column boxes + populate, mbarrier pipeline) instead of cp.async
    # The kernel can cut each request into equal splits itself (plan chunk 0, plan_decode(splits=S), for CUDA
    # graphs). Not in FP8 kernels: they sit at the 128-register cap of 4 CTAs per SM, and the runtime chunk made
    # them park 12 bytes and run 2-4% slower (H100, session 5 run 7); 16-bit kernels measured neutral.
    balanced: bool
    # Warp groups a CTA may run (blockDim 128 x groups, groups x smem_bytes): as many as one-group CTAs fit an SM,
    # so a grouped CTA has exactly their warps, registers and shared memory (the launch bounds keep the register
    # cap); small batches run one such CTA per (request, KV head) and skip the combine (decode_plan.py). Under TMA
    # each group has its own per-stage mbarriers.
    max_groups: int
    # Static shared memory per CTA the kernel may declare (TMA mbarriers, the merge's per-warp row maxes), counted in
    # min_blocks' fit; the compile test checks each cubin against it.
    static_bytes: int
    # Bytes of K and V one cached token holds per KV head (no scales): what the planner's time model streams.
    kv_row_bytes: int


# attention.loader "auto", per (cache element width, page size): the loader measured faster on the H200, session 11
# (bench/decode_ab_tma_h200_s11*.md, bench/decode_bench_h200_s11.md; both loaders fill the same swizzled tiles).
# FP8 with pages of a whole tile or more (continuous caches: one box per tile too): TMA 0.3-3.7% faster on most
# shapes (16 x 1k, 16 x 4k and skewed the most), within 1.2% on the rest; FP8 at 16-token pages: TMA 2-5% slower at
# 1k contexts, faster only past 4k. 16-bit: TMA 0-4% slower (pages of 16 the most). Before the swizzled TMA boxes
# (padded rows, session 10): TMA 7-37% slower everywhere.
DECODE_AUTO_LOADER = {("fp8", "large pages"): "tma", ("fp8", "small pages"): "cp_async",
                      ("16-bit", "large pages"): "cp_async", ("16-bit", "small pages"): "cp_async"}


def decode_auto_key(spec: VariantSpec) -> tuple[str, str]:
    """DECODE_AUTO_LOADER's key of a variant: its element width and whether a page holds a whole 64-row tile."""
    page = spec.cache.page_size
    return ("fp8" if DTYPES[spec.cache.dtype].is_fp8 else "16-bit",
            "large pages" if page is None or page >= DECODE_TILE else "small pages")


def decode_loader(spec: VariantSpec, arch: str) -> str:
    """'tma' or 'cp_async' for one arch: TMA only where the arch has it."""
    want = spec.attention.loader
    if want == "auto":
        want = DECODE_AUTO_LOADER[decode_auto_key(spec)]
    small_page = spec.cache.page_size is not None and spec.cache.page_size < DECODE_TMA_MIN_PAGE  # (config refuses "tma")
    return "tma" if want == "tma" and arch in TMA_ARCHS and not small_page else "cp_async"


# Decode CTAs per SM by default, at most (attention.ctas_per_sm overrides; shared memory may allow fewer): 4 leave
# 128 registers per thread. Swizzled FP8 kernels fit 94 registers, so 5 CTAs compile without spilling, but 4
# measured fastest on the H100 (session 7, same caches, 2 stages: 5 CTAs 0-3% and 6 CTAs 3-12% slower).
DECODE_MAX_CTAS = 4


def decode_block_row_bytes(head_size: int, elem_bytes: int) -> int:
    """Bytes per row of one column block of a decode K/V tile (decode.cuh TileLayout): 128, or 64 for 64-byte rows.
    The TMA decode copies one page x one block column per box, with the swizzle of that width."""
    return min(128, head_size * elem_bytes)


def decode_geometry(spec: VariantSpec, arch: str) -> DecodeGeometry:
    """Shared memory per stage: K and V tiles of 64 unpadded rows (decode.cuh TileLayout, either loader), plus
    float32 scales."""
    c, a = spec.cache, spec.attention
    dt = DTYPES[c.dtype]
    row_bytes = c.head_size * dt.nbytes
    tma = decode_loader(spec, arch) == "tma"
    groups = (c.head_size + spec.quantization.granularity - 1) // spec.quantization.granularity if spec.quantization else 0
    stage = 2 * DECODE_TILE * row_bytes + 2 * DECODE_TILE * groups * 4
    # Measured on the H100 (bench/RESULTS.md, bench/NOTES.md session 7): FP8 runs faster with 2 stages and more
    # CTAs per SM (3 stages: 4-9% slower at batch >= 64, 1.6% faster at 16 x 1k), 16-bit with 3.
    stages = a.stages if a.stages is not None else (2 if dt.is_fp8 else 3)
    ring = DECODE_TILE * 4  # per stage: the tile's cache rows (uint32), looked up one iteration ahead
    # Slack to align the dynamic shared memory: 1024 bytes for TMA (its swizzle follows the address bits), a row
    # for cp.async (fragment addresses XOR chunk bits into a tile address that must be a multiple of a row).
    align = 1024 if tma else row_bytes
    group = a.num_q_heads // c.num_kv_heads
    # FP8 kernels keep Q in shared memory (8 rows, or 16 past a group of 8; 16-bit, padded rows).
    q_smem = (8 if group <= 8 else 16) * (2 * c.head_size + 16) if dt.is_fp8 else 0
    # Geometry per arch: an A100 build sized for an H100's shared memory could not launch (a 3-stage bf16 pipeline at
    # head size 256 is 193 KB; two 99 KB groups of head size 128 share a CTA), though it ran on the H200.
    limit = SMEM_PER_CTA[arch] - DECODE_SMEM_HEADROOM
    while stages > 2 and stages * (stage + ring) + q_smem + align > limit:
        stages -= 1
    merge = 4 * group * ((c.head_size + 8) + 2) * 4  # the epilogue's per-warp slices reuse the pipeline buffers
    smem = max(stages * (stage + ring) + q_smem, merge) + align
    smem = -(-smem // align) * align  # every warp group's pipeline (group g starts at g x smem) starts aligned
    # Without a minimum, ptxas may take more registers than shared memory would cost in occupancy (the FP8
    # kernel went 127 -> 139 registers, 4 -> 3 CTAs per SM, 8% slower at 64 x 4k).
    # Static shared memory, which depends on the warp groups a CTA may run (= min_blocks): TMA kernels' mbarriers,
    # 8 bytes per stage and group, and every kernel's per-warp row maxes for the merge (decode.cuh slice_max: GROUP
    # rows of 4 x groups + 4 floats), plus 8 bytes of alignment between them.
    def static_for(groups: int) -> int:
        return (8 * stages * groups if tma else 0) + 4 * group * (4 * groups + 4) + 8

    min_blocks = a.ctas_per_sm if a.ctas_per_sm is not None else DECODE_MAX_CTAS
    while min_blocks > 1 and min_blocks * (smem + static_for(min_blocks) + SMEM_RESERVED_PER_CTA) > SMEM_PER_SM[arch]:
        min_blocks -= 1
    static = static_for(min_blocks)
    return DecodeGeometry(group=group, stages=stages, stage_bytes=stage,
                          smem_bytes=smem, min_blocks=min_blocks, out_c=DTYPES[a.output_dtype].c_type,
                          window=a.sliding_window, softcap=a.logits_soft_cap, tma=tma, balanced=not dt.is_fp8,
                          max_groups=min_blocks, static_bytes=static, kv_row_bytes=2 * row_bytes)


def kernel_symbol(variant: Variant, kernel: str) -> str:
    return f"kvgen_{variant.name}_{kernel}"


def render_context(variant: Variant, arch: str) -> dict[str, object]:
    """The flat dictionary one variant's templates are rendered with, for one arch."""
    spec = variant.spec
    c = spec.cache
    dt, io = DTYPES[c.dtype], DTYPES[c.io_dtype]
    q = spec.quantization
    split = store_split(spec)
    kernels = spec.kernels_for_arch(arch)
    ctx: dict[str, object] = {
        "variant": variant.name,
        "digest": variant.digest,
        "arch": arch,
        "config_yaml": variant.config_json,
        "kind": c.kind,
        "cache_class": "PagedKVCache" if c.kind == "paged" else "ContinuousKVCache",
        "dtype_c": dt.c_type,
        "io_c": io.c_type,
        "scale_c": DTYPES[q.scale_dtype].c_type if q else "float",
        "num_heads": c.num_kv_heads,
        "head_size": c.head_size,
        "is_mla": c.is_mla,
        "page_size": c.page_size or 0,
        "quantized": q is not None,
        "granularity": q.granularity if q else 1,
        "fp8_max": dt.fp8_max,
        "static_scales": c.static_scales,
        "rope": spec.rope_layout is not None,
        "rope_padded_depth": spec.rope_layout.padded_depth if spec.rope_layout else 0,
        "rope_dim": spec.rope_layout.rope_dim if spec.rope_layout else 0,
        "store_vec": split.vec,
        "store_tpg": split.tpg,
        "store_vpt": split.vpt,
        "store_ipt": split.ipt,
        "store_min_blocks": STORE_MIN_BLOCKS,
        "kernels": kernels,
        "symbols": {k: kernel_symbol(variant, k) for k in kernels},
    }
    if "tma_tile_load" in kernels:
        ctx["tma"] = asdict(tma_geometry(spec))
    if "gather4_tile_load" in kernels:
        ctx["g4"] = asdict(gather4_geometry(spec))
    if "decode" in kernels:
        ctx["dec"] = asdict(decode_geometry(spec, arch))
    return ctx
