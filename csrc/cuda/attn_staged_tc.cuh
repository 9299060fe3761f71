// Staged forward and dQ attention kernels on tensor cores: the fast path of attn_kernels.cuh
// for 16-bit inputs, D in {16, 32, 64, 128} and 16-byte aligned rows, plus their launchers.
// Same Policy interface and numeric conventions as the simple kernels (fp32 accumulation,
// base-2 softmax with scale * log2(e) folded in, lse in natural log); the key rows of a chunk
// are gathered into shared memory with cp.async (double-buffered) and the products run on
// wmma 16x16x16 (bf16/fp16 in, fp32 accumulate).
//
// Why: the simple kernels walk the key list with 4 keys in flight per warp and a dependent
// chain per key (index -> K/V row -> math), so they are latency bound (~6 TFLOP/s). A first
// staged version with fp32 SIMT products (removed; 1.7-2x slower than this one on an H200)
// spent ~2,500 warp-instructions per query (per key ~13 for the scores and ~18 for P.V at
// HPW=4, D=64) and held ~20 KB of shared memory per warp (10 warps per SM), so its cp.async
// latency was poorly hidden.
//
// Work decomposition: one warp per (b, query i, HPW heads of KV group g), kStageWarps warps
// per CTA, no CTA barrier. Per chunk of KC keys (16, or 32 for D <= 32):
//   1. enumerate: lane n computes pol.fwd_key(b, i, g, n0 + n) for the KC slots at once; the
//      valid keys are compacted (ballot + popc) into kidx[buf][0, cnt); stage: their K and V
//      rows are copied into shared memory with 16-byte cp.async, double-buffered (chunk c+1
//      is enumerated and issued before chunk c is computed), rows padded by 16 bytes; the
//      copy loop gives each lane a fixed (K|V, 16-byte piece) and walks the rows, ~4
//      instructions per copy.
//   2. S = Q K^T on tensor cores: Q is a 16 x D tile whose rows >= HPW are zero (A operand,
//      held in registers for D <= 64), K rows are the col-major B operand read straight from
//      the staging buffer. One 16 x 16 tile per 16 keys (tiles past cnt skipped), stored fp32.
//   3. softmax step (forward) or dS (dQ): lanes are split into HPW groups of LPH = 32 / HPW,
//      group h owns head h and each lane KPL = KC / LPH keys (all heads at once). s = S * scale * log2(e) in fp32;
//      forward: base-2 online softmax (chunk max by a group butterfly, l from the unrounded
//      p); P (or dS = exp2(s - lse2) * (dp - delta)) rounded to the input type into a
//      16 x KC tile whose rows >= HPW stay zero, as FlashAttention-2 does.
//   4. O += P V (dQ: dQ += dS K) on tensor cores with the accumulator fragments kept in
//      registers across chunks. The forward's rescale by alpha needs each fragment element's
//      row: the warp loads a table of row numbers into an accumulator fragment once (so no
//      assumption about wmma's private layout), and rescales only when some head's max moved.
//   5. end: fragments stored to shared memory (reusing the K/V buffers), lanes normalise
//      (1 / l, or * scale for dQ) and write 16-byte rows; lse = (m + log2 l) * ln 2.
//   Keys of a chunk past cnt: the K/V buffers are zero-filled once per warp, so their rows are
//   either zeros or an earlier chunk's (finite) rows, and their p / ds is exactly 0; no NaN
//   can leak through 0 * garbage. Deterministic: fixed reduction orders, no atomics.
//
// Shared memory per warp (D=64, HPW=4, KC=16): K/V 2 buffers * 2 * 16 rows * 144 B = 9 KB,
// S fp32 16 x 24 = 1.5 KB (dQ + dP 1.5 KB), P 0.75 KB, tables/indices 0.25 KB: 11.5 KB fwd,
// 13 KB dQ (Q/dO tiles alias the K/V buffers before the first copy) -> 18 / 16 warps per SM
// by shared memory (was 10), registers permitting.
//
// Count, block-sparse D=64 L=4096 B=64 Hq=8 Hk=2 (524,288 warps; 80 slots = 5 chunks of 16,
// ~72 valid keys, ~5 tiles per query), warp-instructions per query:
//   forward, per chunk: enumerate ~40, copies 256 / 32 lanes * ~4 = ~35, S 4 k-steps *
//     (B load + 2 HMMA) + store ~20, softmax (2 keys per lane) ~35, rescale (when a max
//     moved) ~45, P.V 4 * (B load + 2 HMMA) + A load ~15, syncs/waits ~10 -> ~200;
//     5 chunks + prologue (Q tile, fragments, zero fill ~60) + epilogue (~50) = ~1,100
//     (the removed SIMT version: ~2,500). 524,288 * 1,100 = 0.58 G warp-instr / 1.05 T/s = 0.55 ms of
//     issue; tensor work 38.7 GFLOP useful, 155 GFLOP issued (rows >= HPW are padding) is
//     far below the wmma ceiling. Latency bound in practice: predicted 1.5-2.5 ms (5.2 now).
//   dQ, per chunk ~230 (two score products, no rescale, dS.K like P.V) -> ~1,300 per
//     query; predicted 1.8-3 ms (5.9 now). Window (1-2 chunks): fwd ~0.8 ms, dQ ~1 ms
//     (1.8 / 2.1 now).
//
#pragma once
#include <mma.h>

