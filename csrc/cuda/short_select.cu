// Block compression and top-n block selection of the short path in ONE launch (see the
// header comment at the bottom of this block for costs).
//
// Why: at L <= 256 the fused short kernels take ~0.3 ms per fwd+bwd, and the two small
// launches in front of them (block_compress, then select_blocks) cost ~0.05 ms more, mostly
// ramp-up, tail and a round trip of k_cmp through memory. Here a CTA pools the compressed
// keys it needs into shared memory and scores its queries against them directly.
//
// Semantics: exactly select_blocks(q, block_compress(k, k_pos, valid), ...) (DESIGN.md ops 2
// and 3, csrc/cuda/block_compress.cu, select_blocks_tc.cuh):
//   k_cmp[t] = (sum over the valid j of W_t = [(t+1) S - BL, (t+1) S) ∩ [0, L), in ascending
//     j, of k_j then + k_pos[j - origin]) * (1 / count), fp32, rounded to T; token t is valid
//     when count > 0 (bit-identical to block_compress_fwd: same operations, same order);
//   token t is scored for query i when t < T, valid, its block c = t / tpb holds a valid key,
//     and c < own(i) (causal) or c != own(i); p = softmax over the scored tokens of
//     scale q . k_cmp (base 2 inside), per query head; importance[c] = sum over the G heads
//     of the group (ascending) of the sum over the block's tokens (ascending) of p;
//   candidates: blocks with a valid key, c < own (causal) or c != own, valid query; the
//     top_n by (importance desc, block asc) as packed 64-bit keys (importance bits + 1,
//     ~block; NaN ranks last, as in select_blocks_tc), written ascending, -1 filled; a
//     padded query selects nothing.
//
// Decomposition. CTA = (b, kv head g, tile of 64 queries), 128 threads; warp w owns the 16
// queries i0 + 16 w .. + 15 for ALL G heads of the group: one m16 tile per head, so the
// head sum is a running register sum in every lane (any G, no shuffles, fixed order).
//   0. cp.async, all at once: the k rows [0, j_end) the tile's tokens need (j_end =
//      min(L, t_end S), t_end = tokens below the tile's last own block when causal, else T)
//      and the q rows of the first head chunk (HC = min(G, 256 / D) heads x 64 queries;
//      a second buffer and a chunk pipeline only when G > HC). Meanwhile: validity bits of
//      the L positions (ballots), then block validity and window counts from those bits.
//   1. compression: thread per (token, 8 dims), the window rows summed from shared memory in
//      block_compress's order, rounded to T into a [token][D] tile (zero past t_end).
//   2. per warp: the compressed tile as mma B fragments (registers, loaded once), each
//      lane's two query rows (gid, gid + 8) turned into an additive 0 / -inf bias per column
//      (token validity, own block, causal), then per head: S = Q_h K^T by mma.sync m16n8k16
//      (16 or 32 token columns), s = S scale log2e + bias, quad max / exp2 / quad sum,
//      mass[col] += p. No score leaves the registers.
//   3. per warp: the 16 x T masses through shared memory, one lane per query: block
//      importance, top_n rounds of a 64-bit arg-max over the candidates, ascending output.
//
// Cost, B = 64, Hq = 8, Hk = 2 (G = 4), L = 200 (T = C = 13, tpb = 1), causal, bf16:
// 64 x 2 x 4 = 512 CTAs (<= 3 per SM by shared memory at D = 64: ~1.3 waves on 132 SMs).
//   Bytes: q 64 x 200 x 8 x D x 2 = 13.1 MB (D = 64) / 3.3 MB (D = 16), read once; k rows
//   re-read by the tiles of a (b, g): tiles need 48, 112, 176, 192 rows -> 528 x 128 B x 128
//   = 8.7 MB at D = 64 (2.2 MB at D = 16) of L2 traffic for 3.3 MB (0.8 MB) of DRAM; output
//   64 x 200 x 2 x 16 B = 0.4 MB. DRAM ~16.8 MB (D = 64) -> ~3.5 us at 4.8 TB/s; ~4.5 MB
//   (D = 16) -> ~1 us.
//   FLOPs: 2 x 102,400 rows x 16 cols x D = 0.21 GFLOP on tensor cores (nothing).
//   Instructions (the binding limit of such kernels): per CTA ~ compression t_end x D/8
//   items x ~21 per window row x 32 rows (avg t_end 7.5 -> ~1.3 K warp-instr at D = 64),
//   mma + softmax ~110 per warp per head (1.8 K), top-n ~350 per warp (1.4 K), staging and
//   setup ~0.4 K: ~4.9 K warp-instr x 512 = 2.5 M -> ~19 K per SM, ~9.5 K cycles at IPC 2
//   = ~4.8 us on 132 SMs at 1.98 GHz; D = 16 about half.
//   Predicted kernel time: D = 64 ~6-9 us, D = 16 ~4-6 us (block_compress + select_blocks
//   measured 0.050 / 0.038 ms on an H200).
#include "cuda/short_select.h"

