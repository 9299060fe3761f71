// select_blocks on tensor cores, second version ("select-long", issue 3): the same CTA / warp
// split as the first (select_blocks_tc_old.cuh, kept for A/B runs with
// BLOSSOM_OPS_CUDA_SELECT=old, and for the calls this one declines: scale <= 0 or not finite),
// with the SIMT work per (query, compressed token) pair cut by 2.2x. That kernel was bound by
// issued instructions (Nsight: IPC ~2.1, ALU busiest), not by tensor cores, MUFU or memory.
//
// Work decomposition
//   One CTA (4 warps) per (b, kv head g, tile of QT = 64 / G consecutive queries); warp w owns
//   QW = 16 / G queries = 16 (query, head) rows. Compressed tokens stream through shared memory
//   in chunks of 64 (a ring of 2 or 3 cp.async buffers, one __syncthreads per chunk; at DP =
//   32, 64 the second pass reuses the chunks the first left resident: run_pass). The scores are
//   the transposed product S^T = K Q^T (mma.sync m16n8k16: the chunk's tokens are M, four m16
//   tiles; the warp's rows are N, two n8 tiles; K is the A operand straight from shared memory,
//   Q the B operand, loaded into registers once): thread (gid = lane / 4, q4 = lane % 4) holds
//   tokens 8 k + gid (k = 0..7) of 4 rows. Rows are ordered so that these 4 rows are the 4
//   heads of one query for G = 4 (both heads of 2 queries for G = 2, 4 queries for G = 1, 4 of
//   the heads for G = 8 / 16 with lanes xor 1, 2 holding the rest; Rows<G> below): the sum over
//   the heads is in-thread, no shuffle. Pass 1 gathers per row the statistics (lse), pass 2 the
//   probabilities, their head and block sums, and offers each block to a per-lane top-n list; a
//   final arg-max merge over the query's lanes writes the ascending top-n (-1 padding).
//
// Changes against the first version, per chunk and warp
//   * Offers: a lane's list is best-first floats (importance) + block indices, N = 4 entries
//     (N = 8 for top_n > 4), the first N - top_n pinned at +inf so that the threshold is
//     always the last entry: an offer is ONE compare (greater or unordered, so that a NaN
//     importance still reaches the insertion, where it ranks below every number and above an
//     empty slot) and a branch. In a "clean" chunk (every block a candidate of the slot: no
//     validity mask, below the causal limit, not the own block) there is no candidacy test.
//     Insertion: N independent compares and a branch-free shift. A lane offers its blocks in
//     ascending order, so "strictly greater" keeps ties with the lower block, as before.
//     (The previous kernel: 64-bit key compare + candidacy per offer, ~15 instructions, and a
//     ~38-instruction insertion.)
//   * Head sums in-thread (transposed layout above) instead of a head butterfly and picks.
//   * Softmax scale folded into the exp2 argument (one FFMA per score instead of FMUL +
//     FADD); needs scale > 0 (the raw maximum orders like the scaled one).
//   * Pass 1 keeps per row a reference m that is NOT the running max: a chunk's sum of
//     exp2(s - m) is taken while it is <= 2^64 (finite; l only needs some reference,
//     lse = m + log2 l, and m <= the true max keeps it >= 1); a chunk that fails (the first
//     scored one, where m = -inf gives inf or NaN, a NaN score, or a new maximum more than
//     ~60 above m) recomputes with its own max. Per row and chunk: 8 FFMA + 8 MUFU + 8 FADD,
//     one test for the thread's 4 rows, no max tree.
//   * Chunk loader: rows of unscored tokens are not zero-filled any more (their scores are
//     replaced by -inf with a select; a NaN in such a row stays in its own column); a row is
//     copied when t < t_end; each thread copies 2 contiguous 16-byte segments of 1-4 rows
//     (fewer address computations); columns D..DP of the K buffers are zeroed once.
//   * Masks: one test per chunk ("every token scored, no excluded range in the chunk"), the
//     per-accumulator selects only for the other chunks.
//   * Pass 1 and the 7 block sizes of pass 2 are separate copies of the chunk loop (no pass
//     or tpb switch per chunk); CTA coordinates in 32-bit arithmetic (no 64-bit division).
//   Masks, candidates, padding, ties and the float64-reference semantics are the previous
//   kernel's: token t is scored for query i when t < T, valid_cmp(b, t), its block c = t / tpb
//   holds a valid key, c != own(i), and c < own(i) when causal; a candidate block is one with a
//   valid key, c < own (causal) or c != own; a padded query selects nothing.
//
// Counts: static SASS (nvcc 13, sm_90, nvdisasm) of the D = 64, G = 4, N = 4, bf16
// instantiation, the hot path of one fully scored, clean chunk of 64 tokens at tpb = 1, per
// warp (warps 2, 3; warps 0, 1 add ~16 per pass for the token ballot):
//                      pass 1 (lse)   pass 2 (offers)   + per insertion   (per chunk: both)
//   previous kernel         430            527              38
//   this kernel             208            228              17
//   A warp executes an insertion when any of its 32 lanes inserts: with random data ~7 of the
//   8 offer positions per chunk at L = 16384 (~6.8 at L = 4096; per-lane lists see 8 of a
//   query's 64 tokens per chunk, so they keep changing). Per chunk and warp, both passes:
//   1,223 -> 555 instructions; per (query, token) pair (4 queries x 64 tokens per warp and
//   chunk): 4.8 -> 2.2. Of the 555: 96 LDSM + HMMA, 128 FFMA + MUFU, 56 FADD (sums), ~32 offer
//   tests, ~119 insertions, ~50 loader, ~75 loop / barrier / masks.
//   Not changed: ~900 instructions per warp and CTA outside the chunk loops (prologue with the
//   Q tile, block validity, the merges).
// Predicted time (H100, B = 64, Hq = 8, Hk = 2, D = 64, bf16, block_size = stride = 16, top_n
// 4, causal). Warp-chunks (both passes) = 4 x sum over tiles of ceil(own block / 64 tokens) x
// 128 (b, g): 325,632 at L = 4096, 4,448,256 at L = 16384. Warp-instructions: previous 0.51 G /
// 6.0 G (measured 1.14 / 11.0 ms: 445 / 546 G warp-instructions per second, IPC ~2.0 / 2.4 per
// SM at ~1.75 GHz); this kernel 0.29 G / 3.0 G. At the same issue rate: 0.65 ms at L = 4096 and
// 5.5 ms at L = 16384; 0.57 / 4.9 ms if the branch-poorer loop issues ~15% faster. Floors:
// MUFU 64 exp2 per warp-chunk (8 cycles each per SM sub-partition): 2.5 ms at L = 16384;
// shared memory (ldmatrix of the K chunk, 8 KB per warp-chunk and pass): ~2.3 ms.
// D = 16, L = 4096 (one k16 step: 72 fewer LDSM + HMMA per warp-chunk): ~0.45 ms (0.82).
// Resources: TcLayout::NB (2 or 3) x 64 x (DP + 8) x 2 B of K buffers + C bytes of block validity;
// registers (PTXAS_VERBOSE=1): <= 128 without spills (4 CTAs / SM) for G >= 4 and most G = 2
// variants; see kCapRegs below for the others (3 CTAs / SM, G = 1: 2-3).
// Coverage: as the previous kernel (16-bit inputs, D % 8 == 0 and <= 128, G in {1, 2, 4, 8,
// 16}, top_n <= 8, tpb a power of two <= 64), plus scale > 0 and L, block_size < 2^31.
// The fragment / lane index math is replayed on the host by scripts/emulate_select_mma.py.
// Included by select_blocks_tc_half.cu (float, half) and select_blocks_tc_bf16.cu
// (bfloat16): two translation units, compiled in parallel.
#pragma once
#include <cmath>
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
constexpr int kMaxTop = 8;     // top_n capacity
// A chunk sum of exp2(s - m) above this is recomputed with the chunk's max (see pass 1).
constexpr float kSumLimit = 18446744073709551616.f;  // 2^64