#include <cstdlib>
#include <type_traits>

#include "common/params.h"
#include "cuda/common.cuh"
#include "cuda/cp_async.cuh"

namespace blossom {
namespace gpu {
namespace detail {

namespace tcw = nvcuda::wmma;

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

// Row stride (floats) of the S tile: group h of LPH lanes reads row h at consecutive
// columns, so rows start an odd multiple of LPH banks apart and the HPW groups of one read
// hit distinct banks.
constexpr int tc_sld(int KC, int LPH, int HPW) {
  if (HPW == 1) return KC;
  int s = LPH;
  while (s < KC) s += 2 * LPH;
  return s;
}

// Compile-time configuration and per-warp shared-memory layout (byte offsets, 128-aligned:
// wmma needs 32-byte aligned tile starts).
template <int D, int HPW, bool DQ>
struct TcCfg {
  static constexpr int KC = D <= 32 ? 32 : 16;  // keys per chunk
  static constexpr int KT = KC / 16;            // 16-key tiles per chunk
  static constexpr int NF = D / 16;             // 16-column fragments of a row
  static constexpr int CPR = D / kFrag;         // 16-byte pieces per row
  static constexpr int RS = D + kFrag;          // K/V/Q row stride (elements): 16 B of padding
  static constexpr int LPH = 32 / HPW;          // lanes per head in the softmax / dS step
  static constexpr int KPL = KC > LPH ? KC / LPH : 1;  // keys per lane in that step
  static constexpr int SLD = tc_sld(KC, LPH, HPW);     // S (and dP) row stride, floats
  static constexpr int PLD = KC + 8;            // P (dS) row stride, elements
  static constexpr int OLD = D + 4;             // output staging row stride, floats
  static constexpr bool REGA = D <= 64;         // Q (dO) A-fragments live in registers
  static constexpr size_t kv_bytes = size_t(2) * 2 * KC * RS * 2;  // [buf][K|V][KC][RS]
  static constexpr size_t tile_bytes = size_t(16) * RS * 2;        // one Q or dO tile
  static constexpr size_t qtiles_bytes = (DQ ? 2 : 1) * tile_bytes;
  // With register fragments the Q (dO) tiles are only needed before the first copy: they
  // borrow the K/V buffers.
  static constexpr size_t q_off = REGA ? 0 : kv_bytes;
  static constexpr size_t s_off = tc_align128(REGA ? kv_bytes : kv_bytes + qtiles_bytes);
  static constexpr size_t s_bytes = tc_align128(size_t(16) * SLD * 4);
  static constexpr size_t p_off = s_off + (DQ ? 2 : 1) * s_bytes;
  static constexpr size_t tab_off = p_off + tc_align128(size_t(16) * PLD * 2);
  static constexpr size_t idx_off = tab_off + 128;  // tab: alpha[16], l[16] (forward)
  static constexpr size_t warp_bytes = tc_align128(idx_off + size_t(2) * KC * 4);
  static_assert(D % 16 == 0 && KC % 16 == 0 && HPW <= 16 && 32 % (2 * CPR) == 0,
                "bad tensor-core staged configuration");
  static_assert(size_t(16) * OLD * 4 <= kv_bytes, "output staging must fit the K/V buffers");
  static_assert(!REGA || qtiles_bytes <= kv_bytes, "Q/dO tiles must fit the K/V buffers");
  static_assert(SLD >= 16 && SLD % 4 == 0 && PLD % 8 == 0, "wmma leading dimensions");
};

// Warp coordinates, staging buffers and the enumerate + copy step of one chunk.
template <typename T, class C, class Policy>
struct TcWarp {
  using E = typename TcElem<T>::type;
  E* kv;           // [2][2][KC][RS]
  int* kidx;       // [2][KC]
  const T* kbase;  // k.at(b, 0, g)
  const T* vbase;
  int64_t sk, sv;
  int64_t b, i, g, n_slots;
  int lane;

