// Staged forward and dQ attention kernels on tensor cores: the fast path of attn_kernels.cuh
// for 16-bit inputs, D in {16, 32, 64, 128} and 16-byte aligned rows, plus their launchers.
// Same Policy interface and numeric conventions as the simple kernels (fp32 accumulation,
// base-2 softmax with scale * log2(e) folded in, lse in natural log); the key rows of a chunk
// are gathered into shared memory with cp.async (double-buffered) and the products run on
// mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate) with every intermediate in registers.
//
// Work decomposition: one warp per (b, query i, HPW heads of KV group g; HPW = 8, 4, 2 or 1
// dividing G), kStageWarps warps per CTA, no CTA barrier. (The block-chunk kernels further
// down take 8 / HPW consecutive queries per warp: "query groups", TcBlkWarp.) Each warp has its own key list
// (the selected blocks of one query), so tiles of queries share no keys: the products are
// per query, with the keys as the M dimension and the heads, padded to 8, as N.
// Per chunk of KC keys (16, or 32 for D <= 32):
//   1. enumerate: lane n computes pol.fwd_key(b, i, g, n0 + n) for the KC slots at once; the
//      valid keys are compacted (ballot + popc) into kidx[buf][0, cnt); stage: their K and V
//      rows are copied into shared memory with 16-byte cp.async, double-buffered (chunk c+1
//      is enumerated and issued before chunk c is computed), rows padded by 16 bytes (the 8
//      rows of an ldmatrix then hit distinct banks).
//   2. S^T = K Q^T per 16-key tile: A = the K rows (ldmatrix), B = Q^T, held in registers for
//      the whole query (row gid < HPW of Q, zero for the padding heads). The accumulator
//      gives lane (gid, tig) the scores of keys gid and gid + 8 for heads 2 tig and 2 tig + 1.
//   3. forward: base-2 online softmax per head; a head's max over the chunk is a butterfly
//      over the 8 lanes of its tig (xor 4, 8, 16), l stays a per-lane partial sum of the
//      unrounded p until the end. dQ: dS^T = exp2(s - lse2) (dP^T - delta), dP^T = V dO^T
//      the same way as S^T.
//   4. O^T += V^T P^T (dQ^T += K^T dS^T): P^T, rounded to the input type as FlashAttention-2
//      does, is in the C layout with keys as rows; movmatrix transposes its two 8x8 halves
//      into the B fragment (heads as columns); V^T (K^T) is ldmatrix.trans of the same
//      staged rows. The O^T accumulators stay in registers across chunks; the rescale by
//      alpha is two multiplies per accumulator (each lane's heads are fixed).
//   5. end: l summed over the 8 lanes of a head; the accumulators, normalised (1 / l, or
//      * scale for dQ), go through shared memory (the K/V buffers) so the rows leave as
//      16-byte stores; lse = (m + log2 l) * ln 2.
//   Keys of a chunk past cnt: the K/V buffers are zero-filled once per warp, so their rows are
//   either zeros or an earlier chunk's (finite) rows, and their p / ds is exactly 0; no NaN
//   can leak through 0 * garbage. Deterministic: fixed reduction orders, no atomics.
//
// History: the previous version used wmma 16x16x16 with the heads as M (padded to 16, 4x
// the useful tensor work at HPW = 4) and sent S, P (dP, dS) through shared memory; Nsight
// Compute showed it bound by L1/shared-memory throughput (71-76% of peak) at 2.90 ms (fwd)
// and 3.27 ms (dQ) for block-sparse D=64 L=4096 B=64 on an H100. Per 16-key tile at D=64 it
// moved 16x16x4 B of S out and in plus P, and issued 4 + 4 wmma (16 HMMA); now 8 mma.sync
// (8 HMMA) and no shared-memory traffic besides the K/V rows (2 x 2 KB per tile read once).
// Measured (H100, same shape): 2.16 ms forward, 2.58 ms dQ. Nsight Compute then shows the
// forward issue-bound (issue slots 67% busy, ~2,660 warp-instructions per query), not bound
// by memory (csrc/cuda/NOTES.md).
//
// Shared memory per warp (D=64, KC=16): K/V 2 buffers * 2 * 16 rows * 144 B = 9 KB + indices.
//
// Block chunks ("staged diet", 2026-11-27; BLOSSOM_OPS_CUDA_STAGED=old keeps the per-slot
// kernels above for A/B). A Policy with kBlockChunks (block-sparse, power-of-two block size
// >= 16) takes attn_fwd_kernel_tc_blk / attn_dq_kernel_tc_blk instead: the keys of a selected
// block are contiguous, so a chunk is one 16-key segment of a listed block and needs no
// per-key enumeration. Per warp, once: lane s <= n computes slot_block(s) (one index load),
// repeats go by __match_any_sync, a ballot / popc compaction lists the distinct blocks in slot
// order (own block first) in shared memory. Per chunk: block = one LDS, the key mask from
// key_end(i) (causal edge, length) and, with key padding only, one validity byte per lane and
// a ballot; every row of the segment is copied with cp.async ignore-src (masked rows become
// zeros: no zero fill of the buffers, no stale rows), one IMAD.WIDE per row address, four
// predicates per R2P, the LDGSTS back to back (ptxas pads each group with 3 dummy LDS that
// also take issue slots: the per-slot loop paid them for every row). Warp coordinates by
// multiply-high division (TcDiv); exp2 without the denormal fix-up (fast_exp2). Same chunk order
// and, when each chunk's keys are a prefix of it (no key padding, or right padding), the same
// key positions as the per-slot kernel at KC = 16, so D >= 64 keeps its summation order; the
// bits differ only where a probability is below 2^-126 (flushed to 0 by fast_exp2), or the
// chunk max of two NaN scores (garbage in). D <= 32 (per-slot KC = 32) and left / random key
// padding (keys keep their block position instead of being compacted) give other rounding.
// scripts/emulate_staged_blk.py replays the index math against the DESIGN mask.
// Policies without block chunks (sliding window, compressed branch) take the per-slot kernels
// with LEAN = true unless BLOSSOM_OPS_CUDA_STAGED=old: TcDiv coordinates, fast_exp2, and a copy
// loop unrolled over the lane's rows with the rows past cnt zero-filled (so no tc_zero), the
// row address one mad.wide per row and the LDGSTS back to back. Same keys, positions and
// summation order as before (bits differ only for probabilities below 2^-126). Window, causal
// D = 64 HPW = 4, one 16-key chunk (8 band + 8 dilation slots): forward 320 -> 252, dQ 300 ->
// 228 warp-instructions (the copies 137 -> 79); per warp also ~-120 (coordinates) and ~-40
// (zero fill), but a 1-key chunk now issues all 8 row copies (+~50): ~-12% per window warp.
//
// Counts: static SASS (nvcc 13, sm_90, nvdisasm), bf16 D = 64 HPW = 4 block-sparse, the hot
// path of one chunk (16 attending keys of a selected block in slot 2, next chunk issued, no
// padding), warp-instructions:
//                        enumerate/  copy    ldmatrix/  softmax/  loop/   chunk
//                        compact     issue   mma        rescale   sync
//   forward, per-slot       143       124       39         83       37      427 (+1)
//   forward, block chunk     17        36       31         64       22      170
//   dQ, per-slot            144       125       50         40       37      401 (+5)
//   dQ, block chunk          17        36       40         21       22      136
// ((+n): instructions the line table gives to no job. Per-slot: the ~21-instruction
// division of fwd_key and selected_block's repeat loop per key, 13 instructions per cp.async
// (kidx LDS, 64-bit multiply, 3 dummy LDS); softmax: exp2f is 4 issue slots, fast_exp2
// one.) Per warp (5 chunks at top_n 4), the same static count:
// forward ~2,510 (ncu measured ~2,660) -> ~1,290 (prologue with the block list and the first
// chunk's copies ~330, 4 x 170 + 117, epilogue ~160); dQ ~2,540 -> ~1,270 (prologue ~540, of
// which ~130 are the delta rowsums, kept in the per-slot kernel's order so that delta keeps
// its bits; epilogue ~100).
// Predicted (H100, B=64 Hq=8 Hk=2 D=64 L=4096 bf16, top_n 4): the forward issued ~1.39 G
// warp-instructions in 2.09 ms; at the same issue rate ~0.67 G take ~1.0 ms, but the K/V
// gather (8.6 GB of rows from L2; 0.81 ms gather-only floor on an H200) limits it: ~1.1-1.2 ms
// forward, ~1.2-1.4 ms dQ (2.51 now). D = 16: ~0.6-0.7 ms each (1.08 / 1.16; ~1.7x fewer
// instructions per warp: 5 chunks of 16 keys at ~130 instead of 3 of 32 at ~370).
//
#pragma once
#include <type_traits>

#include "common/params.h"
#include "cuda/attn_gate_epilogue.cuh"
#include "cuda/attn_gate_fold.cuh"
#include "cuda/common.cuh"
#include "cuda/cp_async.cuh"
#include "cuda/launch_cache.h"
#include "cuda/mma_frag.cuh"

namespace blossom {
namespace gpu {
namespace detail {

constexpr int kStageWarps = 2;  // warps per CTA of the staged kernels

template <int HPW>
__device__ __forceinline__ float pick(const float (&a)[HPW], int hh) {
  float x = a[0];
#pragma unroll
  for (int h = 1; h < HPW; ++h)
    if (hh == h) x = a[h];
  return x;
}

constexpr size_t tc_align128(size_t x) { return (x + 127) & ~size_t(127); }

// Compile-time configuration and per-warp shared-memory layout (byte offsets, 128-aligned).
// KCX forces the chunk length (the block-chunk kernels use 16 at every D).
template <int D, int KCX = 0>
struct TcCfg {
  static constexpr int KC = KCX != 0 ? KCX : (D <= 32 ? 32 : 16);  // keys per chunk
  static constexpr int KT = KC / 16;            // 16-key tiles per chunk
  static constexpr int NF = D / 16;             // 16-column slices of a row (k steps of S)
  static constexpr int CPR = D / kFrag;         // 16-byte pieces per row
  static constexpr int RS = D + kFrag;          // K/V row stride (elements): 16 B of padding
  static constexpr int OLD = D + 4;             // output staging row stride, floats
  static constexpr size_t kv_bytes = size_t(2) * 2 * KC * RS * 2;  // [buf][K|V][KC][RS]
  static constexpr size_t idx_off = tc_align128(kv_bytes);
  static constexpr size_t warp_bytes = tc_align128(idx_off + size_t(2) * KC * 4);
  static_assert(D % 16 == 0 && KC % 16 == 0 && 32 % (2 * CPR) == 0,
                "bad tensor-core staged configuration");
  static_assert(size_t(8) * OLD * 4 <= kv_bytes, "output staging must fit the K/V buffers");
};

// base + j * stride_bytes as one IMAD.WIDE (mad.wide.s32): from C++ the compiler keeps a
// 64 x 64-bit multiply when the stride came from an int64_t (3-4 instructions per row).
__device__ __forceinline__ const char* tc_row_addr(const char* base, int j, int stride_bytes) {
  const char* r;
  asm("mad.wide.s32 %0, %1, %2, %3;" : "=l"(r) : "r"(j), "r"(stride_bytes), "l"(base));
  return r;
}

template <int BYTES>
__device__ __forceinline__ void tc_zero(void* p, int lane) {
  static_assert(BYTES % 16 == 0, "zero fill works in 16-byte pieces");
  uint4* q = reinterpret_cast<uint4*>(p);
  for (int x = lane; x < BYTES / 16; x += 32) q[x] = make_uint4(0, 0, 0, 0);
}

// Warp coordinates, staging buffers and the enumerate + copy step of one chunk. LEAN (the
// default path of policies without block chunks; BLOSSOM_OPS_CUDA_STAGED=old turns it off):
// the copies are unrolled over the lane's rows, rows past cnt are zero-filled (cp.async
// ignore-src), so the buffers need no zero fill, one IMAD.WIDE per row address and the
// LDGSTS back to back (3 dummy issue slots per group instead of per row).
//
// Query pairs (QPW = 2, LEAN only): the warp serves queries i and i + 1 (the N = 8 side holds
// both queries' heads, as in the block-chunk query groups further down). Their slot lists are
// concatenated, slots [0, ns0) of query i then [ns0, n_slots) of query i + 1, and chunked as
// one list. Compaction keeps the order, so a chunk's entries of query i are its first c0
// (issue() returns c0 in *c0_out). Without DD a key both attend is staged twice and the
// column masks are position ranges, [0, c0) for query i and [c0, cnt) for query i + 1.
// DD (dedupe, BLOSSOM_OPS_CUDA_SLOT_DEDUPE != 0 and the policy's pair_dedupe_ok()): when both
// queries attend, query i + 1's part of the list is only its "tail", the slots whose keys
// query i does not attend (Policy::pair_tail: slot a when >= 0, then slots first, first + 1,
// ... in order; window: distance 0 and the dilation distances past the shared ones, 9 of 17
// slots at L = 4096; compressed branch: the token query i + 1 sees beyond query i, 0 or 1);
// its other keys are query i's entries j with pol.pair_attends(b, i + 1, j). issue() also
// returns *m2_out, bit p set when chunk position p is a key of query i + 1 (a warp OR of
// one bit per entry): column masks are bit sets, positions [0, c0) for query i and m2 for
// query i + 1. Query i keeps its keys, chunks and positions; query i + 1 meets its shared
// keys in query i's order (rounding-level differences against one query per warp).
// Window, causal, window 8, L = 4096: 34 -> 26 slots (3 -> 2 chunks of 16; at D <= 32 2 -> 1
// of 32); compressed branch: half the chunks. Static SASS (bf16 D = 64 HPW = 4) of the chunk
// loop: forward 327 -> 364, dQ 317 -> 356 (the membership bits, the warp OR, the bit-set
// masks); per pair at L = 4096 ~-7% / -5% instructions and 24% fewer staged rows. Replayed
// lane by lane by scripts/emulate_slot_pairs.py (both pair kinds against the DESIGN masks).
template <typename T, class C, class Policy, bool LEAN = false, int QPW = 1, bool DD = false>
struct TcWarp {
  using E = typename TcElem<T>::type;
  static_assert(QPW == 1 || (QPW == 2 && LEAN), "query pairs run on the LEAN path only");
  static_assert(!DD || QPW == 2, "dedupe is for query pairs");
  E* kv;           // [2][2][KC][RS]
  int* kidx;       // [2][KC]
  const T* kbase;  // k.at(b, 0, g)
  const T* vbase;
  int64_t sk, sv;
  int64_t b, i, g, n_slots;
  int64_t ns0 = 0;  // QPW = 2: slots of query i (0 when it does not attend)
  int ta = 0, tb = 0;  // DD: list slot ns0 + t is query i + 1's slot ta (t = 0) or tb + t
  bool both = false;        // DD: both queries attend (query i's entries test query i + 1)
  int lane;