// Whether pass 1 reuses the chunks pass 0 left in shared memory (see run_pass), with a ring of
// 3 chunk buffers (27 KB of 16-bit rows per CTA at DP = 64: six CTAs per SM still fit). On at
// DP = 32, 64. Off at DP = 128 (3 buffers would take 52 KB per CTA) and at DP = 16, where it
// measured slower (session 16, H100, B=64 Hq=8 Hk=2 bf16, selection ms base -> reuse: D=16
// L=16384 4.35 / 4.36 -> 4.48 / 4.45, also with 2 buffers; L=4096 unchanged), against D=64
// L=4096 0.729 / 0.728 -> 0.718 / 0.714 and L=16384 7.03 / 6.99 -> 6.77 / 6.86. Off: 2
// buffers, both passes ascending, each loading every chunk (the order before session 16).
template <int DP>
constexpr bool kReuseChunks = DP == 32 || DP == 64;

// Shared memory layout (byte offsets). The Q tile is staged in K buffer 0 before the first
// chunk is loaded (64 rows x kLdK, exactly one buffer).
template <int DP>
struct TcLayout {
  static constexpr int NB = kReuseChunks<DP> ? 3 : 2;  // chunk buffers in the ring
  static constexpr int kLdK = DP + 8;  // 16-bit elements per staged row: 16 B aligned rows,
                                       // and the 8 rows of an ldmatrix hit distinct banks
  static constexpr int kK = 0;                               // [NB][kCols][kLdK]
  static constexpr int kMask = kK + NB * kCols * kLdK * 2;   // [NB] uint64 scored-token bits
  static constexpr int kBlockValid = kMask + (8 * NB + 15) / 16 * 16;  // [C] byte
  static int64_t bytes(int64_t C) { return kBlockValid + ((C + 15) / 16) * 16; }
};

// ldmatrix.x4 / cp.async with a 32-bit shared-memory address kept in a register (the
// generic-pointer versions convert the address at every use).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], unsigned saddr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(saddr));
}
__device__ __forceinline__ void cp_async16_cg(unsigned saddr, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(saddr), "l"(src) : "memory");
}

// Packed 64-bit key of a list entry for the final merge: high word importance bits + 1 (0 for
// the NaN stand-in -1), low word ~block; 0 = empty. Integer order = selection order
// (importance desc, block asc).
using Key = unsigned long long;
__device__ __forceinline__ Key entry_key(float v, int c) {
  if (v == -INFINITY) return 0;  // empty slot
  const unsigned hi = v >= 0.f ? __float_as_uint(v + 0.f) + 1u : 0u;
  return (static_cast<Key>(hi) << 32) | static_cast<Key>(~static_cast<unsigned>(c));
}
__device__ __forceinline__ int key_block(Key k) {  // -1 for an empty slot
  return k == 0 ? -1 : static_cast<int>(~static_cast<unsigned>(k));
}

// Inserts (w, cw) into a best-first list of N entries (v desc; an equal earlier entry stays
// ahead, which gives ties to the lower block because offers come in ascending block order).
// All N compares are independent; each slot then takes its predecessor, the new entry or
// itself: no branches, constant indices (the list stays in registers).
template <int N>
__device__ __forceinline__ void list_insert(float (&v)[N], int (&c)[N], float w, int cw) {
  bool gt[N];
#pragma unroll
  for (int k = 0; k < N; ++k) gt[k] = w > v[k];
#pragma unroll
  for (int k = N - 1; k >= 1; --k) {
    v[k] = gt[k - 1] ? v[k - 1] : (gt[k] ? w : v[k]);
    c[k] = gt[k - 1] ? c[k - 1] : (gt[k] ? cw : c[k]);
  }
  v[0] = gt[0] ? w : v[0];
  c[0] = gt[0] ? cw : c[0];
}

// Thread layout of the transposed product S^T = K Q^T (m16n8k16; the chunk's 64 tokens are M,
// four m16 tiles; the warp's 16 (query, head) rows are N, two n8 tiles). Thread (gid =
// lane / 4, q4 = lane % 4) holds acc[mt][nt][2 h + e] = S(token 16 mt + 8 h + gid, row
// 8 nt + 2 q4 + e): the 8 tokens 8 k + gid (k = 2 mt + h) of the chunk, 4 rows j = 2 nt + e.
// Row j of lane q4 is head hh of query qw (within the warp): slot = j / HPT,
// qw = (q4 / LQ) NS + slot, hh = (q4 % LQ) HPT + j % HPT, with NS query slots per thread
// (4 for G = 1, 2 for G = 2, else 1), HPT = 4 / NS of their heads in the thread and
// LQ = max(1, G / 4) lanes of the quad per query. For G = 4 a thread holds all four heads of
// its query (the head sum needs no shuffle), for G = 2 both heads of two queries, for G = 8,
// 16 four of the heads (lanes xor 1, 2 hold the others).
template <int G>
struct Rows {
  static constexpr int NS = G == 1 ? 4 : (G == 2 ? 2 : 1);
  static constexpr int HPT = 4 / NS;
  static constexpr int LQ = G >= 4 ? G / 4 : 1;
  static constexpr int QW = 16 / G;
  // Row r (0..15) of the warp's tile -> (query qw within the warp, head hh within the group).
  __device__ static void map(int r, int& qw, int& hh) {
    const int q4 = (r & 7) >> 1, j = 2 * (r >> 3) + (r & 1);
    qw = (q4 / LQ) * NS + j / HPT;
    hh = (q4 % LQ) * HPT + j % HPT;
  }
};