  __device__ __forceinline__ E* kbuf(int buf) const { return kv + (buf * 2) * C::KC * C::RS; }
  __device__ __forceinline__ E* vbuf(int buf) const { return kv + (buf * 2 + 1) * C::KC * C::RS; }

  // Enumerates slots [n0, n0 + KC), compacts the valid keys into kidx[buf] and issues the
  // cp.async copies of their K and V rows. Returns the number of valid keys (warp-uniform).
  __device__ __forceinline__ int issue(const Policy& pol, int64_t n0, int buf) const {
    const int64_t n = n0 + lane;
    const int64_t j = (lane < C::KC && n < n_slots) ? pol.fwd_key(b, i, g, n) : -1;
    const unsigned mask = __ballot_sync(kFullMask, j >= 0);
    int* ki = kidx + buf * C::KC;
    if (j >= 0) ki[__popc(mask & ((1u << lane) - 1u))] = static_cast<int>(j);
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
    for (int r = lane / PPK; r < cnt; r += KPP)
      cp_async16(dst + r * C::RS, src + static_cast<int64_t>(ki[r]) * st);
    cp_async_commit();
    return cnt;
  }
};

// Rows < HPW of a 16 x D tile from global rows h0 .. h0 + HPW - 1 of position i, rows
// HPW..15 zero (the padding heads of the tensor-core products).
template <typename T, class C, int HPW>
__device__ __forceinline__ void tc_load_tile(typename TcElem<T>::type* dst, const Bshd<const T>& x,
                                             int64_t b, int64_t i, int64_t h0, int lane) {
  for (int t = lane; t < 16 * C::CPR; t += 32) {
    const int r = t / C::CPR, c = t % C::CPR;
    uint4 u = make_uint4(0, 0, 0, 0);
    if (r < HPW) u = __ldg(reinterpret_cast<const uint4*>(x.at(b, i, h0 + r) + c * kFrag));
    *reinterpret_cast<uint4*>(dst + r * C::RS + c * kFrag) = u;
  }
}

template <int BYTES>
__device__ __forceinline__ void tc_zero(void* p, int lane) {
  static_assert(BYTES % 16 == 0, "zero fill works in 16-byte pieces");
  uint4* q = reinterpret_cast<uint4*>(p);
  for (int x = lane; x < BYTES / 16; x += 32) q[x] = make_uint4(0, 0, 0, 0);
}

// Resident CTAs per SM the register budget must allow up to D = 64: forward 8 (16 warps,
// <= 128 registers; shared memory allows 9), dQ 7 (<= 144 registers: at 128 the compressed
// op's dQ spilled 16 bytes). D = 128 is limited by shared memory anyway.
template <int D, bool DQ>
constexpr int tc_min_ctas() { return D <= 64 ? (DQ ? 7 : 8) : 1; }

// ------------------------------------------------------------------------------ forward
template <typename T, int D, int HPW, class Policy>
__global__ void __launch_bounds__(kStageWarps * 32, tc_min_ctas<D, false>())
    attn_fwd_kernel_tc(const AttnFwdParams<T, float> p, const Policy pol) {
  using C = TcCfg<D, HPW, false>;
  using E = typename TcElem<T>::type;
  using FragA = tcw::fragment<tcw::matrix_a, 16, 16, 16, E, tcw::row_major>;
  using FragBc = tcw::fragment<tcw::matrix_b, 16, 16, 16, E, tcw::col_major>;
  using FragBr = tcw::fragment<tcw::matrix_b, 16, 16, 16, E, tcw::row_major>;
  using FragC = tcw::fragment<tcw::accumulator, 16, 16, 16, float>;
  constexpr int NE = FragC::num_elements;
  extern __shared__ __align__(128) unsigned char smem_tc[];
  const int lane = threadIdx.x & 31;
  const int wib = threadIdx.x >> 5;
  const AttnShape& s = p.shape;
  const int64_t L = s.q_len, Hq = s.q_heads, Hk = s.kv_heads;
  const int64_t G = Hq / Hk, chunks = G / HPW;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kStageWarps + wib;
  if (warp >= s.batch * Hk * chunks * L) return;  // uniform per warp
  const int64_t i = warp % L;
  const int64_t rest = warp / L;
  const int64_t hc = rest % (Hk * chunks);
  const int64_t b = rest / (Hk * chunks);
  const int64_t g = hc / chunks;
  const int64_t h0 = g * G + (hc % chunks) * HPW;

  unsigned char* base = smem_tc + wib * C::warp_bytes;
  TcWarp<T, C, Policy> w;
  w.kv = reinterpret_cast<E*>(base);
  w.kidx = reinterpret_cast<int*>(base + C::idx_off);
  w.kbase = p.k.at(b, 0, g);
  w.vbase = p.v.at(b, 0, g);
  w.sk = p.k.stride_l;
  w.sv = p.v.stride_l;
  w.b = b; w.i = i; w.g = g;
  w.lane = lane;
  E* qs = reinterpret_cast<E*>(base + C::q_off);
  float* ss = reinterpret_cast<float*>(base + C::s_off);
  E* ps = reinterpret_cast<E*>(base + C::p_off);
  float* tab = reinterpret_cast<float*>(base + C::tab_off);  // alpha[16], l[16]
  const int hme = lane / C::LPH, sub = lane % C::LPH;  // this lane's head in the softmax step

  FragC acc[C::NF];
#pragma unroll
  for (int f = 0; f < C::NF; ++f) tcw::fill_fragment(acc[f], 0.f);
  float m = -INFINITY, lp = 0.f;

  if (pol.query_valid(b, i)) {
    tc_load_tile<T, C, HPW>(qs, p.q, b, i, h0, lane);
    // Row-number table in the S tile: loaded as an accumulator, it tells each fragment
    // element its row (head) for the rescale, whatever wmma's element layout is.
    for (int x = lane; x < 256; x += 32) ss[(x >> 4) * C::SLD + (x & 15)] = static_cast<float>(x >> 4);
    __syncwarp();
    int rid[NE];
    {
      FragC rowf;
      tcw::load_matrix_sync(rowf, ss, C::SLD, tcw::mem_row_major);
#pragma unroll
      for (int e = 0; e < NE; ++e) rid[e] = static_cast<int>(rowf.x[e]);
    }
    FragA qa[C::REGA ? C::NF : 1];
    if constexpr (C::REGA) {
#pragma unroll
      for (int f = 0; f < C::NF; ++f) tcw::load_matrix_sync(qa[f], qs + f * 16, C::RS);
    }
    __syncwarp();  // Q tile read before the zero fill may overwrite it
    tc_zero<static_cast<int>(C::kv_bytes)>(w.kv, lane);
    tc_zero<static_cast<int>(C::tab_off - C::p_off)>(ps, lane);
    if (lane < 16) tab[lane] = 1.f;  // alpha of the padding rows stays 1
    __syncwarp();

    const float qsc = static_cast<float>(s.scale) * kLog2e;
    w.n_slots = pol.fwd_slots(b, i, g);
    const int64_t n_chunks = (w.n_slots + C::KC - 1) / C::KC;
    int cnt = n_chunks > 0 ? w.issue(pol, 0, 0) : 0;
    for (int64_t ch = 0; ch < n_chunks; ++ch) {
      const int buf = static_cast<int>(ch & 1);
      int cnt_next = 0;
      if (ch + 1 < n_chunks) {
        cnt_next = w.issue(pol, (ch + 1) * C::KC, buf ^ 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncwarp();  // every lane's copies visible to the whole warp
      if (cnt > 0) {
        const E* kb = w.kbuf(buf);
        const E* vb = w.vbuf(buf);
        // S = Q K^T, one 16 x 16 tile per 16 keys.
#pragma unroll
        for (int t = 0; t < C::KT; ++t) {
          if (t * 16 < cnt) {
            FragC sacc;
            tcw::fill_fragment(sacc, 0.f);
#pragma unroll
            for (int f = 0; f < C::NF; ++f) {
              FragBc kf;
              tcw::load_matrix_sync(kf, kb + t * 16 * C::RS + f * 16, C::RS);
              if constexpr (C::REGA) {
                tcw::mma_sync(sacc, qa[f], kf, sacc);
              } else {
                FragA a;
                tcw::load_matrix_sync(a, qs + f * 16, C::RS);
                tcw::mma_sync(sacc, a, kf, sacc);
              }
            }
            tcw::store_matrix_sync(ss + t * 16, sacc, C::SLD, tcw::mem_row_major);
          }
        }
        __syncwarp();
        // Online-softmax step of head hme over this lane's keys sub + LPH * e.
        float x[C::KPL], pr[C::KPL];
        float cmax = -INFINITY;
#pragma unroll
        for (int e = 0; e < C::KPL; ++e) {
          const int k = sub + C::LPH * e;
          x[e] = k < cnt ? ss[hme * C::SLD + k] * qsc : -INFINITY;
          cmax = fmaxf(cmax, x[e]);
          pr[e] = 0.f;
        }
#pragma unroll
        for (int o = C::LPH / 2; o > 0; o >>= 1) cmax = fmaxf(cmax, __shfl_xor_sync(kFullMask, cmax, o));
        const float mn = fmaxf(m, cmax);
        float alpha = 1.f, psum = 0.f;
        if (mn != -INFINITY) {  // uniform per head group
          alpha = exp2f(m - mn);
#pragma unroll
          for (int e = 0; e < C::KPL; ++e) {
            pr[e] = sub + C::LPH * e < cnt ? exp2f(x[e] - mn) : 0.f;
            psum += pr[e];
          }
        }
        lp = fmaf(lp, alpha, psum);
        m = mn;
#pragma unroll
        for (int e = 0; e < C::KPL; ++e) {
          const int k = sub + C::LPH * e;
          if (k < C::KC) ps[hme * C::PLD + k] = TcElem<T>::from(pr[e]);
        }
        if (sub == 0) tab[hme] = alpha;
        const bool rescale = __any_sync(kFullMask, alpha != 1.f) && ch > 0;
        __syncwarp();  // P and alpha visible
        if (rescale) {
          float a[NE];
#pragma unroll
          for (int e = 0; e < NE; ++e) a[e] = tab[rid[e]];
#pragma unroll
          for (int f = 0; f < C::NF; ++f)
#pragma unroll
            for (int e = 0; e < NE; ++e) acc[f].x[e] *= a[e];
        }
        // O += P V.
#pragma unroll
        for (int t = 0; t < C::KT; ++t) {
          if (t * 16 < cnt) {
            FragA pa;
            tcw::load_matrix_sync(pa, ps + t * 16, C::PLD);
#pragma unroll
            for (int f = 0; f < C::NF; ++f) {
              FragBr vf;
              tcw::load_matrix_sync(vf, vb + t * 16 * C::RS + f * 16, C::RS);
              tcw::mma_sync(acc[f], pa, vf, acc[f]);
            }
          }
        }
      }
      __syncwarp();  // buffer `buf`, S, P and alpha are rewritten by the next iteration
      cnt = cnt_next;
    }
  }

  // l of head hme: the group's partial sums, fixed butterfly (same bits in every lane).
  float l = lp;
#pragma unroll
  for (int o = C::LPH / 2; o > 0; o >>= 1) l += __shfl_xor_sync(kFullMask, l, o);
  __syncwarp();  // the K/V buffers become the output staging area
  float* ost = reinterpret_cast<float*>(base);
#pragma unroll
  for (int f = 0; f < C::NF; ++f) tcw::store_matrix_sync(ost + f * 16, acc[f], C::OLD, tcw::mem_row_major);
  if (sub == 0) tab[16 + hme] = l;
  __syncwarp();
  for (int t = lane; t < HPW * C::CPR; t += 32) {
    const int hh = t / C::CPR, c = t % C::CPR;
    const float lh = tab[16 + hh];
    const float inv = lh > 0.f ? 1.f / lh : 0.f;
    const float* src = ost + hh * C::OLD + c * kFrag;
    const float4 a0 = reinterpret_cast<const float4*>(src)[0];
    const float4 a1 = reinterpret_cast<const float4*>(src)[1];
    const float o[kFrag] = {a0.x * inv, a0.y * inv, a0.z * inv, a0.w * inv,
                            a1.x * inv, a1.y * inv, a1.z * inv, a1.w * inv};
    store8_aligned(p.out.at(b, i, h0 + hh) + c * kFrag, o);
  }
  if (sub == 0 && hme < HPW) {
    p.lse[(b * L + i) * Hq + h0 + hme] = l > 0.f ? (m + __log2f(l)) * kLn2 : -INFINITY;
  }
}

// ------------------------------------------------------------------------------ dQ
// Also writes delta[b, i, h] = dot(dO, O) - grad_lse (0 for padded rows) for the dK/dV pass.
template <typename T, int D, int HPW, class Policy>
__global__ void __launch_bounds__(kStageWarps * 32, tc_min_ctas<D, true>())
    attn_dq_kernel_tc(const AttnBwdParams<T, float> p, const Policy pol, float* __restrict__ delta) {
  using C = TcCfg<D, HPW, true>;
  using E = typename TcElem<T>::type;
  using FragA = tcw::fragment<tcw::matrix_a, 16, 16, 16, E, tcw::row_major>;
  using FragBc = tcw::fragment<tcw::matrix_b, 16, 16, 16, E, tcw::col_major>;
  using FragBr = tcw::fragment<tcw::matrix_b, 16, 16, 16, E, tcw::row_major>;
  using FragC = tcw::fragment<tcw::accumulator, 16, 16, 16, float>;
  extern __shared__ __align__(128) unsigned char smem_tc[];
  const int lane = threadIdx.x & 31;
  const int wib = threadIdx.x >> 5;
  const AttnShape& s = p.shape;
  const int64_t L = s.q_len, Hq = s.q_heads, Hk = s.kv_heads;
  const int64_t G = Hq / Hk, chunks = G / HPW;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kStageWarps + wib;
  if (warp >= s.batch * Hk * chunks * L) return;
  const int64_t i = warp % L;
  const int64_t rest = warp / L;
  const int64_t hc = rest % (Hk * chunks);
  const int64_t b = rest / (Hk * chunks);
  const int64_t g = hc / chunks;
  const int64_t h0 = g * G + (hc % chunks) * HPW;
  const int64_t row = (b * L + i) * Hq + h0;

  unsigned char* base = smem_tc + wib * C::warp_bytes;
  TcWarp<T, C, Policy> w;
  w.kv = reinterpret_cast<E*>(base);
  w.kidx = reinterpret_cast<int*>(base + C::idx_off);
  w.kbase = p.k.at(b, 0, g);
  w.vbase = p.v.at(b, 0, g);
  w.sk = p.k.stride_l;
  w.sv = p.v.stride_l;
  w.b = b; w.i = i; w.g = g;
  w.lane = lane;
  E* qs = reinterpret_cast<E*>(base + C::q_off);
  E* dos = qs + 16 * C::RS;
  float* ss = reinterpret_cast<float*>(base + C::s_off);
  float* dps = reinterpret_cast<float*>(base + C::s_off + C::s_bytes);
  E* dss = reinterpret_cast<E*>(base + C::p_off);
  const int hme = lane / C::LPH, sub = lane % C::LPH;

  FragC dq[C::NF];
#pragma unroll
  for (int f = 0; f < C::NF; ++f) tcw::fill_fragment(dq[f], 0.f);

  if (pol.query_valid(b, i)) {
    tc_load_tile<T, C, HPW>(qs, p.q, b, i, h0, lane);
    tc_load_tile<T, C, HPW>(dos, p.grad_out, b, i, h0, lane);
    __syncwarp();
    // delta: lane-strided partial sums, then a butterfly (fixed order).
    float lse2[HPW], dlt[HPW];
#pragma unroll
    for (int hh = 0; hh < HPW; ++hh) {
      const T* orow = p.out.at(b, i, h0 + hh);
      float x = 0.f;
      for (int d = lane; d < D; d += 32) x = fmaf(TcElem<T>::to(dos[hh * C::RS + d]), to_float(orow[d]), x);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
      const float gl = p.grad_lse != nullptr ? p.grad_lse[row + hh] : 0.f;
      dlt[hh] = x - gl;
      lse2[hh] = p.lse[row + hh] * kLog2e;
    }
    if (lane == 0) {
#pragma unroll
      for (int hh = 0; hh < HPW; ++hh) delta[row + hh] = dlt[hh];
    }
    const float my_lse2 = pick<HPW>(lse2, hme), my_dlt = pick<HPW>(dlt, hme);
    FragA qa[C::REGA ? C::NF : 1], oa[C::REGA ? C::NF : 1];
    if constexpr (C::REGA) {
#pragma unroll
      for (int f = 0; f < C::NF; ++f) {
        tcw::load_matrix_sync(qa[f], qs + f * 16, C::RS);
        tcw::load_matrix_sync(oa[f], dos + f * 16, C::RS);
      }
    }
    __syncwarp();  // Q/dO tiles read before the zero fill may overwrite them
    tc_zero<static_cast<int>(C::kv_bytes)>(w.kv, lane);
    tc_zero<static_cast<int>(C::tab_off - C::p_off)>(dss, lane);
    __syncwarp();

    const float qsc = static_cast<float>(s.scale) * kLog2e;
    w.n_slots = pol.fwd_slots(b, i, g);
    const int64_t n_chunks = (w.n_slots + C::KC - 1) / C::KC;
    int cnt = n_chunks > 0 ? w.issue(pol, 0, 0) : 0;
    for (int64_t ch = 0; ch < n_chunks; ++ch) {
      const int buf = static_cast<int>(ch & 1);
      int cnt_next = 0;
      if (ch + 1 < n_chunks) {
        cnt_next = w.issue(pol, (ch + 1) * C::KC, buf ^ 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncwarp();
      if (cnt > 0) {
        const E* kb = w.kbuf(buf);
        const E* vb = w.vbuf(buf);
        // S = Q K^T and dP = dO V^T.
#pragma unroll
        for (int t = 0; t < C::KT; ++t) {
          if (t * 16 < cnt) {
            FragC sacc, pacc;
            tcw::fill_fragment(sacc, 0.f);
            tcw::fill_fragment(pacc, 0.f);
#pragma unroll
            for (int f = 0; f < C::NF; ++f) {
              FragBc kf, vf;
              tcw::load_matrix_sync(kf, kb + t * 16 * C::RS + f * 16, C::RS);
              tcw::load_matrix_sync(vf, vb + t * 16 * C::RS + f * 16, C::RS);
              if constexpr (C::REGA) {
                tcw::mma_sync(sacc, qa[f], kf, sacc);
                tcw::mma_sync(pacc, oa[f], vf, pacc);
              } else {
                FragA a;
                tcw::load_matrix_sync(a, qs + f * 16, C::RS);
                tcw::mma_sync(sacc, a, kf, sacc);
                tcw::load_matrix_sync(a, dos + f * 16, C::RS);
                tcw::mma_sync(pacc, a, vf, pacc);
              }
            }
            tcw::store_matrix_sync(ss + t * 16, sacc, C::SLD, tcw::mem_row_major);
            tcw::store_matrix_sync(dps + t * 16, pacc, C::SLD, tcw::mem_row_major);
          }
        }
        __syncwarp();
        // dS of head hme for this lane's keys (0 past cnt), rounded to the input type.
#pragma unroll
        for (int e = 0; e < C::KPL; ++e) {
          const int k = sub + C::LPH * e;
          if (k < C::KC) {
            float dsv = 0.f;
            if (k < cnt) {
              const float sv = ss[hme * C::SLD + k] * qsc;
              dsv = exp2f(sv - my_lse2) * (dps[hme * C::SLD + k] - my_dlt);
            }
            dss[hme * C::PLD + k] = TcElem<T>::from(dsv);
          }
        }
        __syncwarp();
        // dQ += dS K.
#pragma unroll
        for (int t = 0; t < C::KT; ++t) {
          if (t * 16 < cnt) {
            FragA da;
            tcw::load_matrix_sync(da, dss + t * 16, C::PLD);
#pragma unroll
            for (int f = 0; f < C::NF; ++f) {
              FragBr kf;
              tcw::load_matrix_sync(kf, kb + t * 16 * C::RS + f * 16, C::RS);
              tcw::mma_sync(dq[f], da, kf, dq[f]);
            }
          }
        }
      }
      __syncwarp();
      cnt = cnt_next;
    }
  } else if (lane == 0) {
#pragma unroll
    for (int hh = 0; hh < HPW; ++hh) delta[row + hh] = 0.f;
  }

  __syncwarp();  // the K/V buffers become the output staging area
  float* ost = reinterpret_cast<float*>(base);
#pragma unroll
  for (int f = 0; f < C::NF; ++f) tcw::store_matrix_sync(ost + f * 16, dq[f], C::OLD, tcw::mem_row_major);
  __syncwarp();
  const float sc = static_cast<float>(s.scale);
  for (int t = lane; t < HPW * C::CPR; t += 32) {
    const int hh = t / C::CPR, c = t % C::CPR;
    const float* src = ost + hh * C::OLD + c * kFrag;
    const float4 a0 = reinterpret_cast<const float4*>(src)[0];
    const float4 a1 = reinterpret_cast<const float4*>(src)[1];
    float o[kFrag] = {a0.x * sc, a0.y * sc, a0.z * sc, a0.w * sc,
                      a1.x * sc, a1.y * sc, a1.z * sc, a1.w * sc};
    store8_acc(p.grad_q.at(b, i, h0 + hh) + c * kFrag, o, p.accumulate);
  }
}

// ------------------------------------------------------------------------------ dispatch
// Dynamic shared memory above 48 KB must be opted into per kernel (D = 128).
template <class K>
inline void stage_smem_attr(K kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(bytes));
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
  const int hpw = G % 4 == 0 ? 4 : (G % 2 == 0 ? 2 : 1);
  auto with_hpw = [&](auto d_c) {
    if (hpw == 4) f(d_c, integral_constant<int, 4>{});
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

inline unsigned stage_grid(int64_t warps) {
  const int64_t blocks = ceil_div(warps, kStageWarps);
  TORCH_CHECK(blocks < (int64_t(1) << 31), "blossom_ops: problem too large for one launch");
  return static_cast<unsigned>(blocks);
}

// Launches the staged forward if it covers this case; false means "use the simple kernel".
template <typename T, class Policy>
bool launch_attn_fwd_staged(const AttnFwdParams<T, float>& p, const Policy& pol, bool vec,
                            cudaStream_t stream) {
  if constexpr (!stage_type_ok<T>()) {
    return false;
  } else {
    const AttnShape& s = p.shape;
    return dispatch_stage_config(s.head_dim, s.group(), vec, [&](auto d_c, auto hpw_c) {
      constexpr int D = decltype(d_c)::value, HPW = decltype(hpw_c)::value;
      const int64_t warps = s.batch * s.kv_heads * (s.group() / HPW) * s.q_len;
      const size_t bytes = kStageWarps * TcCfg<D, HPW, false>::warp_bytes;
      auto kernel = attn_fwd_kernel_tc<T, D, HPW, Policy>;
      stage_smem_attr(kernel, bytes);
      kernel<<<stage_grid(warps), kStageWarps * 32, bytes, stream>>>(p, pol);
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
    return dispatch_stage_config(s.head_dim, s.group(), vec, [&](auto d_c, auto hpw_c) {
      constexpr int D = decltype(d_c)::value, HPW = decltype(hpw_c)::value;
      const int64_t warps = s.batch * s.kv_heads * (s.group() / HPW) * s.q_len;
      const size_t bytes = kStageWarps * TcCfg<D, HPW, true>::warp_bytes;
      auto kernel = attn_dq_kernel_tc<T, D, HPW, Policy>;
      stage_smem_attr(kernel, bytes);
      kernel<<<stage_grid(warps), kStageWarps * 32, bytes, stream>>>(p, pol, delta);
    });
  }
}

}  // namespace detail
}  // namespace gpu
}  // namespace blossom
