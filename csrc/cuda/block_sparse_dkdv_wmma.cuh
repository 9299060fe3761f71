// dK/dV of block_sparse_attention, first tensor-core version (nvcuda::wmma 16x16x16, S / dP /
// P / dS staged through shared memory). Kept for BLOSSOM_OPS_CUDA_BS_DKDV=old (A/B runs) and
// for the cases the mma.sync kernel (block_sparse_dkdv_mma.cuh) declines (32-bit offset
// overflow, L >= 2^30). Measured 1.95 ms at D=64 L=4096 (H100; the prediction below was
// optimistic).
//
// Why a separate kernel: every key of a selection block c has exactly the same query list
// (the own-block queries c*bs .. c*bs+bs-1 plus the bucket of c in the inverse index), so the
// generic per-key kernel re-reads each q / dO row once per key (16 times per block). Here one
// CTA owns one 16-key tile of one block and streams the list once.
//
// Work decomposition
//   * CTA = (b, kv head g, block c, 16-key tile kt of the block; bs / 16 tiles per block),
//     grid order kt, c fastest so that CTAs running together gather rows of the same (b, g)
//     (L2 reuse). K and V of the tile live in shared memory (keys past L or padded: zeros).
//   * The list is flattened into rows (query slot, head): row n = slot * G + hh, slot < bs is
//     the own-block query c*bs + slot, slot >= bs the bucket entry slot - bs. Chunks of 16 rows
//     go round-robin to the 4 warps (chunk t to warp t % 4). Per chunk a warp gathers the 16
//     q and dO rows (16-byte loads) into its shared tiles, then on tensor cores (wmma
//     16x16x16, bf16/fp16 in, fp32 accumulate):
//        S  = Q K^T, dP = dO V^T                       (16 rows x 16 keys, D/16 steps each)
//        P  = exp2(S * scale * log2e - lse * log2e)    masked (causal, validity, lse = -inf)
//        dS = P * (dP - delta)                         elementwise via shared memory
//        dV += P^T dO, dK += dS^T Q                    (16 keys x D, fp32 fragments)
//     P and dS are rounded to the input type for the second pair of products, as FA2 does.
//   * End: the 4 warps' partial dK/dV are summed through shared memory in warp order
//     0, 1, 2, 3 (fixed, no atomics: bit-reproducible), dK scaled, and every key < L of the
//     tile written (padded keys and keys nobody attends: zeros).
//   Lists of any length go through the same loop; a popular block just makes a long CTA.
//
// Count for B=64, L=4096, Hq=8, Hk=2 (G=4), D=64, bs=16, top_n=4, bf16, causal:
//   CTAs B*Hk*C = 64*2*256 = 32,768. Rows (query, head) over all lists <= B*Hq*L*(1+n)
//   = 10.5 M (the own block plus at most n selected blocks per query) = 655 k chunks of 16.
//   FLOPs: 4 products x 2*D per (row, key) = 512 x 10.5 M x 16 keys = 85.9 GFLOP on tensor
//   cores (0.09 ms at 990 TFLOP/s; wmma from shared memory reaches maybe a third of it).
//   Compulsory HBM bytes: q + dO 2*268 MB, k + v 134 MB, dk + dv 134 MB, lse + delta 17 MB,
//   index 8 MB = 0.83 GB -> 0.17 ms at 4.8 TB/s. Gathered (mostly L2) traffic: q/dO rows are
//   read (1+n) times = 2.7 GB. Shared memory per chunk ~14 KB (tiles written once, read
//   twice as A and B operands, K/V fragments, S/dP/P/dS) -> ~110 clk/chunk/SM at 128 B/clk,
//   4,964 chunks per SM -> 0.3 ms.
//   Predicted: 0.5-0.8 ms on an H200 (gather latency, hidden by ~5 CTAs per SM, is the
//   main uncertainty), against 17.7 ms for the per-key kernel; ~4x that at L=16384.
#pragma once
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "cuda/attn_kernels.cuh"
#include "cuda/launch_cache.h"

