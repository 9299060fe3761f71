// Staged forward and dQ attention kernels: the fast path of attn_kernels.cuh for 16-bit
// inputs, D in {16, 32, 64, 128} and 16-byte aligned rows. Same Policy interface, same
// numbers (fp32 accumulation, base-2 softmax with scale * log2(e) folded into q, lse in
// natural log), only the work schedule differs.
//
// Why: the simple kernels walk the key list with 4 keys in flight per warp and a dependent
// chain per key (index -> K/V row -> math), so they are latency bound (~6 TFLOP/s).
//
// Work decomposition (unchanged unit): one warp per (b, query i, HPW heads of KV group g),
// kStageWarps = 2 independent warps per CTA (no CTA barrier; each warp owns a slice of the
// dynamic shared memory). The key slots are processed in chunks of KC (32, or 16 for D=128):
//   1. enumerate: lane n computes pol.fwd_key(b, i, g, n0 + n) for the KC slots at once;
//      the valid keys are compacted (ballot + popc) into kidx[buf][0, cnt);
//   2. stage: the K and V rows of the cnt keys are copied into shared memory with 16-byte
//      cp.async (all 2 * cnt * D / 8 copies of the chunk in flight at once, coalesced: 8
//      lanes per 128-byte row), double-buffered: chunk c+1 is enumerated and issued before
//      chunk c is computed. Rows are padded by 16 bytes so lane k reading row k hits
//      distinct banks;
//   3. scores: lane k owns key k of the chunk and computes its HPW dot products from shared
//      memory (q for the HPW heads sits in shared memory as fp32, read by broadcast);
//   4. forward: one online-softmax step per chunk and head (warp max of the chunk, rescale
//      once); p goes to shared memory; dQ: ds = exp2(s - lse2) * (dp - delta);
//   5. P.V (or dS.K): lane owns an 8-element output chunk of one head (pairs (head, chunk),
//      HPW * D / 8 of them; when fewer than 32, KS = 32 / pairs lanes split the keys and
//      are summed by a butterfly at the end); each lane keeps a partial softmax sum l,
//      summed by a butterfly at the end. Every reduction has a fixed order: bit-reproducible.
//
// Count, block-sparse D=64 L=4096 B=64 Hq=8 Hk=2 (G=4: one warp = one (b, i, g), 524,288
// warps), per query 80 slots = own block + top_n=4 blocks of 16; with causal masking about
// 72 valid keys on average (own block half masked):
//   FLOPs fwd: 524,288 warps * 72 keys * 4 heads * 64 * 2 (QK) * 2 (PV) = 38.7 GFLOP
//   FLOPs dQ : 3 products per (key, head) = 58.0 GFLOP
//   HBM fwd: q 268 MB + out 268 MB + K,V 134 MB + lse 8 MB = 0.68 GB -> 0.14 ms at 4.8 TB/s
//   HBM dQ : q, dO, O, dQ 4 * 268 MB + K,V 134 MB + lse/dlse/delta 25 MB = 1.23 GB -> 0.26 ms
//   L2/L1 -> SM: 524,288 * 72 keys * 2 rows * 128 B = 9.7 GB per pass (cp.async.ca, so
//     neighbouring queries of the same SM share the own block / window rows through L1).
//   Issue (fp32 SIMT, the bound): per (key, warp) ~13 warp-instructions for the scores
//     (8 x [1 LDS.128 K + 8 LDS.128 q + 8 cvt + 32 FMA] / 32 lanes) + ~18 for P.V (1 LDS p,
//     1 LDS.128 V, 8 cvt, 8 FMA per lane) + ~3 enumeration/softmax/copy = ~34;
//     524,288 * 72 * 34 = 1.28 G warp-instr over 132 SMs * 4 schedulers * 1.98 GHz
//     = 1.05 T/s -> ~1.2 ms fwd (was 7.5); dQ ~2x the score work + dS.K -> ~2.0 ms (was
//     10.8). Window (~17 slots, one chunk): fwd ~0.35 ms, dQ ~0.6 ms (was 2.2 / 4.2).
// Shared memory per warp (bf16, D=64): K,V 2 buffers * 2 * 32 rows * 144 B = 18 KB, q fp32
// 1 KB (dQ: + dO 1 KB), p 0.5 KB, indices 0.25 KB: ~20 KB -> 41-43 KB per CTA, 5 CTAs
// (10 warps) per SM.
#pragma once
#include <cstdlib>
#include <type_traits>