#include <cstdlib>
#include <cstring>

#include "cuda/common.cuh"
#include "cuda/cp_async.cuh"
#include "cuda/launch_cache.h"
#include "cuda/mma_frag.cuh"

namespace blossom {
namespace gpu {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kQT = 16 * kWarps;  // queries per CTA: one m16 tile per warp and head
constexpr int kMaxLen = 256;      // positions covered by the validity bits
constexpr int kVWords = kMaxLen / 32;
constexpr int kMaxTok = 32;       // compressed tokens (and hence blocks) per sequence
constexpr int kQBudget = 80 * 1024;  // bytes of q staged at once (both buffers)

// Sizes, host-computed divisions and the byte offsets of the dynamic shared memory (the
// k-row region depends on L, the q region on G).
struct SsConfig {
  int L = 0, G = 1, S = 1, BL = 1, bs = 1, tpb = 1, Tn = 0, C = 0, top_n = 1;
  unsigned bs_magic = 0, tpb_magic = 0;  // x / d = umulhi(x, ceil(2^32 / d)), exact for
                                         // x < 8192; 0 encodes d = 1
  int qs = 0;    // q: [nbuf][hc][kQT][D + 8] 16-bit (padding: conflict-free ldmatrix)
  int ks = 0;    // k rows [j_end][D] 16-bit for the compression; afterwards the per-warp
                 // masses [kWarps][16][kTok + 4] float
  int kt = 0;    // compressed keys [kTok][D + 8] 16-bit
  int misc = 0;  // validity words [kVWords], block-valid bits [1], window counts [kMaxTok]
  int total = 0;
  int hc = 1;    // heads per q buffer (G: all at once, no pipeline)
};

__device__ __forceinline__ int fast_div(int x, unsigned magic) {  // 0 <= x < 8192
  return magic == 0u ? x : static_cast<int>(__umulhi(static_cast<unsigned>(x), magic));
}

// Bits [lo, hi) of a 32-bit word (0 <= lo, clipped at 32).
__device__ __forceinline__ unsigned bit_range(int lo, int hi) {
  hi = hi < 32 ? hi : 32;
  if (hi <= lo) return 0u;
  const unsigned below_hi = hi >= 32 ? ~0u : (1u << hi) - 1u;
  return below_hi & ~((1u << lo) - 1u);
}

// Number of set bits of positions [lo, hi) in the kVWords validity words.
__device__ __forceinline__ int count_bits(const unsigned* vm, int lo, int hi) {
  int n = 0;
#pragma unroll
  for (int w = 0; w < kVWords; ++w) {
    const int a = lo - 32 * w, z = hi - 32 * w;
    if (z > 0 && a < 32) n += __popc(vm[w] & bit_range(a > 0 ? a : 0, z));
  }
  return n;
}

// Rank key of a block importance: the unsigned order of the keys is the importance order
// (an importance is a sum of exp2 results, >= +0, so its bits order like an unsigned int);
// NaN, or anything outside [+0, +inf], gets 1 and ranks last among the candidates (as in
// select_blocks_tc.cuh); 0 is kept for "not a candidate". Ties go to the lower block.
__device__ __forceinline__ unsigned rank_key(float imp) {
  const unsigned x = __float_as_uint(imp + 0.f);  // -0 -> +0 (x + 0 is not folded)
  return x <= 0x7f800000u ? x + 2u : 1u;
}

// Two 16-bit values packed in a word -> floats (exact). bf16 is the high half of a float:
// one shift or mask per value (the generic conversion spends a PRMT more on the high one).
__device__ __forceinline__ void widen2(uint32_t w, const c10::BFloat16*, float& lo, float& hi) {
  lo = __uint_as_float(w << 16);
  hi = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ void widen2(uint32_t w, const c10::Half*, float& lo, float& hi) {
  unpack2(w, static_cast<const c10::Half*>(nullptr), lo, hi);
}

// PW consecutive 16-bit values (PW = 1, 2 or 4; p aligned to 2 PW bytes) -> floats.
template <typename T, int PW>
__device__ __forceinline__ void load_piece(const void* p, float (&f)[PW]) {
  const T* tag = nullptr;
  if constexpr (PW == 4) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    widen2(u.x, tag, f[0], f[1]);
    widen2(u.y, tag, f[2], f[3]);
  } else if constexpr (PW == 2) {
    widen2(*reinterpret_cast<const uint32_t*>(p), tag, f[0], f[1]);
  } else {
    float hi;
    widen2(static_cast<uint32_t>(*reinterpret_cast<const unsigned short*>(p)), tag, f[0], hi);
  }
}
// The same from global memory through the read-only path (k_pos).
template <typename T, int PW>
__device__ __forceinline__ void ldg_piece(const T* p, float (&f)[PW]) {
  const T* tag = nullptr;
  if constexpr (PW == 4) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
    widen2(u.x, tag, f[0], f[1]);
    widen2(u.y, tag, f[2], f[3]);
  } else if constexpr (PW == 2) {
    widen2(__ldg(reinterpret_cast<const unsigned*>(p)), tag, f[0], f[1]);
  } else {
    f[0] = to_float(p[0]);
  }
}
// PW floats rounded to nearest into the 16-bit type E at p.
template <typename E, int PW>
__device__ __forceinline__ void store_piece(void* p, const float (&f)[PW]) {
  if constexpr (PW == 4) {
    *reinterpret_cast<uint2*>(p) = make_uint2(pack2<E>(f[0], f[1]), pack2<E>(f[2], f[3]));
  } else if constexpr (PW == 2) {
    *reinterpret_cast<uint32_t*>(p) = pack2<E>(f[0], f[1]);
  } else {
    *reinterpret_cast<unsigned short*>(p) =
        static_cast<unsigned short>(pack2<E>(f[0], 0.f) & 0xffffu);
  }
}

template <typename T, int D, int NT>
__global__ void __launch_bounds__(kThreads, 2)
    short_select_kernel(const ShortSelectParams<T> p, const SsConfig cf) {
  using E = typename TcElem<T>::type;
  constexpr int kTok = NT * 8;     // token columns: NT n8 tiles
  constexpr int K2 = kTok / 2;     // blocks per lane in the top-n (two lanes per query)
  constexpr int LDQ = D + 8, LDK = D + 8, LDM = kTok + 4;
  constexpr int DK = D / 16, D8 = D / 8;
  constexpr int RPP = kThreads / D8;  // rows per pass of the 16-byte staging loops
  static_assert(kTok <= kMaxTok && NT % 2 == 0 && kQT % RPP == 0, "shape");

  extern __shared__ __align__(128) unsigned char smem[];
  E* qs = reinterpret_cast<E*>(smem + cf.qs);
  E* ks = reinterpret_cast<E*>(smem + cf.ks);
  E* kt = reinterpret_cast<E*>(smem + cf.kt);
  unsigned* vmask = reinterpret_cast<unsigned*>(smem + cf.misc);
  unsigned* bv_s = vmask + kVWords;
  int* tcnt = reinterpret_cast<int*>(bv_s + 1);

  const int L = cf.L, G = cf.G, S = cf.S, BL = cf.BL, bs = cf.bs, tpb = cf.tpb;
  const int Tn = cf.Tn, C = cf.C, top_n = cf.top_n;
  const bool causal = p.causal;
  // grid (tiles, kv heads, batch); causal: the tiles that need most tokens start first
  const int tile = causal ? static_cast<int>(gridDim.x - 1 - blockIdx.x)
                          : static_cast<int>(blockIdx.x);
  const int g = static_cast<int>(blockIdx.y), Hk = static_cast<int>(gridDim.y);
  const int64_t b = blockIdx.z;
  const int i0 = tile * kQT;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int own_last = fast_div(min(L, i0 + kQT) - 1, cf.bs_magic);
  const int t_end = causal ? min(Tn, own_last * tpb) : Tn;
  const int j_end = min(L, t_end * S);
  const int hc_max = cf.hc;
  const int nchunks = (G + hc_max - 1) / hc_max;
  const int d8 = (tid % D8) * 8;  // the 16-byte piece this thread stages

  // ---- 0. every global load of the CTA in flight at once ----------------------------------
  // Three cp.async groups: the k rows (needed first, by the compression), then two "units"
  // of q heads: with one q buffer (G <= hc) heads [0, G/2) and [G/2, G), so the first half
  // is scored while the second is still arriving; with two buffers, chunks 0 and 1.
  {
    const int64_t step = int64_t(RPP) * p.k.stride_l;
    const E* src = reinterpret_cast<const E*>(p.k.at(b, tid / D8, g)) + d8;
    E* dst = ks + (tid / D8) * D + d8;
    for (int j = tid / D8; j < j_end; j += RPP, src += step, dst += RPP * D)
      cp_async16<false>(dst, src);
  }
  cp_async_commit();
  // q rows of heads [h_begin, h_end) of the group into buffer slots h - h_base: row
  // (h - h_base) * kQT + qi of buffer buf; rows past L are zero (never read from global).
  auto load_heads = [&](int h_begin, int h_end, int h_base, int buf) {
    E* dst = qs + (buf * hc_max * kQT + (h_begin - h_base) * kQT + tid / D8) * LDQ + d8;
    const E* src = reinterpret_cast<const E*>(p.q.at(b, i0 + tid / D8, g * G + h_begin)) + d8;
    const int64_t step = int64_t(RPP) * p.q.stride_l;
    for (int h = h_begin; h < h_end; ++h, src += p.q.stride_h, dst += kQT * LDQ) {
#pragma unroll
      for (int k = 0; k < kQT / RPP; ++k) {
        if (i0 + tid / D8 + k * RPP < L) cp_async16<false>(dst + k * RPP * LDQ, src + k * step);
        else *reinterpret_cast<uint4*>(dst + k * RPP * LDQ) = make_uint4(0, 0, 0, 0);
      }
    }
  };
  const int h_split = (G + 1) / 2;
  const int nunits = nchunks == 1 ? 2 : nchunks;
  // heads of unit u: [u0, u1), buffer slot h - ub, buffer u & 1 (always 0 with one chunk)
  auto unit = [&](int u, int& u0, int& u1, int& ub) {
    if (nchunks == 1) {
      u0 = u == 0 ? 0 : h_split;
      u1 = u == 0 ? h_split : G;
      ub = 0;
    } else {
      u0 = ub = u * hc_max;
      u1 = min(G, u0 + hc_max);
    }
  };
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    int u0, u1, ub;
    unit(u, u0, u1, ub);
    if (u < nunits) load_heads(u0, u1, ub, nchunks == 1 ? 0 : u & 1);
    cp_async_commit();
  }

