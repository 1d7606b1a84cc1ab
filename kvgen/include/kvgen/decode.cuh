// Paged decode attention (one new query token per request), split-K flash-decoding, written against the
// KVCacheT trait (row_idx for every K/V row, the cache's scales for FP8).
//
// Grid (splits, H_kv, batch), 128 x ngrp threads: ngrp warp groups of 4 warps (ngrp = 1 except for small
// batches; see decode_partial). A CTA owns one request, one KV head and one chunk of its context, and serves all
// GROUP query heads of that KV head (rows of a 16-row MMA tile). K/V tiles of 64 rows
// stream through a STAGES-deep pipeline, cp.async (page lookups one tile ahead, zero fill past the end) or TMA
// page copies on mbarriers (see decode_partial); warp w of a group takes rows [16w, 16w + 16) of every tile of
// the group with its own online softmax, and all warps of the CTA merge at the end. A CTA of a multi-split plan
// writes a float32 partial output and its log-sum-exp, and decode_combine (a programmatic dependent launch on
// sm_90+) merges the splits and attention sinks; a single-split CTA writes the final output itself.
// MMA: mma.sync m16n8k16, fp32 accumulation, softmax in fp32 with exp2. f16 for f16 caches and for FP8 with no
// scales, one per token, or 2-4 groups per row (raw FP8 -> f16 in one cvt, the scales applied to score and
// probability columns; see DecodeTypes); bf16 for bf16 caches and for other FP8 scale groupings (dequantized into
// bf16 in registers). Tiles are unpadded
// and XOR-swizzled (TileLayout) under both loaders; FP8 fragments are built by vector and ldmatrix loads
// (DecodeSwizzle), and for query groups of up to 8 their P.V is computed transposed, heads as the MMA's n (PVT in
// decode_partial).
#pragma once
#include "cache.cuh"
#include "tma.cuh"

namespace kvgen {

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
// Per-CTA timeline for bench/decode_trace.py (built with -DKVGEN_DECODE_TRACE only; never in a normal build):
// globaltimer ns at [start, length known, first tile landed, loop done, exit, warps parked, first output merged],
// the SM's clock64 at the first and the latest point (slots 13, 14; their ratio to the globaltimer is the SM clock)
// and (slot 15) the SM id.
#ifdef KVGEN_DECODE_TRACE
extern "C" {  // unmangled, so the host finds it with cuModuleGetGlobal
__device__ unsigned long long kvgen_decode_trace[1 << 16][16];
}
#define KVGEN_TRACE(i)                                                                                      \
  do {                                                                                                      \
    if (threadIdx.x == 0) {                                                                                 \
      unsigned long long t_, sm_;                                                                           \
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));                                                \
      asm volatile("{ .reg .u32 s; mov.u32 s, %%smid; cvt.u64.u32 %0, s; }" : "=l"(sm_));                  \
      const uint32_t cta_ = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;                \
      if (cta_ < (1u << 16)) {                                                                              \
        kvgen_decode_trace[cta_][i] = t_;                                                                   \
        kvgen_decode_trace[cta_][15] = sm_;                                                                 \
        kvgen_decode_trace[cta_][i == 0 ? 13 : 14] = clock64(); /* SM cycles at start / at the last point */ \
      }                                                                                                     \
    }                                                                                                       \
  } while (0)
#else
#define KVGEN_TRACE(i) do {} while (0)
#endif

constexpr int kDecodeThreads = 128;
constexpr int kDecodeTile = 64;

// L2 prefetch of the K/V row copies (KVGEN_KV_PREFETCH = 0 | 64 | 128 | 256 bytes; a compile-time knob so one
// run can A/B it on the same caches: bench/decode_bench.py --defines). 128 measured 1-2% faster than none on
// every shape (bf16 and FP8, 16 x 1k to 128 x 4k); 256 was within noise of 128. An evict-first cache policy on
// the same copies (createpolicy + .L2::cache_hint) raised an illegal-instruction fault on the H100. On the H200,
// with unpadded 16-bit tiles (SWZ16): 0 and 128 within 0.5% of each other on all 16 shapes, 256 up to 8% slower
// (bench/decode_ab_prefetch_h200_s10.md); the hint's old gain came with the split lines of padded rows.
#ifndef KVGEN_KV_PREFETCH
#define KVGEN_KV_PREFETCH 128
#endif
#if KVGEN_KV_PREFETCH != 0 && KVGEN_KV_PREFETCH != 64 && KVGEN_KV_PREFETCH != 128 && KVGEN_KV_PREFETCH != 256
#error "KVGEN_KV_PREFETCH must be 0, 64, 128 or 256 (bytes of L2 prefetch per K/V copy)"
#endif

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global" KVGEN_L2_PREFETCH_QUAL(KVGEN_KV_PREFETCH) " [%0], [%1], 16, %2;\n"
               ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 4 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

template <bool F16> __device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (F16) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// ldmatrix: four 8x8 matrices of 16-bit elements; lane i gives the shared address of row i % 8 of matrix i / 8.
// Plain: lane l receives row l / 4, elements 2 (l % 4) and +1 (an m16n8k16 B fragment when rows are n).
// .trans: lane l receives rows 2 (l % 4) and +1 of column l / 4 (a B fragment when rows are k). x2: two matrices,
// lanes 0-15 give the addresses. Addresses are 32-bit shared-window addresses (TileLayout and Q compute theirs
// there).
__device__ __forceinline__ void ldsm_x4_s(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}
__device__ __forceinline__ void ldsm_x2_s(uint32_t& r0, uint32_t& r1, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(addr) : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans_s(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}
// A 16-byte shared load.
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr) : "memory");
  return v;
}

// Transpose of an 8 x 8 matrix of 16-bit pairs held as MMA fragments (lane: row lane / 4, columns 2 (lane % 4) and
// + 1): returns the same lane's pair of the transposed matrix (sm_75+).
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

// Two floats -> one 32-bit register of the MMA input type (low half = first element).
template <bool F16> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (F16) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

// f16x2 product of two f16x2 registers (round to nearest; subnormals kept).
__device__ __forceinline__ uint32_t hmul2_bits(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

// Two consecutive FP8 values (as stored) -> two floats.
template <class T> __device__ __forceinline__ float2 fp8x2_to_float2(unsigned short raw) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(raw),
                                                   is_same_v<T, __nv_fp8_e4m3> ? __NV_E4M3 : __NV_E5M2);
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
}

// Two FP8 values -> one f16x2 register in a single cvt (e4m3 and e5m2 are exact in f16).
template <class T> __device__ __forceinline__ uint32_t fp8x2_to_f16x2(unsigned short raw) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(raw),
                                                   is_same_v<T, __nv_fp8_e4m3> ? __NV_E4M3 : __NV_E5M2);
  return uint32_t(h.x) | (uint32_t(h.y) << 16);
}

// Four FP8 values (one 32-bit word) -> two f16x2 registers: bytes 0-1 and bytes 2-3. The halves go to cvt as
// 16-bit operands of the word itself, so no shift extracts the high half (ptxas reads it in place). The FP8 cvt
// exists from sm_89; before that (sm_80) cuda_fp8.h's conversion, which emulates it (ptxas refused the FP8 decode
// of every sm_80 build until the GPU tests ran the sm_80 path, session 17).
template <class T> __device__ __forceinline__ void fp8x4_to_f16x2x2(uint32_t w, uint32_t& lo, uint32_t& hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  if constexpr (is_same_v<T, __nv_fp8_e4m3>) {
    asm("{ .reg .b16 l, h; mov.b32 {l, h}, %2; cvt.rn.f16x2.e4m3x2 %0, l; cvt.rn.f16x2.e4m3x2 %1, h; }" : "=r"(lo), "=r"(hi) : "r"(w));
  } else {
    asm("{ .reg .b16 l, h; mov.b32 {l, h}, %2; cvt.rn.f16x2.e5m2x2 %0, l; cvt.rn.f16x2.e5m2x2 %1, h; }" : "=r"(lo), "=r"(hi) : "r"(w));
  }
#else
  lo = fp8x2_to_f16x2<T>(static_cast<unsigned short>(w & 0xffffu));
  hi = fp8x2_to_f16x2<T>(static_cast<unsigned short>(w >> 16));
#endif
}

template <class Cache> struct DecodeTypes {
  using T = typename Cache::dtype;
  static constexpr bool kFp8 = sizeof(T) == 1;
  // FP8 with no scales or one scale per (token, head): raw FP8 -> f16 in one cvt, the K scale multiplies a
  // score column and the V scale a probability column (no per-element work).
  static constexpr bool kFp8Direct = kFp8 && (!Cache::quantization_enabled || Cache::num_scale_groups == 1);
  // FP8 with 2-4 scale groups per row (float32 or e8m0): the same f16 path. An output chunk of P.V lies in one
  // group, so P.V takes one P fragment per group (P times each token's V scale of that group) and V needs no
  // per-element work.
  //  - Groups of 64+ dims, rows of 8+ chunks (head size 128 or 256): k-steps aligned to the groups (DecodeSwizzle
  //    ALIGNED), so each group's Q.K has its own accumulator and K's scales multiply one score per token and group,
  //    no element (H200, session 15: float32 per-64 scales 4.6-13.6% faster than below, within 1-5% of per-token
  //    scales, which read half the scale bytes).
  //  - Smaller groups (granularity 32 of a 128-wide head, or of a 64-wide one): each token's largest K scale goes
  //    on its score column and every K element is multiplied in f16x2 by its group's share of that scale (at most 1,
  //    so no f16 overflow).
  // The first version dequantized every element to bf16 (FP8 -> float, a multiply, a pack; ncu, H200, 128 x 4k:
  // twice the warp instructions of per-token scales), which more than 4 groups still do (kFp8Dequant). e8m0
  // per-32 groups were on it until session 15: the f16 path is 1.8-8.8% faster for them since P.V needs no
  // per-element work (it was 1-5% slower with f16x2 shares on V too).
  static constexpr bool kFp8Grouped = kFp8 && Cache::quantization_enabled && Cache::num_scale_groups >= 2 &&
                                      Cache::num_scale_groups <= 4;
  static constexpr bool kFp8GroupAligned = kFp8Grouped && Cache::quantization_granularity % 64 == 0 && Cache::head_size >= 128;
  // More than 4 groups (granularity 16 of a 128-wide head): every element dequantized to bf16.
  static constexpr bool kFp8Dequant = kFp8 && !kFp8Direct && !kFp8Grouped;
  static constexpr bool kF16 = is_same_v<T, __half> || kFp8Direct || kFp8Grouped;  // f16 MMA, else bf16
};