#include "common/params.h"
#include "cuda/common.cuh"
#include "cuda/cp_async.cuh"

namespace blossom {
namespace gpu {
namespace detail {

constexpr int kStageWarps = 2;  // warps per CTA of the staged kernels

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

// 8 elements of a 16-bit row in shared memory -> float.
template <typename T>
__device__ __forceinline__ void lds8(const T* p, float (&f)[kFrag]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  unpack2(u.x, p, f[0], f[1]);
  unpack2(u.y, p, f[2], f[3]);
  unpack2(u.z, p, f[4], f[5]);
  unpack2(u.w, p, f[6], f[7]);
}
// sum_e a[e] * f[e] with a read from fp32 shared memory (broadcast: all lanes, same address).
__device__ __forceinline__ float dot8_smem(const float* a, const float (&f)[kFrag], float s) {
  const float4 a0 = reinterpret_cast<const float4*>(a)[0];
  const float4 a1 = reinterpret_cast<const float4*>(a)[1];
  s = fmaf(a0.x, f[0], s); s = fmaf(a0.y, f[1], s); s = fmaf(a0.z, f[2], s);
  s = fmaf(a0.w, f[3], s); s = fmaf(a1.x, f[4], s); s = fmaf(a1.y, f[5], s);
  s = fmaf(a1.z, f[6], s); s = fmaf(a1.w, f[7], s);
  return s;
}

// Compile-time configuration and per-warp shared-memory layout (byte offsets).
template <int D, int HPW, bool DQ>
struct StageCfg {
  static constexpr int KC = D <= 64 ? 32 : 16;  // keys per chunk
  static constexpr int CPR = D / kFrag;         // 16-byte chunks per row
  static constexpr int RS = D + kFrag;          // row stride in elements (+16 B: no conflicts)
  static constexpr int NP = HPW * CPR;          // (head, chunk) output pairs
  static constexpr int KS = NP >= 32 ? 1 : 32 / NP;  // lanes splitting the keys of a pair
  static constexpr int PPL = NP >= 32 ? NP / 32 : 1;  // pairs per lane
  static constexpr int PS = KC + 1;             // p row stride (floats): heads on distinct banks
  static constexpr size_t kv_bytes = size_t(2) * 2 * KC * RS * 2;  // [buf][K|V][KC][RS] 16-bit
  static constexpr size_t q_off = kv_bytes;
  static constexpr size_t q_bytes = size_t(HPW) * D * 4 * (DQ ? 2 : 1);  // q (and dO) fp32
  static constexpr size_t p_off = q_off + q_bytes;
  static constexpr size_t p_bytes = (size_t(HPW) * PS * 4 + 15) / 16 * 16;
  static constexpr size_t idx_off = p_off + p_bytes;
  static constexpr size_t warp_bytes = idx_off + size_t(2) * KC * 4;
  static_assert(D % kFrag == 0 && 32 % KS == 0, "bad staged configuration");
};

// Shared pieces of the two kernels: the warp's coordinates and the chunk pipeline.
template <typename T, int D, int HPW, bool DQ, class Policy>
struct StageWarp {
  using C = StageCfg<D, HPW, DQ>;
  T* kv;          // [2][2][KC][RS]
  float* qs;      // [HPW][D] (dQ: then dO [HPW][D])
  float* ps;      // [HPW][PS]
  int* kidx;      // [2][KC]
  const T* kbase; // k.at(b, 0, g)
  const T* vbase;
  int64_t sk, sv;  // row strides of k and v
  int64_t b, i, g, n_slots;
  int lane;