namespace blossom {
namespace gpu {
namespace detail {
namespace bs_wmma {

using namespace nvcuda;

constexpr int kTile = 16;        // keys per CTA and rows per chunk (the wmma edge)
constexpr int kDkdvWarps = 4;    // warps per CTA

constexpr int align128(int x) { return (x + 127) & ~127; }

// Shared-memory layout (bytes). 16-bit tiles have rows of D + 8 elements: the padding spreads
// rows over banks and keeps every 16-column fragment start 32-byte aligned (wmma's rule).
template <int D>
struct DkdvLayout {
  static constexpr int LD = D + 8;                  // elements per tile row (16-bit)
  static constexpr int LDR = D + 4;                 // floats per reduction row
  static constexpr int tile = kTile * LD * 2;       // one 16 x D tile of 16-bit elements
  static constexpr int k = 0, v = tile, kvalid = 2 * tile;
  static constexpr int warps = align128(kvalid + kTile * 4);
  // per warp, from its base
  static constexpr int q = 0, o = tile, s = 2 * tile, dp = s + kTile * kTile * 4;
  static constexpr int pm = dp + kTile * kTile * 4, ds = pm + kTile * kTile * 2;
  static constexpr int row_i = ds + kTile * kTile * 2, row_lse = row_i + kTile * 4;
  static constexpr int row_dlt = row_lse + kTile * 4;
  static constexpr int per_warp = align128(row_dlt + kTile * 4);
  static constexpr int total = warps + kDkdvWarps * per_warp;
  // the final dK/dV reduction reuses the warps' region (float 16 x LDR each)
  static constexpr int red_k = warps, red_v = warps + kTile * LDR * 4;
  static_assert(2 * kTile * LDR * 4 <= kDkdvWarps * per_warp, "reduction buffer overflows");
  static_assert(tile % 128 == 0, "tiles must keep 32-byte alignment");
};

// Resident CTAs per SM the register budget must allow (the fp32 dK/dV fragments alone take
// D registers per thread): 4 up to D = 32, 3 at D = 64 (4 would cap at 128 registers and
// spill), 2 at D = 128.
template <int D>
constexpr int dkdv_min_ctas() { return D <= 32 ? 4 : (D == 64 ? 3 : 2); }

template <typename T, int D>
__global__ void __launch_bounds__(kDkdvWarps * 32, dkdv_min_ctas<D>())
    bs_dkdv_kernel(const AttnBwdParams<T, float> p, const BlockSparseMask m, const int64_t C,
                   const int32_t* __restrict__ off, const int32_t* __restrict__ entries,
                   const float* __restrict__ delta) {
  using E = typename TcElem<T>::type;
  using Lay = DkdvLayout<D>;
  constexpr int LD = Lay::LD, LDR = Lay::LDR, NF = D / 16, PIECES = D / kFrag;
  constexpr int PER_LANE = kTile * PIECES / 32;  // 16-byte pieces per lane per tile (>= 1)
  extern __shared__ __align__(128) unsigned char smem[];
  E* Ks = reinterpret_cast<E*>(smem + Lay::k);
  E* Vs = reinterpret_cast<E*>(smem + Lay::v);
  int* kvalid = reinterpret_cast<int*>(smem + Lay::kvalid);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  unsigned char* wbase = smem + Lay::warps + warp * Lay::per_warp;
  E* Qs = reinterpret_cast<E*>(wbase + Lay::q);
  E* Os = reinterpret_cast<E*>(wbase + Lay::o);
  float* Sb = reinterpret_cast<float*>(wbase + Lay::s);
  float* dPb = reinterpret_cast<float*>(wbase + Lay::dp);
  E* Pb = reinterpret_cast<E*>(wbase + Lay::pm);
  E* dSb = reinterpret_cast<E*>(wbase + Lay::ds);
  int* row_i = reinterpret_cast<int*>(wbase + Lay::row_i);
  float* row_lse = reinterpret_cast<float*>(wbase + Lay::row_lse);
  float* row_dlt = reinterpret_cast<float*>(wbase + Lay::row_dlt);

  const AttnShape& s = p.shape;
  const int64_t L = s.q_len, Hq = s.q_heads, Hk = s.kv_heads;
  const int G = static_cast<int>(Hq / Hk);
  const int bs = static_cast<int>(m.block_size);
  const int tpb = bs / kTile;
  int64_t u = blockIdx.x;
  const int kt = static_cast<int>(u % tpb);
  u /= tpb;
  const int64_t c = u % C;
  u /= C;
  const int64_t g = u % Hk, b = u / Hk;
  const int64_t bg = b * Hk + g;
  const int64_t j0 = c * bs + kt * kTile;

  // K and V of the tile; keys past L or padded read as zeros (never touched in memory).
  for (int x = threadIdx.x; x < kTile * PIECES; x += blockDim.x) {
    const int kk = x / PIECES, pc = x % PIECES;
    const int64_t j = j0 + kk;
    uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
    if (j < L && p.valid(b, j)) {
      kv = __ldg(reinterpret_cast<const uint4*>(p.k.at(b, j, g) + pc * kFrag));
      vv = __ldg(reinterpret_cast<const uint4*>(p.v.at(b, j, g) + pc * kFrag));
    }
    *reinterpret_cast<uint4*>(Ks + kk * LD + pc * kFrag) = kv;
    *reinterpret_cast<uint4*>(Vs + kk * LD + pc * kFrag) = vv;
  }
  bool my_key = false;
  if (threadIdx.x < kTile) {
    const int64_t j = j0 + threadIdx.x;
    my_key = j < L && p.valid(b, j);
    kvalid[threadIdx.x] = my_key ? 1 : 0;
  }
  const bool any_key = __syncthreads_or(my_key);  // also publishes K, V, kvalid

  const int32_t* ob = off + bg * (C + 1) + c;
  const int bucket = ob[1] - ob[0];
  const int32_t* list = entries + bg * L * m.n + ob[0];
  const int n_rows = any_key ? (bs + bucket) * G : 0;
  const int n_chunks = (n_rows + kTile - 1) / kTile;

  // Query of row (t * 16 + lane) for lanes < 16, or -1 (past the list, or an own-block
  // query past L). Validity and lse are checked later.
  auto row_query = [&](int t) -> int64_t {
    const int n = t * kTile + lane;
    if (lane >= kTile || n >= n_rows) return -1;
    const int slot = n / G;
    if (slot < bs) {
      const int64_t i = c * bs + slot;
      return i < L ? i : -1;
    }
    return list[slot - bs];
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dk[NF], dv[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) {
    wmma::fill_fragment(dk[f], 0.f);
    wmma::fill_fragment(dv[f], 0.f);
  }
  const float sl2 = static_cast<float>(s.scale) * kLog2e;

  int64_t next_i = row_query(warp);  // prefetched one chunk ahead
  for (int t = warp; t < n_chunks; t += kDkdvWarps) {
    // 1. Row meta: query index (masked by validity) for the gather.
    int64_t i = next_i;
    int h = 0;
    if (lane < kTile) {
      const int n = t * kTile + lane;
      h = static_cast<int>(g) * G + (n % G);
      if (i >= 0 && !p.valid(b, i)) i = -1;
      row_i[lane] = static_cast<int>(i);
    }
    __syncwarp();
    // 2. Gather q and dO rows (zeros for masked rows), lse and delta, next chunk's indices.
    uint4 qr[PER_LANE], orr[PER_LANE];
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) {
      const int x = lane + 32 * e, r = x / PIECES, pc = x % PIECES;
      const int ri = row_i[r];
      const int hr = static_cast<int>(g) * G + ((t * kTile + r) % G);
      qr[e] = orr[e] = make_uint4(0, 0, 0, 0);
      if (ri >= 0) {
        qr[e] = __ldg(reinterpret_cast<const uint4*>(p.q.at(b, ri, hr) + pc * kFrag));
        orr[e] = __ldg(reinterpret_cast<const uint4*>(p.grad_out.at(b, ri, hr) + pc * kFrag));
      }
    }
    float lse = -INFINITY, dlt = 0.f;
    if (lane < kTile && i >= 0) {
      const int64_t row = (b * L + i) * Hq + h;
      lse = p.lse[row];
      dlt = delta[row];
    }
    next_i = row_query(t + kDkdvWarps);
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) {
      const int x = lane + 32 * e, r = x / PIECES, pc = x % PIECES;
      *reinterpret_cast<uint4*>(Qs + r * LD + pc * kFrag) = qr[e];
      *reinterpret_cast<uint4*>(Os + r * LD + pc * kFrag) = orr[e];
    }
    __syncwarp();  // every lane has read row_i before it is rewritten
    if (lane < kTile) {
      // A row with no allowed key (lse = -inf) contributes nothing, as in the generic kernel.
      row_i[lane] = (i >= 0 && lse != -INFINITY) ? static_cast<int>(i) : -1;
      row_lse[lane] = lse * kLog2e;
      row_dlt[lane] = dlt;
    }
    __syncwarp();

    // 3. S = Q K^T and dP = dO V^T.
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> sacc, pacc;
    wmma::fill_fragment(sacc, 0.f);
    wmma::fill_fragment(pacc, 0.f);
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> qa, oa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> kb, vb;
      wmma::load_matrix_sync(qa, Qs + f * 16, LD);
      wmma::load_matrix_sync(kb, Ks + f * 16, LD);  // B[d][k] = K[k][d]
      wmma::mma_sync(sacc, qa, kb, sacc);
      wmma::load_matrix_sync(oa, Os + f * 16, LD);
      wmma::load_matrix_sync(vb, Vs + f * 16, LD);
      wmma::mma_sync(pacc, oa, vb, pacc);
    }
    wmma::store_matrix_sync(Sb, sacc, kTile, wmma::mem_row_major);
    wmma::store_matrix_sync(dPb, pacc, kTile, wmma::mem_row_major);
    __syncwarp();

