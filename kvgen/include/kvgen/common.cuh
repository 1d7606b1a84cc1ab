// kvgen common device helpers: element conversion (saturating FP8), vector access, the run-time cache
// arguments shared with Python. Header-only; compiled by NVRTC (no <cuda.h>, no <cstdint>).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda/std/cstdint>

// <cuda.h> cannot be included under NVRTC (it pulls <stdlib.h>); this matches its CUDA 13 definition.
#ifndef KVGEN_CUTENSORMAP_DECLARED
#define KVGEN_CUTENSORMAP_DECLARED
struct alignas(128) CUtensorMap_st { unsigned long long opaque[16]; };
typedef struct CUtensorMap_st CUtensorMap;
#endif

namespace kvgen {
using cuda::std::int32_t;
using cuda::std::int64_t;
using cuda::std::uint32_t;
using cuda::std::uint64_t;
using cuda::std::uint8_t;

// The one type trait the kernels need. <cuda/std/type_traits> was 1.1 s of a 1.3 s decode compile (NVRTC
// --fdevice-time-trace: the C++ front end spent it parsing that header tree).
template <class A, class B> inline constexpr bool is_same_v = false;
template <class A> inline constexpr bool is_same_v<A, A> = true;
template <bool C, class A, class B> struct conditional { using type = A; };
template <class A, class B> struct conditional<false, A, B> { using type = B; };
template <bool C, class A, class B> using conditional_t = typename conditional<C, A, B>::type;

// The MAX lookup-table contract: every row holds this many columns past a request's last page, so populate's
// vector reads of the pages of a tile (at most this many past its first) stay inside the row. Mirrors
// kvgen/reference.py LUT_TAIL_COLUMNS (reference.padded_lut_cols), which the config's tile rules use.
constexpr uint32_t kLutTailColumns = 16;

// Error bits written (atomicOr) into CacheArgs::error_word when a launch meets data it refuses to touch.
// The write or read is skipped, so the cache is never corrupted; the host reads the word on demand.
enum ErrorBits : uint32_t {
  kErrUnassignedPage = 1u << 0,  // a token maps to the null page or past the lookup-table row
  kErrPageOutOfRange = 1u << 1,  // a page id is past the allocation
  kErrBadRange = 1u << 2,        // CSR offsets decrease or exceed the token count
};

// Run-time description of a whole cache collection (all layers, K and V). Python packs the same layout
// (kvgen/runtime/abi.py); keep both in sync, the static_asserts below pin the size.
struct CacheArgs {
  void* blocks;                    // [num_blocks, KVD, L, P, H, D] or K/V planes [KVD, num_blocks, L, P, H, D]
                                   // (continuous: [slots, KVD, L, S, H, D]); one layer's tensor (L = 1) per launch
                                   // for per-layer caches (KVCache.wrap_layers)
  void* scales;                    // the blocks' layout with G for D, or nullptr when not quantized
  const uint32_t* cache_lengths;   // [batch] tokens already cached
  const uint32_t* lookup_table;    // [batch, lut_row_stride] page ids (paged) / [batch] slot ids (continuous)
  uint32_t* error_word;            // see ErrorBits; may be nullptr
  const float* static_scales;      // [KVD, L, H] float32 (Traits::static_scales), else nullptr
  uint32_t batch_size;
  uint32_t lut_row_stride;         // columns of the lookup table (1 for continuous)
  uint32_t num_blocks;             // pages including the null page / number of slots
  uint32_t num_layers;
  uint32_t max_seq_length;         // longest count of new tokens in this step (max_prompt_length)
  uint32_t max_cache_length;       // longest cache_length + new tokens (max_context_length)
  uint32_t tokens_per_slot;        // continuous caches only: the slot length S; 0 for paged
  uint32_t null_page;              // paged: the page no request owns (kvgen allocates it last; vLLM's null block is 0);
                                   // continuous: 0xFFFFFFFF (none)
  // Paged: rows of H*D elements between consecutive pages of one (K|V, layer) view, and from the K view to the V
  // view. KVCache sets them from the tensor layout: K and V of a page together ([num_blocks, KVD, L, P, H, D]:
  // KVD*L*P and L*P), or K and V planes ([KVD, num_blocks, L, P, H, D], vLLM's FlashAttention layout: L*P and
  // num_blocks*L*P).
  uint32_t page_stride;
  uint32_t kv_offset;
  // Paged, K and V in tensors of their own (KVCache.wrap_layers with kv_layout "split": SGLang's k_buffer /
  // v_buffer): the V view's base and its scales' (blocks / scales then hold K only). nullptr: V is kv_offset rows
  // after K in `blocks`.
  void* v_blocks;
  void* v_scales;
};
static_assert(sizeof(CacheArgs) == 104, "CacheArgs layout must match kvgen/runtime/abi.py");

// Programmatic dependent launch (sm_90+; no-ops before sm_90 and when the grid was launched plainly). The host
// launches store, load, copy_pages and decode with the PDL attribute (KVCache.programmatic_launch), so a grid
// may start while the kernel before it on the stream still runs:
// pdl_wait() blocks until that kernel has completed and its writes are visible, and must come before any global
// access the previous kernel could race with. pdl_launch_dependents() lets the next grid start launching (its
// CTAs then sit in their own pdl_wait, so triggering early is safe).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// The start of a kernel that touches nothing before the kernel before it is done, and lets the next one launch.
__device__ __forceinline__ void pdl_wait_then_release() {
  pdl_wait();
  pdl_launch_dependents();
}

__device__ __forceinline__ void report(const CacheArgs& a, uint32_t bits) {
  if (a.error_word != nullptr) atomicOr(a.error_word, bits);
}

// ---- element conversion --------------------------------------------------------------------------------
struct e8m0_t { uint8_t bits; };  // power-of-two scale 2^(bits-127), as float8_e8m0fnu

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__nv_fp8_e4m3 x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_f32(__nv_fp8_e5m2 x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_f32(e8m0_t x) {
  // bits 0 is 2^-127 (subnormal in float32); 255 is NaN in e8m0fnu and is never produced by kvgen.
  return x.bits == 0 ? __uint_as_float(0x00400000u) : __uint_as_float(uint32_t(x.bits) << 23);
}

template <class T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
// FP8 conversions saturate to the finite range (cvt.rn.satfinite): +-inf and overflow become +-max, never NaN.
// A plain cvt is not satfinite and would turn overflow into NaN (MAX cast_saturating exists for this reason).
template <> __device__ __forceinline__ __nv_fp8_e4m3 from_f32<__nv_fp8_e4m3>(float x) {
  __nv_fp8_e4m3 r; r.__x = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3); return r;
}
template <> __device__ __forceinline__ __nv_fp8_e5m2 from_f32<__nv_fp8_e5m2>(float x) {
  __nv_fp8_e5m2 r; r.__x = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E5M2); return r;
}