// Shared-memory layout of every decode K/V tile (rows of 4 to 32 chunks of 16 bytes: head sizes 64, 128 and 256 in
// 16-bit and FP8), unpadded and XOR-swizzled. A tile is cut into column blocks of at most 128 bytes: block j holds
// bytes [128j, 128j + 128) of all BN rows, RP bytes per row, and chunk c of a block row r sits at c ^ row_xor(r)
// (128-byte block rows: r & 7; 64-byte rows, two per 128-byte line: (r / 2) & 3). That is exactly what a TMA box
// of one page x one block column writes with SWIZZLE_128B (SWIZZLE_64B) into a 1024-byte aligned block, so both
// loaders fill the same layout and one set of fragment loads reads it:
//  - the 8 rows of one ldmatrix matrix, and the 2 rows x 4 chunks of one quarter-warp's 16-byte FP8 K loads, land
//    in 8 distinct 4-bank units;
//  - a cp.async warp writes each 128-byte global line into one 128-byte shared line (padded rows, 272 bytes, split
//    lines between two wavefronts, i.e. two L2 requests; ncu, bf16 64 x 16k on the H200: L2 hit rate 48% against
//    FlashInfer's 1%, DRAM 4.22 against 4.49 TB/s);
//  - a tile start, and the start of every block, is a multiple of 1024 bytes (TMA) or of a block row (cp.async),
//    so XOR on the chunk bits of (tile + lane offset) equals XOR on the lane offset: one lane offset per operand
//    lives across the tile loop, and a fragment address costs an add per tile plus one XOR.
template <int CPR, int BN> struct TileLayout {
  static_assert(CPR == 4 || CPR == 8 || CPR == 16 || CPR == 32, "rows of 64, 128, 256 or 512 bytes");
  static constexpr int CPB = CPR < 8 ? CPR : 8;  // chunks per block row
  static constexpr int RP = CPB * 16;            // bytes per block row
  static constexpr int BLOCK = BN * RP;          // bytes per block
  static constexpr int NBLK = CPR / CPB;
  __device__ static constexpr int row_xor(int row) { return CPB == 8 ? row & 7 : (row >> 1) & 3; }
  // Byte offset of chunk `chunk` of row `row` from the tile start.
  __device__ static constexpr int offset(int row, int chunk) {
    return (chunk / CPB) * BLOCK + row * RP + ((chunk % CPB) ^ row_xor(row)) * 16;
  }
  // Address of chunk `chunk` + m from lane_addr = tile + offset(row, m), for m < CPB and chunk % CPB sharing no bits
  // with m (fragment loads: m is the lane's sub-chunk, chunk a multiple of 2 or 4): the XOR stays inside a block
  // row, the block is an add.
  __device__ static constexpr uint32_t step(uint32_t lane_addr, int chunk) {
    return (lane_addr ^ uint32_t((chunk % CPB) * 16)) + uint32_t((chunk / CPB) * BLOCK);
  }
};

// FP8 fragments from TileLayout tiles (decode_partial's SWZ), built by vector and ldmatrix loads:
//  - K (B of Q.K^T): lane (gq, tq) reads NJ = CPR / 4 whole chunks of its token's row, chunk k_chunk(tq, j). k-step
//    kk takes 4 bytes of load kk / 4: those 4 dims stand at MMA k positions 2tq, 2tq + 1 (b0) and 2tq + 8, 2tq + 9
//    (b1). Q's A fragments are built with the same permutation of k (k_dim), so Q.K is unchanged. Rows of 8+
//    chunks: rows gq even and odd of a quarter-warp take opposite unit parities.
//  - ALIGNED (per-group scales of 64+ dims, rows of 8+ chunks): load j of lane tq is chunk 4j + tq instead, so the
//    four lanes of a k-step read 4 consecutive chunks, one scale group, and each group's Q.K gets its own
//    accumulator (scaled once per token after the k-steps, no per-element work). A quarter-warp's two token rows
//    would then read the same 4 chunks with XORs differing in bit 0, a 2-way bank conflict, so the MMA's token slot
//    i (0-7) reads shared row slot_row(i) = 4 (i % 2) + i / 2 instead: rows whose XORs differ in bit 2.
//  - V (B of P.V): ldmatrix.trans of 8 tokens x one chunk, read as 16-bit pairs, gives lane (gq, tq) dims 2gq and
//    2gq + 1 of tokens 2tq and 2tq + 1. One byte permute splits them into the B fragments of two n-tiles: "even"
//    (column j holds dim 16c + 2j) and "odd" (dim 16c + 2j + 1). Output n-tile dn holds chunk dn / 2, parity dn % 2.
//    Its 8 row addresses are the same token slots' rows (slot_row), so P.V pairs every token with its own row.
template <int CPR, int BN, bool ALIGNED = false> struct DecodeSwizzle {
  static_assert(CPR == 4 || CPR == 8 || CPR == 16, "64-, 128- or 256-byte rows");
  static_assert(!ALIGNED || CPR >= 8, "group-aligned k-steps need rows of 8+ chunks");
  using L = TileLayout<CPR, BN>;
  static constexpr int NJ = CPR / 4;  // 16-byte K loads per lane and token row
  // K chunk of lane column tq, load j (64-byte rows: the two rows of a line sit in its two halves).
  __device__ static constexpr int k_chunk(int tq, int j) {
    return ALIGNED ? 4 * j + tq : CPR == 4 ? tq : 8 * (j / 2) + 2 * tq + (j % 2);
  }
  // First of the 4 dims of k-step kk in lane column tq.
  __device__ static constexpr int k_dim(int tq, int kk) { return 16 * k_chunk(tq, kk / 4) + 4 * (kk % 4); }
  // Tile row (within a warp's 16) of MMA token slot `slot` (0-15): the identity unless ALIGNED.
  __device__ static constexpr int slot_row(int slot) { return ALIGNED ? (slot & 8) | ((slot & 1) << 2) | ((slot & 7) >> 1) : slot; }
  // K: lane (gq, tq), row = warp * 16 + slot_row(gq) (+ 8 for the second n-tile, an add); load j of k_chunk(tq, j).
  __device__ static uint32_t k_lane(int row, int tq) { return uint32_t(L::offset(row, k_chunk(tq, 0))); }
  __device__ static uint32_t k_load(uint32_t lane_addr, int j) {
    return CPR == 4 ? lane_addr : L::step(lane_addr, ALIGNED ? 4 * j : 8 * (j / 2) + (j % 2));
  }
  // V: ldmatrix row `row` of the lane, chunk c + half (c even, half = lane / 16): L::step(tile + v_lane, c).
  __device__ static uint32_t v_lane(int row, int half) { return uint32_t(L::offset(row, half)); }
};

// decode_partial's flags: bit 0, early cache reads (KVCache.decode(early_cache_reads=True)).
constexpr uint32_t kDecodeEarlyReads = 1u;

// Final output of a single-split plan, written by decode_partial itself (no combine launch, no float32 partials):
// out [batch, Hq, D], lse (optional) [batch, Hq], sinks (optional) [Hq]. out == nullptr: write partials.
template <class OT> struct DecodeFinal {
  OT* out;
  float* lse;
  const float* sinks;
};

// Partial attention of one (split, kv head, request). q: [batch, Hq, D]; part_o: [batch, Hq, max_splits, D] f32;
// part_lse: [batch, Hq, max_splits] f32 (natural log). chunk: tokens per split (a multiple of 64), or, with
// BALANCED, 0 to cut each request's own context into gridDim.x equal 64-row-aligned splits (CUDA graphs: a grid
// captured once stays balanced as the lengths on the device grow; kvgen/derive.py decides where it is compiled
// in). The last split also takes everything past gridDim.x * chunk, so any length is covered. With one split
// (gridDim.x == 1) and fin.out set, the CTA writes the final output as decode_combine would (sinks included).
// Warp groups: a CTA of ngrp = blockDim.x / 128 groups (ngrp x SMEM_BYTES of shared memory) cuts its split into
// ngrp consecutive sub-splits ("virtual splits": chunk and the BALANCED cut count gridDim.x * ngrp of them), each
// group streams its own with its own pipeline and named barrier, and all 4 x ngrp warps merge in shared memory.
// One such CTA per (request, KV head) holds the same warps and shared memory per SM as ngrp one-group CTAs, but
// needs no float32 partials and no combine launch (small batches; runtime/decode_plan.py).
// K/V loader, chosen by kvgen/derive.py decode_geometry; both fill the same TileLayout:
//   TMA = false: cp.async, 16 bytes per thread per copy (any arch).
//   TMA = true (sm_90+): one TMA copy per page of a tile and column block (page rows from the trait's populate)
//     through kmap / vmap, create_tma_tile maps of this layer's [rows, H, D] view (runtime/tma.py decode_tile)
//     whose box is one page x 128 bytes (64-byte rows: 64) of one head with the swizzle of that width. Copies
//     complete on a per-stage mbarrier of the warp group; its thread 0 issues, its threads wait. (The first TMA
//     loader wrote 16-byte padded rows through an unswizzled box D + 16 bytes wide: 7-37% slower than cp.async
//     on the H200, whose padded rows had the same split-line cost; head size 256 did not fit a box.)
template <class Cache, class QT, class OT, int GROUP, int STAGES, int SMEM_BYTES, bool WINDOW, bool SOFTCAP, bool TMA = false,
          bool BALANCED = false, int MAX_GROUPS = 1>
