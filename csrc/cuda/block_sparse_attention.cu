// LTIS selected attention on the GPU: query i attends to its own block plus the blocks in
// block_idx[b, i, g] (-1, duplicates and out-of-range entries ignored), one softmax over
// the union.
//
// Backward without float atomics: dK/dV for key j (block c) needs the queries that attend
// to block c. Those are the queries of block c itself plus the queries that selected c,
// which an inverse index lists: for each (b, g, c), the queries i that selected c, in a
// deterministic order (counting sort, built by block_index_kernel below in the workspace).
#include "cuda/attn_kernels.cuh"
#include "cuda/block_sparse_dkdv.h"
#include "cuda/block_sparse_policy.cuh"
#include "cuda/launch.h"

namespace blossom {
namespace gpu {
namespace {

constexpr int kIndexWarps = 8;  // warps of the index-building CTA (one CTA per (b, g))
// Cursor bytes block_index_kernel keeps in shared memory (without a >48 KB opt-in): C <= 1536,
// i.e. L <= 24576 at block size 16.
constexpr size_t kIndexSmemCursorBytes = 48 * 1024 - 256;

// BLOSSOM_OPS_CUDA_INDEX_SMEM=0 keeps block_index_kernel's cursors in the global workspace
// (A/B; read once).
inline bool index_cursors_global() {
  static const bool global = detail::env_equals("BLOSSOM_OPS_CUDA_INDEX_SMEM", "0");
  return global;
}

// Exclusive scan of one int per thread over the CTA; returns the prefix and adds the CTA
// total to *carry (same value in every thread).
__device__ int block_exclusive_scan(int x, int* warp_tot, int* carry) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  int inc = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(detail::kFullMask, inc, o);
    if (lane >= o) inc += y;
  }
  if (lane == 31) warp_tot[w] = inc;
  __syncthreads();
  int before = 0, total = 0;
  for (int k = 0; k < kIndexWarps; ++k) {
    if (k < w) before += warp_tot[k];
    total += warp_tot[k];
  }
  const int result = *carry + before + inc - x;
  __syncthreads();
  if (threadIdx.x == 0) *carry += total;
  __syncthreads();
  return result;
}

// A lane's query row of block_idx for the index passes. NS > 0: the row's first NS entries in
// registers (n <= NS), loaded one group of 32 queries ahead of their use, so that a warp's
// passes do not wait for a dependent DRAM read per group (the index kernel was bound by that
// latency: ~0.07 ms at L = 4096, 0.34 ms at 16384 on an H100, 16 / 64 groups per warp and
// pass). NS = 0: any n, read in place (selected_block).
template <int NS>
struct IndexRow {
  int v[NS > 0 ? NS : 1];
  const int32_t* row = nullptr;
  // Reads the row of query i (i < L) or marks it empty (in_range false).
  __device__ __forceinline__ void load(const BlockSparseMask& m, int64_t b, int64_t i, int64_t g,
                                       bool in_range) {
    row = in_range ? m.at(b, i, g) : nullptr;
    if constexpr (NS > 0) {
#pragma unroll
      for (int s = 0; s < NS; ++s) v[s] = in_range && s < m.n ? row[s] : -1;
    }
  }
  // selected_block of slot s (s < n) for query i with own block `own`.
  __device__ __forceinline__ int64_t block(int64_t s, int64_t own, int64_t i, int64_t C,
                                           int64_t bs, bool causal) const {
    if constexpr (NS == 0) {
      return selected_block(row, s, own, i, C, bs, causal);
    } else {
      int c = -1;
#pragma unroll
      for (int k = 0; k < NS; ++k)
        if (k == s) c = v[k];
      if (entry_excluded(c, own, i, C, bs, causal)) return -1;
#pragma unroll
      for (int k = 0; k < NS; ++k)
        if (k < s && v[k] == c) return -1;
      return c;
    }
  }
};

// One CTA per (b, g). Warp w owns queries [w * per, (w + 1) * per). Pass 1 counts per (warp,
// block) with integer atomics (order-free); a scan turns counts into per-(warp, block)
// cursors; pass 2 places each warp's queries in order of (query group of 32, slot, lane),
// ranking lanes that hit the same block with __match_any_sync. The result depends only on
// block_idx, never on scheduling (and not on NS: IndexRow). The per-(warp, block) cursors live
// in dynamic shared memory when the launcher gives it (cursors_in_smem: kIndexWarps * C ints
// fit, C <= 1536), so the pass-1 atomics and pass-2 cursor updates stay on the SM; otherwise in
// the global workspace.
template <int NS>
__global__ void __launch_bounds__(kIndexWarps * 32)
    block_index_kernel(const BlockSparseMask m, const Validity valid, int64_t L, int64_t Hk,
                       int64_t C, int32_t* __restrict__ off, int32_t* __restrict__ cursor,
                       int32_t* __restrict__ entries, bool cursors_in_smem) {
  __shared__ int warp_tot[kIndexWarps];
  __shared__ int carry;
  extern __shared__ int32_t cur_smem[];
  const int64_t bg = blockIdx.x, b = bg / Hk, g = bg % Hk;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  int32_t* cur = cursors_in_smem ? cur_smem : cursor + bg * kIndexWarps * C;
  int32_t* o = off + bg * (C + 1);
  int32_t* ent = entries + bg * L * m.n;
  const int64_t bs = m.block_size;
  const int64_t per = (L + kIndexWarps - 1) / kIndexWarps;
  const int64_t i_begin = w * per, i_end = (w + 1) * per < L ? (w + 1) * per : L;

  for (int64_t x = threadIdx.x; x < kIndexWarps * C; x += blockDim.x) cur[x] = 0;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();

  // Both passes walk the warp's groups of 32 queries with the next group's rows in flight.
  IndexRow<NS> row, next;
  row.load(m, b, i_begin + lane, g, i_begin + lane < i_end);
  for (int64_t i0 = i_begin; i0 < i_end; i0 += 32) {
    const int64_t i = i0 + lane;
    next.load(m, b, i + 32, g, i + 32 < i_end);
    if (i < i_end && valid(b, i)) {
      for (int64_t s = 0; s < m.n; ++s) {
        const int64_t c = row.block(s, i / bs, i, C, bs, m.causal);
        if (c >= 0) atomicAdd(&cur[w * C + c], 1);
      }
    }
    row = next;
  }
  __syncthreads();

  for (int64_t c0 = 0; c0 < C; c0 += blockDim.x) {
    const int64_t c = c0 + threadIdx.x;
    int tot = 0;
    if (c < C)
      for (int k = 0; k < kIndexWarps; ++k) tot += cur[k * C + c];
    const int start = block_exclusive_scan(tot, warp_tot, &carry);
    if (c < C) {
      o[c] = start;
      int run = start;
      for (int k = 0; k < kIndexWarps; ++k) {
        const int cnt = cur[k * C + c];
        cur[k * C + c] = run;
        run += cnt;
      }
    }
  }
  if (threadIdx.x == 0) o[C] = carry;
  __syncthreads();

  row.load(m, b, i_begin + lane, g, i_begin + lane < i_end);
  for (int64_t i0 = i_begin; i0 < i_end; i0 += 32) {  // warp-uniform trip count
    const int64_t i = i0 + lane;
    next.load(m, b, i + 32, g, i + 32 < i_end);
    const bool live = i < i_end && valid(b, i);
    for (int64_t s = 0; s < m.n; ++s) {
      const int c = live ? static_cast<int>(row.block(s, i / bs, i, C, bs, m.causal)) : -1;
      const unsigned peers = __match_any_sync(detail::kFullMask, c);
      const int rank = __popc(peers & ((1u << lane) - 1u));
      int base = 0;
      if (c >= 0) {
        base = cur[w * C + c];
        ent[base + rank] = static_cast<int32_t>(i);
      }
      __syncwarp();
      if (c >= 0 && rank == 0) cur[w * C + c] = base + __popc(peers);
      __syncwarp();
    }
    row = next;
  }
}

// BLOSSOM_OPS_CUDA_INDEX_AHEAD=0 (read once; A/B): the index rows read in place (IndexRow<0>)
// instead of in registers one group ahead.
inline bool index_ahead_off() {
  static const bool off = detail::env_equals("BLOSSOM_OPS_CUDA_INDEX_AHEAD", "0");
  return off;
}

struct IndexLayout {
  size_t delta = 0, off = 0, cursor = 0, entries = 0, total = 0;
};

IndexLayout index_layout(const AttnShape& s, const BlockSparseMask& m, bool gated) {
  const size_t BG = static_cast<size_t>(s.batch * s.kv_heads);
  const size_t C = static_cast<size_t>(detail::ceil_div(s.q_len, m.block_size));
  IndexLayout lay;
  lay.delta = 0;  // at the start: blossom_branches_bwd's fused dQ writes it there
  lay.off = lay.delta + detail::attn_delta_bytes(s, gated);
  lay.cursor = lay.off + detail::align_up(BG * (C + 1) * sizeof(int32_t));
  lay.entries = lay.cursor + detail::align_up(BG * kIndexWarps * C * sizeof(int32_t));
  lay.total = lay.entries +
              detail::align_up(BG * static_cast<size_t>(s.q_len * m.n) * sizeof(int32_t));
  return lay;
}


}  // namespace