  __device__ __forceinline__ T* kbuf(int buf) const { return kv + (buf * 2) * C::KC * C::RS; }
  __device__ __forceinline__ T* vbuf(int buf) const { return kv + (buf * 2 + 1) * C::KC * C::RS; }

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
    T* kb = kbuf(buf);
    T* vb = vbuf(buf);
    // Copy t: key r = t / (2 CPR), K for the first CPR pieces then V: 8 lanes per row.
    for (int t = lane; t < cnt * 2 * C::CPR; t += 32) {
      const int r = t / (2 * C::CPR), w = t % (2 * C::CPR);
      const int c = w % C::CPR;
      const int64_t jr = ki[r];
      if (w < C::CPR)
        cp_async16(kb + r * C::RS + c * kFrag, kbase + jr * sk + c * kFrag);
      else
        cp_async16(vb + r * C::RS + c * kFrag, vbase + jr * sv + c * kFrag);
    }
    cp_async_commit();
    return cnt;
  }
};

// Head and chunk of output pair r of this lane.
template <class C>
__device__ __forceinline__ void lane_pair(int lane, int r, int& hh, int& c) {
  const int pr = C::KS > 1 ? lane / C::KS : lane + 32 * r;
  hh = pr / C::CPR;
  c = pr % C::CPR;
}
template <int HPW>
__device__ __forceinline__ float pick(const float (&a)[HPW], int hh) {
  float x = a[0];
#pragma unroll
  for (int h = 1; h < HPW; ++h)
    if (hh == h) x = a[h];
  return x;
}

// ------------------------------------------------------------------------------ forward
template <typename T, int D, int HPW, class Policy>
__global__ void __launch_bounds__(kStageWarps * 32)
    attn_fwd_kernel_staged(const AttnFwdParams<T, float> p, const Policy pol) {
  using C = StageCfg<D, HPW, false>;
  extern __shared__ __align__(16) unsigned char smem[];
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

  unsigned char* base = smem + wib * C::warp_bytes;
  StageWarp<T, D, HPW, false, Policy> w;
  w.kv = reinterpret_cast<T*>(base);
  w.qs = reinterpret_cast<float*>(base + C::q_off);
  w.ps = reinterpret_cast<float*>(base + C::p_off);
  w.kidx = reinterpret_cast<int*>(base + C::idx_off);
  w.kbase = p.k.at(b, 0, g);
  w.vbase = p.v.at(b, 0, g);
  w.sk = p.k.stride_l;
  w.sv = p.v.stride_l;
  w.b = b; w.i = i; w.g = g;
  w.lane = lane;

  float acc[C::PPL][kFrag], m[HPW], lp[HPW];
#pragma unroll
  for (int r = 0; r < C::PPL; ++r) zero_frag(acc[r]);
#pragma unroll
  for (int hh = 0; hh < HPW; ++hh) {
    m[hh] = -INFINITY;
    lp[hh] = 0.f;
  }

  if (pol.query_valid(b, i)) {
    // q * scale * log2(e) in fp32 shared memory: the softmax runs in base 2.
    const float qsc = static_cast<float>(s.scale) * kLog2e;
    for (int t = lane; t < HPW * C::CPR; t += 32) {
      const int hh = t / C::CPR, c = t % C::CPR;
      float f[kFrag];
      load8_aligned(p.q.at(b, i, h0 + hh) + c * kFrag, f);
#pragma unroll
      for (int e = 0; e < kFrag; ++e) f[e] *= qsc;
      float4* dst = reinterpret_cast<float4*>(w.qs + hh * D + c * kFrag);
      dst[0] = make_float4(f[0], f[1], f[2], f[3]);
      dst[1] = make_float4(f[4], f[5], f[6], f[7]);
    }
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
      __syncwarp();  // every lane's copies (and q) visible to the whole warp
      if (cnt > 0) {
        // Scores: lane k owns key k of the chunk.
        float sc[HPW];
#pragma unroll
        for (int hh = 0; hh < HPW; ++hh) sc[hh] = 0.f;
        if (lane < cnt) {
          const T* krow = w.kbuf(buf) + lane * C::RS;
#pragma unroll
          for (int c = 0; c < C::CPR; ++c) {
            float kf[kFrag];
            lds8(krow + c * kFrag, kf);
#pragma unroll
            for (int hh = 0; hh < HPW; ++hh) sc[hh] = dot8_smem(w.qs + hh * D + c * kFrag, kf, sc[hh]);
          }
        }
        // One online-softmax step per head for the whole chunk.
        float alpha[HPW];
#pragma unroll
        for (int hh = 0; hh < HPW; ++hh) {
          const float x = lane < cnt ? sc[hh] : -INFINITY;
          const float mn = fmaxf(m[hh], warp_max(x));
          float pr = 0.f;
          alpha[hh] = 1.f;
          if (mn != -INFINITY) {  // uniform
            alpha[hh] = exp2f(m[hh] - mn);
            pr = lane < cnt ? exp2f(x - mn) : 0.f;
          }
          lp[hh] = fmaf(lp[hh], alpha[hh], pr);
          m[hh] = mn;
          if (lane < C::KC) w.ps[hh * C::PS + lane] = pr;
        }
        __syncwarp();
        // P.V: lane owns (head, 8-element chunk) pairs; KS lanes split the keys.
        const int ks = C::KS > 1 ? lane % C::KS : 0;
        const T* vb = w.vbuf(buf);
#pragma unroll
        for (int r = 0; r < C::PPL; ++r) {
          int hh, c;
          lane_pair<C>(lane, r, hh, c);
          const float a = pick<HPW>(alpha, hh);
#pragma unroll
          for (int e = 0; e < kFrag; ++e) acc[r][e] *= a;
          const float* prow = w.ps + hh * C::PS;
          for (int k = ks; k < cnt; k += C::KS) {
            const float pk = prow[k];
            float vf[kFrag];
            lds8(vb + k * C::RS + c * kFrag, vf);
#pragma unroll
            for (int e = 0; e < kFrag; ++e) acc[r][e] = fmaf(pk, vf[e], acc[r][e]);
          }
        }
      }
      __syncwarp();  // buffer `buf` and p are rewritten by the next iteration
      cnt = cnt_next;
    }
  }

