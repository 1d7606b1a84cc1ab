// kvgen implementation of MAX's KVCacheT trait for CUDA: PagedKVCache and ContinuousKVCache.
//
// `Traits` is the rendered, per-variant struct of compile-time parameters (see templates/trait.cuh.j2).
// A cache object is a view of one (K|V, layer) slice of the collection, built on the device from the
// run-time CacheArgs, exactly as MAX's PagedKVCacheCollection._get_cache[kv_idx](layer_idx).
// Formulas follow the semantics reference (types.mojo): row_idx, num_kv_rows, get_tma_row, populate.
#pragma once
#include "common.cuh"

namespace kvgen {

// A cache row that does not exist: a token refused by the row checks, or a tile row past the context.
constexpr uint32_t kNoRow = 0xffffffffu;

// Physical TMA rows of the pages one BN-row tile touches (MAX PagedRowIndices[BN, page_size]).
template <int BN, int PageSize> struct PagedRowIndices {
  static constexpr int eff_page = (PageSize == 0 || PageSize >= BN) ? BN : PageSize;  // kv_sub_tile_rows
  static constexpr int num_pages = BN / eff_page;
  static_assert(BN % eff_page == 0, "a tile must hold whole sub-tile pages");
  uint32_t rows[num_pages];
  __device__ __forceinline__ uint32_t get_row(uint32_t off) const {
    if constexpr (num_pages == 1) return rows[0] + off;
    else return rows[off / eff_page] + off % eff_page;
  }
};

template <class Traits> struct CacheCommon {
  using dtype = typename Traits::dtype;
  using scale_dtype = typename Traits::scale_dtype;
  static constexpr int num_heads = Traits::num_heads;
  static constexpr int head_size = Traits::head_size;
  static constexpr bool is_mla = Traits::is_mla;
  static constexpr int kv_dim = is_mla ? 1 : 2;
  static constexpr bool quantization_enabled = Traits::quantization_enabled;
  static constexpr int quantization_granularity = Traits::quantization_granularity;
  static constexpr int num_scale_groups = (head_size + quantization_granularity - 1) / quantization_granularity;
  static constexpr int row_elems = num_heads * head_size;  // row pitch of the [rows, H, D] view
  static constexpr float fp8_max = Traits::fp8_max;         // 0 for non-FP8 caches
  // kvgen extension (not in MAX's trait): FP8 caches with one float32 scale per (K|V, layer, KV head) on the
  // device, vLLM's and FlashInfer's k_scale / v_scale. Stored values are x / scale; load returns value * scale.
  static constexpr bool static_scales = Traits::static_scales;

  // This view's per-head scales ([H] floats of CacheArgs::static_scales [KVD, L, H]), or nullptr; set by view().
  const float* head_scales;
  __device__ __forceinline__ static const float* head_scales_of(const CacheArgs& a, int kv_idx, int layer) {
    if constexpr (static_scales) return a.static_scales + (int64_t(kv_idx) * a.num_layers + layer) * num_heads;
    else return nullptr;
  }
  // Static scale of head h (1 without static scales).
  __device__ __forceinline__ float static_scale(uint32_t h) const {
    if constexpr (static_scales) return head_scales[h];
    else return 1.f;
  }
};

// ------------------------------------------------------------------------------------------------------
template <class Traits> struct PagedKVCache : CacheCommon<Traits> {
  using Base = CacheCommon<Traits>;
  using typename Base::dtype;
  using typename Base::scale_dtype;
  using Base::head_size;
  using Base::num_heads;
  using Base::num_scale_groups;
  using Base::quantization_granularity;
  using Base::row_elems;
  static constexpr int page_size_ = Traits::page_size;
  static_assert(page_size_ > 0 && (page_size_ & (page_size_ - 1)) == 0, "page size is a power of two");

  dtype* blocks;          // base of this (kv, layer) view: page 0, token 0, head 0
  scale_dtype* scales;    // same for scales, or nullptr
  const CacheArgs* args;  // collection-wide run-time values

  __device__ __forceinline__ static PagedKVCache view(const CacheArgs& a, int kv_idx, int layer) {
    PagedKVCache c;
    c.head_scales = Base::head_scales_of(a, kv_idx, layer);
    const bool own_v = kv_idx != 0 && a.v_blocks != nullptr;  // V in a tensor of its own (CacheArgs::v_blocks)
    const int64_t first_row = (own_v ? 0 : int64_t(kv_idx) * a.kv_offset) + int64_t(layer) * page_size_;  // row 0 of the view
    c.blocks = reinterpret_cast<dtype*>(own_v ? a.v_blocks : a.blocks) + first_row * row_elems;
    void* const scales = own_v ? a.v_scales : a.scales;
    c.scales = scales == nullptr ? nullptr : reinterpret_cast<scale_dtype*>(scales) + first_row * num_heads * num_scale_groups;
    c.args = &a;
    return c;
  }

  // -- comptime members ----------------------------------------------------------------------------------
  __device__ static constexpr int max_tile_size() { return page_size_; }

  // -- lengths --------------------------------------------------------------------------------------------
  __device__ __forceinline__ uint32_t cache_length(uint32_t b) const { return args->cache_lengths[b]; }
  __device__ __forceinline__ const uint32_t* cache_lengths_nd() const { return args->cache_lengths; }
  __device__ __forceinline__ uint32_t max_prompt_length() const { return args->max_seq_length; }
  __device__ __forceinline__ uint32_t max_context_length() const { return args->max_cache_length; }
  __device__ __forceinline__ bool empty_cache() const { return args->max_cache_length == 0; }

  // -- row math -------------------------------------------------------------------------------------------
  // Rows of H*D elements between consecutive pages of this view (other layers, and V unless K and V are planes,
  // sit in between).
  __device__ __forceinline__ uint32_t stride() const { return args->page_stride; }
  __device__ __forceinline__ uint32_t lut(uint32_t b, uint32_t col) const {
    return args->lookup_table[uint64_t(b) * args->lut_row_stride + col];
  }
  __device__ __forceinline__ uint32_t row_idx(uint32_t b, uint32_t t) const {
    return lut(b, t / page_size_) * stride() + t % page_size_;
  }
  __device__ __forceinline__ uint32_t num_kv_rows() const { return (args->num_blocks - 1) * stride() + page_size_; }
  // Sparse-MLA encoding enc = phys_block * P + offset -> TMA row.
  __device__ __forceinline__ uint32_t get_tma_row(uint32_t enc) const {
    return (enc / page_size_) * stride() + enc % page_size_;
  }

  // -- element addresses ----------------------------------------------------------------------------------
  __device__ __forceinline__ int64_t elem_offset(uint32_t b, uint32_t h, uint32_t t, uint32_t d) const {
    return int64_t(row_idx(b, t)) * row_elems + int64_t(h) * head_size + d;
  }
  template <int Tile> __device__ __forceinline__ dtype* block_paged_ptr(uint32_t b, uint32_t t, uint32_t h, uint32_t d) const {
    static_assert(Tile <= page_size_ && page_size_ % Tile == 0, "a tile may not cross a page");
    return blocks + elem_offset(b, h, t, d);
  }
  __device__ __forceinline__ int64_t scale_offset(uint32_t b, uint32_t h, uint32_t t, uint32_t d) const {
    return int64_t(row_idx(b, t)) * (num_heads * num_scale_groups) + int64_t(h) * num_scale_groups
        + d / quantization_granularity;  // floor division (MAX fixed a ceildiv bug here)
  }
  __device__ __forceinline__ scale_dtype* scales_block_paged_ptr(uint32_t b, uint32_t h, uint32_t t, uint32_t d) const {
    return scales + scale_offset(b, h, t, d);
  }
  __device__ __forceinline__ scale_dtype* scales_raw_ptr() const { return scales; }

  // -- load / store ---------------------------------------------------------------------------------------
  template <int W> __device__ __forceinline__ Vec<dtype, W> load_quantized(uint32_t b, uint32_t h, uint32_t t, uint32_t d) const {
    return load_vec<W>(blocks + elem_offset(b, h, t, d));
  }
  template <int W> __device__ __forceinline__ Vec<scale_dtype, W> load_scale(uint32_t b, uint32_t h, uint32_t t, uint32_t d) const {
    static_assert(Base::quantization_enabled, "load_scale needs a quantized cache");
    return load_vec<W>(scales + scale_offset(b, h, t, d));
  }
  template <int W> __device__ __forceinline__ void store_scale(uint32_t b, uint32_t h, uint32_t t, uint32_t d,
                                                               const Vec<scale_dtype, W>& s) const {
    static_assert(Base::quantization_enabled, "store_scale needs a quantized cache");
    store_vec<W>(scales + scale_offset(b, h, t, d), s);
  }
  // Dequantizing load: one scale for the whole vector, so the vector must not cross a granularity block.
  template <int W, class Out> __device__ __forceinline__ Vec<Out, W> load(uint32_t b, uint32_t h, uint32_t t, uint32_t d) const {
    const Vec<dtype, W> q = load_quantized<W>(b, h, t, d);
    Vec<Out, W> r;
    float s = Base::static_scale(h);
    if constexpr (Base::quantization_enabled) {
      static_assert(quantization_granularity % W == 0, "a loaded vector may not cross a scale group");
      s = to_f32(load_scale<1>(b, h, t, d).v[0]);
    }
#pragma unroll
    for (int i = 0; i < W; ++i) r.v[i] = from_f32<Out>(to_f32(q.v[i]) * s);
    return r;
  }
  template <int W> __device__ __forceinline__ void store(uint32_t b, uint32_t h, uint32_t t, uint32_t d,
                                                         const Vec<dtype, W>& x) const {
    store_vec<W>(blocks + elem_offset(b, h, t, d), x);
  }

  // -- populate -------------------------------------------------------------------------------------------
  // Physical rows of the pages a BN tile starting at base_kv_row touches. With several pages per tile the
  // tile must start on a page (BaseAlignment % P == 0); the LUT is read with aligned vector loads, so its
  // row stride is a multiple of the chunk and the 16-column pad keeps over-reads in bounds (MAX contract).
  template <int BN, int BaseAlignment> __device__ __forceinline__ PagedRowIndices<BN, page_size_>
  populate(uint32_t b, uint32_t base_kv_row) const {
    using R = PagedRowIndices<BN, page_size_>;
    R r;
    const uint32_t st = stride();
    if constexpr (R::num_pages == 1) {
      if constexpr (BaseAlignment % page_size_ == 0) r.rows[0] = lut(b, base_kv_row / page_size_) * st;
      else r.rows[0] = row_idx(b, base_kv_row);
    } else {
      static_assert(BaseAlignment >= page_size_ && BaseAlignment % page_size_ == 0,
                    "a multi-page tile must start on a page boundary");
      static_assert(R::num_pages <= int(kLutTailColumns),
                    "a tile's pages are read from the lookup table at most kLutTailColumns past its first: BN <= 16 x page_size");
      constexpr int a_pages = BaseAlignment / page_size_;
      constexpr int lb_n = R::num_pages & -R::num_pages;
      constexpr int lb_a = a_pages & -a_pages;
      constexpr int chunk0 = lb_n < lb_a ? lb_n : lb_a;
      constexpr int chunk = chunk0 < 4 ? chunk0 : 4;  // 16-byte loads at most
      const uint32_t* p = args->lookup_table + uint64_t(b) * args->lut_row_stride + base_kv_row / page_size_;
#pragma unroll
      for (int i = 0; i < R::num_pages; i += chunk) {
        const Vec<uint32_t, chunk> v = load_vec<chunk>(p + i);
#pragma unroll
        for (int j = 0; j < chunk; ++j) r.rows[i + j] = v.v[j] * st;
      }
    }
    return r;
  }

  // -- kvgen helpers (not in the trait) ------------------------------------------------------------------
  // Page id a token position maps to, and whether a write there is allowed (assigned, inside the LUT row).
  __device__ __forceinline__ bool position_ok(uint32_t b, uint32_t t, uint32_t& row) const {
    const uint32_t col = t / page_size_;
    if (col >= args->lut_row_stride) { report(*args, kErrUnassignedPage); return false; }
    return slot_ok(lut(b, col), t % page_size_, row);
  }
  // A (page, offset in page) pair resolved on the host (KVCache.begin_step's token map): re-checked here so a
  // stale or corrupt map can never write the null page, past the allocation, or into another layer's rows.
  __device__ __forceinline__ bool slot_ok(uint32_t page, uint32_t off, uint32_t& row) const {
    if (page >= args->num_blocks) { report(*args, kErrPageOutOfRange); return false; }
    if (page == args->null_page || off >= uint32_t(page_size_)) { report(*args, kErrUnassignedPage); return false; }
    row = page * stride() + off;
    return true;
  }
};

// ------------------------------------------------------------------------------------------------------
// Continuous batching: the lookup table maps a batch entry to a slot of S = tokens_per_slot rows.
template <class Traits> struct ContinuousKVCache : CacheCommon<Traits> {
  using Base = CacheCommon<Traits>;
  using typename Base::dtype;
  using typename Base::scale_dtype;
  using Base::head_size;
  using Base::num_heads;
  using Base::row_elems;
  static constexpr int page_size_ = 0;
  static_assert(!Base::quantization_enabled, "a continuous cache is never quantized");

  dtype* blocks;
  scale_dtype* scales;
  const CacheArgs* args;

  __device__ __forceinline__ static ContinuousKVCache view(const CacheArgs& a, int kv_idx, int layer) {
    ContinuousKVCache c;
    c.head_scales = Base::head_scales_of(a, kv_idx, layer);
    const int64_t slice = int64_t(kv_idx) * a.num_layers + layer;
    c.blocks = reinterpret_cast<dtype*>(a.blocks) + slice * int64_t(a.tokens_per_slot) * row_elems;
    c.scales = nullptr;
    c.args = &a;
    return c;
  }
  __device__ static constexpr int max_tile_size() { return -1; }
  __device__ __forceinline__ uint32_t cache_length(uint32_t b) const { return args->cache_lengths[b]; }
  __device__ __forceinline__ const uint32_t* cache_lengths_nd() const { return args->cache_lengths; }
  __device__ __forceinline__ uint32_t max_prompt_length() const { return args->max_seq_length; }
  __device__ __forceinline__ uint32_t max_context_length() const { return args->max_cache_length; }
  __device__ __forceinline__ bool empty_cache() const { return args->max_cache_length == 0; }

  __device__ __forceinline__ uint32_t stride() const { return uint32_t(Base::kv_dim) * args->num_layers * args->tokens_per_slot; }
  __device__ __forceinline__ uint32_t row_idx(uint32_t b, uint32_t t) const { return args->lookup_table[b] * stride() + t; }
  __device__ __forceinline__ uint32_t num_kv_rows() const { return (args->num_blocks - 1) * stride() + args->tokens_per_slot; }
  __device__ __forceinline__ uint32_t get_tma_row(uint32_t enc) const { return enc; }

  __device__ __forceinline__ int64_t elem_offset(uint32_t b, uint32_t h, uint32_t t, uint32_t d) const {
    return int64_t(row_idx(b, t)) * row_elems + int64_t(h) * head_size + d;
  }
  template <int Tile> __device__ __forceinline__ dtype* block_paged_ptr(uint32_t b, uint32_t t, uint32_t h, uint32_t d) const {
    return blocks + elem_offset(b, h, t, d);
  }
  __device__ __forceinline__ scale_dtype* scales_block_paged_ptr(uint32_t, uint32_t, uint32_t, uint32_t) const { return nullptr; }
  __device__ __forceinline__ scale_dtype* scales_raw_ptr() const { return nullptr; }
  template <int W> __device__ __forceinline__ Vec<dtype, W> load_quantized(uint32_t b, uint32_t h, uint32_t t, uint32_t d) const {
    return load_vec<W>(blocks + elem_offset(b, h, t, d));
  }
  template <int W, class Out> __device__ __forceinline__ Vec<Out, W> load(uint32_t b, uint32_t h, uint32_t t, uint32_t d) const {
    const Vec<dtype, W> q = load_quantized<W>(b, h, t, d);
    Vec<Out, W> r;
    const float s = Base::static_scale(h);
#pragma unroll
    for (int i = 0; i < W; ++i) r.v[i] = from_f32<Out>(to_f32(q.v[i]) * s);
    return r;
  }
  template <int W> __device__ __forceinline__ void store(uint32_t b, uint32_t h, uint32_t t, uint32_t d,
                                                         const Vec<dtype, W>& x) const {
    store_vec<W>(blocks + elem_offset(b, h, t, d), x);
  }
  // Default populate (MAX _populate_via_row_idx): one row per sub-tile page; a slot is one long page.
  template <int BN, int BaseAlignment> __device__ __forceinline__ PagedRowIndices<BN, 0>
  populate(uint32_t b, uint32_t base_kv_row) const {
    PagedRowIndices<BN, 0> r;
    r.rows[0] = row_idx(b, base_kv_row);
    return r;
  }
  __device__ __forceinline__ bool position_ok(uint32_t b, uint32_t t, uint32_t& row) const {
    return slot_ok(args->lookup_table[b], t, row);
  }
  __device__ __forceinline__ bool slot_ok(uint32_t slot, uint32_t t, uint32_t& row) const {
    if (slot >= args->num_blocks) { report(*args, kErrPageOutOfRange); return false; }
    if (t >= args->tokens_per_slot) { report(*args, kErrUnassignedPage); return false; }
    row = slot * stride() + t;
    return true;
  }
};

}  // namespace kvgen
