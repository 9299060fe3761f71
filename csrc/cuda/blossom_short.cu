// Fused blossom_attention for short sequences (R == 2: selected + window branches + gate).
//
// Why: at L ~ 200 the composed op is ~15 small launches, each too small to fill the GPU.
// A dense (b, kv head, query tile) x keys score tile is cheap at this length, and both
// branches share everything but the mask, so one kernel computes S = scale Q K^T once and
// applies both masks to it.
//
// Algebra (a = sigmoid(gate[..., 0]), b = sigmoid(gate[..., 1]) per (query, head) row):
//   forward   P_sel = softmax over the selected mask, P_win = softmax over the window mask
//             (own max / normaliser each); o_x = P_x V; out = a o_sel + b o_win.
//   backward  dP = dO V^T once; delta_sel = a rowsum(dO o_sel), delta_win = b rowsum(dO o_win);
//             dS = P_sel (a dP - delta_sel) + P_win (b dP - delta_win);
//             dQ = scale dS K, dK = scale dS^T Q, dV = (a P_sel + b P_win)^T dO;
//             grad_gate[.., 0] = rowsum(dO o_sel) a (1 - a), [.., 1] likewise with o_win, b.
//
// Masks (DESIGN.md ops 1 and 4), built per (row, 64-key chunk) as two 64-bit masks:
//   selected: valid(j), j <= i if causal, block(j) = i / bs or block(j) in block_idx[b, i, g]
//             (entries < 0 or >= ceil(L / bs) ignored; duplicates are harmless in a bit OR).
//   window:   valid(j), j <= i if causal, |i - j| < window or (dilated, |i - j| a power of 2).
// A row of an invalid query has empty masks: o = 0, lse = -inf, zero gradients. Keys and
// queries that are padded or past L are zero-filled in shared memory (tests put NaN there).
// Every use of P, dS or the gate is guarded by the mask bit, so NaN gate logits on padded
// rows never reach valid rows.
//
// Decomposition. Rows = (query, head of kv group g) pairs, 64 per tile: QT = 64 / G queries
// x G heads (row r -> query q0 + r / G, head g G + r % G; rows >= QT G are dead). 128
// threads = 4 warps. Products on tensor cores through mma.sync m16n8k16 (16-bit in, fp32
// accumulate; fragment layouts in mma_frag.cuh), FlashAttention-2 style: S, P, dP and dS
// live in registers only. A lane (gid = lane / 4, tig = lane % 4) of an n8 tile holds rows
// gid and gid + 8 at columns 2 tig + {0, 1}; the probabilities (or dS) of two adjacent n8
// tiles are exactly the A fragment of the next k16 step, so nothing is transposed or staged.
// Each register step covers kHalf = 32 keys (or query rows): a whole 64-wide chunk of S
// spilled at D = 64. L <= 256 (kMaxLen): a row's masks over all key chunks are at most 4
// (selected, window) uint64 pairs, built once per CTA at the start (no global index loads
// inside the chunk loops).
//   fwd:   CTA per (b, g, query tile); warp w owns rows [16 w, 16 w + 16) (Q as A fragments
//          through ldmatrix). Keys [0, last query] (causal) or [0, L) in chunks of 64, K and
//          V double-buffered in shared memory (cp.async: chunk c + 1 copied while c is
//          computed). Per 32-key step: S = Q K^T (K rows as B fragments), online softmax
//          per branch (row max and sum are butterflies over the row's 4 lanes, accumulators
//          rescaled when the max grows), P_sel V and P_win V (V through ldmatrix.trans).
//          o_sel, o_win, out leave straight from the accumulators as 16-bit pairs.
//   dQ:    CTA per (b, g, query tile): rowsum(dO o_x), grad_gate, per-row (a, b, delta_x,
//          lse2_x) and every chunk's masks into the workspace (96 bytes per row); per key
//          chunk (K, V double-buffered), per 32-key step: S = Q K^T and dP = dO V^T in
//          registers, dS from the row data, dQ += dS K (K through ldmatrix.trans).
//   dK/dV: CTA per (64-key tile, b, g, split s), key tile major (longest causal walks are
//          dispatched first): the key tile's query steps of QT queries
//          (from the tile's first key when causal) are dealt round robin over nsplit CTAs
//          (step t to split t % nsplit; nsplit <= 4 from a load estimate, see dkdv_split;
//          sm_90 only, 1 before). Each step loads Q, dO and the rows' workspace data
//          (double-buffered: step t + 1 is copied while t is computed); warp w owns keys [16 w, 16 w + 16): per 32-row step
//          S^T = K Q^T and dP^T = V dO^T in registers, then dS^T and (a P_sel + b P_win)^T
//          as A fragments of dK += dS^T Q and dV += (..)^T dO (Q, dO through ldmatrix.trans).
//          The nsplit CTAs of a key tile are one thread-block cluster: each stages its fp32
//          partials in its shared memory, and after a cluster barrier CTA s sums rows
//          r % nsplit == s over ranks 0, 1, .. in that order through distributed shared
//          memory. Every output element has one writer and a fixed summation order:
//          deterministic, no atomics, no global partials.
//
// Cost at B=64, Hq=8, Hk=2 (G=4), D=64, L=200, causal: 13 query tiles of 16 queries per
// (b, g), 28 (query tile, 64-key chunk) pairs per (b, g), 128 (b, g):
//   fwd  3 GEMMs of 64x64x64 per pair (QK, P_sel V, P_win V) = 1.6 MFLOP -> 5.6 GFLOP of
//        tensor work; bytes: q 13 MB + k, v 3.3 MB each (re-read from L2 per tile) + out,
//        o_sel, o_win 39 MB + lse 0.8 MB ~ 60 MB of DRAM (13 us at 4.8 TB/s). 1664 CTAs.
//   bwd  dQ: 3 GEMMs per pair; dK/dV: 4 GEMMs per (key tile, query step) pair, 28 steps per
//        (b, g): key tiles 0..3 walk 13, 9, 5, 1 steps (dkdv_split keeps them unsplit at
//        L = 200 and splits in 2 at L = 50) -> ~13 GFLOP; bytes: q, dO, o_sel, o_win, dQ
//        65 MB + k, v, dk, dv 13 MB + workspace 9.8 MB written, re-read per key tile
//        ~ 100 MB.
//   Shared memory (bytes) at D = 16 / 32 / 64: fwd 19584 / 29824 / 50304, dQ 24704 / 36992 /
//   61568, dK/dV 24576 / 36864 / 61440 (two step buffers). Registers (sm_90, nvcc 13, bf16
//   and half alike): fwd 106 / 130 / 164, dQ 114 / 130 / 160, dK/dV 127 / 160 / 167, no
//   spills; launch bounds 3 CTAs per SM for all three (12 warps). D = 128 is left to the
//   generic path.
//   Instruction diet (2026-11-27, from SASS and ncu: at D = 64 the three kernels issued
//   29-38 M warp-instructions, issue slots 38-47% busy, 0.5-0.7 eligible warps per
//   scheduler, so both the count and the latency mattered): loaders with fixed per-thread
//   16-byte pieces (Pieces), masks built once per row for two chunks, double-buffered dK/dV
//   query steps, fast_exp2 and selects instead of exp2f behind branches (forward and dQ).
//   Per 64-key chunk at D = 64 the forward went from 2,311 to 1,046 warp-instructions.
//   Measured (H100, benchmarks/profile_gpu.py, kernel time per fwd+bwd, B=64 L=200,
//   benchmarks/results/gpu_h100_2026-11-27e_short_loads.txt): D=64 0.321 -> 0.236 ms
//   (fwd 0.097 -> 0.069, dQ 0.101 -> 0.068, dK/dV 0.114 -> 0.090, select 0.009); D=16
//   0.185 -> 0.143. Flash SDPA fwd+bwd, same shape: 0.231 ms.
//   Tried and not kept: launch bounds of 4 CTAs per SM for the forward and dQ (48 bytes
//   spilled in the forward; forward 0.097 -> 0.096 ms, dQ 0.100 -> 0.107, H200, before the
//   diet); fast_exp2 / selects in the dK/dV kernel (16-20 bytes of spills at D = 64). Branch
//   `short-bwd-one` (not merged): dQ and dK/dV in one launch with ready flags, written
//   before the diet; its dispatch model's main gain, the key-tile-major dK/dV grid, is here.
#include <cooperative_groups.h>

#include <cmath>
#include <cstdlib>