  // Validity bits of the positions [0, L) (the loads above stay in flight).
  {
    const int j = warp * 32 + lane;  // kWarps * 32 == kMaxLen
    const unsigned m = __ballot_sync(kFullMask, j < L && p.valid(b, j));
    if (lane == 0) vmask[warp] = m;
  }
  __syncthreads();
  if (warp == 0) {  // block c holds a valid key (C <= kTok <= 32: one lane per block)
    const bool any = lane < C && count_bits(vmask, lane * bs, min(L, (lane + 1) * bs)) > 0;
    const unsigned m = __ballot_sync(kFullMask, any);
    if (lane == 0) *bv_s = m;
  } else if (warp == 1 && lane < kTok) {  // valid positions in each needed window
    const int t = lane;
    tcnt[t] = t < t_end ? count_bits(vmask, max(0, (t + 1) * S - BL), min(L, (t + 1) * S)) : 0;
  }
  cp_async_wait<2>();  // the k rows (the q units may still be in flight)
  __syncthreads();
  // ---- 1. compression, in block_compress_fwd's order ---------------------------------------
  // Thread per (token, PW = D / 16 dims): 16 pieces per token, so a 16-token tile is one
  // pass of the CTA and each thread's serial chain (the window's rows) is short.
  {
    constexpr int PW = D / 16;
    const T* pos = p.k_pos == nullptr ? nullptr : p.k_pos + static_cast<int64_t>(g) * BL * D;
    for (int x = tid; x < kTok * 16; x += kThreads) {
      const int t = x >> 4, d0 = (x & 15) * PW;
      float acc[PW];
#pragma unroll
      for (int e = 0; e < PW; ++e) acc[e] = 0.f;
      if (t < t_end) {
        const int origin = (t + 1) * S - BL;
        const int lo = max(origin, 0), hi = min(L, (t + 1) * S);
        const E* col = ks + d0;
        const int cnt = tcnt[t];
        if (pos == nullptr && cnt == hi - lo) {  // every row valid: no tests, 2 loads in flight
          int j = lo;
          for (; j + 2 <= hi; j += 2) {
            float f0[PW], f1[PW];
            load_piece<T, PW>(col + j * D, f0);
            load_piece<T, PW>(col + (j + 1) * D, f1);
#pragma unroll
            for (int e = 0; e < PW; ++e) acc[e] += f0[e];
#pragma unroll
            for (int e = 0; e < PW; ++e) acc[e] += f1[e];
          }
          if (j < hi) {
            float f0[PW];
            load_piece<T, PW>(col + j * D, f0);
#pragma unroll
            for (int e = 0; e < PW; ++e) acc[e] += f0[e];
          }
        } else {
          for (int j = lo; j < hi; ++j) {
            if (!((vmask[j >> 5] >> (j & 31)) & 1u)) continue;  // padding may hold NaN
            float f[PW];
            load_piece<T, PW>(col + j * D, f);
#pragma unroll
            for (int e = 0; e < PW; ++e) acc[e] += f[e];
            if (pos != nullptr) {
              ldg_piece<T, PW>(pos + (j - origin) * D + d0, f);
#pragma unroll
              for (int e = 0; e < PW; ++e) acc[e] += f[e];
            }
          }
        }
        const float inv = 1.f / static_cast<float>(cnt > 0 ? cnt : 1);
#pragma unroll
        for (int e = 0; e < PW; ++e) acc[e] *= inv;
      }
      store_piece<E, PW>(kt + t * LDK + d0, acc);
    }
  }
  __syncthreads();  // kt, tcnt and bv visible; the k rows are dead (their space is reused)