// Block sums of one slot. A lane starts with w[k] = its heads' probabilities of token 8 k + gid.
// If a block spans several k (tpb >= 16) those are summed in the thread first (kPre per
// block). Then "levels", each pairing the lanes that differ in one lane bit: first the heads
// held by other lanes of the quad (G >= 8: xor 1, 2), then the tokens of a block held by other
// gid lanes (tpb >= 2: xor 4, 8, 16 for gid bits 0, 1, 2 up to log2 min(tpb, 8)). While a lane
// holds more than one value a level is a reduce-scatter (keep the values whose lowest index
// bit equals the lane bit, send the others: half the shuffles of a butterfly), after that a
// butterfly add, and only the lane whose bit is 0 offers. Value w[i] at the end stands for
// index (i << kScatter) | (the scatter levels' lane bits): k for tpb <= 8, the block within
// the chunk for tpb >= 16.
template <int LQ, int TPB>
struct Levels {
  static constexpr int lg(int x) { return x <= 1 ? 0 : 1 + lg(x / 2); }
  static constexpr int kPre = TPB >= 16 ? TPB / 8 : 1;
  static constexpr int kNV = 8 / kPre;
  static constexpr int kHead = lg(LQ);
  static constexpr int kTok = lg(TPB < 8 ? TPB : 8);
  static constexpr int kLevels = kHead + kTok;
  static constexpr int kScatter = kLevels < lg(kNV) ? kLevels : lg(kNV);
  static constexpr int kNVOut = kNV >> kScatter;
  static constexpr int offset(int i) { return i < kHead ? (1 << i) : (4 << (i - kHead)); }
  static constexpr int allreduce_mask() {
    int m = 0;
    for (int i = kScatter; i < kLevels; ++i) m |= offset(i);
    return m;
  }
  // (scatter levels' lane bits) as the low bits of the value index.
  __device__ static int low_bits(int lane) {
    int lo = 0;
#pragma unroll
    for (int i = 0; i < kScatter; ++i) lo |= ((lane & offset(i)) ? 1 : 0) << i;
    return lo;
  }
};

template <int LQ, int TPB>
__device__ __forceinline__ void block_sums(float (&w)[8], int lane) {
  using Lv = Levels<LQ, TPB>;
  if constexpr (Lv::kPre > 1) {
#pragma unroll
    for (int bi = 0; bi < Lv::kNV; ++bi) {
      float v = w[bi * Lv::kPre];
#pragma unroll
      for (int j = 1; j < Lv::kPre; ++j) v += w[bi * Lv::kPre + j];
      w[bi] = v;
    }
  }
#pragma unroll
  for (int i = 0; i < Lv::kLevels; ++i) {
    const int off = Lv::offset(i);
    if (i < Lv::kScatter) {
      const bool bit = (lane & off) != 0;
      const int cnt = Lv::kNV >> i;
#pragma unroll
      for (int k = 0; k < cnt / 2; ++k) {
        const float keep = bit ? w[2 * k + 1] : w[2 * k];
        const float send = bit ? w[2 * k] : w[2 * k + 1];
        w[k] = keep + __shfl_xor_sync(kFullMask, send, off);
      }
    } else {
      w[0] += __shfl_xor_sync(kFullMask, w[0], off);
    }
  }
}