#include "cuda/blossom_short.h"
#include "cuda/common.cuh"
#include "cuda/cp_async.cuh"
#include "cuda/launch_cache.h"
#include "cuda/mma_frag.cuh"

namespace blossom {
namespace gpu {
namespace {

using namespace detail;

constexpr int kRows = 64;     // (query, head) rows per tile
constexpr int kKeys = 64;     // keys per chunk (one 64-bit mask per row)
constexpr int kThreads = 128; // 4 warps, 16 rows each
// Keys (forward, dQ) or query rows (dK/dV) per register step: one step's S and dP are
// kHalf / 8 n8 tiles per lane (a whole 64-wide chunk in registers spills at D = 64).
constexpr int kHalf = 32;
constexpr int kMaxChunks = 4;    // L <= 256 (kMaxLen): at most 4 key chunks per row
constexpr int kMaxLen = kMaxChunks * kKeys;
constexpr int kSplitMax = 4;     // CTAs (one thread-block cluster) per dK/dV key tile
// Workspace per (b, i, query head) row, 96 bytes: floats a, b, dsel, dwin, lse2s, lse2w, 0, 0
// then kMaxChunks (selected, window) uint64 mask pairs (one 16-byte piece per key chunk).
constexpr int kWsFloats = 8 + kMaxChunks * 4;
constexpr int kRowD = 12;        // dK/dV shared row data: 8 floats + this chunk's mask pair

constexpr int up128(int x) { return (x + 127) / 128 * 128; }

template <int D>
struct Lay {
  static constexpr int kLdH = D + 8;  // 16-bit rows of Q, K, V, dO (padding against conflicts)
  static constexpr int kLdO = D + 4;  // float staging of D-wide results (dK/dV partials)
  static constexpr int kTile = up128(kRows * kLdH * 2);
  static constexpr int kStage = kRows * kLdO * 4;  // one D-wide float staging tile
  static constexpr int kBits = kMaxChunks * 2 * kRows * 8;  // masks of every key chunk
  static constexpr int kRowF = 8 * kRows * 4;               // per-row floats
  static constexpr int kVw = 128;                           // key validity words
  static constexpr int kRowDB = kRows * kRowD * 4;          // dK/dV per-step row data
};

// Mask parameters of one problem (both branches), as ints: L is short here.
struct ShortMask {
  int L = 0, C = 0, n = 0;
  int64_t bs = 16, window = 8;
  bool dilated = true, causal = true;
  const int32_t* idx = nullptr;
  int64_t isb = 0, isl = 0, ish = 0;
  Validity valid;
};

// Bits of the keys [lo, hi) inside the chunk [j0, j0 + 64).
__device__ __forceinline__ uint64_t range_bits(int64_t lo, int64_t hi, int64_t j0) {
  lo = lo > j0 ? lo : j0;
  hi = hi < j0 + kKeys ? hi : j0 + kKeys;
  if (lo >= hi) return 0ull;
  const int w = static_cast<int>(hi - lo);
  const uint64_t m = w >= 64 ? ~0ull : ((1ull << w) - 1ull);
  return m << static_cast<int>(lo - j0);
}

// Selected and window masks of valid query i (head group g) over the key chunks c0 and
// c0 + 2, the two a build_bits thread owns (kMaxChunks = 4 = 2 x kThreads / kRows); lim[k]
// is chunk k's key validity (0 for a chunk past the last). The row's block indices are read
// once for both chunks (per chunk and row they were re-read: ~12% of the forward's
// instructions went to building masks).
__device__ __forceinline__ void row_bits(const ShortMask& m, int64_t b, int i, int g, int c0,
                                         uint64_t (&lim)[2], uint64_t (&sel)[2],
                                         uint64_t (&win)[2]) {
  int j0[2];
  uint64_t s[2], w[2];
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    j0[k] = (c0 + 2 * k) * kKeys;
    if (m.causal) {
      if (i < j0[k]) lim[k] = 0ull;
      else if (i - j0[k] < 63) lim[k] &= (2ull << (i - j0[k])) - 1ull;  // keys j0 .. i
    }
    const int64_t own = i / m.bs;
    s[k] = range_bits(own * m.bs, own * m.bs + m.bs, j0[k]);
    w[k] = range_bits(int64_t(i) - m.window + 1,
                      m.causal ? int64_t(i) + 1 : int64_t(i) + m.window, j0[k]);
  }
  if ((lim[0] | lim[1]) == 0ull) {
    sel[0] = sel[1] = win[0] = win[1] = 0ull;
    return;
  }
  const int32_t* row = m.idx + b * m.isb + int64_t(i) * m.isl + int64_t(g) * m.ish;
  for (int t = 0; t < m.n; ++t) {
    const int c = row[t];
    if (c >= 0 && c < m.C) {
#pragma unroll
      for (int k = 0; k < 2; ++k)
        s[k] |= range_bits(int64_t(c) * m.bs, int64_t(c + 1) * m.bs, j0[k]);
    }
  }
  if (m.dilated) {
    for (int p = 1; p < m.L; p <<= 1) {  // distances 1, 2, 4, ... <= L - 1
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const unsigned dl = unsigned(i - p - j0[k]), dr = unsigned(i + p - j0[k]);
        if (dl < unsigned(kKeys)) w[k] |= 1ull << dl;
        if (!m.causal && dr < unsigned(kKeys)) w[k] |= 1ull << dr;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    sel[k] = s[k] & lim[k];
    win[k] = w[k] & lim[k];
  }
}

__device__ __forceinline__ uint64_t vbits(const unsigned* vw) {
  return uint64_t(vw[0]) | (uint64_t(vw[1]) << 32);
}

// Piece assignment of the 64-row loaders below: thread t copies the 16-byte piece
// c = t % kPer of rows t / kPer + k kStep (k < kIters). Fixed per thread, so a row's address
// is one multiply-add and no piece index is divided (the lambda-per-piece loader this
// replaces spent ~58 instructions per piece, ~25% of the forward's instructions at D = 64).
template <int D>
struct Pieces {
  static constexpr int kPer = D / 8;              // 16-byte pieces per row
  static constexpr int kStep = kThreads / kPer;   // rows between a thread's pieces
  static constexpr int kIters = kRows / kStep;    // pieces per thread
  static_assert(kThreads % kPer == 0 && kRows % kStep == 0, "bad piece split");
};

// Keys j0 .. j0 + 63 (kv head g) of x into dst (ld D + 8); keys past L or padded are
// zero-filled (cp.async with source size 0: no branch per piece).
template <int D, typename E, typename T>
__device__ __forceinline__ void load_key_rows(E* dst, const Bshd<const T>& x, const ShortMask& m,
                                              int64_t b, int g, int j0) {
  using P = Pieces<D>;
  const int c = threadIdx.x % P::kPer, r0 = threadIdx.x / P::kPer;
  const int64_t row_bytes = x.stride_l * int64_t(sizeof(T));
  const char* base = reinterpret_cast<const char*>(x.at(b, 0, g)) + c * 16;
  const char* src = base + (j0 + r0) * row_bytes;
  const bool* vp = m.valid.ptr != nullptr ? m.valid.ptr + b * m.valid.stride_b : nullptr;
  E* d = dst + r0 * Lay<D>::kLdH + c * 8;
#pragma unroll
  for (int k = 0; k < P::kIters; ++k) {
    const int j = j0 + r0 + k * P::kStep;
    const bool ok = j < m.L && (vp == nullptr || vp[j]);
    cp_async16_zfill(d + k * P::kStep * Lay<D>::kLdH, ok ? src : base, ok);
    src += P::kStep * row_bytes;
  }
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + __expf(-x)); }

// Row r of a query-side tile: query q0 + r / G, head g G + r % G. live: the row exists
// (r < QT G, query < L); ok: live and the query is valid.
struct RowId {
  int i;
  int64_t h;
  bool live, ok;
};
__device__ __forceinline__ RowId row_id(const ShortMask& m, int64_t b, int g, int G, int QT,
                                        int q0, int r) {
  RowId id;
  const int qq = r / G;
  id.i = q0 + qq;
  id.h = int64_t(g) * G + r % G;
  id.live = qq < QT && id.i < m.L;
  id.ok = id.live && m.valid(b, id.i);
  return id;
}

// The 64 query-side rows (query q0 + r / G, head g G + r % G) of x into dst; rows of
// padded or out-of-range queries are zero-filled. Same piece split as load_key_rows; the
// thread's rows advance by kStep, so (query, head) advance by (kStep / G, kStep % G) with a
// carry: one division per call instead of one per piece.
template <int D, typename E, typename T>
__device__ __forceinline__ void load_query_rows(E* dst, const Bshd<const T>& x, const ShortMask& m,
                                                int64_t b, int g, int G, int QT, int q0) {
  using P = Pieces<D>;
  const int c = threadIdx.x % P::kPer, r0 = threadIdx.x / P::kPer;
  const unsigned uG = unsigned(G);
  unsigned qq = unsigned(r0) / uG, hh = unsigned(r0) - qq * uG;
  const unsigned dq = unsigned(P::kStep) / uG, dh = unsigned(P::kStep) - dq * uG;
  const int64_t row_bytes = x.stride_l * int64_t(sizeof(T));
  const int64_t head_bytes = x.stride_h * int64_t(sizeof(T));
  const char* base = reinterpret_cast<const char*>(x.at(b, q0, int64_t(g) * G)) + c * 16;
  const bool* vp = m.valid.ptr != nullptr ? m.valid.ptr + b * m.valid.stride_b : nullptr;
  E* d = dst + r0 * Lay<D>::kLdH + c * 8;
#pragma unroll
  for (int k = 0; k < P::kIters; ++k) {
    const int i = q0 + int(qq);
    const bool ok = int(qq) < QT && i < m.L && (vp == nullptr || vp[i]);
    const char* src = base + int64_t(qq) * row_bytes + int64_t(hh) * head_bytes;
    cp_async16_zfill(d + k * P::kStep * Lay<D>::kLdH, ok ? src : base, ok);
    qq += dq;
    hh += dh;
    if (hh >= uG) {
      hh -= uG;
      ++qq;
    }
  }
}

struct Smem {
  unsigned char* base;
  template <typename X>
  __device__ X* at(int off) const { return reinterpret_cast<X*>(base + off); }
};

// Masks of the tile's 64 rows for every key chunk c < nc, once per CTA:
// sBits[(2 c) * 64 + r] = selected, sBits[(2 c + 1) * 64 + r] = window (0 for rows that are
// not valid queries). Contains a __syncthreads; the bits are visible after the caller's next.
__device__ __forceinline__ void build_bits(const ShortMask& m, int64_t b, int g, int G, int QT,
                                           int q0, int nc, unsigned* sVw, uint64_t* sBits) {
  // Key validity words; whole warps per iteration (nc * 64 is a multiple of 32).
  for (int j = threadIdx.x; j < nc * kKeys; j += kThreads) {
    const bool ok = j < m.L && m.valid(b, j);
    const unsigned bal = __ballot_sync(kFullMask, ok);
    if ((threadIdx.x & 31) == 0) sVw[j >> 5] = bal;
  }
  __syncthreads();
  static_assert(kMaxChunks == 2 * (kThreads / kRows), "a thread builds chunks c0 and c0 + 2");
  const int r = threadIdx.x % kRows, c0 = threadIdx.x / kRows;
  if (c0 >= nc) return;
  const RowId id = row_id(m, b, g, G, QT, q0, r);
  uint64_t lim[2], bs[2] = {0ull, 0ull}, bw[2] = {0ull, 0ull};
  lim[0] = vbits(sVw + 2 * c0);
  lim[1] = c0 + 2 < nc ? vbits(sVw + 2 * (c0 + 2)) : 0ull;
  if (id.ok) row_bits(m, b, id.i, g, c0, lim, bs, bw);
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int c = c0 + 2 * k;
    if (c >= nc) break;
    sBits[(2 * c) * kRows + r] = bs[k];
    sBits[(2 * c + 1) * kRows + r] = bw[k];
  }
}

// ------------------------------------------------------------------------- forward
// One pass, online softmax per branch, FlashAttention-2 style: S, P_sel and P_win never
// leave registers.
// Warp w owns rows [16 w, 16 w + 16) (Q as A fragments from shared memory); per 32-key half
// of a 64-key chunk, S = Q K^T is 4 n8 tiles of m16n8k16 (K rows as B through ldmatrix),
// lane (gid, tig) holds rows 16 w + gid and + 8 at columns 8 nt + 2 tig + {0, 1}; a row's
// max and sum are butterflies over its 4 lanes (xor 1, 2). The probabilities of two adjacent
// n8 tiles are exactly the A fragment of the next k16 step of P V (V through
// ldmatrix.trans), so P never goes through shared memory. K and V are double-buffered (chunk
// c + 1 is copied while c is computed). The outputs leave straight from the accumulators as
// 16-bit pairs.
template <int D>
struct FwdMmaLay {
  static constexpr int kTile = Lay<D>::kTile;
  static constexpr int kQ = 0;
  static constexpr int kK = kTile;          // [2] buffers
  static constexpr int kV = 3 * kTile;      // [2] buffers
  static constexpr int kBits = 5 * kTile;   // masks of every key chunk
  static constexpr int kVw = kBits + Lay<D>::kBits;
  static constexpr int kBytes = kVw + Lay<D>::kVw;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 3)
    short_fwd_mma_kernel(const ShortFwdParams<T> p, const ShortMask m, int G, int QT,
                         int n_tiles, float sl2) {
  using E = typename TcElem<T>::type;
  using Ly = FwdMmaLay<D>;
  constexpr int ld = Lay<D>::kLdH;
  constexpr int KD = D / 16;       // k16 steps of S = Q K^T
  constexpr int ND = D / 8;        // n8 tiles of a D-wide output row
  constexpr int NH = kHalf / 8;    // n8 tiles of a 32-key half chunk
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const Smem sm{smem_raw};
  E* sQ = sm.at<E>(Ly::kQ);
  uint64_t* sBits = sm.at<uint64_t>(Ly::kBits);
  unsigned* sVw = sm.at<unsigned>(Ly::kVw);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const int tile = blockIdx.x % n_tiles;
  const int64_t bg = blockIdx.x / n_tiles;
  const int Hk = static_cast<int>(p.shape.kv_heads);
  const int g = static_cast<int>(bg % Hk);
  const int64_t b = bg / Hk;
  const int L = m.L;
  const int q0 = tile * QT;
  const int q_end = q0 + QT < L ? q0 + QT : L;
  const int key_end = m.causal ? q_end : L;
  const int n_chunks = (key_end + kKeys - 1) / kKeys;
  auto kbuf = [&](int c) { return sm.at<E>(Ly::kK + (c & 1) * Ly::kTile); };
  auto vbuf = [&](int c) { return sm.at<E>(Ly::kV + (c & 1) * Ly::kTile); };
  auto load_chunk = [&](int c) {
    load_key_rows<D>(kbuf(c), p.k, m, b, g, c * kKeys);
    load_key_rows<D>(vbuf(c), p.v, m, b, g, c * kKeys);
  };

  load_query_rows<D>(sQ, p.q, m, b, g, G, QT, q0);
  if (n_chunks > 0) load_chunk(0);
  cp_async_commit();
  build_bits(m, b, g, G, QT, q0, n_chunks, sVw, sBits);

  // Lane roles of the ldmatrix addresses (see mma_frag.cuh): A rows / B rows of K (keys x
  // dims, non-transposed) and B rows of V (keys x dims, transposed).
  const int a_off = ((lane & 7) + ((lane >> 3) & 1) * 8) * ld + (lane >> 4) * 8;
  const int kb_off = ((lane & 7) + (lane >> 4) * 8) * ld + ((lane >> 3) & 1) * 8;
  const int vb_off = ((lane & 7) + ((lane >> 3) & 1) * 8) * ld + (lane >> 4) * 8;
  const int r0 = warp * 16 + gid;  // this lane's rows: r0 and r0 + 8

  float os[ND][4], ow[ND][4];
#pragma unroll
  for (int n = 0; n < ND; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) os[n][e] = ow[n][e] = 0.f;
  float ms[2] = {-INFINITY, -INFINITY}, mw[2] = {-INFINITY, -INFINITY};  // log2 domain
  float ls[2] = {0.f, 0.f}, lw[2] = {0.f, 0.f};  // this lane's partial sums

  for (int c = 0; c < n_chunks; ++c) {
    if (c + 1 < n_chunks) {
      load_chunk(c + 1);  // into the buffers chunk c - 1 used (released by the last sync)
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // chunk c (and Q) landed for every thread; masks visible
    const E* sK = kbuf(c);
    const E* sV = vbuf(c);
    const uint64_t* bc = sBits + 2 * c * kRows;
    // Two online-softmax steps of 32 keys per chunk: half the score registers of one
    // 64-key step (at D = 64 the whole chunk's S pushed the kernel into spills). Not
    // unrolled, for the same reason.
#pragma unroll 1
    for (int hk = 0; hk < 2; ++hk) {
      float s[NH][4];
#pragma unroll
      for (int nt = 0; nt < NH; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      // Q fragments re-read from shared memory per k step rather than held in registers.
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t qa[4];
        ldmatrix_x4(qa, sQ + warp * 16 * ld + kk * 16 + a_off);
#pragma unroll
        for (int np = 0; np < NH / 2; ++np) {
          uint32_t bf[4];
          ldmatrix_x4(bf, sK + (hk * kHalf + np * 16) * ld + kk * 16 + kb_off);
          mma16816<E>(s[2 * np], qa, bf[0], bf[1]);
          mma16816<E>(s[2 * np + 1], qa, bf[2], bf[3]);
        }
      }
      // Masks of rows r0 (j = 0) and r0 + 8 (j = 1) over this half; bit 8 nt + e & 1 is
      // column 8 nt + 2 tig + (e & 1) of the half.
      const int sh = hk * kHalf + 2 * tig;
      const uint32_t bsel[2] = {static_cast<uint32_t>(bc[r0] >> sh),
                                static_cast<uint32_t>(bc[r0 + 8] >> sh)};
      const uint32_t bwin[2] = {static_cast<uint32_t>(bc[kRows + r0] >> sh),
                                static_cast<uint32_t>(bc[kRows + r0 + 8] >> sh)};
      float cs[2] = {-INFINITY, -INFINITY}, cw[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < NH; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = e >> 1, bit = 8 * nt + (e & 1);
          const float x = s[nt][e] * sl2;
          s[nt][e] = x;
          if ((bsel[j] >> bit) & 1u) cs[j] = fmaxf(cs[j], x);
          if ((bwin[j] >> bit) & 1u) cw[j] = fmaxf(cw[j], x);
        }
      float as[2], aw[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
          cs[j] = fmaxf(cs[j], __shfl_xor_sync(kFullMask, cs[j], o));
          cw[j] = fmaxf(cw[j], __shfl_xor_sync(kFullMask, cw[j], o));
        }
        const float ns = fmaxf(ms[j], cs[j]), nw = fmaxf(mw[j], cw[j]);
        // Still no key: nothing accumulated yet, keep factor 1 (exp2(-inf - -inf) is NaN).
        as[j] = ns == -INFINITY ? 1.f : fast_exp2(ms[j] - ns);
        aw[j] = nw == -INFINITY ? 1.f : fast_exp2(mw[j] - nw);
        ms[j] = ns;
        mw[j] = nw;
        ls[j] *= as[j];
        lw[j] *= aw[j];
      }
#pragma unroll
      for (int n = 0; n < ND; ++n) {
        os[n][0] *= as[0];
        os[n][1] *= as[0];
        os[n][2] *= as[1];
        os[n][3] *= as[1];
        ow[n][0] *= aw[0];
        ow[n][1] *= aw[0];
        ow[n][2] *= aw[1];
        ow[n][3] *= aw[1];
      }
      // P V per k16 step: the probabilities of n8 tiles 2 k and 2 k + 1 are its A fragment
      // (masked entries exactly 0).
#pragma unroll
      for (int k = 0; k < NH / 2; ++k) {
        uint32_t as4[4], aw4[4];
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int bit = 8 * (2 * k + h);
            const float* x = &s[2 * k + h][2 * j];
            // fast_exp2 unconditionally, then a select: no branch per element (exp2f's
            // range fix-up and a branch around each call were ~1/4 of this loop).
            const float p0 = ((bsel[j] >> bit) & 1u) ? fast_exp2(x[0] - ms[j]) : 0.f;
            const float p1 = ((bsel[j] >> (bit + 1)) & 1u) ? fast_exp2(x[1] - ms[j]) : 0.f;
            const float w0 = ((bwin[j] >> bit) & 1u) ? fast_exp2(x[0] - mw[j]) : 0.f;
            const float w1 = ((bwin[j] >> (bit + 1)) & 1u) ? fast_exp2(x[1] - mw[j]) : 0.f;
            ls[j] += p0 + p1;
            lw[j] += w0 + w1;
            as4[2 * h + j] = pack2<E>(p0, p1);
            aw4[2 * h + j] = pack2<E>(w0, w1);
          }
#pragma unroll
        for (int dp = 0; dp < ND / 2; ++dp) {
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, sV + (hk * kHalf + k * 16) * ld + dp * 16 + vb_off);
          mma16816<E>(os[2 * dp], as4, vb[0], vb[1]);
          mma16816<E>(os[2 * dp + 1], as4, vb[2], vb[3]);
          mma16816<E>(ow[2 * dp], aw4, vb[0], vb[1]);
          mma16816<E>(ow[2 * dp + 1], aw4, vb[2], vb[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with chunk c's buffers before they are refilled
  }

  // Row sums over the 4 lanes of a row (fixed butterfly), normalise, write.
  const int64_t Hq = p.shape.q_heads;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
      ls[j] += __shfl_xor_sync(kFullMask, ls[j], o);
      lw[j] += __shfl_xor_sync(kFullMask, lw[j], o);
    }
    const RowId id = row_id(m, b, g, G, QT, q0, r0 + 8 * j);
    if (!id.live) continue;
    const float is = ls[j] > 0.f ? 1.f / ls[j] : 0.f, iw = lw[j] > 0.f ? 1.f / lw[j] : 0.f;
    const T* gl = p.gate.at(b, id.i, id.h);
    const float ga = sigmoidf(to_float(gl[0])), gb = sigmoidf(to_float(gl[1]));
    const int64_t row = (b * L + id.i) * Hq + id.h;
#pragma unroll
    for (int n = 0; n < ND; ++n) {
      const float s0 = os[n][2 * j] * is, s1 = os[n][2 * j + 1] * is;
      const float w0 = ow[n][2 * j] * iw, w1 = ow[n][2 * j + 1] * iw;
      const int64_t off = row * D + 8 * n + 2 * tig;
      *reinterpret_cast<uint32_t*>(p.o_sel + off) = pack2<E>(s0, s1);
      *reinterpret_cast<uint32_t*>(p.o_win + off) = pack2<E>(w0, w1);
      *reinterpret_cast<uint32_t*>(p.out + off) = pack2<E>(ga * s0 + gb * w0, ga * s1 + gb * w1);
    }
    if (tig == 0) {
      p.lse_sel[row] = ms[j] == -INFINITY ? -INFINITY : (ms[j] + log2f(ls[j])) * kLn2;
      p.lse_win[row] = mw[j] == -INFINITY ? -INFINITY : (mw[j] + log2f(lw[j])) * kLn2;
    }
  }
}

// ------------------------------------------------------------------------- backward: dQ
// dQ prologue: per-row gate, deltas and grad_gate (one thread per row, straight from global
// memory, like gate_fusion's backward: rowsum over every live row, valid or not) into sRow
// and the workspace; every chunk's masks into sBits and the workspace. Ends with a
// __syncthreads (sRow and sBits visible).
template <typename T, int D>
__device__ __forceinline__ void dq_rows_and_masks(const ShortBwdParams<T>& p, const ShortMask& m,
                                                  int64_t b, int g, int G, int QT, int q0,
                                                  int nc_all, float* __restrict__ ws,
                                                  float* sRow, unsigned* sVw, uint64_t* sBits) {
  const int L = m.L;
  const int64_t Hq = p.shape.q_heads;
  const int tid = threadIdx.x;
  if (tid < kRows) {
    const RowId id = row_id(m, b, g, G, QT, q0, tid);
    float ga = 0.f, gb = 0.f, dsel = 0.f, dwin = 0.f, l2s = -INFINITY, l2w = -INFINITY;
    if (id.live) {
      const T* go = p.grad_out.at(b, id.i, id.h);
      const T* os = p.o_sel.at(b, id.i, id.h);
      const T* ow = p.o_win.at(b, id.i, id.h);
      float rs = 0.f, rw = 0.f;
#pragma unroll
      for (int d0 = 0; d0 < D; d0 += kFrag) {
        float fo[kFrag], fs[kFrag], fw[kFrag];
        load8_aligned(go + d0, fo);
        load8_aligned(os + d0, fs);
        load8_aligned(ow + d0, fw);
        rs += dot_frag(fo, fs);
        rw += dot_frag(fo, fw);
      }
      const T* gl = p.gate.at(b, id.i, id.h);
      const float a_ = sigmoidf(to_float(gl[0])), b_ = sigmoidf(to_float(gl[1]));
      const int64_t row = (b * L + id.i) * Hq + id.h;
      p.grad_gate[row * 2 + 0] = from_float<T>(rs * a_ * (1.f - a_));
      p.grad_gate[row * 2 + 1] = from_float<T>(rw * b_ * (1.f - b_));
      if (id.ok) {
        ga = a_;
        gb = b_;
        dsel = a_ * rs;
        dwin = b_ * rw;
        l2s = p.lse_sel[row] * kLog2e;
        l2w = p.lse_win[row] * kLog2e;
      }
      float4* w = reinterpret_cast<float4*>(ws + row * kWsFloats);
      w[0] = make_float4(ga, gb, dsel, dwin);
      w[1] = make_float4(l2s, l2w, 0.f, 0.f);
    }
    sRow[0 * kRows + tid] = ga;
    sRow[1 * kRows + tid] = gb;
    sRow[2 * kRows + tid] = dsel;
    sRow[3 * kRows + tid] = dwin;
    sRow[4 * kRows + tid] = l2s;
    sRow[5 * kRows + tid] = l2w;
  }
  build_bits(m, b, g, G, QT, q0, nc_all, sVw, sBits);
  __syncthreads();
  // Masks of every chunk to the workspace (zero past the last chunk): one 16-byte store each.
  // Thread t writes chunks t / 64 and t / 64 + 2 of row t % 64 (one row_id per thread).
  {
    const int r = tid % kRows;
    const RowId id = row_id(m, b, g, G, QT, q0, r);
    if (id.live) {
      ulonglong2* wb =
          reinterpret_cast<ulonglong2*>(ws + ((b * L + id.i) * Hq + id.h) * kWsFloats + 8);
      for (int c = tid / kRows; c < kMaxChunks; c += kThreads / kRows) {
        const uint64_t bs = c < nc_all ? sBits[(2 * c) * kRows + r] : 0ull;
        const uint64_t bw = c < nc_all ? sBits[(2 * c + 1) * kRows + r] : 0ull;
        wb[c] = make_ulonglong2(bs, bw);
      }
    }
  }
}

// dQ, FlashAttention-2 style (see short_fwd_mma_kernel): per 32-key half, S = Q K^T
// and dP = dO V^T as n8 tiles in registers, dS from the row data, and dS as the A fragment
// of dQ += dS K (K through ldmatrix.trans). K and V double-buffered.
template <int D>
struct DqMmaLay {
  static constexpr int kTile = Lay<D>::kTile;
  static constexpr int kK = 2 * kTile;                     // Q, dO, then K[2], V[2]
  static constexpr int kV = 4 * kTile;
  static constexpr int kBits = 6 * kTile;
  static constexpr int kRow = kBits + Lay<D>::kBits;
  static constexpr int kVw = kRow + Lay<D>::kRowF;
  static constexpr int kBytes = kVw + Lay<D>::kVw;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 3)
    short_dq_mma_kernel(const ShortBwdParams<T> p, const ShortMask m, int G, int QT,
                        int n_tiles, float sl2, float* __restrict__ ws) {
  using E = typename TcElem<T>::type;
  using Ly = DqMmaLay<D>;
  constexpr int ld = Lay<D>::kLdH;
  constexpr int KD = D / 16, ND = D / 8, NH = kHalf / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const Smem sm{smem_raw};
  E* sQ = sm.at<E>(0);
  E* sDO = sm.at<E>(Lay<D>::kTile);
  uint64_t* sBits = sm.at<uint64_t>(Ly::kBits);
  float* sRow = sm.at<float>(Ly::kRow);
  unsigned* sVw = sm.at<unsigned>(Ly::kVw);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const int tile = blockIdx.x % n_tiles;
  const int64_t bg = blockIdx.x / n_tiles;
  const int Hk = static_cast<int>(p.shape.kv_heads);
  const int g = static_cast<int>(bg % Hk);
  const int64_t b = bg / Hk;
  const int L = m.L;
  const int64_t Hq = p.shape.q_heads;
  const int q0 = tile * QT;
  const int q_end = q0 + QT < L ? q0 + QT : L;
  const int key_end = m.causal ? q_end : L;
  const int n_chunks = (key_end + kKeys - 1) / kKeys;
  const int nc_all = (L + kKeys - 1) / kKeys;  // the dK/dV kernel reads every chunk's masks
  auto kbuf = [&](int c) { return sm.at<E>(Ly::kK + (c & 1) * Ly::kTile); };
  auto vbuf = [&](int c) { return sm.at<E>(Ly::kV + (c & 1) * Ly::kTile); };
  auto load_chunk = [&](int c) {
    load_key_rows<D>(kbuf(c), p.k, m, b, g, c * kKeys);
    load_key_rows<D>(vbuf(c), p.v, m, b, g, c * kKeys);
  };

  load_query_rows<D>(sQ, p.q, m, b, g, G, QT, q0);
  load_query_rows<D>(sDO, p.grad_out, m, b, g, G, QT, q0);
  if (n_chunks > 0) load_chunk(0);
  cp_async_commit();
  dq_rows_and_masks<T, D>(p, m, b, g, G, QT, q0, nc_all, ws, sRow, sVw, sBits);

  const int a_off = ((lane & 7) + ((lane >> 3) & 1) * 8) * ld + (lane >> 4) * 8;
  const int kb_off = ((lane & 7) + (lane >> 4) * 8) * ld + ((lane >> 3) & 1) * 8;
  const int kt_off = ((lane & 7) + ((lane >> 3) & 1) * 8) * ld + (lane >> 4) * 8;
  const int r0 = warp * 16 + gid;  // this lane's rows: r0 and r0 + 8
  float ga[2], gb[2], dsel[2], dwin[2], l2s[2], l2w[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int r = r0 + 8 * j;
    ga[j] = sRow[r];
    gb[j] = sRow[kRows + r];
    dsel[j] = sRow[2 * kRows + r];
    dwin[j] = sRow[3 * kRows + r];
    l2s[j] = sRow[4 * kRows + r];
    l2w[j] = sRow[5 * kRows + r];
  }
  float dq[ND][4];
#pragma unroll
  for (int n = 0; n < ND; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;

  for (int c = 0; c < n_chunks; ++c) {
    if (c + 1 < n_chunks) {
      load_chunk(c + 1);  // into the buffers chunk c - 1 used (released by the last sync)
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // chunk c (and Q, dO) landed for every thread
    const E* sK = kbuf(c);
    const E* sV = vbuf(c);
    const uint64_t* bc = sBits + 2 * c * kRows;
#pragma unroll 1
    for (int hk = 0; hk < 2; ++hk) {
      float sc[NH][4], dp[NH][4];
#pragma unroll
      for (int nt = 0; nt < NH; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t qa[4], oa[4];
        ldmatrix_x4(qa, sQ + warp * 16 * ld + kk * 16 + a_off);
        ldmatrix_x4(oa, sDO + warp * 16 * ld + kk * 16 + a_off);
#pragma unroll
        for (int np = 0; np < NH / 2; ++np) {
          uint32_t kf[4], vf[4];
          ldmatrix_x4(kf, sK + (hk * kHalf + np * 16) * ld + kk * 16 + kb_off);
          ldmatrix_x4(vf, sV + (hk * kHalf + np * 16) * ld + kk * 16 + kb_off);
          mma16816<E>(sc[2 * np], qa, kf[0], kf[1]);
          mma16816<E>(sc[2 * np + 1], qa, kf[2], kf[3]);
          mma16816<E>(dp[2 * np], oa, vf[0], vf[1]);
          mma16816<E>(dp[2 * np + 1], oa, vf[2], vf[3]);
        }
      }
      const int sh = hk * kHalf + 2 * tig;
      const uint32_t bsel[2] = {static_cast<uint32_t>(bc[r0] >> sh),
                                static_cast<uint32_t>(bc[r0 + 8] >> sh)};
      const uint32_t bwin[2] = {static_cast<uint32_t>(bc[kRows + r0] >> sh),
                                static_cast<uint32_t>(bc[kRows + r0 + 8] >> sh)};
      // dS = P_sel (a dP - delta_sel) + P_win (b dP - delta_win), exactly 0 off both masks;
      // tiles 2 k and 2 k + 1 form the A fragment of k16 step k of dQ += dS K.
#pragma unroll
      for (int k = 0; k < NH / 2; ++k) {
        uint32_t da[4];
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            float d2[2];
#pragma unroll
            for (int u = 0; u < 2; ++u) {
              const int e = 2 * j + u, bit = 8 * (2 * k + h) + u;
              const float x = sc[2 * k + h][e] * sl2, dpv = dp[2 * k + h][e];
              // Both exponentials unconditionally and selects (no branches): a masked
              // entry's factor is exactly 0 (never inf * 0: the select drops it).
              const float ps = ((bsel[j] >> bit) & 1u) ? fast_exp2(x - l2s[j]) : 0.f;
              const float pw = ((bwin[j] >> bit) & 1u) ? fast_exp2(x - l2w[j]) : 0.f;
              d2[u] = ps * (ga[j] * dpv - dsel[j]) + pw * (gb[j] * dpv - dwin[j]);
            }
            da[2 * h + j] = pack2<E>(d2[0], d2[1]);
          }
#pragma unroll
        for (int dpair = 0; dpair < ND / 2; ++dpair) {
          uint32_t kb[4];
          ldmatrix_x4_trans(kb, sK + (hk * kHalf + k * 16) * ld + dpair * 16 + kt_off);
          mma16816<E>(dq[2 * dpair], da, kb[0], kb[1]);
          mma16816<E>(dq[2 * dpair + 1], da, kb[2], kb[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with chunk c's buffers before they are refilled
  }

  const float scale = static_cast<float>(p.shape.scale);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const RowId id = row_id(m, b, g, G, QT, q0, r0 + 8 * j);
    if (!id.live) continue;
    const int64_t row = (b * L + id.i) * Hq + id.h;
#pragma unroll
    for (int n = 0; n < ND; ++n)
      *reinterpret_cast<uint32_t*>(p.grad_q + row * D + 8 * n + 2 * tig) =
          pack2<E>(scale * dq[n][2 * j], scale * dq[n][2 * j + 1]);
  }
}

// ------------------------------------------------------------------------- backward: dK/dV
// One query step of short_dkdv_kernel (see there): dK (mk) and dV (mv)
// of warp w's 16 keys += the products with this step's 64 query rows.
template <typename T, int D>
__device__ __forceinline__ void dkdv_step_mma(const typename TcElem<T>::type* sK,
                                              const typename TcElem<T>::type* sV,
                                              const typename TcElem<T>::type* sQ,
                                              const typename TcElem<T>::type* sDO,
                                              const float* sRd, float sl2, float (&mk)[D / 8][4],
                                              float (&mv)[D / 8][4]) {
  using E = typename TcElem<T>::type;
  constexpr int ld = Lay<D>::kLdH;
  constexpr int KD = D / 16, ND = D / 8, NH = kHalf / 8;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const int a_off = ((lane & 7) + ((lane >> 3) & 1) * 8) * ld + (lane >> 4) * 8;
  const int b_off = ((lane & 7) + (lane >> 4) * 8) * ld + ((lane >> 3) & 1) * 8;
  const int t_off = ((lane & 7) + ((lane >> 3) & 1) * 8) * ld + (lane >> 4) * 8;
  const int key0 = warp * 16 + gid;  // this lane's keys (in the tile): key0 and key0 + 8
#pragma unroll 1
  for (int hr = 0; hr < 2; ++hr) {  // 32 query rows at a time
    float st[NH][4], dpt[NH][4];
#pragma unroll
    for (int nt = 0; nt < NH; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      uint32_t ka[4], va[4];
      ldmatrix_x4(ka, sK + warp * 16 * ld + kk * 16 + a_off);
      ldmatrix_x4(va, sV + warp * 16 * ld + kk * 16 + a_off);
#pragma unroll
      for (int np = 0; np < NH / 2; ++np) {
        uint32_t qf[4], of[4];
        ldmatrix_x4(qf, sQ + (hr * kHalf + np * 16) * ld + kk * 16 + b_off);
        ldmatrix_x4(of, sDO + (hr * kHalf + np * 16) * ld + kk * 16 + b_off);
        mma16816<E>(st[2 * np], ka, qf[0], qf[1]);
        mma16816<E>(st[2 * np + 1], ka, qf[2], qf[3]);
        mma16816<E>(dpt[2 * np], va, of[0], of[1]);
        mma16816<E>(dpt[2 * np + 1], va, of[2], of[3]);
      }
    }
    // dS^T and (a P_sel + b P_win)^T; tiles 2 k and 2 k + 1 are the A fragment of k16 step k.
#pragma unroll
    for (int k = 0; k < NH / 2; ++k) {
      uint32_t da[4], ca[4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float ds[4], pc[4];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int r = hr * kHalf + 8 * (2 * k + h) + 2 * tig + u;  // query row of the step
          const float* rd = sRd + r * kRowD;
          const float4 r0 = *reinterpret_cast<const float4*>(rd);      // a, b, dsel, dwin
          const float2 r1 = *reinterpret_cast<const float2*>(rd + 4);  // lse2 sel, win
          const uint64_t* rb = reinterpret_cast<const uint64_t*>(rd + 8);
          const uint64_t bs = rb[0], bw = rb[1];
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int e = 2 * j + u, key = key0 + 8 * j;
            const float x = st[2 * k + h][e] * sl2, dp = dpt[2 * k + h][e];
            // Branches and exp2f kept here: the dQ kernel's select form with fast_exp2
            // (and even fast_exp2 in this form) spilled 16-20 bytes at D = 64 under the
            // 168-register cap of 3 CTAs per SM (nvcc 13).
            float d = 0.f, c = 0.f;
            if ((bs >> key) & 1ull) {
              const float ps = exp2f(x - r1.x);
              d += ps * (r0.x * dp - r0.z);
              c += r0.x * ps;
            }
            if ((bw >> key) & 1ull) {
              const float pw = exp2f(x - r1.y);
              d += pw * (r0.y * dp - r0.w);
              c += r0.y * pw;
            }
            ds[e] = d;
            pc[e] = c;
          }
        }
        da[2 * h] = pack2<E>(ds[0], ds[1]);
        da[2 * h + 1] = pack2<E>(ds[2], ds[3]);
        ca[2 * h] = pack2<E>(pc[0], pc[1]);
        ca[2 * h + 1] = pack2<E>(pc[2], pc[3]);
      }
#pragma unroll
      for (int dp2 = 0; dp2 < ND / 2; ++dp2) {
        uint32_t qb[4], ob[4];
        ldmatrix_x4_trans(qb, sQ + (hr * kHalf + k * 16) * ld + dp2 * 16 + t_off);
        ldmatrix_x4_trans(ob, sDO + (hr * kHalf + k * 16) * ld + dp2 * 16 + t_off);
        mma16816<E>(mk[2 * dp2], da, qb[0], qb[1]);
        mma16816<E>(mk[2 * dp2 + 1], da, qb[2], qb[3]);
        mma16816<E>(mv[2 * dp2], ca, ob[0], ob[1]);
        mma16816<E>(mv[2 * dp2 + 1], ca, ob[2], ob[3]);
      }
    }
  }
}

// dK/dV: K, V tiles, then two step buffers of (Q, dO, row data: kRows x kRowD floats). After
// the query walk (its last __syncthreads and cp_async_wait<0>, when the step buffers are
// dead) the fp32 dK, dV partials (2 x kRows x (D + 4) floats) are staged from the first
// buffer on. Bytes at D = 16 / 32 / 64: 24576 / 36864 / 61440; 3 CTAs per SM (set by the
// registers; 3 x 61440 fits the 227 KB of an SM).
template <int D>
struct DkdvLay {
  static constexpr int kTile = Lay<D>::kTile;
  static constexpr int kK = 0;
  static constexpr int kV = kTile;
  // Two step buffers (Q, dO, row data): step t + 1 is copied while step t is computed.
  static constexpr int kStep = 2 * kTile + Lay<D>::kRowDB;
  static constexpr int kQ = 2 * kTile;  // + buf * kStep
  static constexpr int kDO = kQ + kTile;
  static constexpr int kRd = kQ + 2 * kTile;
  static constexpr int kStage = kQ;
  static constexpr int kWalk = kQ + 2 * kStep;                 // used during the query walk
  static constexpr int kStaged = kStage + 2 * Lay<D>::kStage;  // used after it
  static constexpr int kBytes = kWalk > kStaged ? kWalk : kStaged;
};
static_assert(DkdvLay<16>::kBytes == 24576 && DkdvLay<32>::kBytes == 36864 &&
                  DkdvLay<64>::kBytes == 61440,
              "dK/dV shared memory changed: update the comments (and check occupancy)");

// CTA (b, g, key tile, split s of nsplit): the query steps q0 = first + t QT of the key
// tile with t % nsplit == s. The nsplit CTAs of a key tile form one thread-block cluster
// (sm_90); each stages its fp32 partial dK, dV in its own shared memory and, after a
// cluster barrier, CTA s sums the rows r % nsplit == s over the ranks 0, 1, .., nsplit - 1
// in that order (distributed shared memory): deterministic, no atomics, no global partials.
// The per-step products are FlashAttention-2 style on mma.sync (dkdv_step_mma). Warp w owns
// keys [16 w, 16 w + 16) of the tile: S^T = K Q^T and dP^T = V dO^T per 32-row half as n8
// tiles of query rows in registers (lane (gid, tig): keys 16 w + gid and + 8, rows
// 8 nt + 2 tig + {0, 1}), each element's row data read from sRd, and dS^T and
// (a P_sel + b P_win)^T are directly the A fragments of dK += dS^T Q and dV += (..)^T dO
// (Q, dO through ldmatrix.trans).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 3)  // 3 CTAs per SM: <= 168 registers
    short_dkdv_kernel(const ShortBwdParams<T> p, const ShortMask m, int G, int QT, int n_ktiles,
                      int nsplit, float sl2, const float* __restrict__ ws) {
  using E = typename TcElem<T>::type;
  using Ly = DkdvLay<D>;
  constexpr int ldo = Lay<D>::kLdO;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const Smem sm{smem_raw};
  E* sK = sm.at<E>(Ly::kK);
  E* sV = sm.at<E>(Ly::kV);
  // dK, dV partials after the walk, from Q on (static_assert in DkdvLay); same offsets in
  // every CTA of a cluster, which the reduction relies on.
  float* sSk = sm.at<float>(Ly::kStage);
  float* sSv = sSk + kRows * ldo;

  const int tid = threadIdx.x, warp = tid >> 5;
  // Grid order: key tile major, so every (b, g)'s key tile 0 (the longest walk when causal)
  // is dispatched first and the short walks fill the SMs at the end; the nsplit CTAs of one
  // (key tile, b, g) stay consecutive (one cluster).
  const int split = static_cast<int>(blockIdx.x % nsplit);
  const int64_t n_bg = gridDim.x / (int64_t(nsplit) * n_ktiles);
  const int64_t tile_bg = blockIdx.x / nsplit;
  const int kt = static_cast<int>(tile_bg / n_bg);
  const int64_t bg = tile_bg % n_bg;
  const int Hk = static_cast<int>(p.shape.kv_heads);
  const int g = static_cast<int>(bg % Hk);
  const int64_t b = bg / Hk;
  const int L = m.L;
  const int64_t Hq = p.shape.q_heads;
  const int k0 = kt * kKeys;

  load_key_rows<D>(sK, p.k, m, b, g, k0);
  load_key_rows<D>(sV, p.v, m, b, g, k0);
  cp_async_commit();

  float mk[D / 8][4], mv[D / 8][4];  // dK, dV accumulators: keys (rows) x head dims, C layout
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) mk[n][e] = mv[n][e] = 0.f;

  // Queries below k0 see no key of this tile when causal. Step q0's Q, dO and row data go
  // to buffer buf; the next step's copies are in flight while this one is computed (one
  // step at a time left ~1 us of load latency exposed per step, 13 steps at L = 200).
  auto issue_step = [&](int q0, int buf) {
    E* bq = sm.at<E>(Ly::kQ + buf * Ly::kStep);
    E* bdo = sm.at<E>(Ly::kDO + buf * Ly::kStep);
    float* brd = sm.at<float>(Ly::kRd + buf * Ly::kStep);
    load_query_rows<D>(bq, p.q, m, b, g, G, QT, q0);
    load_query_rows<D>(bdo, p.grad_out, m, b, g, G, QT, q0);
    // Row data from the dQ pass's workspace: (a, b, dsel, dwin), (lse2s, lse2w, -, -), and
    // this key tile's mask pair; zero for rows that are not valid queries (empty masks).
    // Thread t copies part t / 64 of row t % 64, threads t < 64 part 2 as well.
    const int r = tid % kRows;
    const RowId id = row_id(m, b, g, G, QT, q0, r);
    const float* src = ws + ((b * L + id.i) * Hq + id.h) * kWsFloats;
    for (int part = tid / kRows; part < 3; part += 2)
      cp_async16_zfill(brd + r * kRowD + part * 4,
                       id.ok ? src + (part < 2 ? part * 4 : 8 + kt * 4) : ws, id.ok);
    cp_async_commit();
  };
  const int first = m.causal ? k0 : 0;
  const int walk = nsplit * QT;
  int buf = 0;
  if (first + split * QT < L) issue_step(first + split * QT, 0);
  for (int q0 = first + split * QT; q0 < L; q0 += walk, buf ^= 1) {
    if (q0 + walk < L) {
      issue_step(q0 + walk, buf ^ 1);  // into the buffer the previous step computed from
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // step q0's rows (and K, V) landed for every thread
    dkdv_step_mma<T, D>(sK, sV, sm.at<E>(Ly::kQ + buf * Ly::kStep),
                        sm.at<E>(Ly::kDO + buf * Ly::kStep),
                        sm.at<float>(Ly::kRd + buf * Ly::kStep), sl2, mk, mv);
    __syncthreads();  // buffer buf is refilled by the next iteration's issue
  }
  cp_async_wait<0>();  // K/V copies of a CTA that walked no query step
  __syncthreads();

  {
    const int lane = tid & 31, gid = lane >> 2, tig = lane & 3;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int off = (warp * 16 + gid + 8 * (e >> 1)) * ldo + 8 * n + 2 * tig + (e & 1);
        sSk[off] = mk[n][e];
        sSv[off] = mv[n][e];
      }
  }
  __syncthreads();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  if (nsplit > 1) cg::this_cluster().sync();  // every partial of the cluster is staged
#endif
  const float scale = static_cast<float>(p.shape.scale);
  constexpr int kPer = D / 8;
  for (int x = tid; x < kRows * kPer; x += kThreads) {
    const int r = x / kPer, d0 = (x % kPer) * 8;
    const int j = k0 + r;
    if (j >= L || r % nsplit != split) continue;
    float dk[kFrag], dv[kFrag];
#pragma unroll
    for (int e = 0; e < kFrag; ++e) dk[e] = dv[e] = 0.f;
    for (int s = 0; s < nsplit; ++s) {  // fixed order over the ranks
      const float* fk = sSk + r * ldo + d0;
      const float* fv = sSv + r * ldo + d0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      if (s != split) {
        fk = cg::this_cluster().map_shared_rank(fk, s);
        fv = cg::this_cluster().map_shared_rank(fv, s);
      }
#endif
#pragma unroll
      for (int e = 0; e < kFrag; ++e) {
        dk[e] += fk[e];
        dv[e] += fv[e];
      }
    }
#pragma unroll
    for (int e = 0; e < kFrag; ++e) dk[e] *= scale;
    const int64_t off = ((b * L + j) * Hk + g) * D + d0;
    store8_aligned(p.grad_k + off, dk);
    store8_aligned(p.grad_v + off, dv);
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (nsplit > 1) cg::this_cluster().sync();  // keep shared memory alive until read
#endif
}

// ------------------------------------------------------------------------- host side
int64_t short_max_len() {
  static const int64_t v = [] {
    const char* e = std::getenv("BLOSSOM_OPS_CUDA_SHORT_MAX_LEN");
    if (e == nullptr || *e == '\0') return int64_t(256);
    return static_cast<int64_t>(std::atoll(e));
  }();
  return v;
}

ShortMask make_mask(const AttnShape& s, const BlockSparseMask& sel, const SlidingWindowMask& win,
                    const Validity& valid) {
  ShortMask m;
  m.L = static_cast<int>(s.q_len);
  m.bs = sel.block_size;
  m.C = static_cast<int>((s.q_len + sel.block_size - 1) / sel.block_size);
  m.n = static_cast<int>(sel.n);
  m.window = win.window;
  m.dilated = win.dilated;
  m.causal = sel.causal;
  m.idx = sel.idx;
  m.isb = sel.stride_b;
  m.isl = sel.stride_l;
  m.ish = sel.stride_h;
  m.valid = valid;
  return m;
}

// The opt-in above 48 KB, once per kernel and device (cuda/launch_cache.h): it was a
// cudaFuncSetAttribute on every launch, 2-3 per training step at short sequences.
template <typename F>
void with_smem(F kernel, int bytes) {
  opt_in_smem(kernel, bytes);
}

template <typename T, int D>
void fwd_d(const ShortFwdParams<T>& p, cudaStream_t stream) {
  const ShortMask m = make_mask(p.shape, p.sel, p.win, p.valid);
  const int G = static_cast<int>(p.shape.group());
  const int QT = kRows / G;
  const int n_tiles = static_cast<int>((p.shape.q_len + QT - 1) / QT);
  const int64_t ctas = p.shape.batch * p.shape.kv_heads * n_tiles;
  const float sl2 = static_cast<float>(p.shape.scale) * kLog2e;
  auto kernel = short_fwd_mma_kernel<T, D>;
  with_smem(kernel, FwdMmaLay<D>::kBytes);
  kernel<<<static_cast<unsigned>(ctas), kThreads, FwdMmaLay<D>::kBytes, stream>>>(
      p, m, G, QT, n_tiles, sl2);
  check_launch("blossom_short_fwd");
}

// CTAs per dK/dV key tile (one cluster). Key tile 0 walks every query step (ceil(L / QT)
// when causal), so unsplit it is the kernel's critical path; but the CTAs of a cluster
// hold their SM slots until the slowest one is done, so a wide split wastes slots on the
// short tiles. Pick the split with the smallest estimate max(critical path, slot-steps /
// slots), slot-steps counting nsplit x (the longest share) per key tile plus kCtaOverhead
// steps of per-CTA overhead (K/V loads, cluster barrier, reduction), 3 CTAs per SM.
// kCtaOverhead = 2 is measured, not derived: dK/dV kernel times on an H200, B=64, G=4
// (ms for split 1 / 2 / 3 / 4): D=64 L=200 0.167 / 0.186 / 0.184 / 0.185, D=16 L=200
// 0.119 / 0.113 / 0.110 / 0.111, D=64 L=50 0.038 / 0.032 / 0.032 / 0.062. With 2 the
// estimate picks 1, 1, 2 there (the old 0.5 picked 2, 2, 4). Clusters need sm_90;
// BLOSSOM_OPS_CUDA_SHORT_SPLIT=n (read once) caps the split (1: off) for A/B runs.
constexpr double kCtaOverhead = 2.0;
int dkdv_split(int L, int QT, int n_ktiles, int64_t bg, bool causal) {
  static const int cap = [] {
    const char* e = std::getenv("BLOSSOM_OPS_CUDA_SHORT_SPLIT");
    if (e == nullptr || *e == '\0') return kSplitMax;
    const int v = std::atoi(e);
    return v < 1 ? 1 : (v > kSplitMax ? kSplitMax : v);
  }();
  // Compute capability and SM count, queried once per device (cuda/launch_cache.h) rather
  // than twice per backward.
  DeviceInfo info;
  if (!current_device_info(info)) {
    (void)cudaGetLastError();  // clear the error; run unsplit
    return 1;
  }
  const int major = info.major, sms = info.sms;
  if (major < 9 || sms < 1) return 1;
  const double slots = 3.0 * sms;
  int best = 1;
  double best_est = 0.0;
  for (int s = 1; s <= cap; ++s) {
    int cp = 0;
    double slot_steps = 0.0;
    for (int kt = 0; kt < n_ktiles; ++kt) {
      const int first = causal ? kt * kKeys : 0;
      const int steps = (L - first + QT - 1) / QT;
      const int share = (steps + s - 1) / s;
      cp = share > cp ? share : cp;
      slot_steps += s * (share + kCtaOverhead);
    }
    const double load = slot_steps * static_cast<double>(bg) / slots;
    const double est = cp > load ? cp : load;
    if (s == 1 || est < best_est) {
      best = s;
      best_est = est;
    }
  }
  return best;
}

template <typename T, int D>
void bwd_d(const ShortBwdParams<T>& p, float* ws, cudaStream_t stream) {
  const ShortMask m = make_mask(p.shape, p.sel, p.win, p.valid);
  const int G = static_cast<int>(p.shape.group());
  const int QT = kRows / G;
  const int n_tiles = static_cast<int>((p.shape.q_len + QT - 1) / QT);
  const int n_ktiles = static_cast<int>((p.shape.q_len + kKeys - 1) / kKeys);
  const int64_t bg = p.shape.batch * p.shape.kv_heads;
  const float sl2 = static_cast<float>(p.shape.scale) * kLog2e;
  auto dq = short_dq_mma_kernel<T, D>;
  with_smem(dq, DqMmaLay<D>::kBytes);
  dq<<<static_cast<unsigned>(bg * n_tiles), kThreads, DqMmaLay<D>::kBytes, stream>>>(
      p, m, G, QT, n_tiles, sl2, ws);
  check_launch("blossom_short_bwd (dq)");
  // Same stream: the dK/dV pass reads the workspace the dQ pass wrote.
  auto dkdv = short_dkdv_kernel<T, D>;
  const int bytes = DkdvLay<D>::kBytes;
  with_smem(dkdv, bytes);
  const int nsplit = dkdv_split(static_cast<int>(p.shape.q_len), QT, n_ktiles, bg, m.causal);
  const unsigned ctas = static_cast<unsigned>(bg * n_ktiles * nsplit);
  const float* cws = ws;
  if (nsplit > 1) {
    // One cluster of nsplit CTAs per key tile (consecutive blockIdx.x): see the kernel.
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(ctas);
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = static_cast<size_t>(bytes);
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(nsplit);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    const cudaError_t err =
        cudaLaunchKernelEx(&cfg, dkdv, p, m, G, QT, n_ktiles, nsplit, sl2, cws);
    BLOSSOM_CHECK(err == cudaSuccess, "blossom_short_bwd (dkdv, cluster of ", nsplit,
                 ") failed to launch: ", cudaGetErrorString(err),
                 " (BLOSSOM_OPS_CUDA_SHORT_SPLIT=1 disables the split)");
  } else {
    dkdv<<<ctas, kThreads, bytes, stream>>>(p, m, G, QT, n_ktiles, 1, sl2, cws);
  }
  check_launch("blossom_short_bwd (dkdv)");
}

}  // namespace

bool blossom_short_eligible(int64_t seq_len, int64_t head_dim, int64_t group) {
  if (detail::simple_kernels_requested()) return false;
  if (seq_len < 1 || seq_len > short_max_len()) return false;
  if (seq_len > kMaxLen) return false;  // masks of at most kMaxChunks key chunks per row
  if (group < 1 || group > kRows) return false;
  // D = 128 would need ~255 registers and spills in the dK/dV and forward kernels.
  return head_dim == 16 || head_dim == 32 || head_dim == 64;
}

template <typename T>
void blossom_short_fwd(const ShortFwdParams<T>& p, cudaStream_t stream) {
  if (p.shape.batch == 0 || p.shape.q_len == 0) return;
  switch (p.shape.head_dim) {
    case 16: return fwd_d<T, 16>(p, stream);
    case 32: return fwd_d<T, 32>(p, stream);
    case 64: return fwd_d<T, 64>(p, stream);
    default: BLOSSOM_CHECK(false, "blossom_short_fwd: unsupported head_dim ", p.shape.head_dim);
  }
}

size_t blossom_short_bwd_workspace_bytes(const AttnShape& s) {
  return static_cast<size_t>(s.batch * s.q_len * s.q_heads) * kWsFloats * sizeof(float);
}

template <typename T>
void blossom_short_bwd(const ShortBwdParams<T>& p, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream) {
  if (p.shape.batch == 0 || p.shape.q_len == 0) return;
  BLOSSOM_CHECK(workspace_bytes >= blossom_short_bwd_workspace_bytes(p.shape),
               "blossom_short_bwd: workspace too small");
  float* ws = static_cast<float*>(workspace);
  switch (p.shape.head_dim) {
    case 16: return bwd_d<T, 16>(p, ws, stream);
    case 32: return bwd_d<T, 32>(p, ws, stream);
    case 64: return bwd_d<T, 64>(p, ws, stream);
    default: BLOSSOM_CHECK(false, "blossom_short_bwd: unsupported head_dim ", p.shape.head_dim);
  }
}

#define BLOSSOM_INSTANTIATE(T)                                                            \
  template void blossom_short_fwd<T>(const ShortFwdParams<T>&, cudaStream_t);            \
  template void blossom_short_bwd<T>(const ShortBwdParams<T>&, void*, size_t, cudaStream_t);
BLOSSOM_INSTANTIATE(c10::Half)
BLOSSOM_INSTANTIATE(c10::BFloat16)
#undef BLOSSOM_INSTANTIATE

}  // namespace gpu
}  // namespace blossom
