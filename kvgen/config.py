"""Pydantic models of one kvgen variant, and the cross-field rules that make a variant buildable.

Field-level checks (types, ranges, enumerations) are Pydantic's; the rules that relate several fields live in
`_cross_field_problems`, so that every rejection can name the field, the rule, the value and a fix.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .dtypes import DTYPES, CacheDType, IODType, ScaleDType
from .errors import ConfigError, Problem
from .reference import LUT_TAIL_COLUMNS

# sm_80: A100 / A30; sm_86: A10, A40, RTX 30xx; sm_89: L4, L40S, RTX 40xx (FP8 conversions in hardware); sm_90a:
# H100 / H200 / H20; sm_100a: B200 / GB200. No TMA nor programmatic launches before sm_90.
Arch = Literal["sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a"]
KernelName = Literal["store", "load", "copy_pages", "tma_tile_load", "gather4_tile_load", "decode"]
Swizzle = Literal["NONE", "32B", "64B", "128B"]

TMA_ARCHS = frozenset({"sm_90a", "sm_100a"})
# Shared memory per SM (the largest carveout) and the most one CTA may opt into, per arch (CUDA C++ Programming
# Guide, technical specifications per compute capability: 8.0 164 / 163 KB, 8.6 and 8.9 100 / 99 KB, 9.0 and 10.0
# 228 / 227 KB). A decode pipeline keeps 7 KB below the per-CTA maximum (static shared memory and the driver's
# reserve come on top).
SMEM_PER_SM = {"sm_80": 164 * 1024, "sm_86": 100 * 1024, "sm_89": 100 * 1024, "sm_90a": 228 * 1024,
               "sm_100a": 228 * 1024}
SMEM_PER_CTA = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90a": 227 * 1024,
                "sm_100a": 227 * 1024}
DECODE_SMEM_HEADROOM = 7 * 1024
ARCHS: tuple[str, ...] = get_args(Arch)
assert set(SMEM_PER_SM) == set(SMEM_PER_CTA) == set(ARCHS), "a shared-memory budget for every arch"
# Kernels emitted with another one rather than named in `kernels` (kernels_for_arch), and the one they come with.
DERIVED_KERNELS = {"decode_combine": "decode", "store_slots": "store", "adopt_block_table": "decode"}
GATHER4_ARCHS = frozenset({"sm_100a"})
SWIZZLE_BYTES = {"NONE": 16, "32B": 32, "64B": 64, "128B": 128}  # MAX: bytes() = 2^v * 16
TMA_SMEM_ALIGN = 128  # bytes: a TMA box's shared-memory destination
DECODE_TMA_MIN_PAGE = 8  # the TMA decode's boxes (one page each) must start on a swizzle atom of 8 rows
MAX_TILE_SMEM_BYTES = 200 * 1024  # the tile-load kernel stages one BN x BK tile; H100 allows 227 KB


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


class _Strict(BaseModel):
    # strict: a YAML `true` or "128" is not silently taken as an integer
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class CacheParams(_Strict):
    kind: Literal["paged", "continuous"] = Field("paged", description="paged (page table) or continuous batching")
    dtype: CacheDType = Field(description="element type stored in the cache")
    num_kv_heads: int = Field(ge=1, le=256, description="KV heads per device (H)")
    head_size: int = Field(ge=8, le=1024, description="elements per head (D)")
    is_mla: bool = Field(False, description="MLA cache: K only (KVD = 1), one KV head")
    page_size: int | None = Field(None, ge=1, le=1024, description="tokens per page (paged caches only)")
    num_layers: int = Field(1, ge=1, le=1024, description="layers per page; a run-time dimension, default for allocation")
    input_dtype: IODType | None = Field(
        None, description="dtype of new K/V handed to store and returned by load (default: bf16, or f32 for f32 caches)"
    )
    static_scales: bool = Field(
        False, description="FP8 caches without per-row scales: one float32 scale per (K|V, layer, KV head) held on the "
        "device (vLLM's and FlashInfer's k_scale / v_scale, per tensor or per head; KVCache.set_static_scales). store "
        "writes x / scale (saturating), load returns value * scale, decode folds them into the logits and the output")

    @property
    def kv_dim(self) -> int:
        return 1 if self.is_mla else 2

    @property
    def io_dtype(self) -> str:
        if self.input_dtype is not None:
            return self.input_dtype
        return "float32" if self.dtype == "float32" else ("float16" if self.dtype == "float16" else "bfloat16")


class Quantization(_Strict):
    scale_dtype: ScaleDType = Field("float32", description="dtype of the per-group scales")
    granularity: int = Field(ge=1, le=1024, description="elements of head_size sharing one scale")


class RopeLayout(_Strict):
    """MAX's rope-aware FP8 MLA row: padded_depth FP8 bytes of content, then rope_dim BF16 elements."""

    padded_depth: int = Field(ge=16, le=1024, description="bytes of FP8 content at the start of each row")
    rope_dim: int = Field(ge=8, le=256, description="BF16 rope elements after the content")