// The kernel body; select_mma2_kernel / _r128 below only differ in their launch bounds.
// N: list length (4 serves top_n <= 4, 8 serves top_n <= 8).
template <typename T, int DP, int G, int N>
__device__ __forceinline__ void select_mma2_body(const SelectParams<T>& p, const int64_t C,
                                                 const int flags) {
  using E = typename TcElem<T>::type;
  using Lay = TcLayout<DP>;
  using Rw = Rows<G>;
  constexpr int QW = Rw::QW;          // queries per warp
  constexpr int QT = 4 * QW;          // queries per CTA
  constexpr int NS = Rw::NS, HPT = Rw::HPT, LQ = Rw::LQ;
  constexpr int LDK = Lay::kLdK;
  constexpr int DK = DP / 16;         // k16 steps
  constexpr int NB = Lay::NB;         // chunk buffers
  static_assert(G == 1 || G == 2 || G == 4 || G == 8 || G == 16, "G");
  static_assert(N == 4 || N == 8, "N");

  extern __shared__ __align__(128) unsigned char smem[];
  E* kbuf = reinterpret_cast<E*>(smem + Lay::kK);
  unsigned long long* tokmask = reinterpret_cast<unsigned long long*>(smem + Lay::kMask);
  unsigned char* blockvalid = smem + Lay::kBlockValid;

  const AttnShape& s = p.shape;
  const int64_t L = s.q_len, Tn = s.kv_len, Hk = s.kv_heads;
  const int D = static_cast<int>(s.head_dim);
  // CTA coordinates and block indices in 32-bit arithmetic (the launcher checks L, block_size
  // < 2^31): a 64-bit division is a ~70-instruction call.
  const unsigned tiles = static_cast<unsigned>((L + QT - 1) / QT);
  const unsigned tile = blockIdx.x % tiles, bg = blockIdx.x / tiles;
  const int64_t b = bg / static_cast<unsigned>(Hk), g = bg % static_cast<unsigned>(Hk);
  const int64_t i0 = int64_t(tile) * QT;
  const unsigned bs32 = static_cast<unsigned>(p.block_size);
  auto block_of_pos = [&](int64_t j) { return static_cast<int>(static_cast<unsigned>(j) / bs32); };
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int gid = lane >> 2, q4 = lane & 3;
  const int64_t bs = p.block_size;
  const int tpb = static_cast<int>(static_cast<unsigned>(p.block_size) / static_cast<unsigned>(p.stride));
  const int top_n = static_cast<int>(p.top_n);
  const bool causal = p.causal;

  // Token range of the tile and the blocks whose validity it needs.
  // Token / block indices fit in int (the launcher checks T, C <= 2^30).
  const int own_last = block_of_pos(std::min(L, i0 + QT) - 1);
  const int c_hi = causal ? own_last : static_cast<int>(C);
  const int t_end = static_cast<int>(causal ? std::min<int64_t>(Tn, int64_t(own_last) * tpb) : Tn);
  const int nch = (t_end + kCols - 1) / kCols;
  // This warp's chunks: causal, every column at or after its last query's own block is
  // excluded for all of its queries.
  const int own_last_w = block_of_pos(std::min(L, i0 + (warp + 1) * QW) - 1);
  const int t_end_w = causal ? std::min(t_end, own_last_w * tpb) : t_end;

  // Q tile pieces: thread tid stages pieces idx = tid + n kThreads (n < QN) of the
  // kRows x DP / 8 16-byte pieces, row R = idx / (DP / 8) in the order of Rows<G>::map (zeros
  // for padded / out-of-range queries and columns >= D). With early Q loads (the default;
  // BLOSSOM_OPS_CUDA_SELECT_QLOAD=old: flags bit 0 clear) all QN loads are issued here, before
  // the block-validity fill, and stored after it: one exposed round trip per CTA instead of
  // one per piece (Nsight Compute, run x: the serial load -> store pairs of the staging loop
  // held ~9% of the kernel's stall samples at D = 64, L = 4096; run y: 0.761 -> 0.727 ms at
  // L = 4096, 6.97 -> 6.85 at L = 16384, B = 64 Hq = 8 Hk = 2 bf16, H100).
  constexpr int QN = kRows * (DP / 8) / kThreads;
  static_assert(QN * kThreads == kRows * (DP / 8), "Q pieces per thread");
  const bool q_early = (flags & 1) != 0;
  auto q_piece = [&](int idx) -> uint4 {
    const int R = idx / (DP / 8), d8 = (idx % (DP / 8)) * 8;
    int qw, hh;
    Rw::map(R & 15, qw, hh);
    const int64_t i = i0 + (R >> 4) * QW + qw;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (d8 < D && i < L && p.valid(b, i))
      v = __ldg(reinterpret_cast<const uint4*>(p.q.at(b, i, g * G + hh) + d8));
    return v;
  };
  uint4 qv[QN];
  if (q_early) {
#pragma unroll
    for (int n = 0; n < QN; ++n) qv[n] = q_piece(tid + n * kThreads);
  }

  // blockvalid[c]: block c holds a valid key (coalesced byte reads; equal-value writes).
  for (int c = tid; c < c_hi; c += kThreads) blockvalid[c] = p.valid.ptr == nullptr;
  __syncthreads();
  if (p.valid.ptr != nullptr) {
    const int64_t j_end = std::min(L, c_hi * bs);
    for (int64_t j = tid; j < j_end; j += kThreads)
      if (p.valid(b, j)) blockvalid[block_of_pos(j)] = 1;
  }

  // Q tile -> K buffer 0, row R = 16 warp + r, then into registers as B fragments for the
  // whole CTA. Columns D..DP of K buffers 1..NB-1 are zeroed here once (the loader only copies
  // columns < D; buffer 0 gets its zeros from the Q staging): Q is 0 there, but 0 x
  // uninitialised bits could be NaN.
  auto q_store = [&](int idx, uint4 v) {
    const int R = idx / (DP / 8), d8 = (idx % (DP / 8)) * 8;
    *reinterpret_cast<uint4*>(kbuf + R * LDK + d8) = v;
    if (d8 >= D) {
#pragma unroll
      for (int nb = 1; nb < NB; ++nb)
        *reinterpret_cast<uint4*>(kbuf + (nb * kCols + R) * LDK + d8) = v;
    }
  };
  if (q_early) {
#pragma unroll
    for (int n = 0; n < QN; ++n) q_store(tid + n * kThreads, qv[n]);
  } else {  // the previous staging: each piece loaded where it is stored
    for (int idx = tid; idx < kRows * (DP / 8); idx += kThreads) q_store(idx, q_piece(idx));
  }
  __syncthreads();  // also publishes blockvalid
  // qb[kk][nt]: the B fragment (k = d of k16 step kk, n = row 8 nt + gid). Matrix j of the
  // x4: rows 8 (j / 2) .. +8 of the warp's 16, d 8 (j % 2) .. +8 of the step.
  uint32_t qb[DK][2][2];
  {
    const unsigned base = smem_addr(kbuf + (warp * 16 + ((lane >> 4) & 1) * 8 + (lane & 7)) * LDK +
                                    ((lane >> 3) & 1) * 8);
#pragma unroll
    for (int kk = 0; kk < DK; ++kk) {
      uint32_t r[4];
      ldsm_x4(r, base + kk * 32);
      qb[kk][0][0] = r[0];
      qb[kk][0][1] = r[1];
      qb[kk][1][0] = r[2];
      qb[kk][1][1] = r[3];
    }
  }

  // Chunk loader: thread tid copies SPR = 2 consecutive 16-byte segments (columns
  // 8 seg0 .. 8 seg0 + 15) of RPT rows (jr, jr + RPP, ...) of a chunk, those that lie below
  // t_end (one compare per row, the segments by immediate offsets); the other rows keep stale
  // data, which only unscored columns read. Two segments per row halve the address work of
  // one segment per row and still give each warp instruction 8 rows x 64 contiguous bytes.
  // The chunk's scored-token bits go to tokmask[buf] (warps 0 and 1, one ballot each).
  // Without validity masks a token is scored iff t < t_end.
  const int tpb_sh = __ffs(tpb) - 1;
  const E* kg = reinterpret_cast<const E*>(p.k_cmp.at(b, 0, g));
  const int64_t k_sl = p.k_cmp.stride_l;
  const bool* vc = p.valid_cmp.ptr == nullptr ? nullptr : p.valid_cmp.ptr + b * p.valid_cmp.stride_b;
  const bool all_valid = p.valid.ptr == nullptr;  // then every blockvalid[c] is 1
  const bool plain_tokens = all_valid && vc == nullptr;
  auto tok_ok = [&](int t) {
    bool ok = t < t_end;
    if (!plain_tokens) ok = ok && (vc == nullptr || vc[t]) && blockvalid[t >> tpb_sh];
    return ok;
  };
  constexpr int SPR = DP >= 32 ? 2 : 1;         // segments per row and thread
  constexpr int TPR = DP / 8 / SPR;             // threads per row
  constexpr int RPP = kThreads / TPR;           // rows per pass of the CTA
  constexpr int RPT = kCols / RPP;              // rows per thread
  constexpr unsigned kBufBytes = kCols * LDK * 2;
  const int jr = tid / TPR, seg0 = (tid % TPR) * SPR;
  // segments of the row this thread copies (D < DP leaves the last ones out)
  const int nseg = std::max(0, std::min(SPR, D / 8 - seg0));
  const int64_t k_step = int64_t(RPP) * k_sl;  // elements between this thread's rows
  const E* const src0 = kg + int64_t(jr) * k_sl + seg0 * 8;  // chunk 0
  const unsigned dst0 = smem_addr(kbuf + jr * LDK + seg0 * 8);  // buffer 0; b: + b kBufBytes
  auto load_chunk = [&](int ch, int buf) {
    const int n0 = ch * kCols;
    const unsigned dst = dst0 + buf * kBufBytes;
    const int rows = t_end - n0 - jr;  // copy row r when r * RPP < rows
    const E* src = src0 + ch * (RPT * k_step);  // RPT steps of RPP rows = one chunk
    if (D == DP) {  // uniform: every segment of a row (no per-segment test)
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
#pragma unroll
        for (int sg = 0; sg < SPR; ++sg)
          if (r * RPP < rows) cp_async16_cg(dst + (r * RPP * LDK + sg * 8) * 2, src + sg * 8);
        src += k_step;
      }
    } else {
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
#pragma unroll
        for (int sg = 0; sg < SPR; ++sg)
          if (r * RPP < rows && sg < nseg)
            cp_async16_cg(dst + (r * RPP * LDK + sg * 8) * 2, src + sg * 8);
        src += k_step;
      }
    }
    detail::cp_async_commit();
    if (warp < 2) {
      const unsigned bits = __ballot_sync(kFullMask, tok_ok(n0 + warp * 32 + lane));
      if (lane == 0) reinterpret_cast<unsigned*>(tokmask + buf)[warp] = bits;
    }
  };

  // This thread's queries (slots). Per slot: excluded tokens [ex0, ex1) (the own block, and
  // everything after it when causal), and candidate blocks c < climit, c != cex (climit = 0
  // for a padded query; every block c with c * tpb < t_end lies below c_hi, where blockvalid
  // is filled).
  int ex0[NS], ex1[NS], climit[NS], cex[NS];
  const int c_tok = (t_end + tpb - 1) / tpb;  // blocks with a token below t_end
