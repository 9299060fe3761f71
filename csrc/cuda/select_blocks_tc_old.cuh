// PREVIOUS VERSION of the tensor-core selection, kept unchanged for A/B runs
// (BLOSSOM_OPS_CUDA_SELECT=old; entry select_blocks_tc_old_fwd) and as the path for the calls
// the current kernel (select_blocks_tc.cuh) declines (scale <= 0 or not finite).
// select_blocks on tensor cores, scores kept in registers: the LTIS scores of a tile of
// queries against the compressed keys as mma.sync m16n8k16 (16-bit inputs, fp32
// accumulation), softmax statistics, per-block importance and top-n fused in one CTA.
// Nothing of size [B, L, H, T] and no importance array of size [L, C] ever exists, and the
// score tile never goes through shared memory: each thread works on the accumulator
// fragments it holds and keeps its own top-n list.
//
// Work decomposition
//   One CTA (4 warps) per (b, kv head g, tile of QT = 64 / G consecutive queries); warp w
//   owns the QW = 16 / G queries w * QW .. w * QW + QW - 1 of the tile, i.e. 16 score rows
//   (one m16 tile). Compressed tokens stream through shared memory in chunks of 64 tokens
//   (double-buffered cp.async, ONE __syncthreads per chunk; rows of unscored tokens are
//   zero-filled, their k_cmp may hold NaN). Each warp multiplies its Q fragments (registers
//   for the whole CTA, loaded once with ldmatrix) by the chunk (ldmatrix.x4 B fragments:
//   K is stored [token][d], which is the col-major B operand, no .trans) into 8 n8 tiles =
//   32 fp32 accumulators per thread.
//   Row order inside a warp (m16n8k16 accumulators: lane holds rows lane/4 and lane/4 + 8,
//   columns 8 nt + 2 (lane % 4) + {0, 1}): for G >= 2, row r = hb * 8 + hl * QW + qi with
//   head = hb * G/2 + hl, so a thread's two rows are two heads of the SAME query qi; the
//   other heads of qi sit in the lanes lane ^ (4 QW 2^k), k < log2(G/2) (none for G = 2,
//   xor 16 for G = 4, xor 8, 16 for G = 8, xor 4, 8, 16 for G = 16). For G = 1 the two rows
//   are two queries (lane/4 and lane/4 + 8): such a thread has two "slots" (lists).
//   pass 1: per row online base-2 max and sum over the thread's 16 columns of each chunk,
//           merged over the 4 lanes of a quad (xor 1, 2) once at the end -> lse2.
//   pass 2: p = exp2(s - lse2) (lse2 = +inf for a row with nothing scored: p = 0), summed
//           over the G heads (in-thread pair + butterfly), then per block of tpb columns
//           (tpb = block_size / stride, a power of two <= 64, 64 % tpb == 0 so a block never
//           straddles chunks): tpb 1 -> a column, 2 -> the thread's column pair, 4 -> pair +
//           xor 1, >= 8 -> n-tiles summed in registers + xor 1, 2. Each block is offered by
//           exactly one lane of the query's lanes (the duplicates of the head butterfly split
//           the blocks by index modulo G/2) to that lane's own best-first list (registers) of
//           packed 64-bit keys (importance bits + 1, ~block): an offer costs one 64-bit
//           compare against the lane's top_n-th key and is inserted (4 or 8 branch-free
//           compare-exchanges) only when it beats it.
//   Instruction diet (the kernel is bound by issued SIMT instructions, not by tensor cores,
//   MUFU or memory; Nsight: IPC 2.1, ALU pipe busiest): chunk loader with hoisted (b, g)
//   bases and a shift for t / tpb (it had a 64-bit address and an integer division per
//   16-byte row), a fast path for chunks scored in full (no per-accumulator mask select),
//   per-lane n-tile picks by selects instead of a branch per n-tile, and the key lists
//   above (the old float/int lists copied the whole list on every offer and branched per
//   entry). Static SASS of the D = 64, G = 4 instantiation: 12,672 -> 7,496 instructions.
//   Masks: the loader publishes a 64-bit scored-token mask per chunk (two ballots); a thread
//   removes its query's excluded range (own block, and after it when causal) with a few
//   64-bit ops per chunk and tests constant bit positions per accumulator. Block candidacy
//   is c < climit, c != cex (precomputed per slot) and blockvalid[c] (read only when a
//   validity mask was given).
//   Finally top_n rounds of arg-max over the list heads of the query's lanes (importance
//   desc, block asc), ascending output by rank, -1 padding. Every sum has a fixed order:
//   deterministic. Causal: the CTA reads only tokens before its last query's own block, and
//   a warp skips the chunks that lie wholly at or after its own last query's block.
//   Scored tokens, candidates and padding follow select_blocks.cu / cpu/select_blocks.cpp:
//   token t is scored for query i when t < T, valid_cmp(b, t), its block c = t / tpb holds a
//   valid key, c != own(i), and c < own(i) when causal; a padded query selects nothing.
//
// Counts, B = 64, Hq = 8, Hk = 2 (G = 4), D = 64, bf16, block_size = stride = 16 (tpb = 1),
// causal. Tiles of 16 queries; the tile ending in block o reads o tokens, padded to whole
// 64-token chunks; 64 score rows per CTA.
//   L = 4096 (T = 256): 32,768 CTAs; 40,704 columns per (b, g) summed over its 256 tiles
//     -> 128 x 40,704 x 64 rows = 0.33 G scores per pass (warps skip some: upper bound).
//     Tensor: 2 passes x 0.33 G x 2 x 64 = 85 GFLOP (0.09 ms at ~990 TFLOP/s).
//     exp2: ~1 per score per pass (+ 1 per row and chunk) = 0.67 G; MUFU 16/clk/SM x 132 SMs
//     x 1.98 GHz = 4.2 T/s -> 0.16 ms.
//     Shared memory: per chunk and pass every warp ldmatrix-reads the whole K chunk
//     (64 x 64 x 2 B = 8 KB) for its 16 x 64 = 1,024 scores: 8 B per score (the old kernel
//     moved ~15), + 8 KB of cp.async stores per CTA: 0.67 G x 8.5 B / (128 B/clk/SM x 132 x
//     1.98 G) = 0.17 ms. No S round trip, no __syncthreads besides one per chunk.
//     HBM: q 268 MB read once (0.06 ms), k_cmp 4.2 MB, out 4.2 MB; k_cmp re-read from L2 by
//     every tile: 2 x 128 x 40,704 x 128 B = 1.3 GB (~0.2 ms at ~7 TB/s L2).
//     Predicted ~0.35-0.5 ms (MUFU and LSU run concurrently; plus q load and list merges).
//   L = 16384 (T = 1024): 131,072 CTAs, 556,032 columns per (b, g): 4.55 G scores per pass,
//     9.1 G both; tensor 1.17 TFLOP (1.2 ms at peak, overlapped), exp2 9.1 G / 4.2 T/s =
//     2.2 ms, shared memory 9.1 G x 8.5 B / 33 TB/s = 2.3 ms (concurrent with MUFU),
//     L2 2 x 128 x 556,032 x 128 B = 18 GB (~2.5 ms, concurrent). Predicted ~3-4.5 ms
//     (32.3 ms measured for the previous wmma kernel on an H200).
//   Resources: 2 x 64 x (DP + 8) x 2 B of K buffers (18 KB at D = 64) + C bytes of block
//   validity; registers reported by scripts/nvcc_check.sh (PTXAS_VERBOSE=1): 124 at D = 64
//   G = 4 (4 CTAs = 16 warps per SM; capped at 128 by select_mma_kernel_r128 for
//   DP <= 32 and DP = 64 with G in 2..8), 154 at D = 64 G = 1 (3 CTAs / SM), no spills.
//   Coverage: 16-bit inputs, D % 8 == 0 and <= 128, G in {1, 2, 4, 8, 16}, top_n <= 8 and
//   tpb a power of two <= 64 (the old wmma kernel also took other tpb <= 64; those now run
//   the generic kernel of select_blocks.cu).
//   The fragment / lane index math is replayed on the host by scripts/emulate_select_mma.py.
// Included by select_blocks_tc_old_half.cu (float, half) and select_blocks_tc_old_bf16.cu
// (bfloat16): the kernel instantiations per 16-bit type take minutes of nvcc time, so the
// two types compile as two translation units, in parallel.
#pragma once
#include <cstdlib>
#include <limits>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/cp_async.cuh"
#include "cuda/launch_cache.h"
#include "cuda/mma_frag.cuh"
#include "cuda/select_blocks_tc.h"