class TmaParams(_Strict):
    swizzle: Swizzle = Field("128B", description="TMA swizzle mode of K/V tiles")
    bn: int = Field(64, ge=1, le=256, description="rows (tokens) per K/V tile (default 64; 16 x page_size for pages "
                    "of 1-2 tokens, whose populate may read 16 lookup-table columns ahead)")
    bk: int | None = Field(None, ge=1, le=1024, description="columns per tile (default: padded depth)")
    base_alignment: int | None = Field(None, ge=1, description="alignment of tile start rows (default: bn)")


class AttentionParams(_Strict):
    """Decode attention over this cache: compile-time shape and features; values (scale, window size, cap,
    sink logits) are run-time arguments."""

    num_q_heads: int = Field(ge=1, le=1024, description="query heads per device (a multiple of num_kv_heads)")
    sliding_window: bool = Field(False, description="compile in a sliding window (its size is a launch argument)")
    logits_soft_cap: bool = Field(False, description="compile in cap * tanh(logit / cap)")
    sinks: bool = Field(False, description="accept per-head attention-sink logits")
    output_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    stages: int | None = Field(None, ge=2, le=4, description="decode K/V pipeline depth (default: 3 for 16-bit, 2 for FP8 caches)")
    ctas_per_sm: int | None = Field(
        None, ge=1, le=8,
        description="decode CTAs per SM the kernel is compiled for (registers per thread at most 65536 / (128 x N)), "
                    "capped by what shared memory holds; default: kvgen/derive.py decode_geometry. Overrides the "
                    "default's caps, so a high value may make ptxas spill (the build manifest lists spills)")
    loader: Literal["auto", "tma", "cp_async"] = Field(
        "auto", description="how K/V tiles reach shared memory: 'tma' = create_tma_tile descriptors, populate and an "
        "mbarrier pipeline (sm_90a/sm_100a only; cp.async on other archs); 'cp_async' = 16-byte asynchronous copies "
        "on every arch; 'auto' = the one measured faster (H200, session 11): TMA for FP8 caches whose pages hold a "
        "64-row tile or more (continuous caches too), cp.async otherwise (bench/RESULTS.md)")


class VariantSpec(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,47}$", description="lowercase identifier prefix of the variant")
    description: str = ""
    cache: CacheParams
    quantization: Quantization | None = None
    rope_layout: RopeLayout | None = None
    tma: TmaParams = TmaParams()
    attention: AttentionParams | None = None
    archs: list[Arch] = Field(default_factory=lambda: ["sm_90a"], min_length=1)
    kernels: list[KernelName] | None = Field(None, min_length=1, description="kernels to emit (default: all the archs support)")
    sources: list[str] = Field(default_factory=list, description="user kernel sources compiled against the trait")

    @model_validator(mode="before")
    @classmethod
    def _small_page_tile_default(cls, data: Any) -> Any:
        """A tile spans bn / P pages and populate reads that many lookup-table columns ahead, which the table's
        16-column tail must hold: pages of 1-2 tokens default to bn = 16 x P instead of 64 (an explicit bn is checked)."""
        if not isinstance(data, dict):
            return data
        cache, tma = data.get("cache"), data.get("tma", {})
        p = cache.get("page_size") if isinstance(cache, dict) else getattr(cache, "page_size", None)
        # A page size the rules refuse (0, 3, ...) keeps the default, so its error stands alone.
        if type(p) is not int or not _is_pow2(p) or LUT_TAIL_COLUMNS * p >= TmaParams.model_fields["bn"].default:
            return data
        if isinstance(tma, dict) and "bn" not in tma:
            return {**data, "tma": {**tma, "bn": LUT_TAIL_COLUMNS * p}}
        if isinstance(tma, TmaParams) and "bn" not in tma.model_fields_set:
            return {**data, "tma": tma.model_copy(update={"bn": LUT_TAIL_COLUMNS * p})}
        return data

    @model_validator(mode="after")
    def _check_rules(self) -> VariantSpec:
        problems = _cross_field_problems(self)
        if problems:
            raise ConfigError(problems)
        return self

    # ---- derived facts used by rendering and run time -----------------------------------------------------
    @property
    def tma_archs(self) -> list[str]:
        return [a for a in self.archs if a in TMA_ARCHS]

    @property
    def effective_kernels(self) -> list[str]:
        if self.kernels is not None:
            return list(self.kernels)
        wanted = ["store", "load", "copy_pages"]
        if self.tma_archs and DTYPES[self.cache.dtype].tma_type is not None:
            wanted.append("tma_tile_load")
        if GATHER4_ARCHS & set(self.archs) and DTYPES[self.cache.dtype].tma_type is not None:
            wanted.append("gather4_tile_load")
        if self.attention is not None:
            wanted.append("decode")
        return wanted

    def kernels_for_arch(self, arch: str) -> list[str]:
        """Kernels compiled into the cubin of one arch (TMA kernels only where the arch has TMA)."""
        out = []
        for k in self.effective_kernels:
            if k == "tma_tile_load" and arch not in TMA_ARCHS:
                continue
            if k == "gather4_tile_load" and arch not in GATHER4_ARCHS:
                continue
            out.append(k)
            if k == "decode":
                out.append("decode_combine")  # merges the split-K partials
                if self.cache.kind == "paged":
                    out.append("adopt_block_table")  # step tables from an engine's block table (KVCache.adopt_block_table)
            if k == "store" and self.cache.kind == "paged" and self.rope_layout is None:
                out.append("store_slots")  # the store with vLLM's slot mapping (KVCache.store_slots)
        return out