  // ---- 2. scores and per-token masses, per warp ----------------------------------------------
  const unsigned bvm = *bv_s;
  // Scored tokens (query independent part): valid, in a block with a valid key, < t_end.
  const unsigned tokmask = __ballot_sync(
      kFullMask, lane < t_end && tcnt[lane] > 0 && ((bvm >> fast_div(lane, cf.tpb_magic)) & 1u));
  const int gid = lane >> 2, tig = lane & 3;
  const int mi = lane >> 3, rr = lane & 7;

  // B fragments of the compressed tile, kept for every head: x4 matrix j = tokens
  // 8 (j / 2) .. +8 of an n-tile pair, dims 8 (j % 2) .. +8 of a k16 step -> b0b1, b2b3 of
  // n-tile 2 np, then of n-tile 2 np + 1 ([token][d] storage is the col-major B operand).
  uint32_t kb[DK][NT / 2][4];
  {
    const E* base = kt + ((mi >> 1) * 8 + rr) * LDK + (mi & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < DK; ++kk)
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) ldmatrix_x4(kb[kk][np], base + np * 16 * LDK + kk * 16);
  }

  // Additive column bias of the lane's two rows (queries gid and gid + 8 of the warp):
  // 0 where the token is scored for that query, -inf elsewhere (everything for a padded
  // query or one past L). Column of (nt, e): nt * 8 + 2 tig + e.
  float bias[2][NT][2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = i0 + warp * 16 + gid + 8 * r;
    unsigned ok = 0u;
    if (i < L && ((vmask[i >> 5] >> (i & 31)) & 1u)) {
      const int lo = fast_div(i, cf.bs_magic) * tpb;  // own block's first token (< T <= 32)
      const unsigned excl = causal ? (~0u << lo) : bit_range(lo, lo + tpb);
      ok = tokmask & ~excl;
    }
    const unsigned sh = ok >> (2 * tig);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) bias[r][nt][e] = ((sh >> (nt * 8 + e)) & 1u) ? 0.f : -INFINITY;
  }

  const float sc = static_cast<float>(p.shape.scale) * kLog2e;
  const bool warp_live = i0 + warp * 16 < L;  // warp-uniform
  float mass[NT][4];  // like the accumulators: [nt][0..1] row gid, [nt][2..3] row gid + 8
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) mass[nt][e] = 0.f;

  for (int u = 0; u < nunits; ++u) {
    cp_async_wait<1>();  // exactly one group was committed after unit u's
    __syncthreads();
    int u0, u1, ub;
    unit(u, u0, u1, ub);
    if (warp_live) {
      // x4 matrix j = rows 8 (j % 2) .. +8 of the warp's 16, dims 8 (j / 2) .. +8 of a k16
      // step -> a0a1, a2a3, a4a5, a6a7 of the A fragment.
      const E* qbase = qs + ((nchunks == 1 ? 0 : u & 1) * hc_max * kQT + warp * 16 +
                             (mi & 1) * 8 + rr) * LDQ + (mi >> 1) * 8;
      for (int h = u0; h < u1; ++h) {  // heads in ascending order: a fixed summation order
        uint32_t qa[DK][4];
#pragma unroll
        for (int kk = 0; kk < DK; ++kk)
          ldmatrix_x4(qa[kk], qbase + (h - ub) * kQT * LDQ + kk * 16);
        float acc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DK; ++kk)
#pragma unroll
          for (int np = 0; np < NT / 2; ++np) {
            mma16816<E>(acc[2 * np], qa[kk], kb[kk][np][0], kb[kk][np][1]);
            mma16816<E>(acc[2 * np + 1], qa[kk], kb[kk][np][2], kb[kk][np][3]);
          }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float m = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& a = acc[nt][2 * r + e];
              a = fmaf(a, sc, bias[r][nt][e]);  // base-2 logit, -inf where not scored
              m = fmaxf(m, a);
            }
          m = fmaxf(m, __shfl_xor_sync(kFullMask, m, 1));
          m = fmaxf(m, __shfl_xor_sync(kFullMask, m, 2));
          m = fmaxf(m, -1e30f);  // nothing scored (m = -inf): every p is exp2(-inf) = 0
          float l = 0.f;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& a = acc[nt][2 * r + e];
              a = fast_exp2(a - m);
              l += a;
            }
          l += __shfl_xor_sync(kFullMask, l, 1);
          l += __shfl_xor_sync(kFullMask, l, 2);
          const float inv = l > 0.f ? fast_rcp(l) : 0.f;  // l >= 1 when anything is scored
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              mass[nt][2 * r + e] = fmaf(acc[nt][2 * r + e], inv, mass[nt][2 * r + e]);
        }
      }
    }
    if (nchunks > 1 && u + 2 < nunits) {
      __syncthreads();  // every warp is done with this buffer
      int v0, v1, vb;
      unit(u + 2, v0, v1, vb);
      load_heads(v0, v1, vb, u & 1);
    }
    cp_async_commit();  // possibly empty: keeps the wait_group count uniform
  }
  if (!warp_live) return;  // warp-uniform; no barrier below

  // ---- 3. importance and top-n: lanes q and q + 16 share query q, blocks [0, K2) / [K2, 2 K2)
  float* mw = reinterpret_cast<float*>(smem + cf.ks) + warp * 16 * LDM;
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      *reinterpret_cast<float2*>(mw + (gid + 8 * r) * LDM + nt * 8 + 2 * tig) =
          make_float2(mass[nt][2 * r], mass[nt][2 * r + 1]);
  __syncwarp();
  const int q = lane & 15, hf = lane >> 4, c0 = hf * K2;
  const int i = i0 + warp * 16 + q;
  unsigned cand = 0u;  // candidate blocks of query i (all C <= 32 of them)
  if (i < L && ((vmask[i >> 5] >> (i & 31)) & 1u)) {
    const int own = fast_div(i, cf.bs_magic);  // < C <= 32
    const unsigned all = C >= 32 ? ~0u : (1u << C) - 1u;
    cand = bvm & all & (causal ? (1u << own) - 1u : ~(1u << own));
  }
  const bool need = __popc(cand) > top_n;  // else every candidate is chosen
  unsigned chosen = cand;
  if (__any_sync(kFullMask, need)) {  // the rounds below shuffle: the whole warp runs them
    const float* row = mw + q * LDM;
    unsigned u[K2];
    if (tpb == 1) {  // block = token: the masses are the importances
#pragma unroll
      for (int c4 = 0; c4 < K2; c4 += 4) {
        const float4 v = *reinterpret_cast<const float4*>(row + c0 + c4);
        u[c4] = rank_key(v.x);
        u[c4 + 1] = rank_key(v.y);
        u[c4 + 2] = rank_key(v.z);
        u[c4 + 3] = rank_key(v.w);
      }
    } else {
#pragma unroll
      for (int cc = 0; cc < K2; ++cc) {
        const int t0 = (c0 + cc) * tpb, t1 = min(t0 + tpb, Tn);  // the block's tokens
        float v = 0.f;
#pragma unroll 1
        for (int t = t0; t < t1; ++t) v += row[t];
        u[cc] = rank_key(v);
      }
    }
    const unsigned mine = cand >> c0;
#pragma unroll
    for (int cc = 0; cc < K2; ++cc) u[cc] = ((mine >> cc) & 1u) ? u[cc] : 0u;
    unsigned pick = 0u;
    for (int k = 0; k < top_n; ++k) {  // top_n < #candidates when need: one block per round
      unsigned best = 0u;
#pragma unroll
      for (int cc = 0; cc < K2; ++cc) best = max(best, u[cc]);
      best = max(best, __shfl_xor_sync(kFullMask, best, 16));
      int cb = K2;  // this lane's lowest block holding best, K2 if none
#pragma unroll
      for (int cc = K2 - 1; cc >= 0; --cc) cb = u[cc] == best ? cc : cb;
      const int cb_other = __shfl_xor_sync(kFullMask, cb, 16);
      const int lo_half = hf == 0 ? cb : cb_other;  // ties: the lower half wins
      const int c = lo_half < K2 ? lo_half : K2 + (hf == 0 ? cb_other : cb);
      pick |= 1u << c;
#pragma unroll
      for (int cc = 0; cc < K2; ++cc) u[cc] = c0 + cc == c ? 0u : u[cc];
    }
    if (need) chosen = pick;
  }
  if (hf != 0 || i >= L) return;
  int32_t* out = p.out + ((b * L + i) * Hk + g) * top_n;
  for (int k = 0; k < top_n; ++k) {  // ascending: set bits from the lowest
    int v = -1;
    if (chosen != 0u) {
      v = __ffs(chosen) - 1;
      chosen &= chosen - 1u;
    }
    out[k] = v;
  }
}