namespace blossom {
namespace gpu {
namespace {

using namespace detail;

constexpr int kThreads = 128;  // 4 warps
constexpr int kRows = 64;      // (query, head) score rows per CTA, 16 per warp
constexpr int kCols = 64;      // token columns per chunk = 8 n8 tiles
constexpr int kNt = kCols / 8;
constexpr int kMaxTop = 8;     // top_n capacity of the per-thread lists

// Shared memory layout (byte offsets). The Q tile is staged in K buffer 0 before the first
// chunk is loaded (64 rows x kLdK, exactly one buffer).
template <int DP>
struct TcLayout {
  static constexpr int kLdK = DP + 8;  // 16-bit elements per staged row: 16 B aligned rows,
                                       // and the 8 rows of an ldmatrix hit distinct banks
  static constexpr int kK = 0;                              // [2][kCols][kLdK]
  static constexpr int kMask = kK + 2 * kCols * kLdK * 2;   // [2] uint64 scored-token bits
  static constexpr int kBlockValid = kMask + 16;            // [C] byte
  static int64_t bytes(int64_t C) { return kBlockValid + ((C + 15) / 16) * 16; }
};

// A list entry packs (importance, block) into one unsigned 64-bit key whose integer order
// is the selection order: high word = importance bits + 1 (an importance is a sum of exp2
// results, so it is >= +0 and its bits order like an unsigned int; NaN, or anything that is
// not in [+0, +inf], gets 0, i.e. ranks like the old -inf), low word = ~block (ties go to the
// lower block). 0 is an empty slot; every candidate key is > 0 (~block >= 2^31 - 2^30).
// One 64-bit compare replaces the old (importance, block, empty) test chain.
using Key = unsigned long long;
__device__ __forceinline__ Key make_key(float imp, int c) {
  const unsigned u = __float_as_uint(imp + 0.f);  // -0 -> +0 (x + 0 is not folded)
  const unsigned hi = u <= 0x7f800000u ? u + 1u : 0u;
  return (static_cast<Key>(hi) << 32) | static_cast<Key>(~static_cast<unsigned>(c));
}
__device__ __forceinline__ int key_block(Key k) {  // -1 for an empty slot
  return k == 0 ? -1 : static_cast<int>(~static_cast<unsigned>(k));
}

// One compare-exchange step of an insertion: (hi, lo) = (max, min) of (key, cur) from a
// single 64-bit compare (written in PTX: left to itself the compiler computes max and min
// with two compares).
__device__ __forceinline__ void key_cx(Key& cur, Key& key) {
  asm("{\n\t.reg .pred p;\n\t.reg .b64 t;\n\t"
      "setp.gt.u64 p, %1, %0;\n\t"
      "selp.b64 t, %0, %1, p;\n\t"   // min
      "selp.b64 %0, %1, %0, p;\n\t"  // cur <- max
      "mov.b64 %1, t;\n\t"           // key <- min
      "}"
      : "+l"(cur), "+l"(key));
}

// Inserts key into the first N entries of a best-first list (constant indices: the list
// stays in registers), no branches. N = 4 serves every top_n <= 4: a lane only has to keep
// its own top_n, so entries top_n.. are never read (they stay 0 when N = 4).
template <int N>
__device__ __forceinline__ void key_insert(Key (&lk)[kMaxTop], Key key) {
#pragma unroll
  for (int k = 0; k < N; ++k) key_cx(lk[k], key);
}

// lk[idx] for idx < N (the worst key this lane must keep) by a constant-index select chain.
template <int N>
__device__ __forceinline__ Key key_at(const Key (&lk)[kMaxTop], int idx) {
  Key r = lk[0];
#pragma unroll
  for (int k = 1; k < N; ++k) r = idx == k ? lk[k] : r;
  return r;
}

// Row r (0..15) of a warp's m16 tile -> (query within the warp, head within the group).
template <int G>
__device__ __forceinline__ void row_map(int r, int& qw, int& hh) {
  if constexpr (G == 1) {
    qw = r;
    hh = 0;
  } else {
    constexpr int QW = 16 / G, G2 = G / 2;
    const int hl = (r & 7) / QW;
    qw = (r & 7) % QW;
    hh = (r >> 3) * G2 + hl;
  }
}

// The kernel body; select_mma_kernel / select_mma_kernel_r128 below only differ in their
// launch bounds.
template <typename T, int DP, int G>
__device__ __forceinline__ void select_mma_body(const SelectParams<T>& p, const int64_t C) {
  using E = typename TcElem<T>::type;
  using Lay = TcLayout<DP>;
  constexpr int QW = 16 / G;          // queries per warp
  constexpr int QT = 4 * QW;          // queries per CTA
  constexpr int LDK = Lay::kLdK;
  constexpr int DK = DP / 16;         // k16 steps
  constexpr int NS = G == 1 ? 2 : 1;  // query slots per thread
  constexpr int G2 = G == 1 ? 1 : G / 2;  // lanes holding the same sums after the butterfly
  static_assert(G == 1 || G == 2 || G == 4 || G == 8 || G == 16, "G");

  extern __shared__ __align__(128) unsigned char smem[];
  E* kbuf = reinterpret_cast<E*>(smem + Lay::kK);
  unsigned long long* tokmask = reinterpret_cast<unsigned long long*>(smem + Lay::kMask);
  unsigned char* blockvalid = smem + Lay::kBlockValid;

  const AttnShape& s = p.shape;
  const int64_t L = s.q_len, Tn = s.kv_len, Hk = s.kv_heads;
  const int D = static_cast<int>(s.head_dim);
  const int64_t tiles = (L + QT - 1) / QT;
  const int64_t tile = blockIdx.x % tiles, bg = blockIdx.x / tiles;
  const int64_t b = bg / Hk, g = bg % Hk;
  const int64_t i0 = tile * QT;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t bs = p.block_size;
  const int tpb = static_cast<int>(p.block_size / p.stride);
  const int top_n = static_cast<int>(p.top_n);
  const bool causal = p.causal;

  // Token range of the tile and the blocks whose validity it needs.
  // Token / block indices fit in int (the launcher checks T, C <= 2^30).
  const int own_last = static_cast<int>((std::min(L, i0 + QT) - 1) / bs);
  const int c_hi = causal ? own_last : static_cast<int>(C);
  const int t_end = static_cast<int>(causal ? std::min<int64_t>(Tn, int64_t(own_last) * tpb) : Tn);
  const int nch = (t_end + kCols - 1) / kCols;
  // This warp's chunks: causal, every column at or after its last query's own block is
  // excluded for all of its queries.
  const int own_last_w = static_cast<int>((std::min(L, i0 + (warp + 1) * QW) - 1) / bs);
  const int t_end_w = causal ? std::min(t_end, own_last_w * tpb) : t_end;

  // blockvalid[c]: block c holds a valid key (coalesced byte reads; equal-value writes).
  for (int c = tid; c < c_hi; c += kThreads) blockvalid[c] = p.valid.ptr == nullptr;
  __syncthreads();
  if (p.valid.ptr != nullptr) {
    const int64_t j_end = std::min(L, c_hi * bs);
    for (int64_t j = tid; j < j_end; j += kThreads)
      if (p.valid(b, j)) blockvalid[j / bs] = 1;
  }

  // Q tile -> K buffer 0, in the warps' row order (zeros for padded / out-of-range queries
  // and columns >= D), then into registers as A fragments for the whole CTA.
  for (int idx = tid; idx < kRows * (DP / 8); idx += kThreads) {
    const int R = idx / (DP / 8), d8 = (idx % (DP / 8)) * 8;
    int qw, hh;
    row_map<G>(R & 15, qw, hh);
    const int64_t i = i0 + (R >> 4) * QW + qw;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (d8 < D && i < L && p.valid(b, i))
      v = __ldg(reinterpret_cast<const uint4*>(p.q.at(b, i, g * G + hh) + d8));
    *reinterpret_cast<uint4*>(kbuf + R * LDK + d8) = v;
  }
  __syncthreads();  // also publishes blockvalid
  uint32_t qa[DK][4];
  {
    // matrix j of the x4: rows 8 (j % 2) .. +8 of the warp's tile, columns 8 (j / 2) .. +8
    // of the k16 step -> registers a0a1, a2a3, a4a5, a6a7 of the m16n8k16 A fragment.
    const int mi = lane >> 3, rr = lane & 7;
    const E* base = kbuf + (warp * 16 + (mi & 1) * 8 + rr) * LDK + (mi >> 1) * 8;
#pragma unroll
    for (int kk = 0; kk < DK; ++kk) ldmatrix_x4(qa[kk], base + kk * 16);
  }

  // Chunk loader: rows of unscored tokens are zero (their k_cmp may hold NaN); the chunk's
  // scored-token bits go to tokmask[buf] (warps 0 and 1, one ballot each).
  // Per-element costs matter here (every thread runs this 4x per chunk at D = 64): the
  // (b, g) bases are hoisted, t / tpb is a shift (tpb is a power of two), and the 64-bit
  // address is one multiply-add per row.
  const int tpb_sh = __ffs(tpb) - 1;
  const E* kg = reinterpret_cast<const E*>(p.k_cmp.at(b, 0, g));
  const int64_t k_sl = p.k_cmp.stride_l;
  const bool* vc = p.valid_cmp.ptr == nullptr ? nullptr : p.valid_cmp.ptr + b * p.valid_cmp.stride_b;
  auto tok_ok = [&](int t) {
    return t < t_end && (vc == nullptr || vc[t]) && blockvalid[t >> tpb_sh];
  };
  // Thread tid stages 16 bytes (columns d8 .. d8 + 7) of rows j0, j0 + RPI, ... of a chunk.
  constexpr int RPI = kThreads / (DP / 8);  // rows per pass of the CTA
  const int j0 = tid / (DP / 8), d8 = (tid % (DP / 8)) * 8;
  const int64_t k_step = int64_t(RPI) * k_sl;
  auto load_chunk = [&](int ch, int buf) {
    const int n0 = ch * kCols;
    E* kb = kbuf + (buf * kCols + j0) * LDK + d8;
    const E* src = kg + int64_t(n0 + j0) * k_sl + d8;
#pragma unroll
    for (int it = 0; it < kCols / RPI; ++it) {
      if (d8 < D && tok_ok(n0 + j0 + it * RPI)) detail::cp_async16<false>(kb + it * RPI * LDK, src);
      else *reinterpret_cast<uint4*>(kb + it * RPI * LDK) = make_uint4(0, 0, 0, 0);
      src += k_step;
    }
    detail::cp_async_commit();
    if (warp < 2) {
      const unsigned bits = __ballot_sync(kFullMask, tok_ok(n0 + warp * 32 + lane));
      if (lane == 0) reinterpret_cast<unsigned*>(tokmask + buf)[warp] = bits;
    }
  };

  // This thread's queries (slots): G >= 2 one query (both rows), G = 1 rows lane/4 and +8.
  const int q4 = lane & 3;
  const int hl = G == 1 ? 0 : (lane >> 2) / QW;  // which duplicate of the head butterfly
  // Per slot: excluded tokens [ex0, ex1) (the own block, and everything after it when
  // causal), and candidate blocks c < climit, c != cex (climit = 0 for a padded query; every
  // block c with c * tpb < t_end lies below c_hi, where blockvalid is filled).
  int ex0[NS], ex1[NS], climit[NS], cex[NS];
  const int c_tok = (t_end + tpb - 1) / tpb;  // blocks with a token below t_end
#pragma unroll
  for (int sl = 0; sl < NS; ++sl) {
    int qw, hh;
    row_map<G>((lane >> 2) + 8 * sl, qw, hh);
    const int64_t i = i0 + warp * QW + qw;
    const bool qok = i < L && p.valid(b, i);
    const int own = static_cast<int>((i < L ? i : L - 1) / bs);
    ex0[sl] = own * tpb;
    ex1[sl] = causal ? std::numeric_limits<int>::max() : (own + 1) * tpb;
    climit[sl] = qok ? (causal ? std::min(own, c_tok) : c_tok) : 0;
    cex[sl] = causal ? -1 : own;
  }
  const bool all_valid = p.valid.ptr == nullptr;  // then every blockvalid[c] is 1
  const float sc = static_cast<float>(s.scale) * kLog2e;

  float m[2], l[2], lse2[2];  // per row (rows lane/4 and lane/4 + 8)
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
    lse2[r] = INFINITY;
  }
  // Per slot: best keys first. Only the first top_n entries matter (the final merge pops at
  // most top_n heads per lane), so an offer is inserted only when it beats thr = the
  // top_n-th entry: one 64-bit compare for the (common) rejected offer.
  Key lk[NS][kMaxTop], thr[NS];
#pragma unroll
  for (int sl = 0; sl < NS; ++sl) {
    thr[sl] = 0;
#pragma unroll
    for (int k = 0; k < kMaxTop; ++k) lk[sl][k] = 0;
  }