  // DD: ns0, n_slots and query i + 1's tail from the queries that attend (qbits). A query
  // i + 1 alone keeps its whole list (ta = tb = 0). Slots are < 2^31 (kidx holds ints).
  __device__ __forceinline__ void pair_slots_dedupe(const Policy& pol, unsigned qbits) {
    ns0 = (qbits & 1u) != 0u ? pol.fwd_slots(b, i, g) : 0;
    both = qbits == 3u;
    int64_t nt = 0, a = -1, first = 0;
    if (both) {
      pol.pair_tail(b, i, g, a, first, nt);
    } else if ((qbits & 2u) != 0u) {
      nt = pol.fwd_slots(b, i + 1, g);
    }
    // Tail index t -> slot: t == 0 ? ta : tb + t (without a single slot a: ta = tb + 0).
    tb = static_cast<int>(a >= 0 ? first - 1 : first);
    ta = a >= 0 ? static_cast<int>(a) : tb;
    n_slots = ns0 + nt;
  }

  __device__ __forceinline__ E* kbuf(int buf) const { return kv + (buf * 2) * C::KC * C::RS; }
  __device__ __forceinline__ E* vbuf(int buf) const { return kv + (buf * 2 + 1) * C::KC * C::RS; }

  // The forward's and dQ's warp setup: buffers in the warp's area `base`, the K / V rows of
  // (b, g), query i (and i + 1), the zero fill of the non-LEAN path, and the slot counts of
  // the queries in qbits. p: AttnFwdParams or AttnBwdParams.
  template <class Params>
  __device__ __forceinline__ void setup(const Params& p, const Policy& pol, unsigned char* base,
                                        int64_t b_, int64_t i_, int64_t g_, unsigned qbits,
                                        int lane_) {
    kv = reinterpret_cast<E*>(base);
    kidx = reinterpret_cast<int*>(base + C::idx_off);
    kbase = p.k.at(b_, 0, g_);
    vbase = p.v.at(b_, 0, g_);
    sk = p.k.stride_l;
    sv = p.v.stride_l;
    b = b_; i = i_; g = g_;
    lane = lane_;
    if constexpr (!LEAN) {  // LEAN: every row of a used chunk is written (zero fill past cnt)
      tc_zero<static_cast<int>(C::kv_bytes)>(kv, lane);
      __syncwarp();
    }
    if constexpr (QPW == 1) {
      n_slots = pol.fwd_slots(b, i, g);
    } else if constexpr (DD) {
      pair_slots_dedupe(pol, qbits);
    } else {
      ns0 = (qbits & 1u) != 0u ? pol.fwd_slots(b, i, g) : 0;
      n_slots = ns0 + ((qbits & 2u) != 0u ? pol.fwd_slots(b, i + 1, g) : 0);
    }
  }

  // Enumerates slots [n0, n0 + KC), compacts the valid keys into kidx[buf] and issues the
  // cp.async copies of their K and V rows. Returns the number of valid keys (warp-uniform);
  // QPW = 2 also the number of them that belong to query i (*c0_out); DD the positions of
  // query i + 1's keys (*m2_out).
  __device__ __forceinline__ int issue(const Policy& pol, int64_t n0, int buf,
                                       int* c0_out = nullptr, unsigned* m2_out = nullptr) const {
    const int64_t n = n0 + lane;
    int64_t j;
    bool in2 = false;  // DD: a key of query i + 1
    if constexpr (QPW == 1) {
      j = (lane < C::KC && n < n_slots) ? pol.fwd_key(b, i, g, n) : -1;
    } else if constexpr (DD) {
      const bool second = n >= ns0;
      const int t = static_cast<int>(n - ns0);  // tail index of query i + 1
      const int64_t slot = second ? (t == 0 ? ta : tb + t) : n;
      j = (lane < C::KC && n < n_slots) ? pol.fwd_key(b, i + (second ? 1 : 0), g, slot) : -1;
      // Branch-free (bitwise): pair_attends is arithmetic, harmless for j = -1.
      const bool att = pol.pair_attends(b, i + 1, j);
      in2 = (j >= 0) & (second | (both & att));
    } else {
      const bool second = n >= ns0;
      j = (lane < C::KC && n < n_slots) ? pol.fwd_key(b, i + (second ? 1 : 0), g,
                                                       second ? n - ns0 : n)
                                         : -1;
    }
    const unsigned mask = __ballot_sync(kFullMask, j >= 0);
    if constexpr (QPW == 2) {
      // Lanes below ub hold slots of query i.
      const int64_t ub = ns0 - n0;
      const unsigned first = ub >= 32 ? kFullMask : (ub <= 0 ? 0u : (1u << ub) - 1u);
      *c0_out = __popc(mask & first);
    }
    int* ki = kidx + buf * C::KC;
    const int pos = __popc(mask & ((1u << lane) - 1u));  // compacted position of lane's key
    if (j >= 0) ki[pos] = static_cast<int>(j);
    if constexpr (DD) {  // all 32 lanes: the operand first, then the collective
      const unsigned bit2 = in2 ? 1u << pos : 0u;
      *m2_out = __reduce_or_sync(kFullMask, bit2);
    }
    __syncwarp();
    const int cnt = __popc(mask);
    // Lane owns one 16-byte piece (K pieces, then V pieces) of KPP interleaved rows:
    // coalesced (CPR lanes per 128-byte row) and little address arithmetic per copy.
    constexpr int PPK = 2 * C::CPR, KPP = 32 / PPK;
    const int w = lane % PPK;
    const bool is_v = w >= C::CPR;
    const int c = is_v ? w - C::CPR : w;
    const T* src = (is_v ? vbase : kbase) + c * kFrag;
    const int64_t st = is_v ? sv : sk;
    E* dst = (is_v ? vbuf(buf) : kbuf(buf)) + c * kFrag;
    if constexpr (LEAN) {
      if (cnt > 0) {  // |st| < 2^26 elements (launcher): a key times the byte stride is a
                      // 32 x 32 -> 64-bit product, one IMAD.WIDE with the base as addend
        const char* srcb = reinterpret_cast<const char*>(src);
        const int stb = static_cast<int>(st * static_cast<int64_t>(sizeof(T)));
        const int r0 = lane / PPK;
        const int* kl = ki + r0;
        const int last = ki[cnt - 1];  // rows past cnt read a valid row's address
        E* d = dst + r0 * C::RS;
        int jr[C::KC / KPP];
#pragma unroll
        for (int k = 0; k < C::KC / KPP; ++k) {
          const int j = kl[KPP * k];  // past cnt: a stale entry of kidx, not used
          jr[k] = r0 + KPP * k < cnt ? j : last;
        }
#pragma unroll
        for (int k = 0; k < C::KC / KPP; ++k)
          cp_async16_masked(d + KPP * k * C::RS, tc_row_addr(srcb, jr[k], stb),
                            static_cast<unsigned>(r0 + KPP * k < cnt));
      }
    } else {
      for (int r = lane / PPK; r < cnt; r += KPP)
        cp_async16(dst + r * C::RS, src + static_cast<int64_t>(ki[r]) * st);
    }
    cp_async_commit();
    return cnt;
  }