    // 4. P and dS, lane = (row lane / 2, keys 8 * (lane % 2) .. + 8).
    {
      const int r = lane >> 1, k0 = (lane & 1) * 8;
      const int ri = row_i[r];
      const float l2 = row_lse[r], dl = row_dlt[r];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int kk = k0 + e;
        const bool ok = ri >= 0 && kvalid[kk] != 0 && (!m.causal || j0 + kk <= ri);
        const float pr = ok ? exp2f(fmaf(Sb[r * kTile + kk], sl2, -l2)) : 0.f;
        const float dsv = ok ? pr * (dPb[r * kTile + kk] - dl) : 0.f;
        Pb[r * kTile + kk] = TcElem<T>::from(pr);
        dSb[r * kTile + kk] = TcElem<T>::from(dsv);
      }
    }
    __syncwarp();

    // 5. dV += P^T dO, dK += dS^T Q (P stored [row][key] is P^T in column-major).
    wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::col_major> pa, dsa;
    wmma::load_matrix_sync(pa, Pb, kTile);
    wmma::load_matrix_sync(dsa, dSb, kTile);
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> ob2, qb;
      wmma::load_matrix_sync(ob2, Os + f * 16, LD);
      wmma::mma_sync(dv[f], pa, ob2, dv[f]);
      wmma::load_matrix_sync(qb, Qs + f * 16, LD);
      wmma::mma_sync(dk[f], dsa, qb, dk[f]);
    }
    __syncwarp();  // the next chunk overwrites this warp's tiles
  }

