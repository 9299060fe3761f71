// The LTIS mask of block_sparse_attention as a Policy of the attention kernels
// (attn_kernels.cuh, attn_staged_tc.cuh): which keys a query attends (forward), which queries
// attend a key through the inverse index (backward), and the block-chunk description of the
// staged kernels. Shared by block_sparse_attention.cu and the fused branch dQ
// (blossom_branches.cu).
#pragma once
#include "common/checks.h"
#include "common/params.h"
#include "cuda/common.cuh"

namespace blossom {
namespace gpu {

// Whether entry c of query i's list adds no block of its own, before the repeat test: -1 and
// out-of-range entries, the own block, and (causal) blocks that start after i.
__device__ __forceinline__ bool entry_excluded(int64_t c, int64_t own, int64_t i, int64_t C,
                                               int64_t bs, bool causal) {
  return c < 0 || c >= C || c == own || (causal && c * bs > i);
}

// Block c selected by query i in slot s, or -1 when the slot adds nothing to the own block:
// entry_excluded, or a repeat of an earlier slot.
__device__ __forceinline__ int64_t selected_block(const int32_t* row, int64_t s, int64_t own,
                                                  int64_t i, int64_t C, int64_t bs,
                                                  bool causal) {
  const int64_t c = row[s];
  if (entry_excluded(c, own, i, C, bs, causal)) return -1;
  for (int64_t k = 0; k < s; ++k)
    if (row[k] == c) return -1;
  return c;
}

struct BlockSparsePolicy {
  int64_t L = 0, C = 0, Hk = 0;
  BlockSparseMask m;
  Validity valid;
  const int32_t* off = nullptr;      // [B * Hk, C + 1] start of each bucket (backward only)
  const int32_t* entries = nullptr;  // [B * Hk, L * n] queries of each bucket

  __device__ __forceinline__ bool query_valid(int64_t b, int64_t i) const { return valid(b, i); }
  __device__ __forceinline__ bool key_valid(int64_t b, int64_t j) const { return valid(b, j); }

  __device__ __forceinline__ int64_t fwd_slots(int64_t, int64_t, int64_t) const {
    return (1 + m.n) * m.block_size;
  }
  __device__ __forceinline__ int64_t fwd_key(int64_t b, int64_t i, int64_t g, int64_t n) const {
    // 32-bit division: slot counts and positions are far below 2^31, and 64-bit division
    // costs several times more in this per-key path.
    const int bs = static_cast<int>(m.block_size), nn = static_cast<int>(n);
    const int slot = nn / bs;
    const int64_t own = static_cast<int>(i) / bs;
    int64_t c = own;
    if (slot > 0) c = selected_block(m.at(b, i, g), slot - 1, own, i, C, bs, m.causal);
    if (c < 0) return -1;
    const int64_t j = c * bs + (nn - slot * bs);
    if (j >= L || (m.causal && j > i) || !valid(b, j)) return -1;
    return j;
  }

  // Block chunks (attn_staged_tc.cuh): the staged forward and dQ stage one 16-key segment of
  // a listed block per chunk instead of enumerating fwd_key slot by slot (block sizes 16, 32,
  // 64, ...; others keep the per-slot kernels). slot_block is selected_block without the
  // repeat test (the kernel drops repeats with __match_any_sync).
  static constexpr bool kBlockChunks = true;
  bool block_chunks_ok() const {
    const int64_t bs = m.block_size;
    return bs >= 16 && (bs & (bs - 1)) == 0 && m.n + 1 <= 32 && L <= (int64_t(1) << 30);
  }
  // Query groups of the block-chunk kernels (qpw queries per warp): every query's slots fit
  // 32 / qpw lanes of the list pass, and a block index fits the list entry's 23 bits.
  bool block_groups_ok(int qpw) const {
    return m.n + 1 <= 32 / qpw && C < (int64_t(1) << 23);
  }
  __device__ __forceinline__ int blk_size() const { return static_cast<int>(m.block_size); }
  __device__ __forceinline__ int blk_slots() const { return static_cast<int>(m.n) + 1; }
  __device__ __forceinline__ int slot_block(int64_t b, int64_t i, int64_t g, int s) const {
    const int bs = static_cast<int>(m.block_size), ii = static_cast<int>(i);
    const int own = ii >> (31 - __clz(bs));  // bs is a power of two (block_chunks_ok)
    if (s == 0) return own;
    const int c = m.at(b, i, g)[s - 1];
    return (c < 0 || c >= static_cast<int>(C) || c == own || (m.causal && c * bs > ii)) ? -1 : c;
  }
  // In 32 bits: the kernels that ask run with L <= 2^30 (block_chunks_ok) and i <= L.
  __device__ __forceinline__ int key_end(int64_t i) const {
    const int ii = static_cast<int>(i), l = static_cast<int>(L);
    return m.causal && ii + 1 < l ? ii + 1 : l;
  }
  __device__ __forceinline__ bool keys_all_valid() const { return valid.ptr == nullptr; }

  __device__ __forceinline__ int64_t bwd_slots(int64_t b, int64_t j, int64_t g) const {
    const int32_t* o = off + (b * Hk + g) * (C + 1) + static_cast<int>(j) / static_cast<int>(m.block_size);
    return m.block_size + (o[1] - o[0]);
  }
  __device__ __forceinline__ int64_t bwd_query(int64_t b, int64_t j, int64_t g, int64_t n) const {
    const int64_t bs = m.block_size, c = static_cast<int>(j) / static_cast<int>(bs);
    int64_t i;
    if (n < bs) {
      i = c * bs + n;  // the own-block queries of block c
      if (i >= L) return -1;
    } else {
      const int64_t bg = b * Hk + g;
      i = entries[bg * L * m.n + off[bg * (C + 1) + c] + (n - bs)];
    }
    if ((m.causal && j > i) || !valid(b, i)) return -1;
    return i;
  }
};

inline BlockSparsePolicy make_block_sparse_policy(const AttnShape& s, const BlockSparseMask& m,
                                                  const Validity& v) {
  BLOSSOM_CHECK(m.block_size >= 1, "block_sparse_attention: block_size must be >= 1");
  BlockSparsePolicy pol;
  pol.L = s.q_len;
  pol.C = detail::ceil_div(s.q_len, m.block_size);
  pol.Hk = s.kv_heads;
  pol.m = m;
  pol.valid = v;
  return pol;
}

}  // namespace gpu
}  // namespace blossom