  // Chunk loop with double buffering: body(buf, cnt, c0, m2) runs once per chunk that has
  // valid keys, with chunk ch's rows in buffer buf while chunk ch + 1's copies are in flight
  // (c0: QPW = 2, the chunk's entries of query i; QPW = 1, cnt; m2: DD, the positions of
  // query i + 1's keys, else 0).
  template <class Body>
  __device__ __forceinline__ void for_each_chunk(const Policy& pol, Body&& body) {
    const int64_t n_chunks = (n_slots + C::KC - 1) / C::KC;
    int c0 = 0, c0_next = 0;
    unsigned m2 = 0u, m2_next = 0u;
    int cnt = n_chunks > 0 ? issue(pol, 0, 0, &c0, &m2) : 0;
    for (int64_t ch = 0; ch < n_chunks; ++ch) {
      const int buf = static_cast<int>(ch & 1);
      int cnt_next = 0;
      if (ch + 1 < n_chunks) {
        cnt_next = issue(pol, (ch + 1) * C::KC, buf ^ 1, &c0_next, &m2_next);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncwarp();  // every lane's copies visible to the whole warp
      if (cnt > 0) body(buf, cnt, QPW == 1 ? cnt : c0, m2);
      __syncwarp();  // buffer `buf` is rewritten by the next iteration's copies
      cnt = cnt_next;
      c0 = c0_next;
      m2 = m2_next;
    }
  }
};

// B fragments of X^T (k = head dim, n = head) for the rows h0 + gid (< HPW; zero for the
// padding heads) of position i: xb[f] holds dims 16 f + 2 tig + {0, 1} and + 8.
template <typename T, int D, int HPW>
__device__ __forceinline__ void load_head_frags(uint32_t (&xb)[D / 16][2], const Bshd<const T>& x,
                                                int64_t b, int64_t i, int64_t h0, int lane) {
  const int gid = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int f = 0; f < D / 16; ++f) {
    xb[f][0] = 0u;
    xb[f][1] = 0u;
    if (gid < HPW) {
      const uint32_t* row = reinterpret_cast<const uint32_t*>(x.at(b, i, h0 + gid) + 16 * f);
      xb[f][0] = __ldg(row + tig);
      xb[f][1] = __ldg(row + 4 + tig);
    }
  }
}

// B fragments of X^T for a query-group warp: row n = gid of the N = 8 side is head h0 + n %
// HPW of query i0 + n / HPW, zero past HPW * QPW and for the queries not in qbits.
template <typename T, int D, int HPW, int QPW>
__device__ __forceinline__ void load_group_frags(uint32_t (&xb)[D / 16][2],
                                                 const Bshd<const T>& x, int64_t b, int64_t i0,
                                                 int64_t h0, unsigned qbits, int lane) {
  const int gid = lane >> 2, tig = lane & 3;
  const int q = gid / HPW;
  const bool on = gid < HPW * QPW && ((qbits >> q) & 1u) != 0u;
#pragma unroll
  for (int f = 0; f < D / 16; ++f) {
    xb[f][0] = 0u;
    xb[f][1] = 0u;
    if (on) {
      const uint32_t* row =
          reinterpret_cast<const uint32_t*>(x.at(b, i0 + q, h0 + gid % HPW) + 16 * f);
      xb[f][0] = __ldg(row + tig);
      xb[f][1] = __ldg(row + 4 + tig);
    }
  }
}

// Bit q: query i0 + q of a query-group warp exists (< L) and attends (query_valid).
template <int QPW, class Policy>
__device__ __forceinline__ unsigned group_query_bits(const Policy& pol, int64_t b, int64_t i0,
                                                     int64_t L) {
  unsigned bits = 0u;
#pragma unroll
  for (int q = 0; q < QPW; ++q)
    if (i0 + q < L && pol.query_valid(b, i0 + q)) bits |= 1u << q;
  return bits;
}

// rowsum(dO * O) of head h0 + hl of query i, for a one-query warp: lane-strided partial sums
// of each of the HPW rows, then a butterfly (fixed order: every lane ends with the same bits,
// the order the generic kernel uses), and lane-uniform pick of row hl.
template <typename T, int D, int HPW>
__device__ __forceinline__ float head_rowsum(const Bshd<const T>& out, const Bshd<const T>& dout,
                                             int64_t b, int64_t i, int64_t h0, int hl, int lane) {
  float x[HPW];
#pragma unroll
  for (int hh = 0; hh < HPW; ++hh) {
    const T* orow = out.at(b, i, h0 + hh);
    const T* drow = dout.at(b, i, h0 + hh);
    float xs = 0.f;
    for (int d = lane; d < D; d += 32) xs = fmaf(to_float(drow[d]), to_float(orow[d]), xs);
#pragma unroll
    for (int o2 = 16; o2 > 0; o2 >>= 1) xs += __shfl_xor_sync(kFullMask, xs, o2);
    x[hh] = xs;
  }
  return pick<HPW>(x, hl);
}

// rowsum(dO * O) of lane hl's (query, head) row for a query-group warp (QPW > 1), the rows
// n < HPW * QPW being head h0 + n % HPW of query i0 + n / HPW, for the queries in rbits (0
// for the others): lanes 4 r .. 4 r + 3 take row r, 8-element pieces pc, pc + 4, ...
// (16-byte loads), then a two-step butterfly; lane hl reads its row's sum from lane 4 hl.
template <typename T, int D, int HPW, int QPW>
__device__ __forceinline__ float group_rowsum(const Bshd<const T>& out, const Bshd<const T>& dout,
                                              int64_t b, int64_t i0, int64_t h0, unsigned rbits,
                                              int hl, int lane) {
  const int r = lane >> 2, pc = lane & 3;
  float xs = 0.f;
  if (r < HPW * QPW && ((rbits >> (r / HPW)) & 1u) != 0u) {
    const T* orow = out.at(b, i0 + r / HPW, h0 + r % HPW);
    const T* drow = dout.at(b, i0 + r / HPW, h0 + r % HPW);
#pragma unroll
    for (int c = pc; c < D / kFrag; c += 4) {
      float fo[kFrag], fd[kFrag];
      load8_aligned(orow + c * kFrag, fo);
      load8_aligned(drow + c * kFrag, fd);
#pragma unroll
      for (int e = 0; e < kFrag; ++e) xs = fmaf(fd[e], fo[e], xs);
    }
  }
  xs += __shfl_xor_sync(kFullMask, xs, 1);
  xs += __shfl_xor_sync(kFullMask, xs, 2);
  return __shfl_sync(kFullMask, xs, 4 * hl);
}

// group_rowsum of two outputs against the same dO (the fused dQ's two branches): one load of
// each dO piece, both outputs' pieces loaded with it; each sum in group_rowsum's order, so
// both are bit-identical to two group_rowsum calls.
template <typename T, int D, int HPW, int QPW>
__device__ __forceinline__ void group_rowsum2(const Bshd<const T>& out_a, const Bshd<const T>& out_b,
                                              const Bshd<const T>& dout, int64_t b, int64_t i0,
                                              int64_t h0, unsigned rbits, int hl, int lane,
                                              float& xa, float& xb) {
  const int r = lane >> 2, pc = lane & 3;
  float sa = 0.f, sb = 0.f;
  if (r < HPW * QPW && ((rbits >> (r / HPW)) & 1u) != 0u) {
    const T* arow = out_a.at(b, i0 + r / HPW, h0 + r % HPW);
    const T* brow = out_b.at(b, i0 + r / HPW, h0 + r % HPW);
    const T* drow = dout.at(b, i0 + r / HPW, h0 + r % HPW);
#pragma unroll
    for (int c = pc; c < D / kFrag; c += 4) {
      float fa[kFrag], fb[kFrag], fd[kFrag];
      load8_aligned(arow + c * kFrag, fa);
      load8_aligned(brow + c * kFrag, fb);
      load8_aligned(drow + c * kFrag, fd);
#pragma unroll
      for (int e = 0; e < kFrag; ++e) {
        sa = fmaf(fd[e], fa[e], sa);
        sb = fmaf(fd[e], fb[e], sb);
      }
    }
  }
  sa += __shfl_xor_sync(kFullMask, sa, 1);
  sb += __shfl_xor_sync(kFullMask, sb, 1);
  sa += __shfl_xor_sync(kFullMask, sa, 2);
  sb += __shfl_xor_sync(kFullMask, sb, 2);
  xa = __shfl_sync(kFullMask, sa, 4 * hl);
  xb = __shfl_sync(kFullMask, sb, 4 * hl);
}

// Shared-memory byte offsets of this lane's ldmatrix row for a 16 x 16 tile of the staged
// rows (16 keys x 16 dims): `rows` as the A operand with the keys as M (K for S^T = K Q^T),
// `cols` through ldmatrix.trans as the A operand with the dims as M (V^T for O^T = V^T P^T).
template <class C>
__device__ __forceinline__ int tile_row_offset(int lane) {
  return ((lane & 7) + ((lane >> 3) & 1) * 8) * C::RS + (lane >> 4) * 8;
}
template <class C>
__device__ __forceinline__ int tile_col_offset(int lane) {
  return ((lane & 7) + (lane >> 4) * 8) * C::RS + ((lane >> 3) & 1) * 8;
}

// acc (16 x 8, keys x heads, C layout) rounded to E and transposed into the B fragment of
// the keys x heads operand of the next product (k = key, n = head).
template <typename E>
__device__ __forceinline__ void keys_heads_to_b(const float (&acc)[4], uint32_t& b0, uint32_t& b1) {
  b0 = movmatrix_trans(pack2<E>(acc[0], acc[1]));
  b1 = movmatrix_trans(pack2<E>(acc[2], acc[3]));
}

// Column of dim d in a row of the float staging area [8][OLD]: d ^ 4 when bit 5 of d is set
// (the upper 32 of every 64 dims). for_each_staged_piece reads a row's 8-float pieces as two
// float4 per lane, a quarter-warp at a time (8 lanes, pieces c .. c + 7 of one row at
// D >= 64); unswizzled, pieces c and c + 4 sit 32 words apart, on the same banks, and
// each LDS.128 took 8 wavefronts instead of 4 (session 20, Nsight on the H200: 2.1 M excess
// wavefronts in the fused forward at B=16 L=4096, 4% of its shared-memory wavefronts, in a
// kernel bound by L1/TEX data-pipe wavefronts at 87%). stage_heads' scalar stores flip the
// same bit for a whole instruction (16 f + gid [+ 8] share bit 5), so they stay
// conflict-free.
__host__ __device__ constexpr int staged_col(int d) { return d ^ ((d >> 3) & 4); }
static_assert(staged_col(35) == 39 && staged_col(43) == staged_col(35) + 8 &&
                  staged_col(31) == 31 && staged_col(100) == 96,
              "bit 2 flips with bit 5 only; + 8 commutes with it");

// Writes the head-major rows of the accumulators (O^T or dQ^T slices, C layout: dims x
// heads), each head column times mul[j], into the float staging area [8][OLD] (swizzled).
template <class C>
__device__ __forceinline__ void stage_heads(float* ost, const float (&acc)[C::NF][4],
                                            const float (&mul)[2], int lane) {
  const int gid = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int f = 0; f < C::NF; ++f) {
    // r0[8] is staged_col(16 f + gid + 8): adding 8 keeps bits 2 and 5.
    float* r0 = ost + (2 * tig) * C::OLD + staged_col(16 * f + gid);
    float* r1 = r0 + C::OLD;
    r0[0] = acc[f][0] * mul[0];
    r1[0] = acc[f][1] * mul[1];
    r0[8] = acc[f][2] * mul[0];
    r1[8] = acc[f][3] * mul[1];
  }
}

// Lazy reference of the online softmax (log2 units of the scaled scores): see softmax_rescale.
constexpr float kLazyMax = 8.f;

// The staged forwards use the lazy reference unless BLOSSOM_OPS_CUDA_LAZY_MAX=0 (read once):
// H100, D=64: fused forward 1.71 -> 1.59 ms at L=4096, 7.06 -> 6.53 at L=16384
// (csrc/cuda/NOTES.md, "Lazy softmax reference").
inline bool lazy_max_on() {
  static const bool on = !env_equals("BLOSSOM_OPS_CUDA_LAZY_MAX", "0");
  return on;
}

// One online-softmax step of a chunk for this lane's columns 2 tig + {0, 1}: the chunk max
// cmax reduced over each column's 8 lanes (fixed butterfly), the new running max m, msub (0
// while a column has seen no key: exp2(-inf - 0) = 0, never -inf - -inf), and alpha =
// exp2(m_old - msub) applied to lp and the O^T accumulators. FAST: fast_exp2, else exp2f.
// lazy: when no lane's chunk max (its own keys: cmax as passed in) exceeds its column's m by
// more than kLazyMax, the step keeps m as the reference (one vote instead of the butterfly,
// the exp2 and the 2 + 4 NF multiplies): the chunk's probabilities exp2(s - m) are then at
// most 2^kLazyMax, and lp, O and lse = m + log2(lp) stay exact up to rounding (m needs only
// to bound the scores closely enough that exp2 neither overflows nor loses the sum; the
// first chunk with a key always takes the full step, m being -inf). Every lane of the warp
// takes the same branch, so m stays the same on a column's 8 lanes.
template <class C, bool FAST>
__device__ __forceinline__ void softmax_rescale(float (&cmax)[2], float (&m)[2], float (&lp)[2],
                                                float (&o)[C::NF][4], float (&msub)[2],
                                                bool lazy = false) {
  if (lazy) {
    const bool grow = cmax[0] > m[0] + kLazyMax || cmax[1] > m[1] + kLazyMax;
    if (!__any_sync(kFullMask, grow)) {
      msub[0] = m[0] == -INFINITY ? 0.f : m[0];
      msub[1] = m[1] == -INFINITY ? 0.f : m[1];
      return;
    }
  }
  float alpha[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
#pragma unroll
    for (int o2 = 4; o2 < 32; o2 <<= 1)
      cmax[j] = fmaxf(cmax[j], __shfl_xor_sync(kFullMask, cmax[j], o2));
    const float mn = fmaxf(m[j], cmax[j]);
    msub[j] = mn == -INFINITY ? 0.f : mn;
    alpha[j] = FAST ? fast_exp2(m[j] - msub[j]) : exp2f(m[j] - msub[j]);
    m[j] = mn;
    lp[j] *= alpha[j];
  }
#pragma unroll
  for (int f = 0; f < C::NF; ++f) {
    o[f][0] *= alpha[0];
    o[f][1] *= alpha[1];
    o[f][2] *= alpha[0];
    o[f][3] *= alpha[1];
  }
}

// The 16-byte pieces of the staged output rows (float [8][OLD], column n = head h0 + n % HPW
// of query i0 + n / HPW), spread over the lanes: store(q, hh, c, v8, k) for piece c of every
// row of a query below L; k < staged_pieces_per_lane is the piece's turn on its lane (the same
// lane and turn for the same piece in every kernel of one D, HPW, QPW).
template <class C, int HPW, int QPW>
constexpr int staged_pieces_per_lane() {
  return (HPW * QPW * C::CPR + 31) / 32;
}
template <class C, int HPW, int QPW, class Store>
__device__ __forceinline__ void for_each_staged_piece(const float* ost, int64_t i0, int64_t L,
                                                      int lane, Store&& store) {
#pragma unroll
  for (int k = 0; k < staged_pieces_per_lane<C, HPW, QPW>(); ++k) {
    const int t = lane + 32 * k;
    if (t >= HPW * QPW * C::CPR) break;
    const int n = t / C::CPR, c = t % C::CPR;
    const int q = QPW == 1 ? 0 : n / HPW, hh = QPW == 1 ? n : n % HPW;
    if (QPW > 1 && i0 + q >= L) continue;
    // The piece's second half, dims 8 c + 4 .., sits at staged_col(8 c) ^ 4.
    const float* row = ost + n * C::OLD;
    const int col = staged_col(c * kFrag);
    const float4 a0 = *reinterpret_cast<const float4*>(row + col);
    const float4 a1 = *reinterpret_cast<const float4*>(row + (col ^ 4));
    float v8[kFrag] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
    store(q, hh, c, v8, k);
  }
}

// End of a staged forward warp: l of each column summed over its 8 lanes (fixed butterfly),
// O normalised by 1 / l and written through shared memory (the K/V buffers) as 16-byte rows,
// lse = (m + log2 l) ln 2. Column n < HPW * QPW is head h0 + n % HPW of query i0 + n / HPW;
// rows of queries past L (the last group of an odd L) are not written. GATE: each piece also
// leaves blossom_attention's gated sum in p.gate.out (attn_gate_epilogue.cuh). The fused
// forward (attn_fwd_fused.cuh) passes `keep` (its first branch: each stored piece's words, by
// turn k of for_each_staged_piece) and `own0` (its gated second branch: branch 0's pieces
// from those words instead of memory); both null otherwise.
template <class C, int HPW, int QPW, typename T, bool GATE = false>
__device__ __forceinline__ void finish_fwd_warp(const AttnFwdParams<T, float>& p,
                                                unsigned char* base, const float (&o)[C::NF][4],
                                                const float (&m)[2], const float (&lp)[2],
                                                int64_t b, int64_t i0, int64_t h0, int lane,
                                                uint4* keep = nullptr,
                                                const uint4* own0 = nullptr) {
  const int gid = lane >> 2, tig = lane & 3;
  const int64_t L = p.shape.q_len, Hq = p.shape.q_heads;
  float l[2], inv[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    l[j] = lp[j];
#pragma unroll
    for (int o2 = 4; o2 < 32; o2 <<= 1) l[j] += __shfl_xor_sync(kFullMask, l[j], o2);
    inv[j] = l[j] > 0.f ? fast_rcp(l[j]) : 0.f;  // l >= 1 once a key was seen
  }
  __syncwarp();  // the K/V buffers become the output staging area
  float* ost = reinterpret_cast<float*>(base);
  stage_heads<C>(ost, o, inv, lane);
  [[maybe_unused]] float* gw = ost + 8 * C::OLD;  // GATE: the rows' weights [3][8] after them
  static_assert(!GATE || (8 * C::OLD + 3 * 8) * 4 <= C::kv_bytes, "gate weights must fit");
  if constexpr (GATE) stage_gate_weights<T, HPW, QPW>(p.gate, gw, b, i0, h0, L, Hq, lane);
  __syncwarp();
  T* const orow = p.out.at(b, i0, h0);  // the pieces' offsets from here are small products
  for_each_staged_piece<C, HPW, QPW>(ost, i0, L, lane,
                                     [&](int q, int hh, int c, float (&v8)[kFrag], int k) {
    T* dst = orow + q * p.out.stride_l + hh * p.out.stride_h + c * kFrag;
    if constexpr (GATE) {  // p.out contiguous: dst's offset is the piece's in every buffer
      store8_gated(p.gate, dst - p.out.ptr, v8, dst, gw + q * HPW + hh,
                   own0 != nullptr ? own0 + k : nullptr);
    } else if (keep != nullptr) {
      keep[k] = pack8(v8, dst);
      *reinterpret_cast<uint4*>(dst) = keep[k];
    } else {
      store8_aligned(dst, v8);
    }
  });
  if (gid == 0) {
    float* const lrow = p.lse + (b * L + i0) * Hq + h0;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int n = 2 * tig + j;
      const int q = QPW == 1 ? 0 : n / HPW, hh = QPW == 1 ? n : n % HPW;
      if (n < HPW * QPW && (QPW == 1 || i0 + q < L))
        lrow[q * Hq + hh] = l[j] > 0.f ? (m[j] + __log2f(l[j])) * kLn2 : -INFINITY;
    }
  }
}

// End of a staged dQ warp: dQ^T times scale written (or added, p.accumulate) through shared
// memory as 16-byte rows; rows as in finish_fwd_warp.
template <class C, int HPW, int QPW, typename T>
__device__ __forceinline__ void store_dq_warp(const AttnBwdParams<T, float>& p, unsigned char* base,
                                              const float (&dq)[C::NF][4], int64_t b, int64_t i0,
                                              int64_t h0, int lane) {
  const int64_t L = p.shape.q_len;
  __syncwarp();  // the K/V buffers become the output staging area
  float* ost = reinterpret_cast<float*>(base);
  const float sc = static_cast<float>(p.shape.scale);
  const float mul[2] = {sc, sc};
  stage_heads<C>(ost, dq, mul, lane);
  __syncwarp();
  T* const grow = p.grad_q.at(b, i0, h0);
  for_each_staged_piece<C, HPW, QPW>(ost, i0, L, lane,
                                     [&](int q, int hh, int c, float (&v8)[kFrag], int) {
    store8_acc(grow + q * p.grad_q.stride_l + hh * p.grad_q.stride_h + c * kFrag, v8,
               p.accumulate);
  });
}

// The queries of a dQ warp whose rows get per-row terms: the valid ones (qbits), and when
// gated every query below L (a padded row still has a gate gradient; attn_gate_fold.cuh).
template <int QPW>
__device__ __forceinline__ unsigned dq_row_bits(bool gated, unsigned qbits, int64_t i0,
                                                int64_t L) {
  unsigned rbits = qbits;
  if (gated) {
#pragma unroll
    for (int q = 0; q < QPW; ++q)
      if (i0 + q < L) rbits |= 1u << q;
  }
  return rbits;
}

// A row's dQ terms t (delta, lse * log2(e)) of lane n < NR's row n, spread to this lane's
// columns 2 tig + {0, 1} (dq_prologue and dq_prologue_pair).
__device__ __forceinline__ void dq_cols(const float (&t)[2], int lane, float (&my_lse2)[2],
                                        float (&my_dlt)[2]) {
  const int tig = lane & 3;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    my_lse2[j] = __shfl_sync(kFullMask, t[1], 2 * tig + j);
    my_dlt[j] = __shfl_sync(kFullMask, t[0], 2 * tig + j);
  }
}

