// Store and load for MAX's rope-aware FP8 MLA layout (SnapMLA): each row holds PaddedDepth bytes of FP8 e4m3
// content followed by RopeDim BF16 rope elements; one scale per token (granularity = head_size) covers the
// content. Input and output rows are [PaddedDepth + RopeDim] elements of In (content then rope).
#pragma once
#include "store_load.cuh"

namespace kvgen {

template <class Cache, class In, int PaddedDepth, int RopeDim>
__device__ __forceinline__ void store_rope_mla(const CacheArgs& a, const In* __restrict__ k_new,
                                               const uint32_t* __restrict__ row_offsets, const uint2* __restrict__ token_map,
                                               uint32_t total_tokens,
                                               uint32_t layer, uint32_t tokens_per_block) {
  static_assert(sizeof(typename Cache::dtype) == 1, "content is FP8");
  constexpr int kIn = PaddedDepth + RopeDim;
  constexpr int kPerLane = (PaddedDepth + 31) / 32;
  __shared__ uint32_t s_req[kMaxTokensPerBlock], s_pos[kMaxTokensPerBlock], s_row[kMaxTokensPerBlock];
  pdl_wait_then_release();  // a programmatic dependent launch, as store_ragged
  const uint32_t tok0 = blockIdx.x * tokens_per_block;
  if (tok0 >= total_tokens) return;
  const uint32_t ntok = min(tokens_per_block, total_tokens - tok0);
  resolve_tokens<Cache>(a, row_offsets, token_map, tok0, ntok, total_tokens, nullptr, s_req, s_pos, s_row);
  const Cache c = Cache::view(a, 0, layer);
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  for (uint32_t ti = warp; ti < ntok; ti += nwarps) {
    const In* src = k_new + uint64_t(tok0 + ti) * kIn;
    float x[kPerLane];
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = i * 32 + lane;
      x[i] = d < PaddedDepth ? to_f32(src[d]) : 0.f;
      amax = fmaxf(amax, fabsf(x[i]));
    }
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
    const uint32_t row = s_row[ti];
    if (row == kNoRow) continue;
    const typename Cache::scale_dtype scale = make_scale<typename Cache::scale_dtype>(amax, Cache::fp8_max);
    const float inv = 1.f / to_f32(scale);  // same rounding steps as kvgen.reference.quantize
    typename Cache::dtype* dst = c.blocks + int64_t(row) * Cache::row_elems;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = i * 32 + lane;
      if (d < PaddedDepth) dst[d] = from_f32<typename Cache::dtype>(x[i] * inv);
    }
    __nv_bfloat16* rope = reinterpret_cast<__nv_bfloat16*>(dst + PaddedDepth);
    for (int d = lane; d < RopeDim; d += 32) rope[d] = from_f32<__nv_bfloat16>(to_f32(src[PaddedDepth + d]));
    if (lane == 0) c.scales[row] = scale;  // G = 1, H = 1: the scale index is the row
  }
}

template <class Cache, class Out, int PaddedDepth, int RopeDim>
__device__ __forceinline__ void load_rope_mla(const CacheArgs& a, Out* __restrict__ k_out,
                                              const uint32_t* __restrict__ row_offsets, const uint32_t* __restrict__ start_pos,
                                              uint32_t total_tokens, uint32_t layer, uint32_t tokens_per_block) {
  constexpr int kOut = PaddedDepth + RopeDim;
  __shared__ uint32_t s_req[kMaxTokensPerBlock], s_pos[kMaxTokensPerBlock], s_row[kMaxTokensPerBlock];
  pdl_wait_then_release();  // a programmatic dependent launch, as store_ragged
  const uint32_t tok0 = blockIdx.x * tokens_per_block;
  if (tok0 >= total_tokens) return;
  const uint32_t ntok = min(tokens_per_block, total_tokens - tok0);
  resolve_tokens<Cache>(a, row_offsets, nullptr, tok0, ntok, total_tokens, start_pos, s_req, s_pos, s_row);
  const Cache c = Cache::view(a, 0, layer);
  for (uint32_t i = threadIdx.x; i < ntok * kOut; i += blockDim.x) {
    const uint32_t ti = i / kOut, d = i % kOut, row = s_row[ti];
    float v = 0.f;
    if (row != kNoRow) {
      const typename Cache::dtype* src = c.blocks + int64_t(row) * Cache::row_elems;
      if (d < PaddedDepth) v = to_f32(src[d]) * to_f32(c.scales[row]);
      else v = to_f32(reinterpret_cast<const __nv_bfloat16*>(src + PaddedDepth)[d - PaddedDepth]);
    }
    k_out[uint64_t(tok0 + ti) * kOut + d] = from_f32<Out>(v);
  }
}

}  // namespace kvgen
