// Store, load (gather) and copy_pages kernels, written against the KVCacheT trait (Cache = PagedKVCache or
// ContinuousKVCache of a rendered Traits). The rendered .cu instantiates them under extern "C" names.
#pragma once
#include "cache.cuh"

namespace kvgen {

// Work split shared by store and load. A token row (K or V, all heads) is cut into "items": each item is
// VPT vectors of VEC input elements belonging to one scale group slice; TPG consecutive lanes share a
// group and reduce its amax with shuffles. Python (kvgen/derive.py) picks the numbers; see it for why.
template <class Cache, class In, int VEC, int TPG, int VPT> struct RowSplit {
  static constexpr int H = Cache::num_heads, D = Cache::head_size, KVD = Cache::kv_dim;
  static constexpr int elems_per_item = VEC * VPT;
  static constexpr int items_per_head = D / elems_per_item;
  static constexpr int items_per_row = H * items_per_head;   // one of K or V
  static constexpr int items_per_token = KVD * items_per_row;
  static_assert(D % elems_per_item == 0, "an item never spans two heads");
  static_assert(TPG >= 1 && TPG <= 32 && (TPG & (TPG - 1)) == 0, "a scale group lives inside one warp");
  static_assert(items_per_head % TPG == 0, "groups are whole items");
};

constexpr int kThreads = 256;
constexpr int kMaxTokensPerBlock = 64;

// A vLLM slot (page * page_size + offset) -> its cache row, kNoRow for a padding slot (< 0, skipped silently) or a
// refused one (past the allocation, the null page: flagged in the error word, as the token map's checks).
template <class Cache> __device__ __forceinline__ uint32_t slot_row(const Cache& c, const CacheArgs& a, int64_t s) {
  static_assert(Cache::page_size_ > 0, "slot mappings address pages (store_slots is emitted for paged caches only)");
  uint32_t row = kNoRow;
  if (s < 0) return kNoRow;
  if (s >= int64_t(a.num_blocks) * Cache::page_size_) {  // here, not only in slot_ok: s / P must fit 32 bits
    report(a, kErrPageOutOfRange);
    return kNoRow;
  }
  if (!c.slot_ok(uint32_t(s / Cache::page_size_), uint32_t(s % Cache::page_size_), row)) return kNoRow;
  return row;
}

// One new token -> its cache row (kNoRow when refused; the refusal is flagged in the error word). With a token
// map (KVCache.begin_step resolves every new token to (page or slot, offset) once per step) that is one 8-byte
// load, re-checked by slot_ok; without one, a binary search over the CSR row offsets, then the lookup table.
// Row math does not depend on (kv, layer), so one view answers for K and V. `start_pos` (load) replaces
// cache_length(b) as the first position of each request; req and pos are only set on the CSR path.
template <class Cache> __device__ __forceinline__ uint32_t resolve_one(
    const Cache& c, const CacheArgs& a, const uint32_t* row_offsets, const uint2* token_map, uint32_t tok,
    uint32_t total_tokens, const uint32_t* start_pos, uint32_t& req, uint32_t& pos) {
  uint32_t row = kNoRow;
  req = 0;
  pos = kNoRow;
  if (token_map != nullptr) {
    const uint2 m = token_map[tok];
    if (!c.slot_ok(m.x, m.y, row)) row = kNoRow;
    return row;
  }
  uint32_t lo = 0, hi = a.batch_size;  // last b with row_offsets[b] <= tok
  while (hi - lo > 1) {
    const uint32_t mid = (lo + hi) >> 1;
    if (row_offsets[mid] <= tok) lo = mid; else hi = mid;
  }
  const uint32_t first = row_offsets[lo];
  req = lo;
  if (tok >= first && tok < row_offsets[lo + 1] && row_offsets[a.batch_size] == total_tokens) {
    pos = (start_pos != nullptr ? start_pos[lo] : a.cache_lengths[lo]) + (tok - first);
    if (!c.position_ok(req, pos, row)) row = kNoRow;
  } else {
    report(a, kErrBadRange);
  }
  return row;
}

// Resolve each token of a block once, into shared memory (load and the MLA store, whose threads share tokens).
template <class Cache> __device__ __forceinline__ void resolve_tokens(
    const CacheArgs& a, const uint32_t* row_offsets, const uint2* token_map, uint32_t tok0, uint32_t ntok,
    uint32_t total_tokens, const uint32_t* start_pos, uint32_t* s_req, uint32_t* s_pos, uint32_t* s_row) {
  const Cache c = Cache::view(a, 0, 0);
  for (uint32_t i = threadIdx.x; i < ntok; i += blockDim.x) {
    s_row[i] = resolve_one(c, a, row_offsets, token_map, tok0 + i, total_tokens, start_pos, s_req[i], s_pos[i]);
  }
  __syncthreads();
}

// One item's converted words (contiguous in the cache row) in as few stores as possible: 16-byte stores when the
// item is a whole number of them (a quantizing item of 2 bf16 vectors is 16 FP8 bytes: one store rather than two
// of 8 bytes, each of which would touch twice the sectors of the warp's span), else 8- or 4-byte ones.
template <int W> __device__ __forceinline__ void store_words(uint32_t* dst, const uint32_t (&w)[W]) {
  constexpr int kChunk = W % 4 == 0 ? 4 : W % 2 == 0 ? 2 : 1;
#pragma unroll
  for (int i = 0; i < W; i += kChunk) store_vec<kChunk>(dst + i, *reinterpret_cast<const Vec<uint32_t, kChunk>*>(w + i));
}

// store: new K/V [T, H, D] (In) -> cache rows cache_length(b) + t, converting (and quantizing) on the way. With
// SLOTS (the store_slots kernel, vLLM's reshape_and_cache contract) `map` is a slot mapping instead of a token map:
// row t -> slot_mapping[t] = page * page_size + offset (int64, negative: a padding token, skipped), re-checked like
// the token map. A separate instantiation, so the plain store's code is not touched by it.
// Each thread owns IPT items per pass (kvgen/derive.py picks it); the token-map and input loads of a pass are all
// issued before any is used, so their HBM round trips overlap (without a token map: inputs, then the CSR search).
template <class Cache, class In, int VEC, int TPG, int VPT, int IPT, bool SLOTS = false>
__device__ __forceinline__ void store_ragged(const CacheArgs& a, const In* __restrict__ k_new, const In* __restrict__ v_new,
                                             const uint32_t* __restrict__ row_offsets, const uint2* __restrict__ map,
                                             uint32_t total_tokens, uint32_t layer, uint32_t tokens_per_block) {
  using S = RowSplit<Cache, In, VEC, TPG, VPT>;
  using T = typename Cache::dtype;
  using Sc = typename Cache::scale_dtype;
  // A programmatic dependent launch: the new rows may come from the kernel before (wait first). The next grid
  // may launch at once: every kvgen kernel waits for this one before touching memory, and decode's early cache
  // reads (decode_partial) only touch rows this store does not write.
  pdl_wait_then_release();
  const uint32_t tok0 = blockIdx.x * tokens_per_block;
  if (tok0 >= total_tokens) return;
  const uint32_t ntok = min(tokens_per_block, total_tokens - tok0);
  const Cache k_cache = Cache::view(a, 0, layer), v_cache = Cache::view(a, S::KVD - 1, layer);
  const uint32_t n_items = ntok * S::items_per_token;
  // Uniform trip count across the block so every lane of a scale group reaches the shuffles together.
  // No barrier: each thread resolves its own token's row after issuing its input loads, like FlashInfer's
  // append, so warps never wait for each other and loads of different warps overlap freely.
  for (uint32_t base = 0; base < n_items; base += blockDim.x * IPT) {
    // Issue every load of the pass before using any: the token-map entries first, then the inputs. Converting
    // an input before the token map was even requested made the two HBM round trips serial (SASS showed the
    // bf16 -> f32 unpacking waiting on the input load ahead of the map load).
    // A slot-mapping entry (SLOTS) is 8 bytes like a token-map one: the same load, read as the int64's two words.
    uint2 slot[IPT];
    if (map != nullptr) {
#pragma unroll
      for (int u = 0; u < IPT; ++u) {
        const uint32_t it = base + u * blockDim.x + threadIdx.x;
        slot[u] = it < n_items ? map[tok0 + it / S::items_per_token] : make_uint2(0u, 0u);
      }
    }
    // Inputs as 32-bit words (see word_elem_to_f32): VPT vectors of VEC elements per item.
    constexpr int kInWords = S::elems_per_item * int(sizeof(In)) / 4, kVecWords = VEC * int(sizeof(In)) / 4;
    static_assert(VEC * sizeof(In) % 4 == 0, "input vectors are whole words");
    uint32_t raw[IPT][kInWords];
    float static_scale[IPT];  // Cache::static_scales: the item's (K|V, layer, head) scale, loaded with the inputs
#pragma unroll
    for (int u = 0; u < IPT; ++u) {
      const uint32_t it = base + u * blockDim.x + threadIdx.x;
      const bool active = it < n_items;
      const uint32_t ti = it / S::items_per_token, rem = it % S::items_per_token;
      const uint32_t kv = rem / S::items_per_row, h = (rem % S::items_per_row) / S::items_per_head;
      const uint32_t d0 = (rem % S::items_per_head) * S::elems_per_item;
      const uint32_t* src = reinterpret_cast<const uint32_t*>((kv == 0 ? k_new : v_new) + (uint64_t(tok0 + ti) * S::H + h) * S::D + d0);
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        Vec<uint32_t, kVecWords> w{};
        if (active) w = load_vec<kVecWords>(src + j * kVecWords);
#pragma unroll
        for (int i = 0; i < kVecWords; ++i) raw[u][j * kVecWords + i] = w.v[i];
      }
      static_scale[u] = kv == 0 ? k_cache.static_scale(h) : v_cache.static_scale(h);
    }
    uint32_t rows[IPT];
#pragma unroll
    for (int u = 0; u < IPT; ++u) {
      const uint32_t it = base + u * blockDim.x + threadIdx.x;
      rows[u] = kNoRow;
      if (it >= n_items) continue;
      if constexpr (SLOTS) {
        rows[u] = slot_row(k_cache, a, int64_t((uint64_t(slot[u].y) << 32) | slot[u].x));
      } else if (map != nullptr) {
        if (!k_cache.slot_ok(slot[u].x, slot[u].y, rows[u])) rows[u] = kNoRow;
      } else {
        uint32_t req, pos;
        rows[u] = resolve_one(k_cache, a, row_offsets, nullptr, tok0 + it / S::items_per_token, total_tokens,
                              nullptr, req, pos);
      }
    }
#pragma unroll
    for (int u = 0; u < IPT; ++u) {
      const uint32_t it = base + u * blockDim.x + threadIdx.x;
      const bool active = it < n_items;
      const uint32_t rem = it % S::items_per_token;
      const uint32_t kv = rem / S::items_per_row, h = (rem % S::items_per_row) / S::items_per_head;
      const uint32_t d0 = (rem % S::items_per_head) * S::elems_per_item;
      float inv = 1.f;
      Sc scale{};
      if constexpr (Cache::quantization_enabled) {
        // Straight from the raw inputs: a float copy of all VPT x VEC elements would live across the shuffles
        // (32 registers at VPT = 4); the widening conversion is exact, so it can be redone below.
        float amax = 0.f;
#pragma unroll
        for (int j = 0; j < VPT; ++j)
#pragma unroll
          for (int e = 0; e < VEC; ++e) amax = fmaxf(amax, fabsf(word_elem_to_f32<In>(raw[u], j * VEC + e)));
#pragma unroll
        for (int m = TPG / 2; m > 0; m >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
        scale = make_scale<Sc>(amax, Cache::fp8_max);
        // One IEEE division per group, then IEEE multiplies: kvgen.reference.quantize does the same two
        // roundings, so results match bit for bit without a division per element.
        inv = 1.f / to_f32(scale);
      } else if constexpr (Cache::static_scales) {
        inv = 1.f / static_scale[u];  // as kvgen.reference.quantize_static: one IEEE reciprocal, then multiplies
      }
      const uint32_t row = rows[u];
      if (!active || row == kNoRow) continue;
      // Select the base pointer, not a reference to one of two local caches (that would force them to memory).
      T* dst = (kv == 0 ? k_cache.blocks : v_cache.blocks) + int64_t(row) * S::H * S::D + int64_t(h) * S::D + d0;
      constexpr int kOutWords = S::elems_per_item * int(sizeof(T)) / 4;
      uint32_t out[kOutWords];
      if constexpr (is_same_v<In, T> && !Cache::quantization_enabled) {
#pragma unroll
        for (int i = 0; i < kOutWords; ++i) out[i] = raw[u][i];  // same type: the input bits, untouched
      } else {
        float x[S::elems_per_item];
#pragma unroll
        for (int e = 0; e < S::elems_per_item; ++e) x[e] = word_elem_to_f32<In>(raw[u], e);
        pack_words<T>(x, inv, out);
      }
      store_words(reinterpret_cast<uint32_t*>(dst), out);
      if constexpr (Cache::quantization_enabled) {
        if ((threadIdx.x & (TPG - 1)) == 0) {
          (kv == 0 ? k_cache.scales : v_cache.scales)[int64_t(row) * S::H * Cache::num_scale_groups + h * Cache::num_scale_groups
                   + d0 / Cache::quantization_granularity] = scale;
        }
      }
    }
  }
}

// load: cache rows [start_pos(b), start_pos(b) + n_b) -> out K/V [T, H, D] (Out), dequantized.
template <class Cache, class Out, int VEC, int VPT>
__device__ __forceinline__ void load_ragged(const CacheArgs& a, Out* __restrict__ k_out, Out* __restrict__ v_out,
                                            const uint32_t* __restrict__ row_offsets, const uint32_t* __restrict__ start_pos,
                                            uint32_t total_tokens, uint32_t layer, uint32_t tokens_per_block) {
  using S = RowSplit<Cache, Out, VEC, 1, VPT>;
  __shared__ uint32_t s_req[kMaxTokensPerBlock], s_pos[kMaxTokensPerBlock], s_row[kMaxTokensPerBlock];
  pdl_wait_then_release();  // a programmatic dependent launch, as store_ragged
  const uint32_t tok0 = blockIdx.x * tokens_per_block;
  if (tok0 >= total_tokens) return;
  const uint32_t ntok = min(tokens_per_block, total_tokens - tok0);
  resolve_tokens<Cache>(a, row_offsets, nullptr, tok0, ntok, total_tokens, start_pos, s_req, s_pos, s_row);
  const Cache k_cache = Cache::view(a, 0, layer), v_cache = Cache::view(a, S::KVD - 1, layer);
  const uint32_t n_items = ntok * S::items_per_token;
  for (uint32_t it = threadIdx.x; it < n_items; it += blockDim.x) {
    const uint32_t ti = it / S::items_per_token, rem = it % S::items_per_token;
    const uint32_t kv = rem / S::items_per_row, h = (rem % S::items_per_row) / S::items_per_head;
    const uint32_t d0 = (rem % S::items_per_head) * S::elems_per_item;
    const Cache& c = kv == 0 ? k_cache : v_cache;
    Out* dst = (kv == 0 ? k_out : v_out) + (uint64_t(tok0 + ti) * S::H + h) * S::D + d0;
    const uint32_t pos = s_pos[ti];
    const bool ok = s_row[ti] != kNoRow;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      Vec<Out, VEC> v{};
      if (ok) {
        // Through the trait's dequantizing load (row_idx(b, pos) is the row resolve_tokens checked).
        v = c.template load<VEC, Out>(s_req[ti], h, pos, d0 + j * VEC);
      }
      store_vec<VEC>(dst + j * VEC, v);
    }
  }
}