__device__ __forceinline__ void decode_partial(const CUtensorMap* kmap, const CUtensorMap* vmap, DecodeFinal<OT> fin,
                                               const CacheArgs& a, uint32_t layer, const QT* __restrict__ q,
                                               float* __restrict__ part_o, float* __restrict__ part_lse,
                                               uint32_t chunk, float softmax_scale, float soft_cap, uint32_t window,
                                               uint32_t flags) {
  using Ty = DecodeTypes<Cache>;
  using T = typename Ty::T;
  constexpr bool F16 = Ty::kF16;
  constexpr int D = Cache::head_size;
  constexpr int H = Cache::num_heads;
  constexpr int BN = kDecodeTile;
  constexpr int ES = int(sizeof(T));
  constexpr int ROW_BYTES = D * ES;
  constexpr int CPR = ROW_BYTES / 16;             // 16-byte chunks per row
  // Every tile is a TileLayout (unpadded, XOR-swizzled column blocks), whichever loader fills it. SWZ: FP8 fragments
  // by vector and ldmatrix loads (DecodeSwizzle); SWZ16: 16-bit fragments by ldmatrix. kvgen/derive.py decode_geometry
  // mirrors the shared-memory size.
  using Lay = TileLayout<CPR, BN>;
  constexpr bool SWZ = Ty::kFp8, SWZ16 = !Ty::kFp8;
  constexpr int RP = Lay::RP;  // bytes between two rows of a block
  constexpr bool QUANT = Cache::quantization_enabled;
  constexpr int G = Cache::num_scale_groups;
  constexpr int GRAN = Cache::quantization_granularity;
  constexpr int KS = D / 16;                      // k-steps of Q.K
  constexpr int DN = D / 8;                       // n-tiles of P.V
  static_assert(GROUP >= 1 && GROUP <= 16, "one 16-row MMA tile holds the query group");
  static_assert(KS % 2 == 0 && DN % 2 == 0, "ldmatrix.x4 covers two k-steps / two n-tiles");
  static_assert(D % 16 == 0 && (BN * CPR) % kDecodeThreads == 0, "tile copy splits evenly");
  constexpr int TILE_BYTES = BN * ROW_BYTES;
  constexpr int SCALE_BYTES = QUANT ? 2 * BN * G * 4 : 0;
  // e8m0 (power-of-two) scales: a quarter of float32's bytes. cp.async moves 4 bytes at least, so each (token,
  // group) slot holds the aligned word of the cache's scales that contains its byte (the neighbours' bytes ride
  // along in the same sector), and the byte is picked at use. Needs H * G % 4 == 0 (config rule), so every scales
  // row starts on a word and a byte's place in its word is (h * G + g) % 4.
  constexpr bool E8M0 = QUANT && is_same_v<typename Cache::scale_dtype, e8m0_t>;
  static_assert(!E8M0 || (H * G) % 4 == 0, "e8m0 decode scales: rows of whole words");
  // With up to 4 groups (G divides 4) all G bytes of a (token, head) lie in one word: one copy per token fills slot
  // t * G, and every group of the token reads it there (scale_at). (A word per slot was G copies of the same word:
  // H200, session 17, e8m0 per-32 scales at 128 x 16k.) More groups span words and copy one per slot.
  constexpr int kScaleCopiesPerRow = E8M0 && G <= 4 ? 1 : G;
  constexpr int STAGE_BYTES = 2 * TILE_BYTES + SCALE_BYTES;
  // TMA's swizzle follows the shared address bits, so its tiles (and every block in them) start on a multiple of
  // 1024 bytes; cp.async tiles on a multiple of a row (the XOR of a fragment address stays inside a block row).
  constexpr int ALIGN_SLACK = TMA ? 1024 : ROW_BYTES;
  static_assert(SMEM_BYTES % ALIGN_SLACK == 0 && (TMA ? TILE_BYTES % 1024 : (2 * TILE_BYTES + SCALE_BYTES) % ROW_BYTES) == 0,
                "the tiles of every stage and group start aligned");
  // SMEM_BYTES is what the host reserves (kvgen/derive.py decode_geometry): both uses of it must fit.
  constexpr int Q_ROWS = GROUP > 8 ? 16 : 8, Q_PITCH = 2 * D + 16;  // SWZ: Q in shared memory, padded rows
  constexpr int Q_BYTES = SWZ ? Q_ROWS * Q_PITCH : 0;
  constexpr int Q_OFF = STAGES * (STAGE_BYTES + BN * 4);  // after the stages and the row ring
  // Rows of the 16-row MMA tile that hold query heads: gq only, unless GROUP > 8 (then gq + 8 too).
  constexpr int ROWS_USED = GROUP > 8 ? 2 : 1;
  // PVT (swizzled FP8, GROUP <= 8): P.V is computed transposed, O^T[dims][heads] = V^T P^T, so the 8 heads are the
  // MMA's n and the dims its m: D / 16 MMAs per tile instead of D / 8 and 4 x D / 16 accumulators instead of
  // 4 x D / 8 (half of those were padding rows). o[m] then holds dims 16m + 2gq (c0, c1) and 16m + 2gq + 1
  // (c2, c3) of heads 2tq (c0, c2) and 2tq + 1 (c1, c3).
  // Q.K^T is swapped too, S^T[tokens][heads] = K Q^T, tokens as the MMA's m and heads as its n: one MMA per k-step
  // instead of two n-tiles against a Q half of zero rows. Lane (gq, tq) then holds tokens gq and gq + 8 of heads
  // 2tq and 2tq + 1 (c0, c1 and c2, c3): the softmax reduces over gq, the running max and sum are per head
  // (m_run / l_run [hh] = head 2tq + hh), O^T's rescale needs no shuffle, and P^T (the B operand of O^T += V^T P^T)
  // is S^T's fragment transposed by movmatrix.
  constexpr bool PVT = SWZ && GROUP <= 8;
  // Where FP8 row scales go (per token is one group, G = 1): K's per-token and aligned per-group scales multiply
  // each group's score accumulator once per token (kKScaledScores); V's per-token and per-group scales multiply one P
  // fragment per group (kVScaledP), times kPUp, with the merge weights taking 1 / kPUp. A V scale is amax / fp8_max,
  // small (e4m3: amax 0.03 -> 6.7e-5; e5m2's are 128x smaller), and P x scale under f16's normal range (6.1e-5) lost
  // bits as subnormals (relative error 6-8e-3 at an e4m3 V amax of 3e-3, H200, session 15). kPUp = 2^8 x fp8_max /
  // 448 (e4m3 2^8, e5m2 2^15) keeps V amax from about 1e-4 to 114k exact for both formats; a larger finite amax
  // saturates at f16's largest value (never inf), and a NaN or inf scale still reaches the output.
  constexpr bool kKScaledScores = (Ty::kFp8Direct && QUANT) || Ty::kFp8GroupAligned;
  constexpr bool kVScaledP = (Ty::kFp8Direct && QUANT) || Ty::kFp8Grouped;
  constexpr float kPUp = kVScaledP ? 256.f * Cache::fp8_max / 448.f : 1.f;
  constexpr int DN_OUT = PVT ? D / 16 : DN;
  static_assert(Q_OFF + Q_BYTES + ALIGN_SLACK <= SMEM_BYTES,
                "K/V stages, the row ring and (SWZ) Q fit the shared memory");
  // (Per group: a CTA of ngrp groups gets ngrp x SMEM_BYTES and has ngrp x as many warp slices to merge.)
  static_assert(4 * GROUP * (D + 8 + 2) * 4 + ALIGN_SLACK <= SMEM_BYTES, "the epilogue's per-warp slices fit the shared memory");
#if !(defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
  static_assert(!TMA, "the TMA loader needs sm_90 or newer");
#endif
  // Stage s: cp.async keeps [K tile, V tile, scales] together; TMA puts every stage's tiles first so each tile
  // stays 1024-byte aligned, then the scales. The row ring follows either way.
  auto k_tile_off = [](int stage) { return TMA ? stage * 2 * TILE_BYTES : stage * STAGE_BYTES; };
  auto scale_off = [](int stage) { return TMA ? STAGES * 2 * TILE_BYTES + stage * SCALE_BYTES : stage * STAGE_BYTES + 2 * TILE_BYTES; };
  extern __shared__ __align__(16) unsigned char smem_raw[];
  static_assert(MAX_GROUPS >= 1 && MAX_GROUPS <= 8, "1-8 warp groups (named barriers 1-8)");
  // MAX_GROUPS == 1 (large rows): constants, so those kernels compile exactly as one-group kernels.
  const uint32_t tid = MAX_GROUPS == 1 ? threadIdx.x : threadIdx.x % kDecodeThreads;  // thread within its group
  const uint32_t grp = MAX_GROUPS == 1 ? 0 : threadIdx.x / kDecodeThreads;             // index of its group
  const uint32_t ngrp = MAX_GROUPS == 1 ? 1 : blockDim.x / kDecodeThreads;
  // Aligned by an offset from smem_raw, not through an integer round trip, so the compiler still knows every
  // pointer derived from it is shared memory (generic loads of the scales otherwise).
  unsigned char* const smem_cta =
      smem_raw + (ALIGN_SLACK - static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) % ALIGN_SLACK) % ALIGN_SLACK;
  unsigned char* const smem = smem_cta + grp * SMEM_BYTES;  // this group's pipeline
  // The group's own barrier (named barrier 1 + grp, its 128 threads); the CTA-wide __syncthreads is barrier 0.
  auto group_sync = [&]() { asm volatile("bar.sync %0, %1;" ::"r"(grp + 1), "n"(kDecodeThreads) : "memory"); };
  // TMA: one transaction barrier per stage and warp group.
  __shared__ alignas(8) uint64_t full_bar_cta[TMA ? MAX_GROUPS * STAGES : 1];
  uint64_t* const full_bar = full_bar_cta + (TMA ? grp * STAGES : 0);
  // Each warp's final running max per query row, published before the loop's last barrier so the merge needs no
  // pass of its own to find the CTA's max (kvgen/derive.py decode_geometry counts these bytes).
  // (Rows padded by 4 floats: the lanes of a PVT warp read rows 2tq and 2tq + 1 at once, 4-way bank conflicts at a
  // pitch of 64 bytes.)
  __shared__ alignas(16) float slice_max[GROUP][4 * MAX_GROUPS + 4];

  const uint32_t split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const uint32_t warp = tid / 32, lane = tid % 32;  // warp within the group
  const uint32_t vsplit = split * ngrp + grp, nvsplits = gridDim.x * ngrp;  // this group's virtual split
  const uint32_t gq = lane / 4, tq = lane % 4;  // MMA fragment row group and column pair
  const Cache kc = Cache::view(a, 0, layer), vc = Cache::view(a, 1, layer);
  // A token's scale: its float32, or (E8M0) the word holding its byte, copied to a 4-byte shared slot.
  auto scale_src = [](const typename Cache::scale_dtype* scales, int64_t so) -> const void* {
    if constexpr (E8M0) return reinterpret_cast<const uint8_t*>(scales) + (so & ~int64_t(3));
    else return scales + so;
  };
  const uint32_t e8m0_head_byte = h * uint32_t(G);  // this head's first scale byte in a row (rows start on words)
  auto scale_at = [&](const float* slots, int i) -> float {  // slot i = token i / G, group i % G
    if constexpr (E8M0) {
      const uint32_t shift = 8u * ((e8m0_head_byte + uint32_t(i % G)) & 3u);
      const int slot = kScaleCopiesPerRow == 1 ? i - i % G : i;  // the token's one copy (kScaleCopiesPerRow)
      return to_f32(e8m0_t{uint8_t(reinterpret_cast<const uint32_t*>(slots)[slot] >> shift)});
    } else {
      return slots[i];
    }
  };
  // Per-group scales (Ty::kFp8Grouped): the largest scale of token slot t, and the reciprocal of it (0 for a token
  // with no scales: a zero-filled row past the context).
  auto scale_max = [&](const float* slots, int t) -> float {
    float m = scale_at(slots, t * G);
#pragma unroll
    for (int g = 1; g < G; ++g) m = fmaxf(m, scale_at(slots, t * G + g));
    return m;
  };
  auto inv_or_zero = [](float m) -> float { return m > 0.f ? 1.f / m : 0.f; };

  // Programmatic dependent launch (common.cuh pdl_wait): by default nothing global is touched before the kernel
  // before this one on the stream has finished. With early reads the page table, the lengths, the static scales and
  // the first tiles' K/V rows (when all of them precede cache_length(b)) are read first, and only Q, the step's own
  // token and every write wait: the caller promises that the kernel before (kvgen's store is such a kernel) writes
  // none of those.
  const bool early_reads = (flags & kDecodeEarlyReads) != 0;
  if (!early_reads) pdl_wait();
  // Context of this request: the step's token was stored at cache_length(b), so it holds cache_length + 1.
  KVGEN_TRACE(0);
  const uint32_t kv_len = b < a.batch_size ? kc.cache_length(b) + 1 : 0;
  // Static scales (Cache::static_scales; 1 otherwise, folded away): K's joins the logit scale, V's the merge weights.
  const float k_static = kc.static_scale(h), v_static = vc.static_scale(h);
  uint32_t* row_ring = reinterpret_cast<uint32_t*>(smem + STAGES * STAGE_BYTES);  // [STAGES][BN], see the loader
  // TMA: the ring holds each tile's page rows from the trait's populate (one row per page of the tile). Thread
  // p < NP keeps row p of the populate of the tile at position `pos`: one register per thread lives across the
  // math, not NP.
  using Rows = decltype(kc.template populate<BN, BN>(0u, 0u));
  constexpr int NP = Rows::num_pages, EFF = Rows::eff_page;
  // Generic, so populate is instantiated only where a TMA branch calls it (cp.async pages may be too small for it).
  auto page_row_at = [&](auto pos) -> uint32_t {
    const Rows r = kc.template populate<BN, BN>(b, uint32_t(pos));
    uint32_t mine = r.rows[0];
#pragma unroll
    for (int p = 1; p < NP; ++p) mine = tid == uint32_t(p) ? r.rows[p] : mine;
    return mine;
  };
  // Without a window a split's first row does not depend on the request's length: look up the rows (TMA: page
  // rows) of its first STAGES tiles into the ring now, while the cache_length load is in flight, instead of after
  // it (one HBM round trip less before the first copy). Positions are clamped into the request's lookup-table row
  // so the speculative lookups stay in bounds (TMA: to the last whole tile that starts inside it, so populate's
  // aligned vector reads stay aligned and inside the row); rows (pages) past the context are
  // dropped once the length is known (TMA: by `wanted` when the copies are issued).
  constexpr bool kEarlyRows = !WINDOW;
  const bool early_rows = kEarlyRows && (!BALANCED || chunk != 0);
  if constexpr (TMA) {
    if (early_rows && tid < uint32_t(NP)) {
      const uint32_t max_tile =
          Cache::page_size_ > 0 ? (a.lut_row_stride * uint32_t(Cache::page_size_) - 1u) / BN * BN : 0xffffffffu & ~uint32_t(BN - 1);
#pragma unroll
      for (int s = 0; s < STAGES; ++s) row_ring[s * BN + tid] = page_row_at(min(vsplit * chunk + uint32_t(s) * BN, max_tile));
    }
  } else {
    if (early_rows && tid < BN) {
      const uint32_t max_pos = Cache::page_size_ > 0 ? a.lut_row_stride * uint32_t(Cache::page_size_) - 1u : 0xffffffffu;
#pragma unroll
      for (int s = 0; s < STAGES; ++s)
        row_ring[s * BN + tid] = kc.row_idx(b, min(vsplit * chunk + uint32_t(s) * BN + tid, max_pos));
    }
  }
  const uint32_t ctx_start = (WINDOW && kv_len > window) ? kv_len - window : 0;
  if (BALANCED && chunk == 0) chunk = (kv_len - ctx_start + nvsplits * BN - 1) / (nvsplits * BN) * BN;
  const uint32_t first = ctx_start + vsplit * chunk;
  uint32_t last = vsplit + 1 == nvsplits ? kv_len : min(kv_len, first + chunk);
  // TMA tiles start on a multiple of 64 (so a tile holds whole pages for populate); rows before `first` (a
  // sliding window's start) are masked like rows past `last`.
  const uint32_t tile0 = TMA ? first & ~uint32_t(BN - 1) : first;
  const uint32_t hq0 = h * GROUP;
  float* o_out = part_o + ((uint64_t(b) * H * GROUP + hq0) * gridDim.x + split) * D;
  float* lse_out = part_lse + (uint64_t(b) * H * GROUP + hq0) * gridDim.x + split;
  const bool final_out = fin.out != nullptr && gridDim.x == 1;
  // The whole CTA is empty when its first group is (groups take consecutive sub-splits): a uniform early exit.
  if (ctx_start + split * ngrp * chunk >= kv_len) {  // empty split: the combine step skips it by its -inf lse
    if (early_reads) pdl_wait();  // before any write (the kernel before may still read these buffers)
    if (final_out) {  // no rows at all (as decode_combine: zeros, and the sink's logit as the LSE)
      const uint64_t row0 = uint64_t(b) * H * GROUP + hq0;
      for (int i = threadIdx.x; i < GROUP * D; i += blockDim.x) fin.out[row0 * D + i] = from_f32<OT>(0.f);
      if (fin.lse != nullptr)
        for (int r = threadIdx.x; r < GROUP; r += blockDim.x) fin.lse[row0 + r] = fin.sinks ? fin.sinks[hq0 + r] : -INFINITY;
      return;
    }
    for (int r = threadIdx.x; r < GROUP; r += blockDim.x) lse_out[uint64_t(r) * gridDim.x] = -INFINITY;
    return;
  }
  // A later group of a CTA may still be empty: it streams nothing and joins the merge with no rows.
  const int ntiles = first < last ? int((last - tile0 + BN - 1) / BN) : 0;
  KVGEN_TRACE(1);

  // ---- tile loader: K and V rows (page lookups through the trait), scales, zero fill past `last` ----------
  // Thread i copies 16-byte chunk i % CPR of rows i / CPR + k * (128 / CPR): a warp's copy covers whole rows
  // (contiguous 256 B for bf16 D=128). The row numbers of a tile come from a small shared ring filled one
  // iteration ahead by threads 0..63 (one page lookup per row, its latency hidden behind the previous tile's
  // math): looking pages up per chunk, between asm-volatile copies, serialized one L2 round trip per chunk and
  // left DRAM half idle at 16 x 1k (ncu).
  constexpr int ROWS_PER_PASS = kDecodeThreads / CPR;  // rows one pass of the block covers
  constexpr int PASSES = BN * CPR / kDecodeThreads;
  static_assert(kDecodeThreads % CPR == 0 && BN % ROWS_PER_PASS == 0, "tile copy splits evenly");
  auto row_of = [&](int tile) -> uint32_t {  // row of token `tile * BN + tid`, or kNoRow past the end
    const uint32_t t = tile0 + uint32_t(tile) * BN + tid;
    return t < last ? kc.row_idx(b, t) : kNoRow;
  };
  auto page_row_of = [&](auto tile) -> uint32_t { return page_row_at(tile0 + uint32_t(tile) * BN); };
  // A box lands where the TMA swizzle repeats (8 block rows) so its XOR is the layout's row_xor: pages of 8+ rows.
  static_assert(!TMA || EFF % 8 == 0, "every TMA box starts on a swizzle atom");
  // Per-thread constants of the copies, hoisted out of the tile loop: the K address of a row is one 32x32->64
  // multiply-add from kbase, V is K plus the distance between the two views, the shared slots are fixed offsets.
  using Sw = DecodeSwizzle<SWZ ? CPR : 8, BN, Ty::kFp8GroupAligned>;
  const int copy_chunk = int(tid) % CPR, copy_row0 = int(tid) / CPR;
  // Tile offset of this thread's chunk in pass 0, and pass j's distance from it: rows of a thread are copy_row0 +
  // multiples of ROWS_PER_PASS, one swizzle for all when that is a multiple of 8 (a constant distance), else (rows
  // of 32 chunks) the 4-row passes alternate two swizzles.
  const int copy_off0 = Lay::offset(copy_row0, copy_chunk);
  const int copy_swz_odd = ROWS_PER_PASS % 8 == 0 ? 0 : Lay::offset(copy_row0 + ROWS_PER_PASS, copy_chunk) - copy_off0 - ROWS_PER_PASS * RP;
  auto copy_delta = [&](int j) -> int { return j * ROWS_PER_PASS * RP + (j % 2 ? copy_swz_odd : 0); };
  // Swizzled fragment loads: the group's shared-window address and each lane's K and V offsets in a tile.
  const uint32_t smem_s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  // SWZ: Q (Q_ROWS rows of the MMA type, padded rows) after the row ring.
  using MmaT = conditional_t<F16, __half, __nv_bfloat16>;
  MmaT* const q_smem = reinterpret_cast<MmaT*>(smem + Q_OFF);
  const uint32_t q_lane = smem_s + uint32_t(Q_OFF) +
                          uint32_t((lane % 8 + (Q_ROWS > 8 ? lane / 8 % 2 * 8 : 0)) * Q_PITCH + (Q_ROWS > 8 ? lane / 16 : lane / 8 % 2) * 16);
  // A fragment of k-step kk: rows 8-15 are zero unless GROUP > 8 (ldmatrix.x2 of rows 0-7 then).
  auto q_frag = [&](uint32_t (&f)[4], int kk) {
    const uint32_t addr = q_lane + uint32_t(kk * 32);
    if constexpr (Q_ROWS > 8) {
      ldsm_x4_s(f, addr);
    } else {
      ldsm_x2_s(f[0], f[2], addr);
      f[1] = f[3] = 0u;
    }
  };
  const uint32_t k_lane = SWZ ? Sw::k_lane(int(warp) * 16 + Sw::slot_row(int(gq)), int(tq)) : 0u;
  const uint32_t v_lane = SWZ ? Sw::v_lane(int(warp) * 16 + Sw::slot_row(int(lane) / 8 % 2 * 8 + int(lane) % 8), int(lane) / 16) : 0u;
  const unsigned char* kbase = reinterpret_cast<const unsigned char*>(kc.blocks + int64_t(h) * D) + copy_chunk * 16;
  const int64_t v_minus_k = reinterpret_cast<const unsigned char*>(vc.blocks) - reinterpret_cast<const unsigned char*>(kc.blocks);
  constexpr uint32_t kRowBytes = uint32_t(Cache::row_elems) * ES;  // one cache row: all heads
  // A tile's K and V scales (QUANT): tile row r's cache row from row_of_tile(r), kNoRow for a row not read (zero
  // filled). kScaleCopiesPerRow words per row, at slot r * G + g.
  auto copy_scales = [&](int stage, auto row_of_tile) {
    if constexpr (QUANT) {
      float* kss = reinterpret_cast<float*>(smem + scale_off(stage));
      float* vss = kss + BN * G;
      for (int i = tid; i < BN * kScaleCopiesPerRow; i += kDecodeThreads) {
        const int r = i / kScaleCopiesPerRow, g = i % kScaleCopiesPerRow;
        const uint32_t row = row_of_tile(r);
        const bool valid = row != kNoRow;
        const int64_t so = valid ? int64_t(row) * (H * G) + int64_t(h) * G + g : 0;
        const int slot = kScaleCopiesPerRow == G ? i : r * G;  // = r * G + g
        cp_async4(kss + slot, scale_src(kc.scales, so), valid);
        cp_async4(vss + slot, scale_src(vc.scales, so), valid);
      }
    }
  };
  auto load_tile_tma = [&](int tile, int stage) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const uint32_t* pages = row_ring + (tile % STAGES) * BN;
    const uint32_t base = tile0 + uint32_t(tile) * BN;
    if (tid == 0) {
      unsigned char* kt = smem + k_tile_off(stage);
      mbar_arrive_expect_tx(&full_bar[stage], 2 * TILE_BYTES);  // boxes past the cache are zero-filled, still counted
      // (One issuing thread: lanes issuing a page each measured the same on the H200, session 11.)
#pragma unroll
      for (int p = 0; p < NP; ++p) {
        // Pages past the context, or (window) wholly before its start, are not read: their lookup-table entries
        // may be stale once a serving stack recycles out-of-window pages. The OOB row reads as zeros, no DRAM.
        const bool wanted = base + p * EFF < last && (!WINDOW || base + (p + 1) * EFF > first);
        const int32_t row = wanted ? int32_t(pages[p]) : kOobRow;
#pragma unroll
        for (int blk = 0; blk < Lay::NBLK; ++blk) {  // one box per block column: RP bytes of EFF rows
          unsigned char* dst = kt + blk * Lay::BLOCK + p * EFF * RP;
          tma_load_3d(dst, kmap, &full_bar[stage], blk * (RP / ES), int32_t(h), row);
          tma_load_3d(dst + TILE_BYTES, vmap, &full_bar[stage], blk * (RP / ES), int32_t(h), row);
        }
      }
    }
    copy_scales(stage, [&](int r) -> uint32_t {  // same rule as the K/V pages
      return base + r < last && (!WINDOW || base + r >= first) ? pages[r / EFF] + r % EFF : kNoRow;
    });