def _cross_field_problems(v: VariantSpec) -> list[Problem]:
    c, q, r = v.cache, v.quantization, v.rope_layout
    dt = DTYPES[c.dtype]
    io = DTYPES[c.io_dtype]
    P: list[Problem] = []

    def bad(field: str, rule: str, value: Any, fix: str) -> None:
        P.append(Problem(field, rule, value, fix))

    # -- cache shape --------------------------------------------------------------------------------------
    if c.kind == "paged" and c.page_size is None:
        bad("cache.page_size", "a paged cache needs a page size", None, "set cache.page_size, e.g. 128")
    if c.kind == "continuous" and c.page_size is not None:
        bad("cache.page_size", "a continuous cache has no pages", c.page_size, "remove cache.page_size or use kind: paged")
    if c.page_size is not None and not (_is_pow2(c.page_size) and 1 <= c.page_size <= 1024):
        bad("cache.page_size", "must be a power of two in [1, 1024] (row and populate math use shifts)",
            c.page_size, "use 1 (SGLang's default), 16, 64, 128 or 256")
    if (c.head_size * dt.nbytes) % 16:
        bad("cache.head_size", f"head_size * {dt.nbytes} B ({c.dtype}) must be a multiple of 16 B for vector and TMA access",
            c.head_size, f"use a multiple of {16 // dt.nbytes}")
    if (c.head_size * io.nbytes) % 16:
        bad("cache.input_dtype", f"head_size * {io.nbytes} B ({c.io_dtype}) must be a multiple of 16 B",
            c.head_size, f"use a head_size multiple of {16 // io.nbytes}")
    if c.is_mla and c.num_kv_heads != 1:
        bad("cache.num_kv_heads", "an MLA cache stores a single latent head", c.num_kv_heads, "set num_kv_heads: 1")
    if c.input_dtype is not None and dt.nbytes == 4 and c.input_dtype != "float32":
        bad("cache.input_dtype", "a float32 cache is fed float32 values (no silent widening of rounded data)",
            c.input_dtype, "set input_dtype: float32 or leave it out")

    # -- quantization -------------------------------------------------------------------------------------
    if q is not None:
        if not dt.is_fp8:
            bad("quantization", "scales are only defined for FP8 caches", c.dtype,
                "use dtype float8_e4m3fn (or float8_e5m2), or remove quantization")
        if c.kind == "continuous":
            bad("quantization", "a continuous cache is never quantized (MAX asserts this)", c.kind,
                "use kind: paged, or remove quantization")
        if c.head_size % q.granularity:
            bad("quantization.granularity", "must divide head_size", q.granularity,
                f"use a divisor of {c.head_size}, e.g. {_largest_divisor_pow2(c.head_size, 128)}")
        elif q.granularity % 16:
            bad("quantization.granularity", "must be a multiple of 16 so no 16-byte FP8 vector spans two scale groups",
                q.granularity, "use 32, 64 or 128")

    if c.static_scales:
        if not dt.is_fp8:
            bad("cache.static_scales", "static scales are only defined for FP8 caches", c.dtype,
                "use dtype float8_e4m3fn (or float8_e5m2), or remove static_scales")
        if q is not None:
            bad("cache.static_scales", "a cache has either per-row scales (quantization) or static scales, not both",
                "quantization and static_scales", "remove quantization (per tensor / per head) or static_scales (per row)")
        if r is not None:
            bad("cache.static_scales", "the rope-aware layout has its own scales", True, "remove static_scales")

    # -- rope-aware MLA layout ----------------------------------------------------------------------------
    if r is not None:
        if c.kind == "continuous":
            bad("rope_layout", "a continuous cache has no rope-aware layout (MAX: comptime assert)", c.kind,
                "use kind: paged")
        if c.dtype != "float8_e4m3fn":
            bad("rope_layout", "the rope-aware layout stores FP8 e4m3 content", c.dtype, "set cache.dtype: float8_e4m3fn")
        if not c.is_mla:
            bad("rope_layout", "the rope-aware layout is an MLA layout", c.is_mla, "set cache.is_mla: true")
        if r.padded_depth % 64:
            bad("rope_layout.padded_depth", "must be a multiple of 64 bytes (the content TMA swizzle atom)",
                r.padded_depth, "use 512 (DeepSeek kv_lora_rank)")
        if (r.rope_dim * 2) % 16:
            bad("rope_layout.rope_dim", "rope bytes must be a multiple of 16", r.rope_dim, "use 64")
        if c.head_size != r.padded_depth + 2 * r.rope_dim:
            bad("cache.head_size", "with a rope layout head_size counts bytes: padded_depth + 2 * rope_dim",
                c.head_size, f"set head_size: {r.padded_depth + 2 * r.rope_dim}")
        if q is not None and q.granularity != c.head_size:
            bad("quantization.granularity", "the rope-aware layout has one scale per token (granularity = head_size)",
                q.granularity, f"set granularity: {c.head_size}")

    # -- archs and kernels --------------------------------------------------------------------------------
    if len(set(v.archs)) != len(v.archs):
        bad("archs", "each arch may appear once", v.archs, "remove the duplicates")
    kernels = v.kernels or []
    if len(set(kernels)) != len(kernels):
        bad("kernels", "each kernel may appear once", kernels, "remove the duplicates")
    if "tma_tile_load" in kernels and not v.tma_archs:
        bad("kernels", "tma_tile_load needs TMA, which sm_80 does not have", v.archs, "add sm_90a to archs")
    if "gather4_tile_load" in kernels and not (GATHER4_ARCHS & set(v.archs)):
        bad("kernels", "gather4_tile_load uses tile::gather4, which needs sm_100a", v.archs, "add sm_100a to archs")
    uses_tma = any(k in v.effective_kernels for k in ("tma_tile_load", "gather4_tile_load"))
    if uses_tma and dt.tma_type is None:
        bad("cache.dtype", "TMA has no data type for float8_e5m2 (MAX rejects it too)", c.dtype,
            "use float8_e4m3fn, or drop the TMA kernels from kernels")

    # -- decode attention ---------------------------------------------------------------------------------
    if "decode" in v.effective_kernels:
        P.extend(_decode_problems(v))
    elif v.attention is not None and v.kernels is not None:
        bad("attention", "attention parameters are given but the decode kernel is not in kernels", v.kernels,
            "add decode to kernels, or remove attention")

    # -- TMA tile geometry (only when a TMA kernel is emitted) -------------------------------------------
    if uses_tma and "tma_tile_load" in v.effective_kernels:
        P.extend(_tma_problems(v))
    return P