  // 6. Sum the warps' partials in warp order (deterministic) in the reused warp region.
  __syncthreads();
  float* rk = reinterpret_cast<float*>(smem + Lay::red_k);
  float* rv = reinterpret_cast<float*>(smem + Lay::red_v);
  for (int w = 0; w < kDkdvWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int f = 0; f < NF; ++f) {
        if (w > 0) {
          wmma::fragment<wmma::accumulator, 16, 16, 16, float> tk, tv;
          wmma::load_matrix_sync(tk, rk + f * 16, LDR, wmma::mem_row_major);
          wmma::load_matrix_sync(tv, rv + f * 16, LDR, wmma::mem_row_major);
#pragma unroll
          for (int e = 0; e < tk.num_elements; ++e) {
            dk[f].x[e] = tk.x[e] + dk[f].x[e];
            dv[f].x[e] = tv.x[e] + dv[f].x[e];
          }
          __syncwarp();
        }
        wmma::store_matrix_sync(rk + f * 16, dk[f], LDR, wmma::mem_row_major);
        wmma::store_matrix_sync(rv + f * 16, dv[f], LDR, wmma::mem_row_major);
      }
    }
    __syncthreads();
  }

  // 7. Write every key < L of the tile (zeros for padded keys).
  const float sc = static_cast<float>(s.scale);
  for (int x = threadIdx.x; x < kTile * PIECES; x += blockDim.x) {
    const int kk = x / PIECES, pc = x % PIECES;
    const int64_t j = j0 + kk;
    if (j >= L) continue;
    float fk[kFrag], fv[kFrag];
    const bool ok = kvalid[kk] != 0;
#pragma unroll
    for (int e = 0; e < kFrag; ++e) {
      fk[e] = ok ? rk[kk * LDR + pc * kFrag + e] * sc : 0.f;
      fv[e] = ok ? rv[kk * LDR + pc * kFrag + e] : 0.f;
    }
    store8_acc(p.grad_k.at(b, j, g) + pc * kFrag, fk, p.accumulate);
    store8_acc(p.grad_v.at(b, j, g) + pc * kFrag, fv, p.accumulate);
  }
}