#endif
  };
  auto load_tile = [&](int tile, int stage) {
    if constexpr (TMA) { load_tile_tma(tile, stage); return; }
    unsigned char* ks = smem + k_tile_off(stage) + copy_off0;
    const uint32_t* rows = row_ring + (tile % STAGES) * BN;
    uint32_t row[PASSES];
#pragma unroll
    for (int j = 0; j < PASSES; ++j) row[j] = rows[copy_row0 + j * ROWS_PER_PASS];  // all reads before the copies
#pragma unroll
    for (int j = 0; j < PASSES; ++j) {
      const bool valid = row[j] != kNoRow;
      const unsigned char* kp = kbase + uint64_t(valid ? row[j] : 0u) * kRowBytes;
      cp_async16(ks + copy_delta(j), kp, valid);
      cp_async16(ks + TILE_BYTES + copy_delta(j), kp + v_minus_k, valid);
    }
    copy_scales(stage, [&](int r) -> uint32_t { return rows[r]; });
  };

  {  // prologue: the rows of the first STAGES tiles (independent lookups in flight together), then the copies
    if constexpr (TMA) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      if (tid == 0) {
        prefetch_tmap(kmap);
        prefetch_tmap(vmap);
#pragma unroll
        for (int s = 0; s < STAGES; ++s) mbar_init(&full_bar[s], 1);
        fence_mbar_init();
      }
      if (!early_rows && tid < NP) {  // (tiles past ntiles are never copied: their entries are not read)
        uint32_t rows[STAGES];
#pragma unroll
        for (int s = 0; s < STAGES; ++s) rows[s] = s < ntiles ? page_row_of(s) : kNoRow;
#pragma unroll
        for (int s = 0; s < STAGES; ++s) row_ring[s * BN + tid] = rows[s];
      }
#endif
    } else {
      if (early_rows) {  // the ring already holds the rows: drop those past the context
        if (tid < BN) {
#pragma unroll
          for (int s = 0; s < STAGES; ++s)
            if (first + uint32_t(s) * BN + tid >= last) row_ring[s * BN + tid] = kNoRow;
        }
      } else {
        uint32_t rows[STAGES];
#pragma unroll
        for (int s = 0; s < STAGES; ++s) rows[s] = tid < BN ? row_of(s) : kNoRow;
        if (tid < BN) {
#pragma unroll
          for (int s = 0; s < STAGES; ++s) row_ring[s * BN + tid] = rows[s];
        }
      }
    }
    group_sync();
    // Early reads: the first tiles' copies go out before the wait when every row they cover precedes
    // cache_length(b), the row of the step's token (the context's last), which the store before writes.
    const bool copy_before_wait = early_reads && tile0 + uint32_t(STAGES - 1) * BN < kv_len;
    if (early_reads && !copy_before_wait) pdl_wait();
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < ntiles) load_tile(s, s);
      cp_async_commit();
    }
    if (copy_before_wait) pdl_wait();
  }

  // ---- Q fragments (rows = query heads of the group, zero padded to 16), held for the whole context ------
  // Held in registers for the whole context, except with SWZ: there the FP8 kernels sit at the 128-register
  // cap of 4 CTAs per SM, and Q's D / 4 registers (half of them zero rows for GROUP <= 8) spilled the tile loop,
  // so Q waits in shared memory and each k-step's fragment is one ldmatrix.
  uint32_t qa[SWZ ? 1 : KS][4];
  const QT* qb = q + (uint64_t(b) * H * GROUP + hq0) * D;
  auto qv = [&](uint32_t r, uint32_t k) -> float { return r < GROUP ? to_f32(qb[uint64_t(r) * D + k]) : 0.f; };
  if constexpr (!SWZ) {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      // MMA k positions 2tq, 2tq + 1 and 2tq + 8, 2tq + 9 hold dims k, k + 1 and k + 8, k + 9.
      const uint32_t k = ks * 16 + tq * 2;
      qa[ks][0] = pack2<F16>(qv(gq, k), qv(gq, k + 1));
      qa[ks][1] = pack2<F16>(qv(gq + 8, k), qv(gq + 8, k + 1));
      qa[ks][2] = pack2<F16>(qv(gq, k + 8), qv(gq, k + 9));
      qa[ks][3] = pack2<F16>(qv(gq + 8, k + 8), qv(gq + 8, k + 9));
    }
  } else {
    // q_smem row r, k-step kk: columns 16kk + 2t + e hold dim k_dim(t, kk) + e and columns 16kk + 8 + 2t + e
    // dim k_dim(t, kk) + 2 + e (e = 0, 1), so ldmatrix hands lane (gq, tq) the A fragment of the permuted k.
    // Read after the tile loop's first group barrier. The loads go out in batches of 8 before any is stored:
    // written as one load -> convert -> store loop, each element waited for its own load (SASS: LDG, F2FP, STS,
    // branch), 4 to 32 serial round trips that the per-CTA trace showed as FP8's first tile landing about 1.5 us
    // later than bf16's.
    constexpr int kQPerThread = (Q_ROWS * D + kDecodeThreads - 1) / kDecodeThreads, kQBatch = 8;
#pragma unroll
    for (int j0 = 0; j0 < kQPerThread; j0 += kQBatch) {
      float qval[kQBatch];
#pragma unroll
      for (int j = 0; j < kQBatch; ++j) {
        const int i = int(tid) + (j0 + j) * kDecodeThreads, col = i % D, kk = col / 16, within = col % 16;
        const int dim = Sw::k_dim(within % 8 / 2, kk) + (within / 8) * 2 + within % 2;
        qval[j] = j0 + j < kQPerThread && i < Q_ROWS * D ? qv(uint32_t(i / D), uint32_t(dim)) : 0.f;
      }
#pragma unroll
      for (int j = 0; j < kQBatch; ++j) {
        const int i = int(tid) + (j0 + j) * kDecodeThreads;
        if (j0 + j < kQPerThread && i < Q_ROWS * D) q_smem[(i / D) * (Q_PITCH / 2) + i % D] = from_f32<MmaT>(qval[j]);
      }
    }
  }

  constexpr float kLog2e = 1.4426950408889634f;
  softmax_scale *= k_static;  // logits of the dequantized K: (q . k) * k_scale * softmax_scale
  const float scale_log2 = softmax_scale * kLog2e;
  float o[DN_OUT][4];