template <typename T>
void block_sparse_attention_fwd(const AttnFwdParams<T, float>& p, const BlockSparseMask& m,
                                cudaStream_t stream) {
  detail::launch_attn_fwd(p, make_block_sparse_policy(p.shape, m, p.valid), stream,
                          "block_sparse_attention_fwd");
}

size_t block_sparse_attention_bwd_workspace_bytes(const AttnShape& shape,
                                                  const BlockSparseMask& m, bool gated) {
  return index_layout(shape, m, gated).total;
}

template <typename T>
void block_sparse_attention_bwd(const AttnBwdParams<T, float>& p, const BlockSparseMask& m,
                                void* workspace, size_t workspace_bytes, cudaStream_t stream,
                                bool dq_done) {
  const AttnShape& s = p.shape;
  const IndexLayout lay = index_layout(s, m, detail::bwd_gated(p));
  BLOSSOM_CHECK(workspace_bytes >= lay.total, "block_sparse_attention_bwd: workspace too small (",
               workspace_bytes, " < ", lay.total, " bytes)");
  if (s.batch == 0 || s.q_heads == 0 || s.q_len == 0) return;
  char* ws = static_cast<char*>(workspace);
  BlockSparsePolicy pol = make_block_sparse_policy(s, m, p.valid);
  pol.off = reinterpret_cast<int32_t*>(ws + lay.off);
  pol.entries = reinterpret_cast<int32_t*>(ws + lay.entries);
  const size_t cur_bytes = static_cast<size_t>(kIndexWarps) * pol.C * sizeof(int32_t);
  const bool cur_smem = cur_bytes <= kIndexSmemCursorBytes && !index_cursors_global();
  auto kernel = index_ahead_off() || m.n > 8 ? block_index_kernel<0>
                : m.n > 4                       ? block_index_kernel<8>
                                                : block_index_kernel<4>;
  kernel<<<static_cast<unsigned>(s.batch * s.kv_heads), kIndexWarps * 32, cur_smem ? cur_bytes : 0,
           stream>>>(m, p.valid, s.q_len, s.kv_heads, pol.C,
                     reinterpret_cast<int32_t*>(ws + lay.off),
                     reinterpret_cast<int32_t*>(ws + lay.cursor),
                     reinterpret_cast<int32_t*>(ws + lay.entries), cur_smem);
  detail::check_launch("block_sparse_attention_bwd (index)");
  float* delta = reinterpret_cast<float*>(ws + lay.delta);
  if (!dq_done) detail::launch_attn_dq(p, pol, delta, stream, "block_sparse_attention_bwd (dQ)");
  // dK/dV: one CTA per 16-key tile on tensor cores (block_sparse_dkdv.cu); the generic
  // per-key kernel covers the rest (fp32, other block sizes / head dims, unaligned rows,
  // BLOSSOM_OPS_CUDA_SIMPLE=1). A gate rides in the lse the dQ pass left (dkdv_params).
  const AttnBwdParams<T, float> pk = detail::dkdv_params(p, delta);
  if (!detail::launch_block_sparse_dkdv(pk, m, pol.C, pol.off, pol.entries, delta, stream))
    detail::launch_attn_dkdv(pk, pol, delta, stream, "block_sparse_attention_bwd (dK/dV)");
}

#define BLOSSOM_INSTANTIATE(T)                                                             \
  template void block_sparse_attention_fwd<T>(const AttnFwdParams<T, float>&,              \
                                              const BlockSparseMask&, cudaStream_t);       \
  template void block_sparse_attention_bwd<T>(const AttnBwdParams<T, float>&,              \
                                              const BlockSparseMask&, void*, size_t,       \
                                              cudaStream_t, bool);
BLOSSOM_INSTANTIATE(float)
BLOSSOM_INSTANTIATE(c10::Half)
BLOSSOM_INSTANTIATE(c10::BFloat16)
#undef BLOSSOM_INSTANTIATE

}  // namespace gpu
}  // namespace blossom