// n bytes from s to d, thread `first` of a grid-stride loop of `step` threads, in units of U.
template <class U> __device__ __forceinline__ void copy_units(char* d, const char* s, uint64_t n, uint64_t first,
                                                             uint64_t step) {
  for (uint64_t i = first; i < n / sizeof(U); i += step) reinterpret_cast<U*>(d)[i] = reinterpret_cast<const U*>(s)[i];
}

// n bytes in the widest unit (16, 8, 4 or 1 bytes) that divides n and both addresses. A K/V page is always whole
// 16-byte vectors; a scales page need not be: P x H x G x 4 bytes per layer and plane is 24 at one token, three
// heads and one group, so page 1's scales start 8 bytes off a vector (the 16-byte copy faulted, misaligned).
__device__ __forceinline__ void copy_bytes(char* d, const char* s, uint64_t n, uint64_t first, uint64_t step) {
  const uint64_t bits = reinterpret_cast<uint64_t>(d) | reinterpret_cast<uint64_t>(s) | n;
  if (bits % 16 == 0) copy_units<uint4>(d, s, n, first, step);
  else if (bits % 8 == 0) copy_units<uint2>(d, s, n, first, step);
  else if (bits % 4 == 0) copy_units<uint32_t>(d, s, n, first, step);
  else copy_units<char>(d, s, n, first, step);
}