#pragma unroll
  for (int i = 0; i < DN_OUT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  // Running max (log2 units) and sum: of rows gq and gq + 8, or (PVT) of heads 2tq and 2tq + 1.
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  for (int tile = 0; tile < ntiles; ++tile) {
    const int stage = tile % STAGES;
    cp_async_wait<STAGES - 2>();
    group_sync();
    if (tile == 0) KVGEN_TRACE(2);
    // Refill the stage consumed last iteration while this one is computed, and start the page lookups of the
    // tile after it (written to the ring after the math; the next iteration's barrier publishes them).
    if (tile + STAGES - 1 < ntiles) load_tile(tile + STAGES - 1, (tile + STAGES - 1) % STAGES);
    cp_async_commit();
    // This thread's ring entry of tile + STAGES: its token's row (cp.async) or its page's row (TMA).
    constexpr uint32_t kRingWriters = TMA ? NP : BN;
    uint32_t next_row = kNoRow;
    if (tid < kRingWriters && tile + STAGES < ntiles) {
      if constexpr (TMA) next_row = page_row_of(tile + STAGES);
      else next_row = row_of(tile + STAGES);
    }

    const int ks_o = k_tile_off(stage), vs_o = ks_o + TILE_BYTES;  // smem offsets of this stage's K and V tiles
    const float* kss = reinterpret_cast<const float*>(smem + scale_off(stage));
    const float* vss = kss + BN * G;
    const uint32_t tbase = tile0 + uint32_t(tile) * BN + warp * 16;  // this warp's 16 rows
    // Only a warp whose rows reach past the context (the CTA's last tile), or before a window's start (TMA
    // tiles start early), masks; the test is warp-uniform.
    const bool tail = tbase + 16 > last;
    const bool head = TMA && WINDOW && tbase < first;
    if constexpr (TMA) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      mbar_wait(&full_bar[stage], uint32_t(tile / STAGES) & 1u);
      if (tail || head) {
        // TMA copies whole pages: rows of a page past the context hold stale data (maybe inf or NaN), and
        // P = 0 times inf is NaN in the MMA. Zero this warp's masked V rows (K rows are masked by select).
        // Two lanes per row, alternate 16-byte units.
        static_assert(CPR % 2 == 0, "rows are an even number of 16-byte units");
        const uint32_t t = tbase + lane / 2;
        if (t < first || t >= last) {
#pragma unroll
          for (int j = 0; j < CPR / 2; ++j)
            *reinterpret_cast<uint4*>(smem + vs_o + Lay::offset(int(warp) * 16 + int(lane) / 2, 2 * j + int(lane & 1))) = make_uint4(0, 0, 0, 0);
        }
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // before TMA refills this stage
        __syncwarp();
      }
#endif
    }

#ifndef KVGEN_DECODE_NO_MATH  // diagnosis knob (bench/decode_bench.py --defines): the loads alone, wrong results
    // Tile row (within the warp's 16) of C element e in n-tile nt: token slot 2tq + (e & 1) of the n-tile, or (PVT,
    // S^T) slot gq + 8 (e >> 1); DecodeSwizzle::slot_row maps a slot to its row (the identity unless ALIGNED).
    auto token_of = [&](int nt, int e) -> int { return Sw::slot_row(PVT ? 8 * (e >> 1) + int(gq) : nt * 8 + int(tq) * 2 + (e & 1)); };
    // PVT: heads 2tq, 2tq + 1 are elements e & 1; the max and sum are taken over the tokens (lanes gq).
    auto slot_of = [&](int e) -> int { return PVT ? (e & 1) : (e >> 1); };
    constexpr int NT_S = PVT ? 1 : 2, E_S = PVT ? 4 : 2 * ROWS_USED, NSLOT = PVT ? 2 : ROWS_USED;
    // The lane's distinct score tokens (PVT: slots gq and gq + 8; else 2tq, 2tq + 1 of each n-tile): element (nt, e)
    // is token tok_idx(nt, e), whose tile row is tok_row(i). Per-token and per-group scales are read once per token.
    constexpr int NTOK = PVT ? 2 : 4;
    auto tok_idx = [](int nt, int e) -> int { return PVT ? (e >> 1) : nt * 2 + (e & 1); };
    auto tok_row = [&](int i) -> int { return token_of(PVT ? 0 : i >> 1, PVT ? 2 * i : i & 1); };
    // kFp8Grouped without aligned k-steps: the largest K scale of each of the lane's score tokens, read once per tile
    // (the K shares below divide by it, the scores multiply by it).
    float kmax[NTOK];
    if constexpr (Ty::kFp8Grouped && !Ty::kFp8GroupAligned) {
#pragma unroll
      for (int i = 0; i < NTOK; ++i) kmax[i] = scale_max(kss, warp * 16 + tok_row(i));
    }
    // S = Q K^T for 16 rows (two n-tiles of 8 tokens).
    float s[2][4];
    if constexpr (SWZ) {
      // FP8, swizzled (DecodeSwizzle): per 16-byte K load j, the Q fragments of its 4 k-steps come from shared
      // memory (ldmatrix; q_smem holds Q in the permuted k order), and each n-tile's lane reads its token's chunk.
      // ALIGNED (kFp8GroupAligned): the 4 k-steps of load j lie in scale group 16 k_chunk(0, j) / GRAN, and each group
      // accumulates its own scores; kKScaledScores: each accumulator times its K scale once per token, below.
      constexpr int SG = kKScaledScores ? G : 1;
      float sg[SG][2][4];
#pragma unroll
      for (int g = 0; g < SG; ++g)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) sg[g][nt][0] = sg[g][nt][1] = sg[g][nt][2] = sg[g][nt][3] = 0.f;
      // kFp8Grouped, not aligned: f16x2 {r, r}, r = the group's scale over the largest of the lane's K token (row gq
      // of n-tile nt), for each of the lane's K loads (a chunk's 16 dims share one group: granularity is a multiple
      // of 16).
      uint32_t kshare[2][Sw::NJ];
      if constexpr (Ty::kFp8Grouped && !Ty::kFp8GroupAligned) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const int t = int(warp) * 16 + nt * 8 + int(gq);
          // PVT: the lane's K token of n-tile nt is its score token nt (tok_row(nt) = 8 nt + gq, unaligned slots)
          const float inv = inv_or_zero(PVT ? kmax[nt] : scale_max(kss, t));
#pragma unroll
          for (int j = 0; j < Sw::NJ; ++j) {
            const float r = scale_at(kss, t * G + 16 * Sw::k_chunk(int(tq), j) / GRAN) * inv;
            kshare[nt][j] = pack2<true>(r, r);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < Sw::NJ; ++j) {
        const int acc = Ty::kFp8GroupAligned ? 16 * Sw::k_chunk(0, j) / GRAN : 0;  // a constant once unrolled
        uint4 kv[2];
        float ksc[2] = {1.f, 1.f};  // kFp8Dequant: a chunk's 16 dims share one scale
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          kv[nt] = lds128(Sw::k_load(smem_s + uint32_t(ks_o + nt * 8 * RP) + k_lane, j));
          if constexpr (Ty::kFp8Dequant)  // read once per load: q_frag's asm clobbers memory in the k-steps
            ksc[nt] = scale_at(kss, (warp * 16 + nt * 8 + gq) * G + 16 * Sw::k_chunk(int(tq), j) / GRAN);
        }
#pragma unroll
        for (int kk = 4 * j; kk < 4 * j + 4; ++kk) {
          uint32_t qf[4];
          q_frag(qf, kk);
          uint32_t b0[2], b1[2];  // per n-tile: K of token nt * 8 + gq at k 2tq, 2tq + 1 and 2tq + 8, 2tq + 9
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            const uint32_t w = kk % 4 == 0 ? kv[nt].x : kk % 4 == 1 ? kv[nt].y : kk % 4 == 2 ? kv[nt].z : kv[nt].w;
            if constexpr (Ty::kFp8Direct || Ty::kFp8Grouped) {
              fp8x4_to_f16x2x2<T>(w, b0[nt], b1[nt]);
              if constexpr (Ty::kFp8Grouped && !Ty::kFp8GroupAligned) {
                b0[nt] = hmul2_bits(b0[nt], kshare[nt][j]);
                b1[nt] = hmul2_bits(b1[nt], kshare[nt][j]);
              }
            } else {
              const float2 x0 = fp8x2_to_float2<T>(static_cast<unsigned short>(w & 0xffffu));
              const float2 x1 = fp8x2_to_float2<T>(static_cast<unsigned short>(w >> 16));
              b0[nt] = pack2<false>(x0.x * ksc[nt], x0.y * ksc[nt]);
              b1[nt] = pack2<false>(x1.x * ksc[nt], x1.y * ksc[nt]);
            }
          }
          if constexpr (PVT) {
            // The two n-tiles' B fragments are the A fragment of tokens gq / gq + 8; Q's rows 0-7 (qf[0], qf[2]),
            // read as B, are heads x the same k positions.
            const uint32_t ka[4] = {b0[0], b0[1], b1[0], b1[1]};
            mma16816<F16>(sg[acc][0], ka, qf[0], qf[2]);
          } else {
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) mma16816<F16>(sg[acc][nt], qf, b0[nt], b1[nt]);
          }
        }
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = sg[0][nt][e];
      if constexpr (kKScaledScores) {  // score = sum over groups of the token's K scale x the group's Q.K
        float ksc_tok[NTOK][G];
#pragma unroll
        for (int i = 0; i < NTOK; ++i)
#pragma unroll
          for (int g = 0; g < G; ++g) ksc_tok[i][g] = scale_at(kss, (warp * 16 + tok_row(i)) * G + g);
#pragma unroll
        for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
          for (int e = 0; e < E_S; ++e) {
            float x = sg[0][nt][e] * ksc_tok[tok_idx(nt, e)][0];
#pragma unroll
            for (int g = 1; g < G; ++g) x = fmaf(sg[g][nt][e], ksc_tok[tok_idx(nt, e)][g], x);
            s[nt][e] = x;
          }
      }
    }
    if constexpr (SWZ16) {
      // 16-bit K: one ldmatrix.x4 gives the B fragments of two k-steps (rows = tokens, 8 dims per matrix). Matrix
      // lane / 8 is chunk 2kk + lane / 8 of row lrow: TileLayout::step from the lane's offset of chunk lane / 8.
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
        const uint32_t krow = smem_s + uint32_t(ks_o + Lay::offset(int(warp) * 16 + nt * 8 + int(lane) % 8, int(lane) / 8));
#pragma unroll
        for (int kk = 0; kk < KS; kk += 2) {
          uint32_t kb[4];
          ldsm_x4_s(kb, Lay::step(krow, 2 * kk));
          mma16816<F16>(s[nt], qa[kk], kb[0], kb[1]);
          mma16816<F16>(s[nt], qa[kk + 1], kb[2], kb[3]);
        }
      }
    }

    // Online softmax over this warp's 16 tokens (log2 domain). Rows gq + 8 (fragment elements 2, 3) hold query
    // heads only when GROUP > 8; otherwise they are padding and skipped (their P is zero).
    float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
      for (int e = 0; e < E_S; ++e) {
        float x = s[nt][e];
        if constexpr (Ty::kFp8Grouped && !Ty::kFp8GroupAligned) x *= kmax[tok_idx(nt, e)];
        // soft_cap 0 = no cap at run time (a cap-capable variant called without one): a uniform branch.
        if constexpr (SOFTCAP) x = soft_cap > 0.f ? soft_cap * tanhf(x * softmax_scale / soft_cap) * kLog2e : x * scale_log2;
        else x *= scale_log2;
        if (tail || head) {
          const uint32_t t = tbase + uint32_t(token_of(nt, e));
          x = t < last && (!head || t >= first) ? x : -INFINITY;
        }
        s[nt][e] = x;
        tmax[slot_of(e)] = fmaxf(tmax[slot_of(e)], x);
      }
    float alpha[2] = {1.f, 1.f}, mref[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < NSLOT; ++r) {
      if constexpr (PVT) {  // over the 8 token rows gq
        tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 4));
        tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 8));
        tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 16));
      } else {
        tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 1));
        tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 2));
      }
      const float m_new = fmaxf(m_run[r], tmax[r]);
      mref[r] = m_new == -INFINITY ? 0.f : m_new;  // all masked so far: keep exp2 finite
      alpha[r] = exp2f(m_run[r] - mref[r]);
      m_run[r] = m_new;
      l_run[r] *= alpha[r];
    }
    // P's fragments, one per V scale group (kVScaledP: each holds P times the token's V scale of that group; an
    // output chunk lies in one group, so its MMAs take that group's P and V needs no per-element work).
    constexpr int PG = kVScaledP ? G : 1;
    // P x V scale in f16, times kPUp (see there): a finite product past f16's largest value saturates; NaN and inf
    // (a corrupt scale) pass through.
    auto p_times = [&](float p, float vs) -> float {
      const float x = p * (vs * kPUp);
      return x > 65504.f && x < INFINITY ? 65504.f : x;
    };
    uint32_t pa[PG][4];
    {
      float p[2][4] = {};
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
        for (int e = 0; e < E_S; ++e) {
          p[nt][e] = exp2f(s[nt][e] - mref[slot_of(e)]);
          l_run[slot_of(e)] += p[nt][e];
        }
      float vsc[NTOK][PG];  // kVScaledP: each score token's V scale of every group
#pragma unroll
      for (int i = 0; i < NTOK; ++i)
#pragma unroll
        for (int g = 0; g < PG; ++g) vsc[i][g] = kVScaledP ? scale_at(vss, (warp * 16 + tok_row(i)) * G + g) : 1.f;
#pragma unroll
      for (int g = 0; g < PG; ++g) {
        auto pv = [&](int nt, int e) -> float { return kVScaledP ? p_times(p[nt][e], vsc[tok_idx(nt, e)][g]) : p[nt][e]; };
        if constexpr (PVT) {
          // P^T's B fragment (tokens 2tq, 2tq + 1 and + 8 of head gq) is the transpose of S^T's 8 x 8 halves.
          pa[g][0] = movmatrix_trans(pack2<F16>(pv(0, 0), pv(0, 1)));
          pa[g][2] = movmatrix_trans(pack2<F16>(pv(0, 2), pv(0, 3)));
        } else {
          // C fragments of the two token n-tiles are the A fragment of the 16-token k-step.
          pa[g][0] = pack2<F16>(pv(0, 0), pv(0, 1));
          pa[g][1] = pack2<F16>(pv(0, 2), pv(0, 3));
          pa[g][2] = pack2<F16>(pv(1, 0), pv(1, 1));
          pa[g][3] = pack2<F16>(pv(1, 2), pv(1, 3));
        }
      }
    }
    // Rescale the output only when some row's running max moved (after the first tiles it rarely does).
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
      if constexpr (PVT) {  // O^T columns 2tq, 2tq + 1 are heads 2tq, 2tq + 1: this lane's own alphas
#pragma unroll
        for (int m = 0; m < DN_OUT; ++m) {
          o[m][0] *= alpha[0]; o[m][1] *= alpha[1];
          o[m][2] *= alpha[0]; o[m][3] *= alpha[1];
        }
      } else {
#pragma unroll
        for (int dn = 0; dn < DN_OUT; ++dn) {
          o[dn][0] *= alpha[0]; o[dn][1] *= alpha[0];
          if constexpr (ROWS_USED == 2) { o[dn][2] *= alpha[1]; o[dn][3] *= alpha[1]; }
        }
      }
    }

    // O += P V: B[k = token][n = dim] from rows warp*16 + slot_row({2tq, 2tq+1, 2tq+8, 2tq+9}), column 8*dn + gq (PVT: V
    // is the A operand of O^T instead, see below).
    if constexpr (SWZ16) {
      // 16-bit V: one ldmatrix.x4.trans gives b0/b1 of two n-tiles (matrices: tokens 0-7 / 8-15 x 8 dims), the
      // lane's chunk dn + lane / 16: TileLayout::step from the lane's offset of chunk lane / 16, as for K.
      const uint32_t vrow = smem_s + uint32_t(vs_o + Lay::offset(int(warp) * 16 + int(lane) / 8 % 2 * 8 + int(lane) % 8, int(lane) / 16));
#pragma unroll
      for (int dn = 0; dn < DN; dn += 2) {
        uint32_t vb[4];
        ldsm_x4_trans_s(vb, Lay::step(vrow, dn));
        mma16816<F16>(o[dn], pa[0], vb[0], vb[1]);
        mma16816<F16>(o[dn + 1], pa[0], vb[2], vb[3]);
      }
    } else {
      const int r0 = warp * 16 + tq * 2;  // the lane's first token row (kFp8Dequant's per-group V scales)
      // FP8: one ldmatrix.x4.trans gives chunks c and c + 1 of tokens 0-7 and 8-15 (matrix lane / 8:
      // tokens 8 x (m % 2), chunk c + m / 2), four n-tiles (DecodeSwizzle).
      const uint32_t vaddr = smem_s + uint32_t(vs_o) + v_lane;
#pragma unroll
      for (int c = 0; c < CPR; c += 2) {
        uint32_t vb[4];
        ldsm_x4_trans_s(vb, Lay::step(vaddr, c));
#pragma unroll
        for (int hc = 0; hc < 2; ++hc) {
          // bytes of vb: (token 2tq: dim 2gq, 2gq + 1), (token 2tq + 1: same); even dims low, odd dims high
          const uint32_t lo = __byte_perm(vb[2 * hc], 0, 0x3120), hi = __byte_perm(vb[2 * hc + 1], 0, 0x3120);
          const int dn = 2 * (c + hc);
          // even0 / odd0: dims 16(c + hc) + 2gq and + 1 of tokens r0, r0 + 1; even1 / odd1: of tokens r0 + 8, r0 + 9.
          uint32_t even0, odd0, even1, odd1;
          if constexpr (Ty::kFp8Direct || Ty::kFp8Grouped) {
            fp8x4_to_f16x2x2<T>(lo, even0, odd0);
            fp8x4_to_f16x2x2<T>(hi, even1, odd1);
          } else {  // per-group scales of those tokens for this chunk
            const int g = 16 * (c + hc) / GRAN;
            const float s0 = scale_at(vss, r0 * G + g), s1 = scale_at(vss, (r0 + 1) * G + g);  // (kFp8Dequant: quantized)
            const float s8 = scale_at(vss, (r0 + 8) * G + g), s9 = scale_at(vss, (r0 + 9) * G + g);
            auto deq = [&](uint32_t raw, float sa, float sb) {
              const float2 x = fp8x2_to_float2<T>(static_cast<unsigned short>(raw));
              return pack2<false>(x.x * sa, x.y * sb);
            };
            even0 = deq(lo & 0xffffu, s0, s1), odd0 = deq(lo >> 16, s0, s1);
            even1 = deq(hi & 0xffffu, s8, s9), odd1 = deq(hi >> 16, s8, s9);
          }
          const int pg = kVScaledP ? 16 * (c + hc) / GRAN : 0;  // the chunk's V scale group (a constant)
          if constexpr (PVT) {
            // O^T[dims][heads] += V^T P^T: A rows gq / gq + 8 are the chunk's even / odd dims, k = token slots 2tq,
            // 2tq + 1 and + 8; B is P^T (pa[pg][0], pa[pg][2], transposed from S^T by movmatrix).
            const uint32_t va[4] = {even0, odd0, even1, odd1};
            mma16816<F16>(o[c + hc], va, pa[pg][0], pa[pg][2]);
          } else {  // B fragments of n-tiles dn (even dims) and dn + 1 (odd dims)
            mma16816<F16>(o[dn], pa[pg], even0, even1);
            mma16816<F16>(o[dn + 1], pa[pg], odd0, odd1);
          }
        }
      }
    }