bool short_select_disabled() {
  static const bool off = detail::env_equals("BLOSSOM_OPS_CUDA_SHORT_SELECT", "0");
  return off;
}

unsigned div_magic(int d) {  // see SsConfig
  return d == 1 ? 0u : static_cast<unsigned>(((uint64_t(1) << 32) + d - 1) / d);
}

template <int D, int NT>
SsConfig make_config(int L, int G, int S, int BL, int bs, int top_n) {
  constexpr int kTok = NT * 8;
  auto up = [](int x, int a) { return (x + a - 1) / a * a; };
  SsConfig cf;
  cf.L = L;
  cf.G = G;
  cf.S = S;
  cf.BL = BL;
  cf.bs = bs;
  cf.tpb = bs / S;
  cf.Tn = (L + S - 1) / S;
  cf.C = (L + bs - 1) / bs;
  cf.top_n = top_n;
  cf.bs_magic = div_magic(bs);
  cf.tpb_magic = div_magic(cf.tpb);
  const int per_head = kQT * (D + 8) * 2;
  int nbuf = 1;
  cf.hc = G;
  if (G * per_head > kQBudget) {  // stream the heads through two buffers
    nbuf = 2;
    cf.hc = kQBudget / 2 / per_head > 1 ? kQBudget / 2 / per_head : 1;
  }
  cf.qs = 0;
  cf.ks = up(cf.qs + nbuf * cf.hc * per_head, 128);
  const int k_rows = L * D * 2, masses = kWarps * 16 * (kTok + 4) * 4;
  cf.kt = up(cf.ks + (k_rows > masses ? k_rows : masses), 128);
  cf.misc = up(cf.kt + kTok * (D + 8) * 2, 16);
  cf.total = cf.misc + (kVWords + 1 + kMaxTok) * 4;
  return cf;
}