// Prologue of both staged dQ kernels (per-slot and block-chunk): rowsum(dO * O) of each
// (query, head) row of the warp, the per-row terms (dq_row_terms: delta, lse; gated: lse',
// grad_gate) by lane n < NR for row n, delta = 0 for the rows of padded queries, then
// body(my_lse2, my_dlt) with this lane's columns 2 tig + {0, 1} of those terms (shuffled;
// lanes >= NR computed row 0: finite, and only read for padding columns) when some row has
// terms. A gated backward (attn_gate_fold.cuh) also needs the rowsums of padded rows, for
// their gate gradient: rbits, the queries whose rows get terms (warp-uniform), then holds
// every query below L. Rows are head h0 + n % HPW of query i0 + n / HPW.
template <typename T, int D, int HPW, int QPW, class Body>
__device__ __forceinline__ void dq_prologue(const AttnBwdParams<T, float>& p,
                                            float* __restrict__ delta, int64_t b, int64_t i0,
                                            int64_t h0, unsigned qbits, int lane, Body&& body) {
  constexpr int NR = HPW * QPW;  // (query, head) rows of the warp
  const int64_t L = p.shape.q_len, Hq = p.shape.q_heads;
  // Row of lane n < NR's (query, head) in the [B, L, Hq] arrays (lanes >= NR: row 0's).
  const int hl = lane < NR ? lane : 0, ql = hl / HPW;
  const int64_t my_row = (b * L + i0 + ql) * Hq + h0 + hl % HPW;
  const unsigned rbits = dq_row_bits<QPW>(p.gate.ptr != nullptr, qbits, i0, L);
  if (rbits != 0u) {
    float xl;  // rowsum(dO * O) of lane hl's row
    if constexpr (QPW == 1) {
      xl = head_rowsum<T, D, HPW>(p.out, p.grad_out, b, i0, h0, hl, lane);
    } else {
      xl = group_rowsum<T, D, HPW, QPW>(p.out, p.grad_out, b, i0, h0, rbits, hl, lane);
    }
    float t[2] = {0.f, 0.f};  // delta, lse * log2(e)
    if (((rbits >> ql) & 1u) != 0u) {
      dq_row_terms(p, b, i0 + ql, h0 + hl % HPW, my_row, xl, ((qbits >> ql) & 1u) != 0u,
                   lane < NR, delta, t[0], t[1]);
    } else if (lane < NR && i0 + ql < L) {
      delta[my_row] = 0.f;
    }
    float my_lse2[2], my_dlt[2];
    dq_cols(t, lane, my_lse2, my_dlt);
    body(static_cast<const float(&)[2]>(my_lse2), static_cast<const float(&)[2]>(my_dlt));
  } else if (lane < NR && i0 + ql < L) {
    delta[my_row] = 0.f;
  }
}

// dq_prologue for the fused dQ's two branches (ps: block-sparse, pw: window; the same q, dO,
// validity and gate presence, checked by its launcher) with their loads issued together: both
// rows' lse and gate logits, then one pass over dO and both outputs (group_rowsum2), instead
// of the second branch's round trips after the first branch's chunk loop (session 13: ~5% of
// the fused dQ's stall samples waited there). Same values and stores as two dq_prologue
// calls. Leaves this lane's row terms (lane n < NR: row n; zeros where a row has none) in
// t_*; dq_cols spreads them to the lane's columns.
template <typename T, int D, int HPW, int QPW>
__device__ __forceinline__ void dq_prologue_pair(const AttnBwdParams<T, float>& ps,
                                                 float* __restrict__ delta_s,
                                                 const AttnBwdParams<T, float>& pw,
                                                 float* __restrict__ delta_w, int64_t b,
                                                 int64_t i0, int64_t h0, unsigned qbits, int lane,
                                                 float (&t_s)[2], float (&t_w)[2]) {
  constexpr int NR = HPW * QPW;
  const int64_t L = ps.shape.q_len, Hq = ps.shape.q_heads;
  const int hl = lane < NR ? lane : 0, ql = hl / HPW;
  const int64_t my_row = (b * L + i0 + ql) * Hq + h0 + hl % HPW;
  const unsigned rbits = dq_row_bits<QPW>(ps.gate.ptr != nullptr, qbits, i0, L);
  t_s[0] = t_s[1] = t_w[0] = t_w[1] = 0.f;  // [0] delta, [1] lse * log2(e)
  const bool has = ((rbits >> ql) & 1u) != 0u;
  if (rbits != 0u) {
    DqRowIn in_s{0.f, 0.f}, in_w{0.f, 0.f};
    if (has) {
      in_s = dq_row_in(ps, b, i0 + ql, h0 + hl % HPW, my_row);
      in_w = dq_row_in(pw, b, i0 + ql, h0 + hl % HPW, my_row);
    }
    float xs, xw;
    group_rowsum2<T, D, HPW, QPW>(ps.out, pw.out, ps.grad_out, b, i0, h0, rbits, hl, lane, xs,
                                  xw);
    if (has) {
      const bool qv = ((qbits >> ql) & 1u) != 0u;
      dq_row_terms(ps, in_s, b, i0 + ql, h0 + hl % HPW, my_row, xs, qv, lane < NR, delta_s,
                   t_s[0], t_s[1]);
      dq_row_terms(pw, in_w, b, i0 + ql, h0 + hl % HPW, my_row, xw, qv, lane < NR, delta_w,
                   t_w[0], t_w[1]);
      return;
    }
  }
  if (lane < NR && i0 + ql < L) {
    delta_s[my_row] = 0.f;
    delta_w[my_row] = 0.f;
  }
}

// Warp -> (b, query i, KV group g, first head h0) of the staged kernels; false past the
// last warp. 32-bit division: stage_grid keeps the warp count below 2^32, and each 64-bit
// division is a ~70-instruction call (four of them were ~10% of a block-sparse forward warp).
template <int HPW>
__device__ __forceinline__ bool stage_coords(const AttnShape& s, int wib, int64_t& b, int64_t& i,
                                             int64_t& g, int64_t& h0) {
  const uint32_t G = static_cast<uint32_t>(s.q_heads) / static_cast<uint32_t>(s.kv_heads);
  const uint32_t chunks = G / HPW, hcs = static_cast<uint32_t>(s.kv_heads) * chunks;
  const uint32_t L = static_cast<uint32_t>(s.q_len);
  const uint32_t warp = blockIdx.x * kStageWarps + static_cast<uint32_t>(wib);
  if (static_cast<int64_t>(warp) >= s.batch * hcs * s.q_len) return false;
  const uint32_t rest = warp / L, hc = rest % hcs;
  i = warp - rest * L;
  b = rest / hcs;
  g = hc / chunks;
  h0 = static_cast<int64_t>(g) * G + (hc - static_cast<uint32_t>(g) * chunks) * HPW;
  return true;
}