def _decode_problems(v: VariantSpec) -> list[Problem]:
    c, a, q = v.cache, v.attention, v.quantization
    P: list[Problem] = []
    if a is None:
        return [Problem("attention", "the decode kernel needs attention parameters", None,
                        "add attention: {num_q_heads: 32}")]
    if a.num_q_heads % c.num_kv_heads or not 1 <= a.num_q_heads // c.num_kv_heads <= 16:
        P.append(Problem("attention.num_q_heads", "must be num_kv_heads times a group size of 1 to 16",
                         a.num_q_heads, f"use a multiple of {c.num_kv_heads} up to {16 * c.num_kv_heads}"))
    if c.head_size not in (64, 128, 256):
        P.append(Problem("cache.head_size", "decode attention is generated for head sizes 64, 128 and 256",
                         c.head_size, "use 64, 128 or 256"))
    if c.dtype == "float32":
        P.append(Problem("cache.dtype", "decode attention reads 16-bit or FP8 caches (tensor-core inputs)", c.dtype,
                         "use bfloat16, float16 or an FP8 dtype"))
    if c.is_mla or v.rope_layout is not None:
        P.append(Problem("cache.is_mla", "MLA decode is not generated yet (MHA/GQA caches only)", c.is_mla,
                         "remove decode from kernels for MLA caches"))
    if q is not None and q.scale_dtype == "float8_e8m0fnu" and c.head_size % q.granularity == 0:
        groups = c.head_size // q.granularity
        if (c.num_kv_heads * groups) % 4:
            P.append(Problem("cache.num_kv_heads", "decode with e8m0 scales reads each token's scales row "
                             "(num_kv_heads x head_size / granularity bytes) as 4-byte words", c.num_kv_heads,
                             "use num_kv_heads x groups a multiple of 4 (e.g. 4 or 8 KV heads), or scale_dtype: float32"))

    if c.io_dtype == "float32":
        P.append(Problem("cache.input_dtype", "decode queries are 16-bit", c.io_dtype, "use bfloat16 or float16"))
    if a.loader == "tma":  # an explicit request that no arch could honor is an error, not a silent cp.async
        if not TMA_ARCHS & set(v.archs):
            P.append(Problem("attention.loader", "the TMA loader needs an arch with TMA (sm_90a or sm_100a) in archs",
                             v.archs, "add sm_90a to archs, or use loader: cp_async"))
        if c.page_size is not None and c.page_size < DECODE_TMA_MIN_PAGE:
            P.append(Problem("attention.loader", f"the TMA decode copies one page per box, and a box must start on a "
                             f"swizzle atom ({DECODE_TMA_MIN_PAGE} rows): pages of {DECODE_TMA_MIN_PAGE}+ tokens "
                             f"(cache.page_size is {c.page_size})", a.loader,
                             "use loader: cp_async (auto picks it for small pages)"))
    if not P:  # a well-formed decode variant: its smallest pipeline (2 stages) must fit each arch's CTA
        from .derive import decode_geometry  # derive builds on this module

        for arch in v.archs:
            need, limit = decode_geometry(v, arch).smem_bytes, SMEM_PER_CTA[arch] - DECODE_SMEM_HEADROOM
            if need > limit:
                P.append(Problem("archs", f"decode's smallest pipeline (2 stages of 64-row K and V tiles) needs "
                                 f"{need // 1024} KB of shared memory per CTA; {arch} leaves it {limit // 1024} KB",
                                 arch, f"drop {arch} from archs for this cache, or use an FP8 dtype (half the bytes)"))
    return P