  // Offers block c (of a chunk) with importance imp to slot sl's list when it is a
  // candidate of that query.
  auto offer = [&](int sl, float imp, int c) {
    const Key key = make_key(imp, c);
    if (key > thr[sl] && c < climit[sl] && c != cex[sl] && (all_valid || blockvalid[c])) {
      if (top_n <= 4) {  // uniform: half the compare-exchanges
        key_insert<4>(lk[sl], key);
        thr[sl] = key_at<4>(lk[sl], top_n - 1);
      } else {
        key_insert<kMaxTop>(lk[sl], key);
        thr[sl] = key_at<kMaxTop>(lk[sl], top_n - 1);
      }
    }
  };
  // Bits [lo, hi) of a 64-bit chunk mask (clamped to [0, 64)).
  auto range_bits = [](int lo, int hi) -> unsigned long long {
    lo = max(lo, 0);
    hi = min(hi, kCols);
    if (hi <= lo) return 0ull;
    const unsigned long long below_hi = hi >= 64 ? ~0ull : (1ull << hi) - 1ull;
    return below_hi & ~((1ull << lo) - 1ull);
  };

  for (int pass = 0; pass < 2; ++pass) {
    __syncthreads();  // previous readers of kbuf (Q staging / the last chunk) are done
    if (nch > 0) load_chunk(0, 0);
    for (int ch = 0; ch < nch; ++ch) {
      const int buf = ch & 1;
      detail::cp_async_wait<0>();
      __syncthreads();  // chunk ch visible; every thread is done with chunk ch - 1
      if (ch + 1 < nch) load_chunk(ch + 1, buf ^ 1);
      const int n0 = ch * kCols;
      if (n0 >= t_end_w) continue;  // warp-uniform: nothing scored here for this warp

      // S = Q K^T: 16 rows x 64 columns, acc[nt][0..1] row lane/4, [2..3] row lane/4 + 8,
      // columns 8 nt + 2 q4 + {0, 1}.
      float acc[kNt][4];
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
      {
        // matrix j of the x4: tokens 8 (j / 2) .. +8 of the n-tile pair, d 8 (j % 2) .. +8
        // of the k16 step -> b0b1 and b2b3 of n-tile 2 np, then of n-tile 2 np + 1.
        const int mi = lane >> 3, rr = lane & 7;
        const E* base = kbuf + (buf * kCols + (mi >> 1) * 8 + rr) * LDK + (mi & 1) * 8;
#pragma unroll
        for (int kk = 0; kk < DK; ++kk)
#pragma unroll
          for (int np = 0; np < kNt / 2; ++np) {
            uint32_t bf[4];
            ldmatrix_x4(bf, base + np * 16 * LDK + kk * 16);
            mma16816<E>(acc[2 * np], qa[kk], bf[0], bf[1]);
            mma16816<E>(acc[2 * np + 1], qa[kk], bf[2], bf[3]);
          }
      }

      // Base-2 logits, -inf where the token is not scored for the row's query: the chunk's
      // scored-token bits minus the slot's excluded range, shifted so that this thread's
      // column 8 nt + 2 q4 + e is bit 8 nt + e (a constant) of a 32-bit half.
      const unsigned long long bits = tokmask[buf];
      unsigned okw[NS][2];
#pragma unroll
      for (int sl = 0; sl < NS; ++sl) {
        const unsigned long long okm =
            (bits & ~range_bits(ex0[sl] - n0, causal ? kCols : ex1[sl] - n0)) >> (2 * q4);
        okw[sl][0] = static_cast<unsigned>(okm);
        okw[sl][1] = static_cast<unsigned>(okm >> 32);
      }
      // Most chunks are scored in full for every row of the thread (bits 8 nt' + e, nt' < 4,
      // e < 2 of both halves): then only the scale multiply is needed.
      bool full = true;
#pragma unroll
      for (int sl = 0; sl < NS; ++sl)
        full = full && ((okw[sl][0] & okw[sl][1]) & 0x03030303u) == 0x03030303u;
      if (full) {
#pragma unroll
        for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[nt][e] *= sc;
      } else {
#pragma unroll
        for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int sl = NS == 2 ? (e >> 1) : 0;
            const bool ok = (okw[sl][nt >> 2] >> ((nt & 3) * 8 + (e & 1))) & 1u;
            acc[nt][e] = ok ? acc[nt][e] * sc : -INFINITY;
          }
      }

      if (pass == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float cmax = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < kNt; ++nt)
            cmax = fmaxf(cmax, fmaxf(acc[nt][2 * r], acc[nt][2 * r + 1]));
          const float mn = fmaxf(m[r], cmax);
          if (mn != -INFINITY) {  // else nothing scored yet (and -inf - -inf is NaN)
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < kNt; ++nt)
              sum += fast_exp2(acc[nt][2 * r] - mn) + fast_exp2(acc[nt][2 * r + 1] - mn);
            l[r] = l[r] * fast_exp2(m[r] - mn) + sum;
            m[r] = mn;
          }
        }
        continue;
      }