// n / d for 0 <= n < 2^31 as a multiply-high and a shift, with d >= 1 fixed on the host
// (round-up reciprocal: m = ceil(2^(31 + l) / d), l = ceil(log2 d), q = umulhi(n, m) >> (l - 1);
// m = 0 stands for d = 1). Three instructions where a 32-bit division by a runtime value
// is ~20: stage_coords divided four times per warp, ~140 of a block-chunk warp's ~1,100.
// scripts/emulate_staged_blk.py checks it against n / d.
struct TcDiv {
  uint32_t d = 1, m = 0, s = 0;
  static TcDiv make(uint32_t d) {
    TcDiv r;
    r.d = d;
    if (d > 1) {
      uint32_t l = 0;
      while ((uint64_t(1) << l) < d) ++l;
      r.m = static_cast<uint32_t>(((uint64_t(1) << (31 + l)) + d - 1) / d);
      r.s = l - 1;
    }
    return r;
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const {
    return m == 0 ? n : __umulhi(n, m) >> s;
  }
};

// Warp -> (b, i, g, h0) for the block-chunk kernels: stage_coords with the divisions done by
// TcDiv (the launcher checks that the warp count is below 2^31). With qpw > 1 (query groups
// of the block-chunk kernels) a warp takes qpw consecutive queries and i counts groups.
struct TcGrid {
  TcDiv by_len, by_hcs, by_chunks;  // ceil(L / qpw), Hk * chunks, chunks = G / HPW
  uint32_t group = 1;               // G
  uint32_t warps = 0;               // B * Hk * chunks * ceil(L / qpw)
  static TcGrid make(const AttnShape& s, int hpw, int qpw = 1) {
    TcGrid r;
    const uint32_t chunks = static_cast<uint32_t>(s.group() / hpw);
    const int64_t groups = (s.q_len + qpw - 1) / qpw;
    r.by_len = TcDiv::make(static_cast<uint32_t>(groups));
    r.by_hcs = TcDiv::make(static_cast<uint32_t>(s.kv_heads) * chunks);
    r.by_chunks = TcDiv::make(chunks);
    r.group = static_cast<uint32_t>(s.group());
    r.warps = static_cast<uint32_t>(s.batch * s.kv_heads * chunks * groups);
    return r;
  }
};

template <int HPW>
__device__ __forceinline__ bool stage_coords_fast(const TcGrid& gr, int wib, int64_t& b,
                                                  int64_t& i, int64_t& g, int64_t& h0) {
  const uint32_t warp = blockIdx.x * kStageWarps + static_cast<uint32_t>(wib);
  if (warp >= gr.warps) return false;
  const uint32_t rest = gr.by_len.div(warp);
  const uint32_t bb = gr.by_hcs.div(rest);
  const uint32_t hc = rest - bb * gr.by_hcs.d;
  const uint32_t gg = gr.by_chunks.div(hc);
  i = warp - rest * gr.by_len.d;
  b = bb;
  g = gg;
  h0 = static_cast<int64_t>(gg) * gr.group + (hc - gg * gr.by_chunks.d) * HPW;
  return true;
}

// Resident CTAs per SM the register budget must allow up to D = 64: 16 warps forward, 14
// dQ (<= 128 / 144 registers). D = 128 is limited by shared memory anyway. The deduped query
// pairs (DD) ask for the occupancy of the pairs without dedupe: unbounded, ptxas gave the dQ
// 114-116 registers at D = 64 (16 warps per SM instead of 20 at 96) and the forward 77-78
// at D = 16 (24 warps instead of 28 at 70-71). Bounded (dQ 18 warps, forward D = 16 28
// warps) they take <= 96 / <= 72 without spills and ~+30 static instructions per chunk.
template <int D, bool DQ, bool DD = false>
constexpr int tc_min_ctas() {
  return D <= 64 ? ((DQ ? (DD ? 18 : 14) : (DD && D <= 16 ? 28 : 16)) + kStageWarps - 1) /
                       kStageWarps
                 : 1;
}

// ------------------------------------------------------------------------------ forward
// The per-slot forward chunk loop of one warp: the online softmax of this lane's columns
// (running max m, partial sums lp, O^T accumulators o) over the keys of query i (and i + 1
// for QPW = 2), with qb the warp's Q fragments. Shared by attn_fwd_kernel_tc and the fused
// block-sparse + window forward (attn_fwd_fused.cuh); base is the warp's TcCfg<D> area.
template <typename T, int D, int HPW, class Policy, bool LEAN, int QPW, bool DD>
__device__ __forceinline__ void slot_fwd_chunks(const AttnFwdParams<T, float>& p, const Policy& pol,
                                                unsigned char* base, int64_t b, int64_t i,
                                                int64_t g, unsigned qbits,
                                                const uint32_t (&qb)[D / 16][2], int lane,
                                                float (&o)[D / 16][4], float (&m)[2],
                                                float (&lp)[2]) {
  using C = TcCfg<D>;
  using E = typename TcElem<T>::type;
  const int gid = lane >> 2, tig = lane & 3;
  // This lane's columns: query i + cq[j] (cq >= QPW: padding column, no keys).
  const int cq[2] = {(2 * tig) / HPW, (2 * tig + 1) / HPW};
  TcWarp<T, C, Policy, LEAN, QPW, DD> w;
  w.setup(p, pol, base, b, i, g, qbits, lane);
  const float qsc = static_cast<float>(p.shape.scale) * kLog2e;
  const int a_row = tile_row_offset<C>(lane), a_col = tile_col_offset<C>(lane);
  w.for_each_chunk(pol, [&](int buf, int cnt, int c0, unsigned m2) {
    // Chunk positions of this lane's columns: [lo, hi); DD: the bits of cm, shifted by gid
    // (bit t * 16 + 8 h: key t * 16 + gid + 8 h).
    int lo[2], hi[2];
    unsigned cm[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      lo[j] = QPW == 1 ? 0 : (cq[j] == 1 ? c0 : 0);
      hi[j] = QPW == 1 ? cnt : (cq[j] == 0 ? c0 : (cq[j] == 1 ? cnt : 0));
      cm[j] = (cq[j] == 0 ? (c0 >= 32 ? kFullMask : (1u << c0) - 1u) : (cq[j] == 1 ? m2 : 0u))
              >> gid;
    }
    const E* kb = w.kbuf(buf);
    const E* vb = w.vbuf(buf);
    float sc[C::KT][4];
#pragma unroll
    for (int t = 0; t < C::KT; ++t) {
      sc[t][0] = sc[t][1] = sc[t][2] = sc[t][3] = 0.f;
      if (t * 16 < cnt) {
#pragma unroll
        for (int f = 0; f < C::NF; ++f) {
          uint32_t a[4];
          ldmatrix_x4(a, kb + t * 16 * C::RS + 16 * f + a_row);
          mma16816<E>(sc[t], a, qb[f][0], qb[f][1]);
        }
      }
    }
    // Scaled scores (keys past cnt: -inf) and the chunk max of heads 2 tig + {0, 1}.
    float cmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int t = 0; t < C::KT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = t * 16 + gid + (e >> 1) * 8;
        const bool in = DD ? ((cm[e & 1] >> (t * 16 + (e >> 1) * 8)) & 1u) != 0u
                           : key >= lo[e & 1] && key < hi[e & 1];
        const float x = in ? sc[t][e] * qsc : -INFINITY;
        sc[t][e] = x;
        cmax[e & 1] = fmaxf(cmax[e & 1], x);
      }
    float msub[2];
    softmax_rescale<C, LEAN>(cmax, m, lp, o, msub, p.lazy_max);
#pragma unroll
    for (int t = 0; t < C::KT; ++t) {
      if (t * 16 < cnt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          sc[t][e] = LEAN ? fast_exp2(sc[t][e] - msub[e & 1]) : exp2f(sc[t][e] - msub[e & 1]);
          lp[e & 1] += sc[t][e];
        }
        uint32_t pb0, pb1;
        keys_heads_to_b<E>(sc[t], pb0, pb1);
#pragma unroll
        for (int f = 0; f < C::NF; ++f) {
          uint32_t a[4];
          ldmatrix_x4_trans(a, vb + t * 16 * C::RS + 16 * f + a_col);
          mma16816<E>(o[f], a, pb0, pb1);
        }
      }
    }
  });
}

// QPW = 2 (LEAN only): query pairs, see TcWarp; a column's keys are the chunk positions of
// its query, [0, c0) or [c0, cnt) (DD: [0, c0) or the bits of m2), and it sees exactly 0
// from the other query's keys.
// GATE (query pairs only): blossom_attention's gate in the epilogue (p.gate).
template <typename T, int D, int HPW, class Policy, bool LEAN = false, int QPW = 1,
          bool DD = false, bool GATE = false>
__global__ void __launch_bounds__(kStageWarps * 32, tc_min_ctas<D, false, DD>())
    attn_fwd_kernel_tc(const AttnFwdParams<T, float> p, const Policy pol, const TcGrid grid) {
  using C = TcCfg<D>;
  static_assert(HPW * QPW <= 8, "the (query, head) columns are the N = 8 side of the products");
  static_assert(!GATE || (LEAN && QPW == 2), "the gated epilogue is built for query pairs only");
  extern __shared__ __align__(128) unsigned char smem_tc[];
  const int lane = threadIdx.x & 31;
  const int wib = threadIdx.x >> 5;
  const AttnShape& s = p.shape;
  const int64_t L = s.q_len;
  int64_t b, i, g, h0;
  if (LEAN ? !stage_coords_fast<HPW>(grid, wib, b, i, g, h0)
           : !stage_coords<HPW>(s, wib, b, i, g, h0))
    return;  // uniform per warp
  i *= QPW;  // QPW = 2: the first query of the pair

  unsigned char* base = smem_tc + wib * C::warp_bytes;
  // This lane's heads are 2 tig + {0, 1}: running max m, partial sum lp, O^T columns.
  float o[C::NF][4];
#pragma unroll
  for (int f = 0; f < C::NF; ++f) o[f][0] = o[f][1] = o[f][2] = o[f][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, lp[2] = {0.f, 0.f};

  const unsigned qbits = group_query_bits<QPW>(pol, b, i, L);
  if (qbits != 0u) {
    uint32_t qb[C::NF][2];
    load_group_frags<T, D, HPW, QPW>(qb, p.q, b, i, h0, qbits, lane);
    slot_fwd_chunks<T, D, HPW, Policy, LEAN, QPW, DD>(p, pol, base, b, i, g, qbits, qb, lane, o,
                                                      m, lp);
  }

  finish_fwd_warp<C, HPW, QPW, T, GATE>(p, base, o, m, lp, b, i, h0, lane);
}

// ------------------------------------------------------------------------------ dQ
// The per-slot dQ chunk loop of one warp, after its prologue: dq += K^T dS^T over the keys of
// query i (and i + 1 for QPW = 2), with qb / ob the warp's Q and dO fragments and my_lse2 /
// my_dlt this lane's columns' terms (dq_prologue). Shared by attn_dq_kernel_tc and the fused
// block-sparse + window dQ (attn_dq_fused.cuh); base is the warp's TcCfg<D> area.
template <typename T, int D, int HPW, class Policy, bool LEAN, int QPW, bool DD>
__device__ __forceinline__ void slot_dq_chunks(const AttnBwdParams<T, float>& p, const Policy& pol,
                                               unsigned char* base, int64_t b, int64_t i,
                                               int64_t g, unsigned qbits,
                                               const uint32_t (&qb)[D / 16][2],
                                               const uint32_t (&ob)[D / 16][2],
                                               const float (&my_lse2)[2],
                                               const float (&my_dlt)[2], int lane,
                                               float (&dq)[D / 16][4]) {
  using C = TcCfg<D>;
  using E = typename TcElem<T>::type;
  constexpr int NR = HPW * QPW;  // (query, head) rows of the warp
  const int gid = lane >> 2, tig = lane & 3;
  int cq[2];  // this lane's columns: query i + cq[j] (cq >= QPW: padding column)
#pragma unroll
  for (int j = 0; j < 2; ++j) cq[j] = 2 * tig + j < NR ? (2 * tig + j) / HPW : QPW;
  TcWarp<T, C, Policy, LEAN, QPW, DD> w;
  w.setup(p, pol, base, b, i, g, qbits, lane);
  const float qsc = static_cast<float>(p.shape.scale) * kLog2e;
  const int a_row = tile_row_offset<C>(lane), a_col = tile_col_offset<C>(lane);
  w.for_each_chunk(pol, [&](int buf, int cnt, int c0, unsigned m2) {
    const E* kb = w.kbuf(buf);
    const E* vb = w.vbuf(buf);
    // Chunk positions of this lane's columns: [lo, hi) (empty for padding columns); DD:
    // the bits of cm, shifted by gid.
    int lo[2], hi[2];
    unsigned cm[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (cq[j] >= QPW) {
        lo[j] = hi[j] = 0;
      } else if (QPW == 1) {
        lo[j] = 0;
        hi[j] = cnt;
      } else {
        lo[j] = cq[j] == 0 ? 0 : c0;
        hi[j] = cq[j] == 0 ? c0 : cnt;
      }
      cm[j] = (cq[j] == 0 ? (c0 >= 32 ? kFullMask : (1u << c0) - 1u)
                          : (cq[j] == 1 ? m2 : 0u)) >> gid;
    }
#pragma unroll
    for (int t = 0; t < C::KT; ++t) {
      if (t * 16 < cnt) {
        // S^T = K Q^T and dP^T = V dO^T.
        float sc[4] = {0.f, 0.f, 0.f, 0.f}, dp[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int f = 0; f < C::NF; ++f) {
          uint32_t a[4];
          ldmatrix_x4(a, kb + t * 16 * C::RS + 16 * f + a_row);
          mma16816<E>(sc, a, qb[f][0], qb[f][1]);
          ldmatrix_x4(a, vb + t * 16 * C::RS + 16 * f + a_row);
          mma16816<E>(dp, a, ob[f][0], ob[f][1]);
        }
        // dS^T, exactly 0 outside the column's positions (padding columns included).
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = t * 16 + gid + (e >> 1) * 8;
          const int j = e & 1;
          const bool in = DD ? ((cm[j] >> (t * 16 + (e >> 1) * 8)) & 1u) != 0u
                             : key >= lo[j] && key < hi[j];
          sc[e] = in
                      ? (LEAN ? fast_exp2(fmaf(sc[e], qsc, -my_lse2[j]))
                              : exp2f(fmaf(sc[e], qsc, -my_lse2[j]))) *
                            (dp[e] - my_dlt[j])
                      : 0.f;
        }
        uint32_t db0, db1;
        keys_heads_to_b<E>(sc, db0, db1);
        // dQ^T += K^T dS^T.
#pragma unroll
        for (int f = 0; f < C::NF; ++f) {
          uint32_t a[4];
          ldmatrix_x4_trans(a, kb + t * 16 * C::RS + 16 * f + a_col);
          mma16816<E>(dq[f], a, db0, db1);
        }
      }
    }
  });
}

// Also writes delta[b, i, h] = dot(dO, O) - grad_lse (0 for padded rows) for the dK/dV pass;
// gated (p.gate set): the gate gradient and lse' too (attn_gate_fold.cuh). QPW = 2 (LEAN
// only): query pairs as in the forward (DD: without repeated keys).
template <typename T, int D, int HPW, class Policy, bool LEAN = false, int QPW = 1,
          bool DD = false>