#pragma unroll
  for (int sl = 0; sl < NS; ++sl) {
    const int64_t i = i0 + warp * QW + (q4 / LQ) * NS + sl;
    const bool qok = i < L && p.valid(b, i);
    const int own = block_of_pos(i < L ? i : L - 1);
    ex0[sl] = own * tpb;
    ex1[sl] = causal ? std::numeric_limits<int>::max() : (own + 1) * tpb;
    climit[sl] = qok ? (causal ? std::min(own, c_tok) : c_tok) : 0;
    cex[sl] = causal ? -1 : own;
  }
  const float sc = static_cast<float>(s.scale) * kLog2e;  // > 0 (the launcher checks)

  float m[4], l[4], lse2[4];  // per row j
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    m[j] = -INFINITY;
    l[j] = 0.f;
    lse2[j] = INFINITY;
  }
  // Per slot: best first; entries 0 .. N - top_n - 1 pinned at +inf (never displaced: the
  // inserts compare strictly), so lv[sl][N - 1] is always the top_n-th entry = the threshold.
  // Empty: -inf. A NaN importance is stored as -1 (below every importance, above empty).
  float lv[NS][N];
  int lc[NS][N];
#pragma unroll
  for (int sl = 0; sl < NS; ++sl)
#pragma unroll
    for (int k = 0; k < N; ++k) {
      lv[sl][k] = k < N - top_n ? INFINITY : -INFINITY;
      lc[sl][k] = -1;
    }

  // Bits [lo, hi) of a 64-bit chunk mask (clamped to [0, 64)).
  auto range_bits = [](int lo, int hi) -> unsigned long long {
    lo = max(lo, 0);
    hi = min(hi, kCols);
    if (hi <= lo) return 0ull;
    const unsigned long long below_hi = hi >= 64 ? ~0ull : (1ull << hi) - 1ull;
    return below_hi & ~((1ull << lo) - 1ull);
  };

  // A x4 of an m16 tile of K (row-major tokens x d): lane t addresses token (t & 7) +
  // 8 ((t >> 3) & 1), d 8 (t >> 4) of the k16 step -> a0a1 (tokens 0-7, d 0-7), a2a3
  // (tokens 8-15), a4a5 (d 8-15), a6a7. Buffer 0, m-tile 0, step 0:
  const unsigned ldsm0 =
      smem_addr(kbuf + ((lane & 7) + ((lane >> 3) & 1) * 8) * LDK + ((lane >> 4) & 1) * 8);
  // S^T for chunk buffer buf (layout above), then -inf where the token is not scored for the
  // row's query.
  auto chunk_scores = [&](int buf, int n0, float (&acc)[4][2][4]) {
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
    const unsigned base = ldsm0 + buf * kBufBytes;
#pragma unroll
    for (int kk = 0; kk < DK; ++kk)
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        uint32_t ka[4];
        ldsm_x4(ka, base + (mt * 16 * LDK + kk * 16) * 2);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) mma16816<E>(acc[mt][nt], ka, qb[kk][nt][0], qb[kk][nt][1]);
      }
    // Most chunks are scored in full for the thread's queries: every token, and no excluded
    // range inside the chunk. The others: the chunk's bits minus the slot's excluded range,
    // shifted so that this thread's token 8 k + gid is bit 8 k.
    const unsigned long long bits = tokmask[buf];
    bool full = bits == ~0ull;