template <typename T, int D, int NT>
bool launch(const ShortSelectParams<T>& p, cudaStream_t stream) {
  const AttnShape& s = p.shape;
  const SsConfig cf = make_config<D, NT>(
      static_cast<int>(s.q_len), static_cast<int>(s.group()), static_cast<int>(p.stride),
      static_cast<int>(p.block_len), static_cast<int>(p.block_size), static_cast<int>(p.top_n));
  // The device limit and the opt-in, once per device (and kernel): cuda/launch_cache.h.
  DeviceInfo info;
  if (!current_device_info(info)) return false;
  if (cf.total > info.max_smem_optin) return false;
  const dim3 grid(static_cast<unsigned>(ceil_div(cf.L, kQT)), static_cast<unsigned>(s.kv_heads),
                  static_cast<unsigned>(s.batch));
  auto kernel = short_select_kernel<T, D, NT>;
  opt_in_smem(kernel, cf.total);
  kernel<<<grid, kThreads, static_cast<size_t>(cf.total), stream>>>(p, cf);
  check_launch("short_select");
  return true;
}

}  // namespace

bool short_select_eligible(int64_t seq_len, int64_t head_dim, int64_t group, int64_t stride,
                           int64_t block_size, int64_t top_n) {
  if (short_select_disabled()) return false;
  if (seq_len < 1 || seq_len > kMaxLen || group < 1 || group > 64 || top_n < 1) return false;
  if (stride < 1 || block_size < stride || block_size % stride != 0) return false;
  if (block_size > 65536 || top_n > 65536) return false;  // int arithmetic, see SsConfig
  if (head_dim != 16 && head_dim != 32 && head_dim != 64) return false;
  return (seq_len + stride - 1) / stride <= kMaxTok;
}