__global__ void __launch_bounds__(kStageWarps * 32, tc_min_ctas<D, true, DD>())
    attn_dq_kernel_tc(const AttnBwdParams<T, float> p, const Policy pol, float* __restrict__ delta,
                      const TcGrid grid) {
  using C = TcCfg<D>;
  constexpr int NR = HPW * QPW;  // (query, head) rows of the warp
  static_assert(NR <= 8, "the (query, head) columns are the N = 8 side of the products");
  extern __shared__ __align__(128) unsigned char smem_tc[];
  const int lane = threadIdx.x & 31;
  const int wib = threadIdx.x >> 5;
  const AttnShape& s = p.shape;
  const int64_t L = s.q_len;
  int64_t b, i, g, h0;
  if (LEAN ? !stage_coords_fast<HPW>(grid, wib, b, i, g, h0)
           : !stage_coords<HPW>(s, wib, b, i, g, h0))
    return;  // uniform per warp
  i *= QPW;  // QPW = 2: the first query of the pair

  unsigned char* base = smem_tc + wib * C::warp_bytes;
  float dq[C::NF][4];
#pragma unroll
  for (int f = 0; f < C::NF; ++f) dq[f][0] = dq[f][1] = dq[f][2] = dq[f][3] = 0.f;

  const unsigned qbits = group_query_bits<QPW>(pol, b, i, L);
  // The rowsums and per-row terms (the padding columns' dS is forced to 0 below).
  dq_prologue<T, D, HPW, QPW>(p, delta, b, i, h0, qbits, lane, [&](const float (&my_lse2)[2],
                                                                    const float (&my_dlt)[2]) {
    if (qbits != 0u) {
      uint32_t qb[C::NF][2], ob[C::NF][2];
      load_group_frags<T, D, HPW, QPW>(qb, p.q, b, i, h0, qbits, lane);
      load_group_frags<T, D, HPW, QPW>(ob, p.grad_out, b, i, h0, qbits, lane);
      slot_dq_chunks<T, D, HPW, Policy, LEAN, QPW, DD>(p, pol, base, b, i, g, qbits, qb, ob,
                                                       my_lse2, my_dlt, lane, dq);
    }
  });

  store_dq_warp<C, HPW, QPW>(p, base, dq, b, i, h0, lane);
}

// ------------------------------------------------------------------------ block chunks
// A Policy whose keys come in aligned blocks (block-sparse attention) may describe them per
// block instead of per slot; the kernels below then stage one 16-key segment of a block per
// chunk, with no per-key enumeration, division or compaction:
//   static constexpr bool kBlockChunks = true;
//   bool block_chunks_ok() const;       // host: the mask fits (block size % 16 == 0, <= 32
//                                       // slots, positions < 2^30)
//   int blk_size() const;               // keys per block
//   int blk_slots() const;              // slots per query: the own block + n selected
//   int slot_block(b, i, g, s) const;   // block of slot s (s = 0: the own block), or -1;
//                                       // repeats are removed here, by the kernel
//   int key_end(i) const;               // keys >= key_end(i) never attend (length, causal)
//   bool keys_all_valid() const;        // no key padding: key_valid(b, j) is always true
// Everything else of the mask (key_valid, query_valid) comes from the usual hooks.
// A Policy with `static constexpr bool kGateEpilogue = true` (the sliding window: the last
// branch of blossom_attention's forward) gets the gated instance of the query-pair forward
// (attn_gate_epilogue.cuh); the others are not built with it.
template <class P, class = void>
struct has_gate_epilogue : std::false_type {};
template <class P>
struct has_gate_epilogue<P, std::void_t<decltype(P::kGateEpilogue)>>
    : std::integral_constant<bool, P::kGateEpilogue> {};

template <class P, class = void>
struct has_block_chunks : std::false_type {};
template <class P>
struct has_block_chunks<P, std::void_t<decltype(P::kBlockChunks)>>
    : std::integral_constant<bool, P::kBlockChunks> {};

// Per-column chunk masks of a query-group warp. Column 2 tig + j belongs to query
// i0 + q[j]; a chunk at key0, listed by the queries qm, with staged mask `mask`, attends for
// that column at keys before its causal edge kend[j], and only when q[j] is in qm. bits()
// returns, for column j, the chunk mask shifted by gid (bit 0: key gid, bit 8: key gid + 8),
// like the QPW = 1 kernels' `mask >> gid`. Only a chunk that reaches past the first query's
// edge (the diagonal chunk of causal attention) needs the per-column edge (warp-uniform
// branch); the others cost two instructions per column.
template <int HPW, int QPW>
struct ColumnMasks {
  unsigned qbit[2] = {1u, 1u};
  int kend[2] = {0, 0}, kend_first = 0;
  template <class Policy>
  __device__ __forceinline__ void init(const Policy& pol, int64_t i0, int tig) {
    if constexpr (QPW > 1) {
      kend_first = pol.key_end(i0);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int q = (2 * tig + j) / HPW;
        qbit[j] = 1u << q;
        kend[j] = pol.key_end(i0 + q);
      }
    }
  }
  __device__ __forceinline__ void bits(uint32_t mask, int key0, unsigned qm, int gid,
                                       uint32_t (&mk)[2]) const {
    const uint32_t m = mask >> gid;
    if constexpr (QPW == 1) {
      mk[0] = mk[1] = m;
    } else if (key0 + 16 <= kend_first) {
#pragma unroll
      for (int j = 0; j < 2; ++j) mk[j] = (qm & qbit[j]) != 0u ? m : 0u;
    } else {
      const int kg = key0 + gid;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const uint32_t lo = kg < kend[j] ? 1u : 0u, hi = kg + 8 < kend[j] ? 0x100u : 0u;
        mk[j] = (qm & qbit[j]) != 0u ? m & (lo | hi) : 0u;
      }
    }
  }
};

// One warp's block list, staging buffers and copy geometry for the block-chunk kernels.
// Chunk ch is segment ch % spb (16 keys) of the (ch / spb)-th listed block, spb = bs / 16.
// Every row of a staged chunk is written: the row's K/V piece when the key attends, zeros
// otherwise (cp.async with src-size 0), so the buffers need no zero fill and no stale or
// padding (possibly NaN) row is ever multiplied, even by p = 0.
//
// Query groups (QPW > 1): the warp serves QPW consecutive queries i0 .. i0 + QPW - 1, whose
// HPW heads fill the N = 8 columns of the products (column n: query n / HPW, head n % HPW;
// with QPW = 1 the columns past HPW are padding). The list holds the distinct blocks of all
// of them (first appearance in (query, slot) order) with the bit set of the queries that
// list each; a chunk's key mask is then per column: the block is the column's, and the key
// is before the column's causal edge. The per-warp work (coordinates, Q / dO fragments,
// rowsums, epilogue) is shared by QPW queries, and a block two of them select (the own
// block, nearly always) is staged once.
template <typename T, class C, class Policy, int QPW = 1>
struct TcBlkWarp {
  using E = typename TcElem<T>::type;
  static_assert(C::KC == 16, "a block chunk is one 16-key segment");
  static_assert(QPW == 1 || QPW == 2 || QPW == 4 || QPW == 8, "queries per warp");
  // List entry: block | (query bit set << kQShift); the launcher keeps blocks below 2^23.
  static constexpr int kQShift = 23;
  static constexpr int SPQ = 32 / QPW;  // lanes (slots) per query in list_blocks
  // This lane's 16-byte piece: PPK lanes cover the K and V pieces of one row, KPP rows per
  // pass, RPL passes (D = 64: rows lane / 16 + 2 k, k < 8).
  static constexpr int PPK = 2 * C::CPR, KPP = 32 / PPK, RPL = C::KC / KPP;
  E* kv;           // [2][2][KC][RS]
  int* blist;      // the listed blocks, slot order (the idx area: 2 * KC ints)
  const char* src;  // this lane's piece of row r0 of key 0: (k or v).at(b, r0, g) + column
  E* dst0;          // its piece of row r0 in buffer 0
  int st;           // row stride of src in bytes (|stride| < 2^26 elements: launcher)
  int bs, len;
  int kend0;  // key_end(i0 + QPW - 1): the causal edge of the staged rows (the group's last)
  bool all_valid;
  int64_t b, i0;
  int lane;

  __device__ __forceinline__ E* kbuf(int buf) const { return kv + (buf * 2) * C::KC * C::RS; }
  __device__ __forceinline__ E* vbuf(int buf) const { return kv + (buf * 2 + 1) * C::KC * C::RS; }

  __device__ __forceinline__ void init(unsigned char* base, const Bshd<const T>& k,
                                       const Bshd<const T>& v, int64_t b_, int64_t i0_, int64_t g,
                                       int64_t kv_len, const Policy& pol, int lane_) {
    kv = reinterpret_cast<E*>(base);
    blist = reinterpret_cast<int*>(base + C::idx_off);
    lane = lane_;
    b = b_;
    i0 = i0_;
    const int w = lane % PPK, r0 = lane / PPK;
    const bool is_v = w >= C::CPR;
    const int c = is_v ? w - C::CPR : w;
    const int64_t st_el = is_v ? v.stride_l : k.stride_l;
    st = static_cast<int>(st_el * static_cast<int64_t>(sizeof(T)));
    const Bshd<const T>& x = is_v ? v : k;
    src = reinterpret_cast<const char*>(x.at(b, 0, g) + c * kFrag + r0 * st_el);
    dst0 = kv + (is_v ? C::KC * C::RS : 0) + c * kFrag + r0 * C::RS;
    bs = pol.blk_size();
    len = static_cast<int>(kv_len);
    kend0 = pol.key_end(i0 + QPW - 1);
    all_valid = pol.keys_all_valid();
  }

  // Lists the distinct blocks of the slots of the queries in qbits (bit q: query i0 + q
  // attends) in blist, in (query, slot) order of first appearance (own block first); returns
  // their number (warp-uniform). A repeat keeps its first slot, like selected_block. With
  // QPW > 1 lane q * SPQ + s takes slot s of query q (the launcher checks slots <= SPQ), and
  // each entry carries the set of queries that list the block.
  __device__ __forceinline__ int list_blocks(const Policy& pol, int64_t g, unsigned qbits) const {
    const int q = QPW == 1 ? 0 : lane / SPQ, sl = QPW == 1 ? lane : lane % SPQ;
    const bool act = sl < pol.blk_slots() && ((qbits >> q) & 1u) != 0u;
    const int c = act ? pol.slot_block(b, i0 + q, g, sl) : -1;
    const unsigned lt = (1u << lane) - 1u;
    // Every lane must execute the full-mask match: written as the right operand of
    // `c >= 0 && ...` it was short-circuited (SASS: @!P BRA around WARPSYNC.ALL; MATCH.ANY), so
    // the lanes with c < 0 skipped it while the others waited for them at the warp sync:
    // undefined behaviour, a hang on the H100 (2026-11-27). Keep collectives out of &&, ||
    // and ?: operands (scripts/emulate_staged_blk.py lints for it).
    const unsigned same = __match_any_sync(kFullMask, c);
    const bool keep = c >= 0 && (same & lt) == 0u;
    const unsigned km = __ballot_sync(kFullMask, keep);
    if (keep) {
      unsigned qm = 1u;
      if constexpr (QPW > 1) {
        qm = 0u;
#pragma unroll
        for (int qq = 0; qq < QPW; ++qq)
          if (((same >> (qq * SPQ)) & ((1u << SPQ) - 1u)) != 0u) qm |= 1u << qq;
      }
      blist[__popc(km & lt)] = QPW == 1 ? c : (c | static_cast<int>(qm << kQShift));
    }
    __syncwarp();
    return __popc(km);
  }

  // Stages keys [key0, key0 + 16) into buffer buf; returns the mask of keys that attend
  // (bit r: key0 + r; keys >= kend do not), warp-uniform. Rows at or past len are clamped to
  // the last row inside (their copy is a zero fill; the clamp only keeps the unread address
  // in bounds).
  __device__ __forceinline__ uint32_t issue(const Policy& pol, int key0, int kend, int buf) const {
    const int nk = kend - key0;
    // Keys [key0, min(kend, key0 + 16)): a shift of the full mask (16 - nk clamped to 0..16).
    uint32_t mask = 0xffffu >> (C::KC - min(max(nk, 0), C::KC));
    if (!all_valid) {
      const bool v = lane < nk && lane < C::KC && pol.key_valid(b, key0 + lane);
      mask &= __ballot_sync(kFullMask, v);
    }
    if (mask != 0u) {
      E* d = dst0 + buf * (2 * C::KC * C::RS);
      // 32 x 32 -> 64-bit multiply-adds (IMAD.WIDE): one instruction per row address.
      const char* s = src + static_cast<int64_t>(key0) * st;
      const uint32_t mr = mask >> (lane / PPK);  // bit KPP k: this lane's row of pass k
      const int nl = len - key0;                 // rows inside the tensor, >= 1
      if (nl >= C::KC) {
#pragma unroll
        for (int k = 0; k < RPL; ++k)
          cp_async16_masked(d + KPP * k * C::RS, s + static_cast<int64_t>(KPP * k) * st,
                            mr & (1u << (KPP * k)));
      } else {
        const int last = nl - 1 - lane / PPK;  // may be negative: row key0 + r0 + last >= key0
#pragma unroll
        for (int k = 0; k < RPL; ++k) {
          const int r = KPP * k < last ? KPP * k : last;
          cp_async16_masked(d + KPP * k * C::RS, s + static_cast<int64_t>(r) * st,
                            mr & (1u << (KPP * k)));
        }
      }
    }
    cp_async_commit();
    return mask;
  }