#pragma unroll
    for (int sl = 0; sl < NS; ++sl) full = full && (n0 + kCols <= ex0[sl] || n0 >= ex1[sl]);
    if (!full) {
#pragma unroll
      for (int sl = 0; sl < NS; ++sl) {
        const unsigned long long okm =
            (bits & ~range_bits(ex0[sl] - n0, causal ? kCols : ex1[sl] - n0)) >> gid;
        const unsigned lo = static_cast<unsigned>(okm), hi = static_cast<unsigned>(okm >> 32);
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
          for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              if ((2 * nt + (e & 1)) / HPT != sl) continue;  // row of another slot
              const int k = 2 * mt + (e >> 1);
              const bool ok = ((k < 4 ? lo : hi) >> (8 * (k & 3))) & 1u;
              acc[mt][nt][e] = ok ? acc[mt][nt][e] : -INFINITY;
            }
      }
    }
  };

  // Pass 1, one chunk: per row j, the sum of exp2(sc s - m) over the thread's 8 tokens.
  auto chunk_stats = [&](const float (&acc)[4][2][4]) {
    float cs[4];
    bool fine = true;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int nt = j >> 1, e = j & 1;
      const float nm = -m[j];
      float part[2];  // two chains (and no 0 + x: it is not folded)
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const float x = fast_exp2(fmaf(acc[mt][nt][e], sc, nm)) +
                        fast_exp2(fmaf(acc[mt][nt][2 + e], sc, nm));
        part[mt & 1] = mt < 2 ? x : part[mt & 1] + x;
      }
      cs[j] = part[0] + part[1];
      fine = fine && cs[j] <= kSumLimit;
    }
    if (fine) {  // one branch for the four rows
#pragma unroll
      for (int j = 0; j < 4; ++j) l[j] += cs[j];
      return;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int nt = j >> 1, e = j & 1;
      if (cs[j] <= kSumLimit) {
        l[j] += cs[j];
      } else {
        // First scored chunk of the row (m = -inf: inf or NaN above), a NaN score, or a
        // new maximum far above m: rescale to the chunk's max (scores are masked to -inf,
        // sc > 0, so the max of the raw accumulators gives the max of the scaled ones).
        float cmax = -INFINITY;
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
          cmax = fmaxf(cmax, fmaxf(acc[mt][nt][e], acc[mt][nt][2 + e]));
        const float mn = fmaxf(m[j], cmax * sc);
        if (mn != -INFINITY) {  // else nothing scored yet (and -inf - -inf is NaN)
          float sum = 0.f;
#pragma unroll
          for (int mt = 0; mt < 4; ++mt)
            sum += fast_exp2(fmaf(acc[mt][nt][e], sc, -mn)) +
                   fast_exp2(fmaf(acc[mt][nt][2 + e], sc, -mn));
          l[j] = l[j] * fast_exp2(m[j] - mn) + sum;
          m[j] = mn;
        }
      }
    }
  };

  // Offers block c with importance x to slot sl (x passed the threshold test): the NaN
  // stand-in and the branch-free insertion.
  auto insert = [&](int sl, float x, int c) {
    list_insert<N>(lv[sl], lc[sl], x == x ? x : -1.f, c);
  };
  auto candidate = [&](int sl, int c) {
    return c < climit[sl] && c != cex[sl] && (all_valid || blockvalid[c]);
  };

  // Per slot: chunks below ch_clean[sl] hold only candidate blocks of the slot, except the
  // chunk ch_own[sl] (non-causal: the own block's chunk; -1 otherwise). tpb_c as below.
  int ch_clean[NS], ch_own[NS];
  // Pass 2, one chunk: probabilities, head and block sums, offers.
  auto chunk_offers = [&](const float (&acc)[4][2][4], int ch, auto tpb_c) {
    constexpr int TPB = decltype(tpb_c)::value;
    using Lv = Levels<LQ, TPB>;
    const int n0 = ch * kCols;
    float w[NS][8];  // w[slot][k]: the slot's heads in this thread, token 8 k + gid
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float pr[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
          pr[j] = fast_exp2(fmaf(acc[mt][j >> 1][2 * hf + (j & 1)], sc, -lse2[j]));
        const int k = 2 * mt + hf;
        if constexpr (HPT == 4) {
          w[0][k] = (pr[0] + pr[1]) + (pr[2] + pr[3]);
        } else if constexpr (HPT == 2) {
          w[0][k] = pr[0] + pr[1];
          w[NS - 1][k] = pr[2] + pr[3];
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j) w[j % NS][k] = pr[j];
        }
      }
    const int cb0 = n0 / TPB;
    const int lo = Lv::low_bits(lane);
    const bool offers = (lane & Lv::allreduce_mask()) == 0;
    // Block of value i (lane-dependent, ascending in i).
    auto block_of = [&](int i) {
      const int idx = (i << Lv::kScatter) | lo;
      if constexpr (TPB <= 8) return cb0 + idx * (8 / TPB) + (gid >> Levels<1, TPB>::lg(TPB));
      else return cb0 + idx;
    };