  float l[HPW];
#pragma unroll
  for (int hh = 0; hh < HPW; ++hh) {
    float x = lp[hh];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
    l[hh] = x;
  }
#pragma unroll
  for (int o = 1; o < C::KS; o <<= 1)
#pragma unroll
    for (int r = 0; r < C::PPL; ++r)
#pragma unroll
      for (int e = 0; e < kFrag; ++e) acc[r][e] += __shfl_xor_sync(kFullMask, acc[r][e], o);

  if (C::KS == 1 || lane % C::KS == 0) {
#pragma unroll
    for (int r = 0; r < C::PPL; ++r) {
      int hh, c;
      lane_pair<C>(lane, r, hh, c);
      const float lh = pick<HPW>(l, hh);
      const float inv = lh > 0.f ? 1.f / lh : 0.f;
      float o[kFrag];
#pragma unroll
      for (int e = 0; e < kFrag; ++e) o[e] = acc[r][e] * inv;
      store8_aligned(p.out.at(b, i, h0 + hh) + c * kFrag, o);
    }
  }
  if (lane == 0) {
    float* lse_row = p.lse + (b * L + i) * Hq + h0;
#pragma unroll
    for (int hh = 0; hh < HPW; ++hh)
      lse_row[hh] = l[hh] > 0.f ? (m[hh] + __log2f(l[hh])) * kLn2 : -INFINITY;
  }
}

// ------------------------------------------------------------------------------ dQ
// Also writes delta[b, i, h] = dot(dO, O) - grad_lse (0 for padded rows) for the dK/dV pass.
template <typename T, int D, int HPW, class Policy>
__global__ void __launch_bounds__(kStageWarps * 32)
    attn_dq_kernel_staged(const AttnBwdParams<T, float> p, const Policy pol,
                          float* __restrict__ delta) {
  using C = StageCfg<D, HPW, true>;
  extern __shared__ __align__(16) unsigned char smem[];
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

  unsigned char* base = smem + wib * C::warp_bytes;
  StageWarp<T, D, HPW, true, Policy> w;
  w.kv = reinterpret_cast<T*>(base);
  w.qs = reinterpret_cast<float*>(base + C::q_off);
  w.ps = reinterpret_cast<float*>(base + C::p_off);
  w.kidx = reinterpret_cast<int*>(base + C::idx_off);
  w.kbase = p.k.at(b, 0, g);
  w.vbase = p.v.at(b, 0, g);
  w.sk = p.k.stride_l;
  w.sv = p.v.stride_l;
  w.b = b; w.i = i; w.g = g;
  w.lane = lane;
  float* dos = w.qs + HPW * D;

  float dq[C::PPL][kFrag];
#pragma unroll
  for (int r = 0; r < C::PPL; ++r) zero_frag(dq[r]);

  if (pol.query_valid(b, i)) {
    const float qsc = static_cast<float>(s.scale) * kLog2e;
    for (int t = lane; t < HPW * C::CPR; t += 32) {
      const int hh = t / C::CPR, c = t % C::CPR;
      float f[kFrag], d[kFrag];
      load8_aligned(p.q.at(b, i, h0 + hh) + c * kFrag, f);
      load8_aligned(p.grad_out.at(b, i, h0 + hh) + c * kFrag, d);
#pragma unroll
      for (int e = 0; e < kFrag; ++e) f[e] *= qsc;
      float4* dq4 = reinterpret_cast<float4*>(w.qs + hh * D + c * kFrag);
      dq4[0] = make_float4(f[0], f[1], f[2], f[3]);
      dq4[1] = make_float4(f[4], f[5], f[6], f[7]);
      float4* dd4 = reinterpret_cast<float4*>(dos + hh * D + c * kFrag);
      dd4[0] = make_float4(d[0], d[1], d[2], d[3]);
      dd4[1] = make_float4(d[4], d[5], d[6], d[7]);
    }
    __syncwarp();
    float lse2[HPW], dlt[HPW];
#pragma unroll
    for (int hh = 0; hh < HPW; ++hh) {
      const T* orow = p.out.at(b, i, h0 + hh);
      float x = 0.f;
      for (int d = lane; d < D; d += 32) x = fmaf(dos[hh * D + d], to_float(orow[d]), x);
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
        const T* kb = w.kbuf(buf);
        if (lane < C::KC) {
          float sc[HPW], dp[HPW];
#pragma unroll
          for (int hh = 0; hh < HPW; ++hh) sc[hh] = dp[hh] = 0.f;
          if (lane < cnt) {
            const T* krow = kb + lane * C::RS;
            const T* vrow = w.vbuf(buf) + lane * C::RS;
#pragma unroll
            for (int c = 0; c < C::CPR; ++c) {
              float kf[kFrag], vf[kFrag];
              lds8(krow + c * kFrag, kf);
              lds8(vrow + c * kFrag, vf);
#pragma unroll
              for (int hh = 0; hh < HPW; ++hh) {
                sc[hh] = dot8_smem(w.qs + hh * D + c * kFrag, kf, sc[hh]);
                dp[hh] = dot8_smem(dos + hh * D + c * kFrag, vf, dp[hh]);
              }
            }
          }
#pragma unroll
          for (int hh = 0; hh < HPW; ++hh)
            w.ps[hh * C::PS + lane] =
                lane < cnt ? exp2f(sc[hh] - lse2[hh]) * (dp[hh] - dlt[hh]) : 0.f;
        }
        __syncwarp();
        // dQ += dS . K: lane owns (head, 8-element chunk) pairs; KS lanes split the keys.
        const int ks = C::KS > 1 ? lane % C::KS : 0;
#pragma unroll
        for (int r = 0; r < C::PPL; ++r) {
          int hh, c;
          lane_pair<C>(lane, r, hh, c);
          const float* prow = w.ps + hh * C::PS;
          for (int k = ks; k < cnt; k += C::KS) {
            const float dsk = prow[k];
            float kf[kFrag];
            lds8(kb + k * C::RS + c * kFrag, kf);
#pragma unroll
            for (int e = 0; e < kFrag; ++e) dq[r][e] = fmaf(dsk, kf[e], dq[r][e]);
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

#pragma unroll
  for (int o = 1; o < C::KS; o <<= 1)
#pragma unroll
    for (int r = 0; r < C::PPL; ++r)
#pragma unroll
      for (int e = 0; e < kFrag; ++e) dq[r][e] += __shfl_xor_sync(kFullMask, dq[r][e], o);

  if (C::KS == 1 || lane % C::KS == 0) {
    const float sc = static_cast<float>(s.scale);
#pragma unroll
    for (int r = 0; r < C::PPL; ++r) {
      int hh, c;
      lane_pair<C>(lane, r, hh, c);
#pragma unroll
      for (int e = 0; e < kFrag; ++e) dq[r][e] *= sc;
      store8_aligned(p.grad_q.at(b, i, h0 + hh) + c * kFrag, dq[r]);
    }
  }
}

}  // namespace detail
}  // namespace gpu
}  // namespace blossom

// The tensor-core variants of the two kernels above (same pipeline, wmma products).
#include "cuda/attn_staged_tc.cuh"

namespace blossom {
namespace gpu {
namespace detail {

// ------------------------------------------------------------------------------ dispatch
// BLOSSOM_OPS_CUDA_SIMPLE=1 (read once) routes every launch to the simple kernels (A/B runs);
// BLOSSOM_OPS_CUDA_SIMPLE=2 keeps the staged path but on its fp32 SIMT kernels instead of
// the tensor-core ones (A/B of attn_staged_tc.cuh alone).
inline bool attn_simple_only() {
  static const bool v = [] {
    const char* e = std::getenv("BLOSSOM_OPS_CUDA_SIMPLE");
    return e != nullptr && e[0] == '1' && e[1] == '\0';
  }();
  return v;
}
inline bool attn_stage_simt() {
  static const bool v = [] {
    const char* e = std::getenv("BLOSSOM_OPS_CUDA_SIMPLE");
    return e != nullptr && e[0] == '2' && e[1] == '\0';
  }();
  return v;
}

// Dynamic shared memory above 48 KB must be opted into per kernel (D = 128 tensor-core path).
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
  if (!vec || attn_simple_only() || G < 1) return false;
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
      if (!attn_stage_simt()) {
        const size_t bytes = kStageWarps * TcCfg<D, HPW, false>::warp_bytes;
        auto kernel = attn_fwd_kernel_tc<T, D, HPW, Policy>;
        stage_smem_attr(kernel, bytes);
        kernel<<<stage_grid(warps), kStageWarps * 32, bytes, stream>>>(p, pol);
        return;
      }
      using C = StageCfg<D, HPW, false>;
      const size_t bytes = kStageWarps * C::warp_bytes;
      static_assert(kStageWarps * C::warp_bytes <= 48 * 1024, "needs cudaFuncSetAttribute");
      attn_fwd_kernel_staged<T, D, HPW, Policy>
          <<<stage_grid(warps), kStageWarps * 32, bytes, stream>>>(p, pol);
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
      if (!attn_stage_simt()) {
        const size_t bytes = kStageWarps * TcCfg<D, HPW, true>::warp_bytes;
        auto kernel = attn_dq_kernel_tc<T, D, HPW, Policy>;
        stage_smem_attr(kernel, bytes);
        kernel<<<stage_grid(warps), kStageWarps * 32, bytes, stream>>>(p, pol, delta);
        return;
      }
      using C = StageCfg<D, HPW, true>;
      const size_t bytes = kStageWarps * C::warp_bytes;
      static_assert(kStageWarps * C::warp_bytes <= 48 * 1024, "needs cudaFuncSetAttribute");
      attn_dq_kernel_staged<T, D, HPW, Policy>
          <<<stage_grid(warps), kStageWarps * 32, bytes, stream>>>(p, pol, delta);
    });
  }
}

}  // namespace detail
}  // namespace gpu
}  // namespace blossom