#endif  // KVGEN_DECODE_NO_MATH
    // Slot (tile + STAGES) % STAGES was last read when tile's own copies were issued, before this iteration's
    // barrier; it is next read after the following barrier.
    if (tid < kRingWriters) row_ring[((tile + STAGES) % STAGES) * BN + tid] = next_row;
  }
  const uint32_t nw = 4 * ngrp, gw = grp * 4 + warp;  // warps of the CTA, this warp's slice
  // This warp's running max of each of its rows, for every warp's merge scale (below).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = PVT ? 2 * int(tq) + r : int(gq) + 8 * r;
    if (row < GROUP && (PVT ? gq == 0 : tq == 0)) slice_max[row][gw] = m_run[r];
  }
  cp_async_wait<0>();
  __syncthreads();
  KVGEN_TRACE(3);
  // The next grid (the combine, or the next layer's kernel) may start launching now; it waits for this grid's
  // writes itself.
  pdl_launch_dependents();

  // ---- merge the 4 x ngrp warps (reusing the pipelines' shared memory) ------------------------------------
  // Every warp scales its rows to the CTA's max M (from slice_max, published before the barrier above) and parks
  // them with their scaled sums in its own slice; after one barrier every thread adds up the slices of its
  // outputs: o = sum_w 2^(m_w - M) o_w / sum_w 2^(m_w - M) l_w. (A pass with one warp per row turning the slices'
  // (max, sum) pairs into weights, between two barriers, cost 0.5-0.7 us per CTA, H200 session 18 trace; before
  // that the warps added into one buffer in 4 barrier-separated turns: 6 us per CTA.)
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if constexpr (PVT) {  // partial sums of each head over this lane's tokens: add up the 8 token rows
      l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 4);
      l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 8);
      l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 16);
    } else {
      l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
      l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    }
  }
  // Row pitch in floats: 4 rows of the plain path's 8-byte pairs land in distinct banks (the PVT and swizzled
  // float4 parks meet 2-way conflicts, once per CTA).
  constexpr int OP = D + 8;
  float* sm_o = reinterpret_cast<float*>(smem_cta);  // [nw warps][GROUP][OP]: 2^(m_w - M) x the warp's rows
  float* sm_l = sm_o + nw * GROUP * OP;              // [GROUP][nw]: 2^(m_w - M) x the warp's row sums
  float* sm_m = sm_l + GROUP * nw;                   // [GROUP]: M (log2 units; 0 for a row no warp saw)
  // M of a row, and this warp's scale for it (0 for a warp that saw no rows, m_w = -inf).
  auto row_scale = [&](int row, float m_w, float& mref) -> float {
    // Predicated loads in straight-line code, bounded by the template: a runtime bound unrolled 16-fold, and
    // branches around each group's loads kept them from being in flight together.
    float4 v[MAX_GROUPS];
#pragma unroll
    for (int k = 0; k < MAX_GROUPS; ++k) {
      v[k] = make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
      if (4 * k < int(nw)) v[k] = *reinterpret_cast<const float4*>(&slice_max[row][4 * k]);
    }
    float mx = -INFINITY;
#pragma unroll
    for (int k = 0; k < MAX_GROUPS; ++k) mx = fmaxf(mx, fmaxf(fmaxf(v[k].x, v[k].y), fmaxf(v[k].z, v[k].w)));
    mref = mx == -INFINITY ? 0.f : mx;
    return exp2f(m_w - mref);
  };
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = PVT ? 2 * int(tq) + r : int(gq) + 8 * r;  // PVT: head 2tq + r; else MMA row gq + 8r
    if (row < GROUP) {
      float mref;
      const float e = row_scale(row, m_run[r], mref);
      if constexpr (PVT) {  // o[m]: dims 16m + 2gq (c0, c1) and + 1 (c2, c3) of heads 2tq (c0, c2), 2tq + 1 (c1, c3)
        float* dst = sm_o + (gw * GROUP + row) * OP + 2 * gq;
#pragma unroll
        for (int m = 0; m < DN_OUT; ++m) *reinterpret_cast<float2*>(dst + 16 * m) = make_float2(o[m][r] * e, o[m][2 + r] * e);
      } else if constexpr (SWZ) {  // n-tiles 2c (even dims) and 2c + 1 (odd) hold dims 16c + 4tq + 0..3
        float* dst = sm_o + (gw * GROUP + row) * OP + tq * 4;
#pragma unroll
        for (int c = 0; c < CPR; ++c)
          *reinterpret_cast<float4*>(dst + c * 16) = make_float4(o[2 * c][2 * r] * e, o[2 * c + 1][2 * r] * e,
                                                                 o[2 * c][2 * r + 1] * e, o[2 * c + 1][2 * r + 1] * e);
      } else {
        float* dst = sm_o + (gw * GROUP + row) * OP + tq * 2;
#pragma unroll
        for (int dn = 0; dn < DN; ++dn)
          *reinterpret_cast<float2*>(dst + dn * 8) = make_float2(o[dn][2 * r] * e, o[dn][2 * r + 1] * e);
      }
      if (PVT ? gq == 0 : tq == 0) {  // the row's sum, equal in those lanes after the reductions above
        sm_l[row * nw + gw] = l_run[r] * e;
        if (gw == 0) sm_m[row] = mref;
      }
    }
  }
  __syncthreads();
  KVGEN_TRACE(5);
  for (int i = threadIdx.x; i < GROUP * D; i += blockDim.x) {
    const int row = i / D, col = i % D;
    // Every slice's loads in flight together (predicated as in row_scale; the absent groups' slices count as 0).
    float ow[4 * MAX_GROUPS];
    float4 lw[MAX_GROUPS];
#pragma unroll
    for (int k = 0; k < MAX_GROUPS; ++k) {
      lw[k] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int j = 0; j < 4; ++j) ow[4 * k + j] = 0.f;
      if (4 * k < int(nw)) {
        lw[k] = *reinterpret_cast<const float4*>(sm_l + row * nw + 4 * k);
#pragma unroll
        for (int j = 0; j < 4; ++j) ow[4 * k + j] = sm_o[((4 * k + j) * GROUP + row) * OP + col];
      }
    }
    float o_sum = 0.f, l_sum = 0.f;