#pragma unroll
    for (int sl = 0; sl < NS; ++sl) {
      block_sums<LQ, TPB>(w[sl], lane);
      // Every block of the chunk is a candidate of the slot (no validity mask, none at or
      // after climit, not the excluded own block): no candidacy test per offer.
      const bool clean = ch < ch_clean[sl] && ch != ch_own[sl];
      if (clean) {
#pragma unroll
        for (int i = 0; i < Lv::kNVOut; ++i)
          if (offers && !(w[sl][i] <= lv[sl][N - 1])) insert(sl, w[sl][i], block_of(i));
      } else {
#pragma unroll
        for (int i = 0; i < Lv::kNVOut; ++i) {
          if (offers && !(w[sl][i] <= lv[sl][N - 1])) {
            const int c = block_of(i);
            if (candidate(sl, c)) insert(sl, w[sl][i], c);
          }
        }
      }
    }
  };

  auto clean_chunks = [&](auto tpb_c) {
    constexpr int kBlocks = kCols / decltype(tpb_c)::value;  // blocks per chunk
#pragma unroll
    for (int sl = 0; sl < NS; ++sl) {
      ch_clean[sl] = all_valid ? climit[sl] / kBlocks : 0;
      ch_own[sl] = cex[sl] >= 0 ? cex[sl] / kBlocks : -1;
    }
  };
  // One pass over the tile's chunks (PASS 0: statistics, 1: offers with block size tpb_c).
  // The chunks go through a ring of NB buffers, chunk ch in buffer ch % NB, NB - 1 chunks in
  // flight while one is computed. With kReuseChunks, pass 0 takes them in DESCENDING order (its
  // sums do not care), so it ends with chunks 0 .. NB - 1 resident; pass 1 needs ascending
  // order (an offer keeps ties with the lower block) and starts on those without loading
  // them, and a tile of at most NB chunks (every tile at L <= 3072) loads, waits and
  // synchronises nothing in pass 1. Every iteration commits one cp.async group (empty when it
  // loads nothing), so waiting for all but the NB - 2 youngest groups means "chunk ch landed".
  auto run_pass = [&](auto pass_c, auto tpb_c) {
    constexpr int PASS = decltype(pass_c)::value;
    constexpr bool kDesc = PASS == 0 && kReuseChunks<DP>;  // descending chunk order
    constexpr bool kLoadAll = PASS == 0 || !kReuseChunks<DP>;  // no chunk resident at the start
    if constexpr (PASS == 1) clean_chunks(tpb_c);
    if constexpr (kLoadAll) {
      __syncthreads();  // previous readers of kbuf (Q staging / the last chunk) are done
#pragma unroll
      for (int k = 0; k < NB - 1; ++k) {  // the first NB - 1 chunks in the pass's order
        const int ch = kDesc ? nch - 1 - k : k;
        if (ch >= 0 && ch < nch) load_chunk(ch, ch % NB);
        else detail::cp_async_commit();
      }
    }
    for (int it = 0; it < nch; ++it) {
      const int ch = kDesc ? nch - 1 - it : it;
      const int buf = ch % NB;
      if (kLoadAll || nch > NB) {  // block-uniform
        detail::cp_async_wait<NB - 2>();
        __syncthreads();  // chunk ch visible; every thread is done with the previous chunk
        // The chunk NB - 1 places further on goes into the previous chunk's buffer.
        const int nx = kDesc ? ch - (NB - 1) : ch + (NB - 1);
        if (kDesc ? nx >= 0 : (nx < nch && (kLoadAll || nx >= NB))) load_chunk(nx, nx % NB);
        else detail::cp_async_commit();
      }
      const int n0 = ch * kCols;
      if (n0 >= t_end_w) continue;  // warp-uniform: nothing scored here for this warp
      float acc[4][2][4];
      chunk_scores(buf, n0, acc);
      if constexpr (PASS == 0) chunk_stats(acc);
      else chunk_offers(acc, ch, tpb_c);
    }
  };

  run_pass(std::integral_constant<int, 0>(), std::integral_constant<int, 1>());
  // Merge the row statistics over the row's 8 gid lanes (a butterfly: every lane ends with
  // the same bits), then lse2 (+inf for a row with nothing scored: every p is 0).
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
      const float m2 = __shfl_xor_sync(kFullMask, m[j], o);
      const float l2 = __shfl_xor_sync(kFullMask, l[j], o);
      const float mn = fmaxf(m[j], m2);
      if (mn != -INFINITY) {
        l[j] = l[j] * fast_exp2(m[j] - mn) + l2 * fast_exp2(m2 - mn);
        m[j] = mn;
      }
    }
    lse2[j] = l[j] > 0.f ? m[j] + log2f(l[j]) : INFINITY;
  }
  // The pass over the chunks is instantiated per block size (the block sums are in registers).
  switch (tpb) {
    case 1: run_pass(std::integral_constant<int, 1>(), std::integral_constant<int, 1>()); break;
    case 2: run_pass(std::integral_constant<int, 1>(), std::integral_constant<int, 2>()); break;
    case 4: run_pass(std::integral_constant<int, 1>(), std::integral_constant<int, 4>()); break;
    case 8: run_pass(std::integral_constant<int, 1>(), std::integral_constant<int, 8>()); break;
    case 16: run_pass(std::integral_constant<int, 1>(), std::integral_constant<int, 16>()); break;
    case 32: run_pass(std::integral_constant<int, 1>(), std::integral_constant<int, 32>()); break;
    default: run_pass(std::integral_constant<int, 1>(), std::integral_constant<int, 64>()); break;
  }

  // top_n rounds of arg-max over the list heads of the query's lanes (lanes xor 1, 2 of the
  // quad when LQ > 1, and the gid lanes xor 4, 8, 16), per slot. The owner of the winner pops
  // its head.
  const int pins = N - top_n;