def _largest_divisor_pow2(n: int, cap: int) -> int:
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def _tma_problems(v: VariantSpec) -> list[Problem]:
    c, t = v.cache, v.tma
    dt = DTYPES[c.dtype]
    P: list[Problem] = []
    span = SWIZZLE_BYTES[t.swizzle]
    gran = span // dt.nbytes
    row_bytes = (v.rope_layout.padded_depth if v.rope_layout else c.head_size * dt.nbytes)
    if span > row_bytes:
        P.append(Problem("tma.swizzle", f"the swizzle span ({span} B) must fit in one head row ({row_bytes} B)",
                         t.swizzle, "use a smaller swizzle, e.g. 32B or NONE"))
    if not (_is_pow2(t.bn) and 8 <= t.bn <= 256):
        P.append(Problem("tma.bn", "must be a power of two in [8, 256] (TMA box rows <= 256)", t.bn, "use 64 or 128"))
    bk = t.bk if t.bk is not None else _padded_depth(v)
    if bk % gran:
        P.append(Problem("tma.bk", f"must be a multiple of the swizzle granule ({gran} elements of {c.dtype})",
                         bk, f"use {((bk + gran - 1) // gran) * gran}"))
    if bk > _padded_depth(v):
        P.append(Problem("tma.bk", "must not exceed the padded depth of a row", bk, f"use at most {_padded_depth(v)}"))
    if _is_pow2(t.bn) and t.bn * bk * dt.nbytes > MAX_TILE_SMEM_BYTES:
        P.append(Problem("tma.bn", f"a BN x BK tile ({t.bn} x {bk} x {dt.nbytes} B) must fit in {MAX_TILE_SMEM_BYTES} B of shared memory",
                         t.bn, f"use bn {_largest_pow2_at_most(MAX_TILE_SMEM_BYTES // (bk * dt.nbytes))} or a smaller bk"))
    if c.page_size and _is_pow2(c.page_size):  # (a refused page size is reported alone)
        P.extend(Problem(f"tma.{field}", rule, value, fix)
                 for field, rule, value, fix in small_page_tile_problems(c.page_size, t.bn, span, row_bytes))
    if t.base_alignment is not None:
        if not _is_pow2(t.base_alignment):
            P.append(Problem("tma.base_alignment", "must be a power of two", t.base_alignment, f"use {t.bn}"))
        elif c.page_size and c.page_size < t.bn and t.base_alignment < c.page_size:
            P.append(Problem("tma.base_alignment",
                             "when a tile spans several pages (page_size < bn), populate needs tiles that start on a page",
                             t.base_alignment, f"use a multiple of page_size ({c.page_size}), e.g. {t.bn}"))
    return P


