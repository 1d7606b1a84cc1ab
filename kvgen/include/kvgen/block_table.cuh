// A step's page table, lengths and CSR row offsets from an engine's block table, on the device (paged caches).
// vLLM hands its attention backends block_table [reqs, cols] int32 (entries past a request's pages are its null
// block) and seq_lens [reqs] int32, which count the step's new tokens; kvgen's decode and store read the lookup
// table (null-padded rows of lut_row_stride columns), cache_lengths (tokens before the step) and CSR offsets. This
// kernel writes those three from the engine's tensors in one launch per step, so no host round trip is needed and a
// CUDA graph can replay it with the engine's next block table. Header-only; compiled by NVRTC.
#pragma once
#include "common.cuh"

namespace kvgen {

// One CTA per lookup-table row b < gridDim.x (the cache's max_batch). Rows of requests [num_reqs, max_batch) get
// no pages and length 0. Every page id is checked: an id past the allocation is written as the null page and
// flagged in the error word, so nothing downstream reads or writes outside the cache. The null page inside a
// request's pages is kept without a flag: vLLM puts its null block where a sliding window or a prefix-cache hit
// skipped blocks, decode does not read pages wholly before the window, and the stores refuse to write it. A length
// below new_tokens, or more pages than either table holds, is flagged (the request then keeps only what fits).
template <int PageSize>
__device__ __forceinline__ void adopt_block_table(const CacheArgs& a, const int32_t* __restrict__ block_table,
                                                  uint32_t bt_cols,
                                                  const int32_t* __restrict__ seq_lens, uint32_t num_reqs,
                                                  uint32_t new_tokens, uint32_t* __restrict__ row_offsets) {
  pdl_wait_then_release();  // the kernel before it may still read this step's tables
  const uint32_t b = blockIdx.x;
  uint32_t pages = 0, cached = 0;
  if (b < num_reqs) {
    const int32_t len = seq_lens[b];
    const uint32_t room = min(bt_cols, a.lut_row_stride - kLutTailColumns);
    if (len < int32_t(new_tokens)) {
      if (threadIdx.x == 0) report(a, kErrBadRange);
    } else {
      pages = (uint32_t(len) + PageSize - 1) / PageSize;
      cached = uint32_t(len) - new_tokens;
      if (pages > room) {
        if (threadIdx.x == 0) report(a, kErrUnassignedPage);
        pages = room;
        cached = min(cached, pages * PageSize > new_tokens ? pages * PageSize - new_tokens : 0u);
      }
    }
  }
  uint32_t* lut = const_cast<uint32_t*>(a.lookup_table) + uint64_t(b) * a.lut_row_stride;
  const int32_t* src = block_table + uint64_t(b) * bt_cols;  // [reqs, bt_cols], contiguous
  for (uint32_t j = threadIdx.x; j < a.lut_row_stride; j += blockDim.x) {
    uint32_t page = a.null_page;
    if (j < pages) {
      const int32_t id = src[j];
      if (id < 0 || uint32_t(id) >= a.num_blocks) {
        report(a, kErrPageOutOfRange);
      } else {
        page = uint32_t(id);
      }
    }
    lut[j] = page;
  }
  if (threadIdx.x == 0) {
    const_cast<uint32_t*>(a.cache_lengths)[b] = cached;
    row_offsets[b + 1] = min(b + 1, num_reqs) * new_tokens;
    if (b == 0) row_offsets[0] = 0;
  }
}

}  // namespace kvgen