      // pass 2: probabilities summed over the heads -> ms[slot][nt][e] (e: column pair).
      float ms[NS][kNt][2];
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p0 = fast_exp2(acc[nt][e] - lse2[0]);
          const float p1 = fast_exp2(acc[nt][2 + e] - lse2[1]);
          if constexpr (NS == 2) {
            ms[0][nt][e] = p0;
            ms[NS - 1][nt][e] = p1;
          } else {
            float v = p0 + p1;
#pragma unroll
            for (int o = 4 * QW; o < 32; o <<= 1) v += __shfl_xor_sync(kFullMask, v, o);
            ms[0][nt][e] = v;
          }
        }

      // ms[nt0 + hl][e] with constant indices (G2 - 1 selects).
      auto pick_hl = [&](const float (&m)[kNt][2], int nt0, int e) {
        float v = m[nt0][e];
#pragma unroll
        for (int j = 1; j < G2; ++j) v = hl == j ? m[nt0 + j][e] : v;
        return v;
      };
      // Per block: importance (fixed order) offered by exactly one lane of the query.
      auto blocks = [&](auto tpb_c) {
        constexpr int TPB = decltype(tpb_c)::value;
        const int cb0 = n0 / TPB;
#pragma unroll
        for (int sl = 0; sl < NS; ++sl) {
          if constexpr (TPB == 1) {
            // n-tile nt = k G2 + hl of each group of G2 (the lane's share), picked by
            // selects instead of a branch per n-tile.
#pragma unroll
            for (int k = 0; k < kNt / G2; ++k)
#pragma unroll
              for (int e = 0; e < 2; ++e)
                offer(sl, pick_hl(ms[sl], k * G2, e), cb0 + (k * G2 + hl) * 8 + 2 * q4 + e);
          } else if constexpr (TPB == 2) {
#pragma unroll
            for (int k = 0; k < kNt / G2; ++k)
              offer(sl, pick_hl(ms[sl], k * G2, 0) + pick_hl(ms[sl], k * G2, 1),
                    cb0 + (k * G2 + hl) * 4 + q4);
          } else if constexpr (TPB == 4) {
#pragma unroll
            for (int nt = 0; nt < kNt; ++nt) {
              float v = ms[sl][nt][0] + ms[sl][nt][1];
              v += __shfl_xor_sync(kFullMask, v, 1);
              if ((q4 & 1) == 0 && nt % G2 == hl) offer(sl, v, cb0 + nt * 2 + (q4 >> 1));
            }
          } else {
            constexpr int NTB = TPB / 8, NBK = kNt / NTB;  // n-tiles per block, blocks
#pragma unroll
            for (int k = 0; k < NBK; ++k) {
              float v = 0.f;
#pragma unroll
              for (int j = 0; j < NTB; ++j) v += ms[sl][k * NTB + j][0] + ms[sl][k * NTB + j][1];
              v += __shfl_xor_sync(kFullMask, v, 1);
              v += __shfl_xor_sync(kFullMask, v, 2);
              if (q4 == 0 && k % G2 == hl) offer(sl, v, cb0 + k);
            }
          }
        }
      };
      switch (tpb) {
        case 1: blocks(std::integral_constant<int, 1>()); break;
        case 2: blocks(std::integral_constant<int, 2>()); break;
        case 4: blocks(std::integral_constant<int, 4>()); break;
        case 8: blocks(std::integral_constant<int, 8>()); break;
        case 16: blocks(std::integral_constant<int, 16>()); break;
        case 32: blocks(std::integral_constant<int, 32>()); break;
        default: blocks(std::integral_constant<int, 64>()); break;
      }
    }

    if (pass == 0) {
      // Merge the row statistics over the quad (a butterfly: every lane ends with the same
      // bits), then lse2 (+inf for a row with nothing scored: every p is 0).
#pragma unroll
      for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
          const float m2 = __shfl_xor_sync(kFullMask, m[r], o);
          const float l2 = __shfl_xor_sync(kFullMask, l[r], o);
          const float mn = fmaxf(m[r], m2);
          if (mn != -INFINITY) {
            l[r] = l[r] * fast_exp2(m[r] - mn) + l2 * fast_exp2(m2 - mn);
            m[r] = mn;
          }
        }
        lse2[r] = l[r] > 0.f ? m[r] + log2f(l[r]) : INFINITY;
      }
    }
  }

  // top_n rounds of arg-max over the list heads of the query's lanes (xor 1, 2 in the quad,
  // and the head-butterfly duplicates), per slot. The owner of the winner pops its head.