def small_page_tile_problems(page_size: int, bn: int, span: int, row_bytes: int) -> list[tuple[str, str, Any, str]]:
    """(field, rule, value, fix) of a BN-row TMA tile over pages smaller than it, one box per page: populate reads
    bn / P lookup-table columns from a tile's first page, which MAX's 16-column tail must hold
    (reference.padded_lut_cols), and each box lands at P x span bytes, which TMA needs 128-byte aligned. The config
    checks tma.bn / tma.swizzle with it, runtime/tma.py the run-time overrides of create_tma_tile."""
    if page_size >= bn:
        return []
    out = []
    if bn // page_size > LUT_TAIL_COLUMNS:
        out.append(("bn", f"a tile over {page_size}-token pages reads bn / page_size lookup-table columns ahead, and the "
                    f"table's tail holds {LUT_TAIL_COLUMNS}", bn,
                    f"use bn of at most {LUT_TAIL_COLUMNS * page_size}, or larger pages"))
    if (page_size * span) % TMA_SMEM_ALIGN:
        wider = "use a wider swizzle (128B), or " if row_bytes >= TMA_SMEM_ALIGN else ""
        out.append(("swizzle", f"a tile issues one box per {page_size}-token page, at multiples of {page_size * span} B "
                    f"in shared memory, and TMA needs {TMA_SMEM_ALIGN}-byte aligned destinations", f"{span}B" if span > 16 else "NONE",
                    f"{wider}use pages of at least {max(1, TMA_SMEM_ALIGN // span)} tokens, or leave tma_tile_load out "
                    "of kernels"))
    return out


def _largest_pow2_at_most(n: int) -> int:
    p = 8
    while p * 2 <= n:
        p *= 2
    return p


def _padded_depth(v: VariantSpec) -> int:
    """MAX padded_depth(dtype, swizzle, D) = align_up(D, granule); rope layouts read only the content."""
    dt = DTYPES[v.cache.dtype]
    gran = SWIZZLE_BYTES[v.tma.swizzle] // dt.nbytes
    depth = v.rope_layout.padded_depth if v.rope_layout else v.cache.head_size
    return ((depth + gran - 1) // gran) * gran


def padded_depth(v: VariantSpec) -> int:
    return _padded_depth(v)


def validate_variant(data: dict[str, Any], source: str | None = None) -> VariantSpec:
    """Validate one variant dict; every problem becomes a `Problem` inside one `ConfigError`."""
    try:
        return VariantSpec.model_validate(data)
    except ConfigError as e:
        raise ConfigError(e.problems, source) from None
    except ValidationError as e:
        raise ConfigError([_problem_from_pydantic(err) for err in e.errors()], source) from None


def _problem_from_pydantic(err: dict[str, Any]) -> Problem:
    field = ".".join(str(p) for p in err["loc"]) or "<config>"
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        return Problem(field, "unknown field", value, "remove it or check its spelling against the documented fields")
    if kind == "missing":
        return Problem(field, "required field is missing", None, f"add {field} to the config")
    fix = err["msg"]
    if kind in ("literal_error", "enum"):
        fix = "use one of: " + err.get("ctx", {}).get("expected", "")
    elif "ctx" in err and any(k in err["ctx"] for k in ("ge", "le", "gt", "lt")):
        fix = "use a value that " + err["msg"].replace("Input should be", "is")
    return Problem(field, err["msg"], value, fix)
