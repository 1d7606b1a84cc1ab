// TMA (cp.async.bulk.tensor) helpers and the tile-load kernels that exercise create_tma_tile + populate.
// sm_90+ only; gather4 is sm_100+ only. Raw inline PTX keeps NVRTC from parsing <cuda/barrier> (2+ s).
#pragma once
#include "cache.cuh"

namespace kvgen {

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void fence_mbar_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t phase) {
  uint32_t done;
  do {
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"(smem_u32(bar)), "r"(phase) : "memory");
  } while (!done);
}
__device__ __forceinline__ void prefetch_tmap(const CUtensorMap* m) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(m)) : "memory");
}
// 3-D tiled load, coordinates innermost first: (depth column, head, row).
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* m, uint64_t* bar, int32_t c0, int32_t c1, int32_t c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];"
      ::"r"(smem_u32(dst)), "l"(reinterpret_cast<uint64_t>(m)), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1000
// Blackwell gather4: one column coordinate, then four arbitrary row coordinates of a 2-D map (box {W, 1}).
__device__ __forceinline__ void tma_gather4(void* dst, const CUtensorMap* m, uint64_t* bar, int32_t col,
                                           int32_t r0, int32_t r1, int32_t r2, int32_t r3) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cta.global.tile::gather4.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6, %7}], [%2];"
      ::"r"(smem_u32(dst)), "l"(reinterpret_cast<uint64_t>(m)), "r"(smem_u32(bar)), "r"(col), "r"(r0), "r"(r1),
        "r"(r2), "r"(r3)
      : "memory");
}
#endif

// Undo the TMA swizzle of a shared-memory byte offset (buffer 1024-byte aligned). SWIZZLE_{32,64,128}B XOR
// address bits [7, 7+log2(span/16)) into bits [4, ...): CUTLASS Swizzle<log2(span/16), 4, 3>.
template <int SpanBytes> __device__ __forceinline__ uint32_t swizzle_offset(uint32_t off) {
  if constexpr (SpanBytes <= 16) return off;
  else return off ^ (((off >> 7) & uint32_t(SpanBytes / 16 - 1)) << 4);
}

constexpr int32_t kOobRow = 1 << 30;  // a row past any cache: TMA zero-fills it (MAX's OOB-fill trick)