#pragma unroll
  for (int sl = 0; sl < NS; ++sl) {
    int chosen[kMaxTop];
#pragma unroll
    for (int r = 0; r < kMaxTop; ++r) {
      chosen[r] = -1;
      if (r < top_n) {  // uniform over the warp
        Key best = lk[sl][0];
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          if (o >= 4 && (G == 1 || o < 4 * QW)) continue;  // not a lane of this query
          const Key other = __shfl_xor_sync(kFullMask, best, o);
          best = other > best ? other : best;
        }
        if (best != 0 && lk[sl][0] == best) {  // each block is offered by one lane only
#pragma unroll
          for (int k = 0; k + 1 < kMaxTop; ++k) lk[sl][k] = lk[sl][k + 1];
          lk[sl][kMaxTop - 1] = 0;
        }
        chosen[r] = key_block(best);  // -1 once the candidates run out
      }
    }
    // One lane per query writes: chosen[] is best-first with the -1s at its end; the output
    // is ascending by rank.
    int qw, hh;
    row_map<G>((lane >> 2) + 8 * sl, qw, hh);
    const int64_t i = i0 + warp * QW + qw;
    if (q4 == 0 && hl == 0 && i < L) {
      int32_t* out = p.out + ((b * L + i) * Hk + g) * p.top_n;
#pragma unroll
      for (int k = 0; k < kMaxTop; ++k) {
        if (k >= top_n) break;
        const int e = chosen[k];
        if (e < 0) {
          out[k] = -1;
          continue;
        }
        int rank = 0;
#pragma unroll
        for (int y = 0; y < kMaxTop; ++y) rank += (chosen[y] >= 0 && chosen[y] < e);
        out[rank] = e;
      }
    }
  }
}