template <typename T, int D>
void launch_bs_dkdv_wmma_d(const AttnBwdParams<T, float>& p, const BlockSparseMask& m,
                           int64_t C, const int32_t* off, const int32_t* entries,
                           const float* delta, cudaStream_t stream) {
  const AttnShape& s = p.shape;
  const int64_t ctas = s.batch * s.kv_heads * C * (m.block_size / kTile);
  BLOSSOM_CHECK(ctas < (int64_t(1) << 31), "block_sparse_attention_bwd: problem too large");
  constexpr int smem = DkdvLayout<D>::total;
  auto kernel = bs_dkdv_kernel<T, D>;
  opt_in_smem(kernel, smem);  // once per kernel and device (cuda/launch_cache.h)
  kernel<<<static_cast<unsigned>(ctas), kDkdvWarps * 32, smem, stream>>>(p, m, C, off, entries,
                                                                           delta);
  check_launch("block_sparse_attention_bwd (dK/dV tiles)");
}

template <typename T>
bool launch_bs_dkdv_wmma(const AttnBwdParams<T, float>& p, const BlockSparseMask& m,
                         int64_t C, const int32_t* off, const int32_t* entries,
                         const float* delta, cudaStream_t stream) {
  const AttnShape& s = p.shape;
  if (m.block_size < kTile || m.block_size % kTile != 0 || s.kv_len != s.q_len ||
      !attn_bwd_vec_ok(p))
    return false;
  if (s.batch == 0 || s.kv_heads == 0 || s.q_len == 0) return true;  // nothing to write
  switch (s.head_dim) {
    case 16: launch_bs_dkdv_wmma_d<T, 16>(p, m, C, off, entries, delta, stream); return true;
    case 32: launch_bs_dkdv_wmma_d<T, 32>(p, m, C, off, entries, delta, stream); return true;
    case 64: launch_bs_dkdv_wmma_d<T, 64>(p, m, C, off, entries, delta, stream); return true;
    case 128: launch_bs_dkdv_wmma_d<T, 128>(p, m, C, off, entries, delta, stream); return true;
    default: return false;
  }
}

}  // namespace bs_wmma
}  // namespace detail
}  // namespace gpu
}  // namespace blossom