  // Double-buffered chunk loop over the nblk listed blocks: body(buf, mask, key0, qm) runs
  // for every chunk with an attending key, with its rows in buffer buf while the next
  // chunk's copies are in flight; qm is the set of queries that list the block (1 for
  // QPW = 1), mask the keys before the causal edge of the group's last query (rows past a
  // column's own edge are real rows that the column masks out: ColumnMasks).
  template <class Body>
  __device__ __forceinline__ void for_each_chunk(const Policy& pol, int nblk, Body&& body) const {
    // bs is a power of two >= 16 (BlockSparsePolicy::block_chunks_ok): chunk ch is segment
    // ch & (spb - 1) of entry ch >> spb_sh, decoded from ch alone (no cursor to advance).
    const int spb_sh = 27 - __clz(bs);  // log2(bs / 16)
    const int n_chunks = nblk << spb_sh;
    const int seg_mask = (1 << spb_sh) - 1;
    int key0_next = 0;
    unsigned qm_next = 1u;
    auto issue_next = [&](int ch, int buf) {
      const int e = blist[ch >> spb_sh];
      const int blk = QPW == 1 ? e : (e & ((1 << kQShift) - 1));
      qm_next = QPW == 1 ? 1u : static_cast<unsigned>(e) >> kQShift;
      key0_next = blk * bs + (ch & seg_mask) * C::KC;
      return issue(pol, key0_next, kend0, buf);
    };
    uint32_t mask = n_chunks > 0 ? issue_next(0, 0) : 0u;
    int key0 = key0_next;
    unsigned qm = qm_next;
    for (int ch = 0; ch < n_chunks; ++ch) {
      const int buf = ch & 1;
      uint32_t mask_next = 0u;
      if (ch + 1 < n_chunks) {
        mask_next = issue_next(ch + 1, buf ^ 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncwarp();  // every lane's copies visible to the whole warp
      if (mask != 0u) body(buf, mask, key0, qm);
      __syncwarp();  // buffer `buf` is rewritten by the next iteration's copies
      mask = mask_next;
      key0 = key0_next;
      qm = qm_next;
    }
  }

  // The kernels' whole key loop: lists the blocks of the queries in qbits, then runs
  // body(kb, vb, mk) for every chunk with an attending key, kb / vb its staged K / V rows and
  // mk[j] its key mask for column 2 tig + j shifted by gid (bit 0: key gid, bit 8: gid + 8).
  template <int HPW, class Body>
  __device__ __forceinline__ void for_each_group_chunk(const Policy& pol, int64_t g,
                                                       unsigned qbits, Body&& body) const {
    const int nblk = list_blocks(pol, g, qbits);
    ColumnMasks<HPW, QPW> cm;
    cm.init(pol, i0, lane & 3);
    for_each_chunk(pol, nblk, [&](int buf, uint32_t mask, int key0, unsigned qm) {
      uint32_t mk[2];
      cm.bits(mask, key0, qm, lane >> 2, mk);
      body(static_cast<const E*>(kbuf(buf)), static_cast<const E*>(vbuf(buf)), mk);
    });
  }
};

// The block-chunk forward chunk loop of one warp (the block list, then every chunk), as
// slot_fwd_chunks for the per-slot kernels; base is the warp's TcCfg<D, 16> area. Shared by
// attn_fwd_kernel_tc_blk and the fused forward.
template <typename T, int D, int HPW, class Policy, int QPW>
__device__ __forceinline__ void blk_fwd_chunks(const AttnFwdParams<T, float>& p, const Policy& pol,
                                               unsigned char* base, int64_t b, int64_t i0,
                                               int64_t g, unsigned qbits,
                                               const uint32_t (&qb)[D / 16][2], int lane,
                                               float (&o)[D / 16][4], float (&m)[2],
                                               float (&lp)[2]) {
  using C = TcCfg<D, 16>;
  using E = typename TcElem<T>::type;
  TcBlkWarp<T, C, Policy, QPW> w;
  w.init(base, p.k, p.v, b, i0, g, p.shape.kv_len, pol, lane);
  const float qsc = static_cast<float>(p.shape.scale) * kLog2e;
  const int a_row = tile_row_offset<C>(lane), a_col = tile_col_offset<C>(lane);
  w.template for_each_group_chunk<HPW>(pol, g, qbits, [&](const E* kb, const E* vb,
                                                          const uint32_t (&mk)[2]) {
    float sc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int f = 0; f < C::NF; ++f) {
      uint32_t a[4];
      ldmatrix_x4(a, kb + 16 * f + a_row);
      mma16816<E>(sc, a, qb[f][0], qb[f][1]);
    }
    // Scaled scores (keys that do not attend: -inf) and the chunk max of heads 2 tig + {0, 1}.
#pragma unroll
    for (int e = 0; e < 4; ++e)
      sc[e] = (mk[e & 1] >> ((e >> 1) * 8)) & 1u ? sc[e] * qsc : -INFINITY;
    // (The generic kernel starts the max at -inf: the same value unless both keys are NaN.)
    float cmax[2] = {fmaxf(sc[0], sc[2]), fmaxf(sc[1], sc[3])};
    float msub[2];
    softmax_rescale<C, true>(cmax, m, lp, o, msub, p.lazy_max);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      sc[e] = fast_exp2(sc[e] - msub[e & 1]);
      lp[e & 1] += sc[e];
    }
    uint32_t pb0, pb1;
    keys_heads_to_b<E>(sc, pb0, pb1);
#pragma unroll
    for (int f = 0; f < C::NF; ++f) {
      uint32_t a[4];
      ldmatrix_x4_trans(a, vb + 16 * f + a_col);
      mma16816<E>(o[f], a, pb0, pb1);
    }
  });
}

// Forward over block chunks: attn_fwd_kernel_tc with one 16-key segment of a listed block
// per chunk. The arithmetic per chunk is the generic kernel's at KC = 16 (same operations in
// the same order: D >= 64 gives the same bits when each chunk's attending keys are a prefix
// of it, which holds without key padding or with right padding), except exp2 (fast_exp2).
// QPW > 1: query groups (TcBlkWarp); a column's chunks come in the group's list order, and
// the chunks of the other queries add exactly 0 to it (alpha = 1, p = 0), so the first
// query of a group keeps the bits of QPW = 1 and the others round as their blocks' order in
// the shared list says.
template <typename T, int D, int HPW, class Policy, int QPW = 1>
__global__ void __launch_bounds__(kStageWarps * 32, tc_min_ctas<D, false>())
    attn_fwd_kernel_tc_blk(const AttnFwdParams<T, float> p, const Policy pol, const TcGrid grid) {
  using C = TcCfg<D, 16>;
  static_assert(HPW * QPW <= 8, "the (query, head) columns are the N = 8 side of the products");
  extern __shared__ __align__(128) unsigned char smem_tc[];
  const int lane = threadIdx.x & 31;
  const int wib = threadIdx.x >> 5;
  const int64_t L = p.shape.q_len;
  int64_t b, i0, g, h0;
  if (!stage_coords_fast<HPW>(grid, wib, b, i0, g, h0)) return;  // uniform per warp
  i0 *= QPW;

  unsigned char* base = smem_tc + wib * C::warp_bytes;
  float o[C::NF][4];
#pragma unroll
  for (int f = 0; f < C::NF; ++f) o[f][0] = o[f][1] = o[f][2] = o[f][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, lp[2] = {0.f, 0.f};

  const unsigned qbits = group_query_bits<QPW>(pol, b, i0, L);
  if (qbits != 0u) {
    uint32_t qb[C::NF][2];  // loads in flight while the block list is built
    load_group_frags<T, D, HPW, QPW>(qb, p.q, b, i0, h0, qbits, lane);
    blk_fwd_chunks<T, D, HPW, Policy, QPW>(p, pol, base, b, i0, g, qbits, qb, lane, o, m, lp);
  }

  finish_fwd_warp<C, HPW, QPW>(p, base, o, m, lp, b, i0, h0, lane);
}

// The block-chunk dQ chunk loop of one warp, after its prologue (the block list, then every
// chunk): dq += K^T dS^T, as slot_dq_chunks does for the per-slot kernels. base is the
// warp's TcCfg<D, 16> area. Shared by attn_dq_kernel_tc_blk and the fused dQ.
template <typename T, int D, int HPW, class Policy, int QPW>
__device__ __forceinline__ void blk_dq_chunks(const AttnBwdParams<T, float>& p, const Policy& pol,
                                              unsigned char* base, int64_t b, int64_t i0,
                                              int64_t g, unsigned qbits,
                                              const uint32_t (&qb)[D / 16][2],
                                              const uint32_t (&ob)[D / 16][2],
                                              const float (&my_lse2)[2],
                                              const float (&my_dlt)[2], int lane,
                                              float (&dq)[D / 16][4]) {
  using C = TcCfg<D, 16>;
  using E = typename TcElem<T>::type;
  TcBlkWarp<T, C, Policy, QPW> w;
  w.init(base, p.k, p.v, b, i0, g, p.shape.kv_len, pol, lane);
  const float qsc = static_cast<float>(p.shape.scale) * kLog2e;
  const int a_row = tile_row_offset<C>(lane), a_col = tile_col_offset<C>(lane);
  w.template for_each_group_chunk<HPW>(pol, g, qbits, [&](const E* kb, const E* vb,
                                                          const uint32_t (&mk)[2]) {
    // S^T = K Q^T and dP^T = V dO^T.
    float sc[4] = {0.f, 0.f, 0.f, 0.f}, dp[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int f = 0; f < C::NF; ++f) {
      uint32_t a[4];
      ldmatrix_x4(a, kb + 16 * f + a_row);
      mma16816<E>(sc, a, qb[f][0], qb[f][1]);
      ldmatrix_x4(a, vb + 16 * f + a_row);
      mma16816<E>(dp, a, ob[f][0], ob[f][1]);
    }
    // dS^T, exactly 0 for the keys that do not attend.
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = e & 1;
      sc[e] = (mk[j] >> ((e >> 1) * 8)) & 1u
                  ? fast_exp2(fmaf(sc[e], qsc, -my_lse2[j])) * (dp[e] - my_dlt[j])
                  : 0.f;
    }
    uint32_t db0, db1;
    keys_heads_to_b<E>(sc, db0, db1);
    // dQ^T += K^T dS^T.
#pragma unroll
    for (int f = 0; f < C::NF; ++f) {
      uint32_t a[4];
      ldmatrix_x4_trans(a, kb + 16 * f + a_col);
      mma16816<E>(dq[f], a, db0, db1);
    }
  });
}

// dQ over block chunks: attn_dq_kernel_tc with one 16-key segment of a listed block per chunk
// (same arithmetic per key as the generic kernel at KC = 16, exp2 by fast_exp2). The columns
// of the padding heads (2 tig + j >= HPW * QPW) are not forced to 0 here: a column of the mma
// output depends only on its own B column, and those columns are never stored. QPW > 1:
// query groups as in the forward; a column's dS is 0 for the chunks of the other queries.
template <typename T, int D, int HPW, class Policy, int QPW = 1>
__global__ void __launch_bounds__(kStageWarps * 32, tc_min_ctas<D, true>())
    attn_dq_kernel_tc_blk(const AttnBwdParams<T, float> p, const Policy pol,
                          float* __restrict__ delta, const TcGrid grid) {
  using C = TcCfg<D, 16>;
  constexpr int NR = HPW * QPW;  // (query, head) rows of the warp
  static_assert(NR <= 8, "the (query, head) columns are the N = 8 side of the products");
  extern __shared__ __align__(128) unsigned char smem_tc[];
  const int lane = threadIdx.x & 31;
  const int wib = threadIdx.x >> 5;
  const int64_t L = p.shape.q_len;
  int64_t b, i0, g, h0;
  if (!stage_coords_fast<HPW>(grid, wib, b, i0, g, h0)) return;  // uniform per warp
  i0 *= QPW;

  unsigned char* base = smem_tc + wib * C::warp_bytes;
  float dq[C::NF][4];
#pragma unroll
  for (int f = 0; f < C::NF; ++f) dq[f][0] = dq[f][1] = dq[f][2] = dq[f][3] = 0.f;

  const unsigned qbits = group_query_bits<QPW>(pol, b, i0, L);
  dq_prologue<T, D, HPW, QPW>(p, delta, b, i0, h0, qbits, lane, [&](const float (&my_lse2)[2],
                                                                     const float (&my_dlt)[2]) {
    if (qbits != 0u) {
      uint32_t qb[C::NF][2], ob[C::NF][2];  // loads in flight while the block list is built
      load_group_frags<T, D, HPW, QPW>(qb, p.q, b, i0, h0, qbits, lane);
      load_group_frags<T, D, HPW, QPW>(ob, p.grad_out, b, i0, h0, qbits, lane);
      blk_dq_chunks<T, D, HPW, Policy, QPW>(p, pol, base, b, i0, g, qbits, qb, ob, my_lse2,
                                            my_dlt, lane, dq);
    }
  });

  store_dq_warp<C, HPW, QPW>(p, base, dq, b, i0, h0, lane);
}

// ------------------------------------------------------------------------------ dispatch
// Dynamic shared memory above 48 KB must be opted into per kernel (D = 128); once per kernel
// and device (cuda/launch_cache.h), not on every launch (host time of short steps).
template <class K>
inline void stage_smem_attr(K kernel, size_t bytes) {
  opt_in_smem(kernel, static_cast<int>(bytes));
}

template <typename T>
constexpr bool stage_type_ok() {
  return std::is_same<T, c10::Half>::value || std::is_same<T, c10::BFloat16>::value;
}