#pragma unroll
    for (int k = 0; k < MAX_GROUPS; ++k) {
      l_sum += (lw[k].x + lw[k].y) + (lw[k].z + lw[k].w);
      o_sum += (ow[4 * k] + ow[4 * k + 1]) + (ow[4 * k + 2] + ow[4 * k + 3]);
    }
    // V's static scale and the tile loop's kPUp undone with the normalization. The MUFU forms (2 ulp): this runs
    // once per CTA, where the IEEE division's and log2f's longer code cost more than their arithmetic.
    // (l_sum is 1 to the context length when finite, far from __fdividef's 2^126 limit.) `!= 0`, not `> 0`: a NaN
    // sum (NaN or inf scores) must reach the output, as it did before this merge, not read as an empty CTA.
    const float o_norm = l_sum != 0.f ? __fdividef(o_sum * (v_static * (1.f / kPUp)), l_sum) : 0.f;
    const float lse = l_sum != 0.f ? (sm_m[row] + __log2f(l_sum)) * 0.6931471805599453f : -INFINITY;
    if (i == int(threadIdx.x)) KVGEN_TRACE(6);  // thread 0's first output merged, not yet stored
    if (final_out) {
      // decode_combine's merge of a single split: w = exp(lse - m) against the sink's exp(sink - m).
      const uint64_t orow = uint64_t(b) * H * GROUP + hq0 + row;
      float res = o_norm, lse_f = lse;
      if (fin.sinks != nullptr) {
        const float sink = fin.sinks[hq0 + row];
        const float mm = fmaxf(lse, sink);
        const float w = lse == -INFINITY ? 0.f : __expf(lse - mm);
        const float wsum = w + __expf(sink - mm);
        res = wsum != 0.f ? w * o_norm / wsum : 0.f;  // NaN (a NaN row sum) passes through, as below
        lse_f = wsum != 0.f ? mm + __logf(wsum) : -INFINITY;
      }
      fin.out[orow * D + col] = from_f32<OT>(res);
      if (col == 0 && fin.lse != nullptr) fin.lse[orow] = lse_f;
    } else {
      o_out[uint64_t(row) * gridDim.x * D + col] = o_norm;
      if (col == 0) lse_out[uint64_t(row) * gridDim.x] = lse;
    }
  }
  KVGEN_TRACE(4);
}