#pragma unroll
  for (int sl = 0; sl < NS; ++sl) {
    // Real entries are lv[pins ..]: move them to the front as 64-bit keys (0 = empty).
    Key lk[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float v = -INFINITY;
      int c = -1;
#pragma unroll
      for (int j = k; j < N; ++j)
        if (j - k == pins) {
          v = lv[sl][j];
          c = lc[sl][j];
        }
      lk[k] = entry_key(v, c);
    }
    int chosen[kMaxTop];
#pragma unroll
    for (int r = 0; r < kMaxTop; ++r) {
      chosen[r] = -1;
      if (r < top_n) {  // uniform over the warp
        Key best = lk[0];
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          if (o < 4 && o >= LQ) continue;  // another query's lane of the quad
          const Key other = __shfl_xor_sync(kFullMask, best, o);
          best = other > best ? other : best;
        }
        if (best != 0 && lk[0] == best) {  // each block is offered by one lane only
#pragma unroll
          for (int k = 0; k + 1 < N; ++k) lk[k] = lk[k + 1];
          lk[N - 1] = 0;
        }
        chosen[r] = key_block(best);  // -1 once the candidates run out
      }
    }
    // One lane per query writes: chosen[] is best-first with the -1s at its end; the output
    // is ascending by rank.
    const int64_t i = i0 + warp * QW + (q4 / LQ) * NS + sl;
    if (gid == 0 && q4 % LQ == 0 && i < L) {
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

template <typename T, int DP, int G, int N>
__global__ void __launch_bounds__(kThreads)
    select_mma2_kernel(const SelectParams<T> p, const int64_t C, const int flags) {
  select_mma2_body<T, DP, G, N>(p, C, flags);
}
// Same, capped at 128 registers (4 CTAs / SM).
template <typename T, int DP, int G, int N>
__global__ void __launch_bounds__(kThreads, 4)
    select_mma2_kernel_r128(const SelectParams<T> p, const int64_t C, const int flags) {
  select_mma2_body<T, DP, G, N>(p, C, flags);
}
// Same body at MINB CTAs per SM. Nsight Compute (session 8) showed the r128 kernel
// latency-bound at 4 CTAs per SM (1.04 eligible warps per scheduler, 25% occupancy); more
// CTAs with fewer registers win even where ptxas spills a little (80 registers at 6 CTAs:
// 100-250 bytes at DP <= 64). Selection kernel ms, H100, B=64 Hq=8 bf16, one blossom_attention
// fwd+bwd (benchmarks/results/gpu_h100_2026-11-27k.txt and -27l.txt):
//   G (Hk)   case            previous bounds   4 CTAs   6 CTAs
//   4 (2)    D=16 L=16384    5.23 (r128)       -        4.43
//   4 (2)    D=64 L=4096     0.824 (r128)      -        0.752
//   1 (8)    D=16 L=16384    13.36 (plain)     12.48    13.39
//   1 (8)    D=64 L=4096     2.02 (plain)      1.88     2.82
//   2 (4)    D=16 L=16384    7.19 (r128)       7.12     6.71
//   2 (4)    D=64 L=4096     1.11 (r128)       1.10     1.30
//   8 (1)    D=16 L=16384    4.90 (r128)       4.92     4.29
//   8 (1)    D=64 L=4096     0.798 (r128)      0.797    0.739
// kSelectCtas picks the best measured bound per (DP, G) for top_n <= 4 (N = 4, the default;
// N = 8 spills up to 2 KB at 6 CTAs and was not timed); 0 keeps the kernel's own (plain or
// r128). DP = 32 follows DP = 16 / 64 where both agree (G = 4, 8: not timed, spills as small);
// DP = 128 (3 KB of spills at 6 CTAs) keeps its bounds. BLOSSOM_OPS_CUDA_SELECT_CTAS=old
// (read once) keeps the previous bounds everywhere, for A/B runs.
template <typename T, int DP, int G, int N, int MINB>
__global__ void __launch_bounds__(kThreads, MINB)
    select_mma2_kernel_occ(const SelectParams<T> p, const int64_t C, const int flags) {
  select_mma2_body<T, DP, G, N>(p, C, flags);
}
template <int DP, int G, int N>
constexpr int kSelectCtas = N != 4                              ? 0  // top_n > 4: longer lists, more spills
                            : (G == 4 || G == 8) && DP <= 64   ? 6
                            : G == 2 && DP == 16               ? 6
                            : G == 1 && (DP == 16 || DP == 64) ? 4
                                                               : 0;
// BLOSSOM_OPS_CUDA_SELECT_QLOAD=old (read once): the Q tile staged piece by piece, each load
// right before its store, as before the early loads (A/B).
inline bool select_qload_old() {
  static const bool old = env_equals("BLOSSOM_OPS_CUDA_SELECT_QLOAD", "old");
  return old;
}
inline bool select_ctas_old() {
  static const bool old = env_equals("BLOSSOM_OPS_CUDA_SELECT_CTAS", "old");
  return old;
}
// Where ptxas fits the cap without spills (nvcc 13, sm_90, scripts/nvcc_check.sh with
// PTXAS_VERBOSE=1 on the whole translation unit): G >= 4 (120-128 registers; at DP = 128 and
// N = 8 only G = 4, 8: G = 16 spills 12 bytes), and G = 2 at DP <= 32 (123-128) or DP = 64
// with N = 4 (128). The others keep the plain bounds: G = 2 at DP = 64 with N = 8 and at
// DP = 128 take 160-168 registers, G = 1 (4 lists per thread) 152-243.
template <int DP, int G, int N>
constexpr bool kCapRegs = (G >= 4 && !(DP == 128 && N == 8 && G == 16)) ||
                          (G == 2 && (DP <= 32 || (DP == 64 && N == 4)));

template <int DP, int G, int N, typename T>
bool launch_tc(const SelectParams<T>& p, int64_t C, cudaStream_t stream) {
  using Lay = TcLayout<DP>;
  const int64_t bytes = Lay::bytes(C);
  // Device limit and opt-in once per device / kernel (cuda/launch_cache.h), not per call.
  if (bytes > current_max_smem_optin()) return false;
  const AttnShape& s = p.shape;
  const int64_t ctas = s.batch * s.kv_heads * ceil_div(s.q_len, 64 / G);
  if (ctas >= (int64_t(1) << 31)) return false;
  // if constexpr: only the chosen variant is instantiated (compile time).
  void (*kernel)(const SelectParams<T>, const int64_t, const int) = nullptr;
  if constexpr (kCapRegs<DP, G, N>) kernel = select_mma2_kernel_r128<T, DP, G, N>;
  else kernel = select_mma2_kernel<T, DP, G, N>;
  if constexpr (kSelectCtas<DP, G, N> > 0) {
    if (!select_ctas_old())
      kernel = select_mma2_kernel_occ<T, DP, G, N, kSelectCtas<DP, G, N>>;
  }
  opt_in_smem(kernel, static_cast<int>(bytes));
  kernel<<<static_cast<unsigned>(ctas), kThreads, static_cast<size_t>(bytes), stream>>>(
      p, C, select_qload_old() ? 0 : 1);
  check_launch("select_blocks_fwd (tensor cores)");
  return true;
}

template <int DP, int N, typename T>
bool dispatch_group(const SelectParams<T>& p, int64_t C, cudaStream_t stream) {
  switch (p.shape.group()) {
    case 1: return launch_tc<DP, 1, N>(p, C, stream);
    case 2: return launch_tc<DP, 2, N>(p, C, stream);
    case 4: return launch_tc<DP, 4, N>(p, C, stream);
    case 8: return launch_tc<DP, 8, N>(p, C, stream);
    case 16: return launch_tc<DP, 16, N>(p, C, stream);
    default: return false;
  }
}

template <int DP, typename T>
bool dispatch_list(const SelectParams<T>& p, int64_t C, cudaStream_t stream) {
  return p.top_n <= 4 ? dispatch_group<DP, 4>(p, C, stream) : dispatch_group<DP, 8>(p, C, stream);
}

}  // namespace

template <typename T>
bool select_blocks_tc_fwd(const SelectParams<T>& p, cudaStream_t stream) {
  if constexpr (std::is_same<T, float>::value) {
    return false;  // fp32 inputs keep the SIMT kernel (tensor cores would round them)
  } else {
    const AttnShape& s = p.shape;
    const int64_t D = s.head_dim, tpb = p.block_size / p.stride;
    // The scale is folded into the exp2 argument and the max is taken on the raw products.
    if (!(s.scale > 0.0) || !std::isfinite(static_cast<float>(s.scale) * kLog2e)) return false;
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
    // 32-bit positions and block indices in the kernel
    if (s.q_len >= (int64_t(1) << 31) || p.block_size >= (int64_t(1) << 31)) return false;
    if (D <= 16) return dispatch_list<16>(p, C, stream);
    if (D <= 32) return dispatch_list<32>(p, C, stream);
    if (D <= 64) return dispatch_list<64>(p, C, stream);
    return dispatch_list<128>(p, C, stream);
  }
}

}  // namespace gpu
}  // namespace blossom