// Scale of one quantization group: amax / fp8_max, or for e8m0 the next power of two at or above it.
// kvgen.reference.group_scale implements the same bit-level rule; keep them identical.
template <class S> __device__ __forceinline__ S make_scale(float amax, float fp8_max);
// A group holding +-inf has amax = inf; clamped to the largest finite float its scale stays finite, so inf
// stores as +-fp8_max (satfinite) and the group's finite values as 0, instead of inf * (1 / inf) = NaN.
template <> __device__ __forceinline__ float make_scale<float>(float amax, float fp8_max) {
  amax = fminf(amax, 3.40282347e38f);
  return amax > 0.f ? amax / fp8_max : 1.f;
}
template <> __device__ __forceinline__ e8m0_t make_scale<e8m0_t>(float amax, float fp8_max) {
  const float r = amax / fp8_max;
  const uint32_t b = __float_as_uint(r);
  uint32_t e = (b >> 23) & 0xffu, m = b & 0x7fffffu;
  uint32_t bits;
  if (!(r > 0.f)) bits = 127u;          // zero group: scale 1
  else if (e == 0u) bits = 1u;          // subnormal ratio: 2^-126 already covers it
  else bits = e + (m != 0u ? 1u : 0u);  // ceil(log2(r))
  if (bits > 254u) bits = 254u;
  e8m0_t s; s.bits = uint8_t(bits); return s;
}

// ---- vector access ---------------------------------------------------------------------------------------
template <class T, int N> struct Vec { T v[N]; };

template <int Bytes> struct RawVec;
template <> struct RawVec<16> { using type = uint4; };
template <> struct RawVec<8> { using type = uint2; };
template <> struct RawVec<4> { using type = uint32_t; };
template <> struct RawVec<2> { using type = unsigned short; };
template <> struct RawVec<1> { using type = uint8_t; };

template <int Bytes> constexpr bool is_raw_width = Bytes == 1 || Bytes == 2 || Bytes == 4 || Bytes == 8 || Bytes == 16;

// One wide load/store when the vector is 1..16 bytes (callers keep the address aligned to its size).
template <int N, class T> __device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  Vec<T, N> r;
  if constexpr (is_raw_width<int(sizeof(T)) * N>) {
    using R = typename RawVec<int(sizeof(T)) * N>::type;
    *reinterpret_cast<R*>(&r) = *reinterpret_cast<const R*>(p);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) r.v[i] = p[i];
  }
  return r;
}
// L2 prefetch size qualifier of a load (PTX .level::prefetch_size): KVGEN_L2_PREFETCH_QUAL(128) -> ".L2::128B".
// A request then fetches the whole 64/128/256-byte span into L2 at once instead of sector by sector; measured on
// the H100 (bench/NOTES.md) this streams scattered 128-256 byte cache rows 1-2% faster.
#define KVGEN_L2_PREFETCH_QUAL_0 ""
#define KVGEN_L2_PREFETCH_QUAL_64 ".L2::64B"
#define KVGEN_L2_PREFETCH_QUAL_128 ".L2::128B"
#define KVGEN_L2_PREFETCH_QUAL_256 ".L2::256B"
#define KVGEN_L2_PREFETCH_QUAL_(n) KVGEN_L2_PREFETCH_QUAL_##n
#define KVGEN_L2_PREFETCH_QUAL(n) KVGEN_L2_PREFETCH_QUAL_(n)