// Calls f(integral_constant<int, D>, integral_constant<int, HPW>) when the staged kernels
// cover this shape; returns false (and calls nothing) otherwise.
template <class F>
inline bool dispatch_stage_config(int64_t D, int64_t G, bool vec, F&& f) {
  using std::integral_constant;
  if (!vec || simple_kernels_requested() || G < 1) return false;
  const int hpw = G % 8 == 0 ? 8 : (G % 4 == 0 ? 4 : (G % 2 == 0 ? 2 : 1));
  auto with_hpw = [&](auto d_c) {
    if (hpw == 8) f(d_c, integral_constant<int, 8>{});
    else if (hpw == 4) f(d_c, integral_constant<int, 4>{});
    else if (hpw == 2) f(d_c, integral_constant<int, 2>{});
    else f(d_c, integral_constant<int, 1>{});
  };
  switch (D) {
    case 16: with_hpw(integral_constant<int, 16>{}); return true;
    case 32: with_hpw(integral_constant<int, 32>{}); return true;
    case 64: with_hpw(integral_constant<int, 64>{}); return true;
    case 128: with_hpw(integral_constant<int, 128>{}); return true;
    default: return false;
  }
}

// True when BLOSSOM_OPS_CUDA_STAGED=old: policies with block chunks (block-sparse) take the
// per-slot staged kernels again, for A/B runs. Read once per process, on the host.
inline bool staged_old_requested() {
  static const bool old = env_equals("BLOSSOM_OPS_CUDA_STAGED", "old");
  return old;
}

// Whether the lean kernels (block chunks, or the LEAN per-slot kernels) may take this call:
// not switched off, and the K / V row strides fit their 32-bit byte offsets (|stride| < 2^26
// elements: 16 rows or a 32-bit key index times the stride stay 64-bit products of 32-bit
// factors).
template <typename T>
inline bool use_lean_staged(const Bshd<const T>& k, const Bshd<const T>& v) {
  constexpr int64_t lim = int64_t(1) << 26;
  return !staged_old_requested() && k.stride_l > -lim && k.stride_l < lim &&
         v.stride_l > -lim && v.stride_l < lim;
}

// Whether the block-chunk kernels take this call: the policy has them and accepts the mask.
template <class Policy, typename T>
inline bool use_block_chunks(const Policy& pol, const Bshd<const T>& k, const Bshd<const T>& v) {
  if constexpr (has_block_chunks<Policy>::value) {
    return use_lean_staged(k, v) && pol.block_chunks_ok();
  } else {
    return false;
  }
}

// Queries per warp of the block-chunk kernels: 8 / HPW (the (query, head) columns fill the
// N = 8 side of the products) when the policy accepts it (slots <= 32 / qpw, blocks < 2^23),
// else 1. BLOSSOM_OPS_CUDA_QUERY_GROUPS=0 keeps one query per warp in both kernels, =fwd
// only in the dQ kernel (A/B; read once).
inline bool query_groups_off(bool dq) {
  static const bool off = env_equals("BLOSSOM_OPS_CUDA_QUERY_GROUPS", "0");
  static const bool fwd_only = env_equals("BLOSSOM_OPS_CUDA_QUERY_GROUPS", "fwd");
  return off || (dq && fwd_only);
}
template <int HPW, class Policy>
inline int block_group_size(const Policy& pol, bool dq) {
  constexpr int q = 8 / HPW;  // a full N = 8 side; half of it when the slots need more lanes
  if (q == 1 || query_groups_off(dq)) return 1;
  if (pol.block_groups_ok(q)) return q;
  if (q >= 4 && pol.block_groups_ok(q / 2)) return q / 2;
  return 1;
}

// Launches kernel<QPW> for the group size qpw block_group_size picked (8 / HPW, its half, 1).
template <int HPW, class Launch>
inline void with_group_size(int qpw, Launch&& launch) {
  using std::integral_constant;
  constexpr int q = 8 / HPW;
  if constexpr (q > 1) {
    if (qpw == q) return launch(integral_constant<int, q>{});
  }
  if constexpr (q >= 4) {
    if (qpw == q / 2) return launch(integral_constant<int, q / 2>{});
  }
  launch(integral_constant<int, 1>{});
}

// Query pairs for the LEAN per-slot kernels (sliding window, compressed branch): on unless
// BLOSSOM_OPS_CUDA_QUERY_GROUPS=0 (or =fwd, for dQ) or BLOSSOM_OPS_CUDA_SLOT_PAIRS=0 (read once).
inline bool slot_pairs_on(bool dq) {
  static const bool off = env_equals("BLOSSOM_OPS_CUDA_SLOT_PAIRS", "0");
  return !off && !query_groups_off(dq);
}

// Query pairs without repeated keys (TcWarp DD): on unless BLOSSOM_OPS_CUDA_SLOT_DEDUPE=0
// (read once), and only where the policy describes query i + 1's tail (pair_dedupe_ok).
template <class Policy>
inline bool slot_dedupe_on(const Policy& pol) {
  static const bool off = env_equals("BLOSSOM_OPS_CUDA_SLOT_DEDUPE", "0");
  return !off && pol.pair_dedupe_ok();
}

inline unsigned stage_grid(int64_t warps) {
  const int64_t blocks = ceil_div(warps, kStageWarps);
  BLOSSOM_CHECK(blocks < (int64_t(1) << 31), "blossom_ops: problem too large for one launch");
  return static_cast<unsigned>(blocks);
}

// Launches the staged forward if it covers this case; false means "use the simple kernel".
// *gated: whether it applied p.gate (only the query-pair instance of a Policy with
// kGateEpilogue does, when gate_epilogue_usable); untouched otherwise.
template <typename T, class Policy>
bool launch_attn_fwd_staged(const AttnFwdParams<T, float>& p_in, const Policy& pol, bool vec,
                            cudaStream_t stream, bool* gated = nullptr) {
  if constexpr (!stage_type_ok<T>()) {
    return false;
  } else {
    AttnFwdParams<T, float> p = p_in;
    p.lazy_max = lazy_max_on();
    const AttnShape& s = p.shape;
    const bool blk = use_block_chunks(pol, p.k, p.v), lean = use_lean_staged(p.k, p.v);
    (void)blk;  // no block-chunk kernels for this policy
    (void)lean;  // block-chunk policies keep the per-slot kernel as it was for their fallbacks
    return dispatch_stage_config(s.head_dim, s.group(), vec, [&](auto d_c, auto hpw_c) {
      constexpr int D = decltype(d_c)::value, HPW = decltype(hpw_c)::value;
      const int64_t warps = s.batch * s.kv_heads * (s.group() / HPW) * s.q_len;
      if constexpr (has_block_chunks<Policy>::value) {
        if (blk && warps < (int64_t(1) << 31)) {
          const size_t bytes = kStageWarps * TcCfg<D, 16>::warp_bytes;
          const int qpw = block_group_size<HPW>(pol, false);
          const int64_t gw = s.batch * s.kv_heads * (s.group() / HPW) * ((s.q_len + qpw - 1) / qpw);
          with_group_size<HPW>(qpw, [&](auto qpw_c) {
            auto kernel = attn_fwd_kernel_tc_blk<T, D, HPW, Policy, decltype(qpw_c)::value>;
            stage_smem_attr(kernel, bytes);
            kernel<<<stage_grid(gw), kStageWarps * 32, bytes, stream>>>(
                p, pol, TcGrid::make(s, HPW, qpw));
          });
          return;
        }
      }
      const size_t bytes = kStageWarps * TcCfg<D>::warp_bytes;
      const TcGrid grid = TcGrid::make(s, HPW);
      if constexpr (!has_block_chunks<Policy>::value) {
        if (lean && warps < (int64_t(1) << 31)) {
          if (HPW <= 4 && slot_pairs_on(false)) {
            const int64_t pw = s.batch * s.kv_heads * (s.group() / HPW) * ((s.q_len + 1) / 2);
            if (slot_dedupe_on(pol)) {
              auto kernel = attn_fwd_kernel_tc<T, D, HPW, Policy, true, HPW <= 4 ? 2 : 1,
                                               HPW <= 4>;
              if constexpr (has_gate_epilogue<Policy>::value && HPW <= 4) {
                if (gated != nullptr && gate_epilogue_usable(p)) {
                  kernel = attn_fwd_kernel_tc<T, D, HPW, Policy, true, 2, true, true>;
                  *gated = true;
                }
              }
              stage_smem_attr(kernel, bytes);
              kernel<<<stage_grid(pw), kStageWarps * 32, bytes, stream>>>(
                  p, pol, TcGrid::make(s, HPW, 2));
              return;
            }
            auto kernel = attn_fwd_kernel_tc<T, D, HPW, Policy, true, HPW <= 4 ? 2 : 1>;
            if constexpr (has_gate_epilogue<Policy>::value && HPW <= 4) {
              if (gated != nullptr && gate_epilogue_usable(p)) {
                kernel = attn_fwd_kernel_tc<T, D, HPW, Policy, true, 2, false, true>;
                *gated = true;
              }
            }
            stage_smem_attr(kernel, bytes);
            kernel<<<stage_grid(pw), kStageWarps * 32, bytes, stream>>>(p, pol,
                                                                        TcGrid::make(s, HPW, 2));
            return;
          }
          auto kernel = attn_fwd_kernel_tc<T, D, HPW, Policy, true>;
          stage_smem_attr(kernel, bytes);
          kernel<<<stage_grid(warps), kStageWarps * 32, bytes, stream>>>(p, pol, grid);
          return;
        }
      }
      auto kernel = attn_fwd_kernel_tc<T, D, HPW, Policy>;
      stage_smem_attr(kernel, bytes);
      kernel<<<stage_grid(warps), kStageWarps * 32, bytes, stream>>>(p, pol, grid);
    });
  }
}

template <typename T, class Policy>
bool launch_attn_dq_staged(const AttnBwdParams<T, float>& p, const Policy& pol, float* delta,
                           bool vec, cudaStream_t stream) {
  if constexpr (!stage_type_ok<T>()) {
    return false;
  } else {
    const AttnShape& s = p.shape;
    const bool blk = use_block_chunks(pol, p.k, p.v), lean = use_lean_staged(p.k, p.v);
    (void)blk;  // no block-chunk kernels for this policy
    (void)lean;  // block-chunk policies keep the per-slot kernel as it was for their fallbacks
    return dispatch_stage_config(s.head_dim, s.group(), vec, [&](auto d_c, auto hpw_c) {
      constexpr int D = decltype(d_c)::value, HPW = decltype(hpw_c)::value;
      const int64_t warps = s.batch * s.kv_heads * (s.group() / HPW) * s.q_len;
      if constexpr (has_block_chunks<Policy>::value) {
        if (blk && warps < (int64_t(1) << 31)) {
          const size_t bytes = kStageWarps * TcCfg<D, 16>::warp_bytes;
          const int qpw = block_group_size<HPW>(pol, true);
          const int64_t gw = s.batch * s.kv_heads * (s.group() / HPW) * ((s.q_len + qpw - 1) / qpw);
          with_group_size<HPW>(qpw, [&](auto qpw_c) {
            auto kernel = attn_dq_kernel_tc_blk<T, D, HPW, Policy, decltype(qpw_c)::value>;
            stage_smem_attr(kernel, bytes);
            kernel<<<stage_grid(gw), kStageWarps * 32, bytes, stream>>>(
                p, pol, delta, TcGrid::make(s, HPW, qpw));
          });
          return;
        }
      }
      const size_t bytes = kStageWarps * TcCfg<D>::warp_bytes;
      const TcGrid grid = TcGrid::make(s, HPW);
      if constexpr (!has_block_chunks<Policy>::value) {
        if (lean && warps < (int64_t(1) << 31)) {
          if (HPW <= 4 && slot_pairs_on(true)) {
            const int64_t pw = s.batch * s.kv_heads * (s.group() / HPW) * ((s.q_len + 1) / 2);
            if (slot_dedupe_on(pol)) {
              auto kernel = attn_dq_kernel_tc<T, D, HPW, Policy, true, HPW <= 4 ? 2 : 1,
                                              HPW <= 4>;
              stage_smem_attr(kernel, bytes);
              kernel<<<stage_grid(pw), kStageWarps * 32, bytes, stream>>>(
                  p, pol, delta, TcGrid::make(s, HPW, 2));
              return;
            }
            auto kernel = attn_dq_kernel_tc<T, D, HPW, Policy, true, HPW <= 4 ? 2 : 1>;
            stage_smem_attr(kernel, bytes);
            kernel<<<stage_grid(pw), kStageWarps * 32, bytes, stream>>>(
                p, pol, delta, TcGrid::make(s, HPW, 2));
            return;
          }
          auto kernel = attn_dq_kernel_tc<T, D, HPW, Policy, true>;
          stage_smem_attr(kernel, bytes);
          kernel<<<stage_grid(warps), kStageWarps * 32, bytes, stream>>>(p, pol, delta, grid);
          return;
        }
      }
      auto kernel = attn_dq_kernel_tc<T, D, HPW, Policy>;
      stage_smem_attr(kernel, bytes);
      kernel<<<stage_grid(warps), kStageWarps * 32, bytes, stream>>>(p, pol, delta, grid);
    });
  }
}

}  // namespace detail
}  // namespace gpu
}  // namespace blossom