template <typename T, int DP, int G>
__global__ void __launch_bounds__(kThreads)
    select_mma_kernel(const SelectParams<T> p, const int64_t C) {
  select_mma_body<T, DP, G>(p, C);
}
// Same, capped at 128 registers (4 CTAs / SM). Left alone, ptxas aimed at ~96 registers
// and spilled a few words at DP = 16 (G = 2, 4) and used 138 at DP = 64 with a min-blocks
// bound of 1; the cap spills at DP = 64 for G = 1 and 16, which keep the plain bounds.
template <typename T, int DP, int G>
__global__ void __launch_bounds__(kThreads, 4)
    select_mma_kernel_r128(const SelectParams<T> p, const int64_t C) {
  select_mma_body<T, DP, G>(p, C);
}
template <int DP, int G>
constexpr bool kCapRegs = DP <= 32 || (DP == 64 && G >= 2 && G <= 8);

template <int DP, int G, typename T>
bool launch_tc(const SelectParams<T>& p, int64_t C, cudaStream_t stream) {
  using Lay = TcLayout<DP>;
  const int64_t bytes = Lay::bytes(C);
  // Device limit and opt-in once per device / kernel (cuda/launch_cache.h), not per call.
  if (bytes > current_max_smem_optin()) return false;
  const AttnShape& s = p.shape;
  const int64_t ctas = s.batch * s.kv_heads * ceil_div(s.q_len, 64 / G);
  if (ctas >= (int64_t(1) << 31)) return false;
  // if constexpr: only the chosen variant is instantiated (compile time).
  void (*kernel)(const SelectParams<T>, const int64_t) = nullptr;
  if constexpr (kCapRegs<DP, G>) kernel = select_mma_kernel_r128<T, DP, G>;
  else kernel = select_mma_kernel<T, DP, G>;
  opt_in_smem(kernel, static_cast<int>(bytes));
  kernel<<<static_cast<unsigned>(ctas), kThreads, static_cast<size_t>(bytes), stream>>>(p, C);
  check_launch("select_blocks_fwd (tensor cores)");
  return true;
}