template <int N, class T> __device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& x) {
  if constexpr (is_raw_width<int(sizeof(T)) * N>) {
    using R = typename RawVec<int(sizeof(T)) * N>::type;
    *reinterpret_cast<R*>(p) = *reinterpret_cast<const R*>(&x);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = x.v[i];
  }
}

constexpr __host__ __device__ __nv_fp8_interpretation_t fp8_kind(__nv_fp8_e4m3) { return __NV_E4M3; }
constexpr __host__ __device__ __nv_fp8_interpretation_t fp8_kind(__nv_fp8_e5m2) { return __NV_E5M2; }

// ---- vectors as 32-bit words (the store's hot path) ----------------------------------------------------
// Converting through Vec<bf16/fp8, N> arrays makes the compiler move every 8- or 16-bit element with its own byte
// permute (SASS of the FP8 store: ~40 PRMT/LOP3 per 16 output bytes); whole words avoid that.
template <class In, int W> __device__ __forceinline__ float word_elem_to_f32(const uint32_t (&w)[W], int e) {
  if constexpr (sizeof(In) == 4) {
    return __uint_as_float(w[e]);
  } else if constexpr (is_same_v<In, __nv_bfloat16>) {  // bf16 is the upper half of a float: a shift or a mask
    return __uint_as_float((e & 1) ? (w[e >> 1] & 0xffff0000u) : (w[e >> 1] << 16));
  } else {
    static_assert(is_same_v<In, __half>, "16-bit inputs are bf16 or fp16");
    const __half2 h = *reinterpret_cast<const __half2*>(&w[e >> 1]);
    return (e & 1) ? __high2float(h) : __low2float(h);
  }
}

// Four floats as four FP8 bytes (a0 lowest), saturating to the finite range. On sm_89+ two cvt.e4m3x2/e5m2x2
// joined by one mov: the intrinsic returns 16-bit halves the compiler masks before it permutes them together.
template <class T> __device__ __forceinline__ uint32_t fp8x4(float a0, float a1, float a2, float a3) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint32_t r;
  if constexpr (is_same_v<T, __nv_fp8_e4m3>) {
    asm("{.reg .b16 lo, hi;\n\tcvt.rn.satfinite.e4m3x2.f32 lo, %2, %1;\n\tcvt.rn.satfinite.e4m3x2.f32 hi, %4, %3;\n\t"
        "mov.b32 %0, {lo, hi};}" : "=r"(r) : "f"(a0), "f"(a1), "f"(a2), "f"(a3));
  } else {
    asm("{.reg .b16 lo, hi;\n\tcvt.rn.satfinite.e5m2x2.f32 lo, %2, %1;\n\tcvt.rn.satfinite.e5m2x2.f32 hi, %4, %3;\n\t"
        "mov.b32 %0, {lo, hi};}" : "=r"(r) : "f"(a0), "f"(a1), "f"(a2), "f"(a3));
  }
  return r;
#else
  constexpr __nv_fp8_interpretation_t kind = fp8_kind(T{});
  const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(a0, a1), __NV_SATFINITE, kind);
  const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(a2, a3), __NV_SATFINITE, kind);
  return __byte_perm(lo, hi, 0x5410);
#endif
}

// x[i] * mul as N elements of T, little-endian in 32-bit words, rounded as from_f32 (FP8: satfinite).
template <class T, int N> __device__ __forceinline__ void pack_words(const float (&x)[N], float mul,
                                                                     uint32_t (&w)[N * sizeof(T) / 4]) {
  static_assert(N * sizeof(T) % 4 == 0, "whole words");
  if constexpr (sizeof(T) == 1) {
#pragma unroll
    for (int i = 0; i < N; i += 4) w[i / 4] = fp8x4<T>(x[i] * mul, x[i + 1] * mul, x[i + 2] * mul, x[i + 3] * mul);
  } else if constexpr (sizeof(T) == 2) {
#pragma unroll
    for (int i = 0; i < N; i += 2) {  // one packing convert per pair, .x in the low half
      if constexpr (is_same_v<T, __nv_bfloat16>) {
        const __nv_bfloat162 pair = __floats2bfloat162_rn(x[i] * mul, x[i + 1] * mul);
        w[i / 2] = *reinterpret_cast<const uint32_t*>(&pair);
      } else {
        const __half2 pair = __floats2half2_rn(x[i] * mul, x[i + 1] * mul);
        w[i / 2] = *reinterpret_cast<const uint32_t*>(&pair);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) w[i] = __float_as_uint(from_f32<T>(x[i] * mul));
  }
}

__device__ __forceinline__ uint32_t lowbit(uint32_t x) { return x & (~x + 1u); }
}  // namespace kvgen