// Loads the BN x BK tile `tile` of request b, head h, through the create_tma_tile descriptor and populate,
// into out[b, tile, h, BN, BK] (cache dtype, unswizzled). Sub-tile pages past the sequence are OOB loads
// (zeros). Tiles at or past the sequence length are not written. Grid: (max_tiles, H, batch).
template <class Cache, int BN, int BK, int Gran, int SpanBytes, int BaseAlignment>
__device__ __forceinline__ void tile_load(const CUtensorMap* tmap, const CacheArgs& a, uint32_t layer, uint32_t kv,
                                          typename Cache::dtype* __restrict__ out, uint32_t max_tiles) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using T = typename Cache::dtype;
  using Rows = decltype(Cache{}.template populate<BN, BaseAlignment>(0, 0));
  constexpr int kChunks = BK / Gran;
  constexpr uint32_t kTileBytes = BN * BK * sizeof(T);
  static_assert(BK % Gran == 0, "BK is whole swizzle granules");
  extern __shared__ unsigned char dyn_smem[];
  __shared__ alignas(8) uint64_t bar;
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uint64_t>(dyn_smem) + 1023) & ~uint64_t(1023));

  const uint32_t tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const Cache c = Cache::view(a, kv, layer);
  const uint32_t len = c.cache_length(b), base = tile * BN;
  if (base >= len) return;
  if (threadIdx.x == 0) {
    prefetch_tmap(tmap);
    mbar_init(&bar, 1);
    fence_mbar_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const Rows rows = c.template populate<BN, BaseAlignment>(b, base);
    const uint32_t remaining = (len - base + Rows::eff_page - 1) / Rows::eff_page;
    const uint32_t valid_pages = remaining < uint32_t(Rows::num_pages) ? remaining : uint32_t(Rows::num_pages);
    mbar_arrive_expect_tx(&bar, kTileBytes);  // OOB boxes are zero-filled and still counted
#pragma unroll
    for (int p = 0; p < Rows::num_pages; ++p) {
      const int32_t row = uint32_t(p) < valid_pages ? int32_t(rows.rows[p]) : kOobRow;
#pragma unroll
      for (int j = 0; j < kChunks; ++j) {
        T* dst = reinterpret_cast<T*>(smem) + (j * BN + p * Rows::eff_page) * Gran;
        tma_load_3d(dst, tmap, &bar, j * Gran, int32_t(h), row);
      }
    }
  }
  mbar_wait(&bar, 0);
  // Unswizzle 16-byte chunks: element (r, col) sits in granule j = col / Gran at row r of that granule.
  constexpr int kVec = 16 / int(sizeof(T));
  constexpr int kRowVecs = BK / kVec;
  T* o = out + ((uint64_t(b) * max_tiles + tile) * Cache::num_heads + h) * (uint64_t(BN) * BK);
  for (int i = threadIdx.x; i < BN * kRowVecs; i += blockDim.x) {
    const int r = i / kRowVecs, col = (i % kRowVecs) * kVec;
    const uint32_t off = uint32_t(((col / Gran) * BN + r) * Gran + col % Gran) * sizeof(T);
    *reinterpret_cast<uint4*>(o + r * BK + col) = *reinterpret_cast<const uint4*>(smem + swizzle_offset<SpanBytes>(off));
  }
#endif
}

// Loads 4*k rows named by sparse-MLA encodings (enc = page * P + offset, via get_tma_row) with gather4,
// columns [0, TileWidth) in BoxW-wide groups, into out[n, TileWidth]. Grid: (n / TileRows).
template <class Cache, int TileRows, int TileWidth, int BoxW>
__device__ __forceinline__ void gather4_tile_load(const CUtensorMap* tmap, const CacheArgs& a, uint32_t layer, uint32_t kv,
                                                  const uint32_t* __restrict__ enc, uint32_t n,
                                                  typename Cache::dtype* __restrict__ out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1000
  using T = typename Cache::dtype;
  static_assert(TileRows % 4 == 0 && TileWidth % BoxW == 0, "gather4 moves 4 rows of whole boxes");
  __shared__ alignas(128) T tile[TileRows * TileWidth];
  __shared__ alignas(8) uint64_t bar;
  const Cache c = Cache::view(a, kv, layer);
  const uint32_t r0 = blockIdx.x * TileRows;
  if (r0 >= n) return;
  if (threadIdx.x == 0) {
    mbar_init(&bar, 1);
    fence_mbar_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    mbar_arrive_expect_tx(&bar, TileRows * TileWidth * sizeof(T));
    for (int cg = 0; cg < TileWidth / BoxW; ++cg)
      for (int q = 0; q < TileRows / 4; ++q) {
        int32_t rr[4];
        for (int k = 0; k < 4; ++k) {
          const uint32_t i = r0 + q * 4 + k;
          rr[k] = i < n ? int32_t(c.get_tma_row(enc[i])) : kOobRow;
        }
        tma_gather4(tile + cg * TileRows * BoxW + q * 4 * BoxW, tmap, &bar, cg * BoxW, rr[0], rr[1], rr[2], rr[3]);
      }
  }
  mbar_wait(&bar, 0);
  for (int i = threadIdx.x; i < TileRows * TileWidth; i += blockDim.x) {
    const int r = i / TileWidth, col = i % TileWidth;
    if (r0 + r < n) out[uint64_t(r0 + r) * TileWidth + col] = tile[(col / BoxW) * TileRows * BoxW + r * BoxW + col % BoxW];
  }
#endif
}

}  // namespace kvgen