template <typename T>
bool short_select_fwd(const ShortSelectParams<T>& p, cudaStream_t stream) {
  const AttnShape& s = p.shape;
  if (s.kv_heads < 1 || s.kv_heads > 65535 || s.q_heads % s.kv_heads != 0 ||
      s.batch > 65535 || p.block_len < p.stride || p.block_len > (int64_t(1) << 24) ||
      !short_select_eligible(s.q_len, s.head_dim, s.group(), p.stride, p.block_size, p.top_n))
    return false;
  if (s.batch == 0) return true;  // nothing to write
  const bool wide = (s.q_len + p.stride - 1) / p.stride > 16;
  switch (s.head_dim) {
    case 16: return wide ? launch<T, 16, 4>(p, stream) : launch<T, 16, 2>(p, stream);
    case 32: return wide ? launch<T, 32, 4>(p, stream) : launch<T, 32, 2>(p, stream);
    default: return wide ? launch<T, 64, 4>(p, stream) : launch<T, 64, 2>(p, stream);
  }
}

template bool short_select_fwd<c10::Half>(const ShortSelectParams<c10::Half>&, cudaStream_t);
template bool short_select_fwd<c10::BFloat16>(const ShortSelectParams<c10::BFloat16>&,
                                              cudaStream_t);

}  // namespace gpu
}  // namespace blossom