// copy_pages: one contiguous run of each page and of its scales, src_ids[i] -> dst_ids[i]: the whole page (all
// layers, K and V) in the page-major layout; the host launches once per layer tensor and K/V plane otherwise.
__device__ __forceinline__ void copy_pages(const CacheArgs& a, const uint32_t* __restrict__ src_ids,
                                           const uint32_t* __restrict__ dst_ids, uint32_t n_pairs,
                                           uint64_t page_bytes, uint64_t scale_page_bytes) {
  pdl_wait_then_release();  // a programmatic dependent launch, as store_ragged
  const uint32_t pair = blockIdx.y;
  if (pair >= n_pairs) return;
  const uint32_t src = src_ids[pair], dst = dst_ids[pair];
  // Never write the null page nor past the allocation; reading the null page is allowed.
  if (src >= a.num_blocks || dst >= a.num_blocks || dst == a.null_page) {
    if (blockIdx.x == 0 && threadIdx.x == 0) report(a, kErrPageOutOfRange);
    return;
  }
  const uint64_t first = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x, step = uint64_t(gridDim.x) * blockDim.x;
  copy_bytes(static_cast<char*>(a.blocks) + uint64_t(dst) * page_bytes,
             static_cast<const char*>(a.blocks) + uint64_t(src) * page_bytes, page_bytes, first, step);
  if (a.scales != nullptr) {
    copy_bytes(static_cast<char*>(a.scales) + uint64_t(dst) * scale_page_bytes,
               static_cast<const char*>(a.scales) + uint64_t(src) * scale_page_bytes, scale_page_bytes, first, step);
  }
}

}  // namespace kvgen