// Merge the splits of every (request, query head): out = sum_s w_s o_s / (sum_s w_s + sink), w_s = exp(lse_s).
// Grid (Hq, batch), D threads. lse_out (optional) gets the merged natural-log LSE (sink included).
// The splits are merged kCombineBatch at a time with every load of a batch (LSEs and partial outputs) in flight
// together, and an online rescale between batches: loading the outputs only after the LSEs had given the max (and
// the empty splits) made two dependent L2 round trips of the combine's critical path, at most plans' split counts.
constexpr int kCombineBatch = 8;
template <class OT, int D>
__device__ __forceinline__ void decode_combine(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                                               uint32_t splits, const float* __restrict__ sinks,
                                               OT* __restrict__ out, float* __restrict__ lse_out, uint32_t num_q_heads) {
  // Launched as a programmatic dependent of decode_partial: wait until its partials are complete and visible; the
  // next layer's kernels may launch at once (they wait for this grid themselves).
  pdl_wait_then_release();
  const uint32_t hq = blockIdx.x, b = blockIdx.y;
  const uint64_t row = uint64_t(b) * num_q_heads + hq;
  const float* lse = part_lse + row * splits;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    // Running max m (natural log), and the sum of weights and of weighted outputs relative to it; the sink is a
    // split with weight exp(sink) and no output.
    float m = sinks != nullptr ? sinks[hq] : -INFINITY;
    float wsum = sinks != nullptr ? 1.f : 0.f, acc = 0.f;
    for (uint32_t s0 = 0; s0 < splits; s0 += kCombineBatch) {
      float l[kCombineBatch], o[kCombineBatch];
#pragma unroll
      for (int j = 0; j < kCombineBatch; ++j) {
        const bool in = s0 + j < splits;
        l[j] = in ? lse[s0 + j] : -INFINITY;
        o[j] = in ? part_o[(row * splits + s0 + j) * D + d] : 0.f;
      }
      float mb = m;
      bool nan_lse = false;  // fmaxf drops NaN: a split whose scores were NaN must still poison the row
#pragma unroll
      for (int j = 0; j < kCombineBatch; ++j) {
        mb = fmaxf(mb, l[j]);
        nan_lse |= l[j] != l[j];
      }
      if (mb == -INFINITY && !nan_lse) continue;  // nothing but empty splits so far
      const float r = __expf(m - mb);  // 0 while m is -inf
      wsum *= r;
      acc *= r;
#pragma unroll
      for (int j = 0; j < kCombineBatch; ++j) {
        // an empty split (lse -inf) never wrote its partial output: select, never 0 * (whatever is there)
        const float w = l[j] == -INFINITY ? 0.f : __expf(l[j] - mb);
        wsum += w;
        acc = l[j] == -INFINITY ? acc : fmaf(w, o[j], acc);
      }
      m = mb;
    }
    // `!= 0`: a split whose scores were NaN (NaN LSE, NaN weight) makes the row NaN, as a single-split plan does.
    out[row * D + d] = from_f32<OT>(wsum != 0.f ? acc / wsum : 0.f);
    if (d == 0 && lse_out != nullptr) lse_out[row] = wsum != 0.f ? m + __logf(wsum) : -INFINITY;
  }
}

}  // namespace kvgen