template <int DP, typename T>
bool dispatch_group(const SelectParams<T>& p, int64_t C, cudaStream_t stream) {
  switch (p.shape.group()) {
    case 1: return launch_tc<DP, 1>(p, C, stream);
    case 2: return launch_tc<DP, 2>(p, C, stream);
    case 4: return launch_tc<DP, 4>(p, C, stream);
    case 8: return launch_tc<DP, 8>(p, C, stream);
    case 16: return launch_tc<DP, 16>(p, C, stream);
    default: return false;
  }
}

}  // namespace

template <typename T>
bool select_blocks_tc_old_fwd(const SelectParams<T>& p, cudaStream_t stream) {
  if constexpr (std::is_same<T, float>::value) {
    return false;  // fp32 inputs keep the SIMT kernel (tensor cores would round them)
  } else {
    const AttnShape& s = p.shape;
    const int64_t D = s.head_dim, tpb = p.block_size / p.stride;
    if (D < 1 || D > 128 || D % 8 != 0) return false;
    if (!vec_ok<T>(p.q.ptr, D, p.q.stride_b, p.q.stride_l, p.q.stride_h) ||
        !vec_ok<T>(p.k_cmp.ptr, D, p.k_cmp.stride_b, p.k_cmp.stride_l, p.k_cmp.stride_h))
      return false;
    // tpb: a power of two dividing the 64-token chunk (the block sums are done in registers
    // by n-tile / quad lanes); other ratios take the generic kernel.
    if (tpb < 1 || tpb > kCols || !is_pow2(tpb) || p.top_n < 1 || p.top_n > kMaxTop)
      return false;
    if (s.kv_heads < 1 || s.q_heads % s.kv_heads != 0) return false;
    const int64_t C = ceil_div(s.q_len, p.block_size);
    if (C > (int64_t(1) << 30) || s.kv_len > (int64_t(1) << 30)) return false;
    if (D <= 16) return dispatch_group<16>(p, C, stream);
    if (D <= 32) return dispatch_group<32>(p, C, stream);
    if (D <= 64) return dispatch_group<64>(p, C, stream);
    return dispatch_group<128>(p, C, stream);
  }
}

}  // namespace gpu
}  // namespace blossom
