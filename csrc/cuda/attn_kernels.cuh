// Generic sparse-attention kernels (forward, dQ, dK/dV), shared by the three attention
// operators. An operator supplies a mask Policy that enumerates, for one query, the keys it
// may attend to (forward and dQ) and, for one key, the queries that attend to it (dK/dV);
// the kernels do the arithmetic. Sparse key sets here are short (a window plus ~log2 L
// offsets, or (top_n + 1) blocks), so the work unit is one warp per row:
//
//   * forward / dQ: one warp per (batch, query i, HPW heads of one KV group). The warp is
//     split into KPW = 32 / TPK sub-groups of TPK lanes; lane x of a sub-group owns head-dim
//     elements [8x, 8x + 8). Each sub-group walks its own subset of the key list (key slot n
//     goes to sub-group n % KPW) with its own online-softmax state, so no communication is
//     needed per key beyond the TPK-lane dot-product reduction; the KPW partial states are
//     merged by a butterfly at the end (deterministic: every merge is commutative).
//   * dK/dV: one warp per (batch, key j, KV head g); sub-groups walk the (query, head) pairs
//     that attend to j, each accumulating dK and dV in registers; merged by a butterfly.
//     No atomics, so gradients are bit-reproducible.
//
// Policy interface (all __device__, const):
//   bool    query_valid(b, i)
//   bool    key_valid(b, j)
//   int64_t fwd_slots(b, i, g)           number of key slots of query i
//   int64_t fwd_key(b, i, g, n)          key of slot n, or -1 when masked (validity included)
//   int64_t bwd_slots(b, j, g)           number of query slots of key j
//   int64_t bwd_query(b, j, g, n)        query of slot n, or -1 when masked (validity included)
// The two enumerations must describe the same mask, each allowed pair exactly once.
//
// Forward and dQ have a staged fast path (attn_staged_tc.cuh: whole chunks of K/V rows copied
// to shared memory with cp.async, products on tensor cores) for 16-bit types, D in
// {16, 32, 64, 128} and 16-byte aligned rows; the kernels below (*_simple) take every other
// case, and every case when BLOSSOM_OPS_CUDA_SIMPLE=1.
#pragma once
#include "common/params.h"
#include "cuda/attn_staged_tc.cuh"
#include "cuda/common.cuh"

namespace blossom {
namespace gpu {
namespace detail {

constexpr int kAttnWarps = 4;  // warps per CTA

// ------------------------------------------------------------------------------ forward
template <typename T, int TPK, int HPW, bool VEC, class Policy>
__global__ void __launch_bounds__(kAttnWarps * 32)
    attn_fwd_kernel_simple(const AttnFwdParams<T, float> p, const Policy pol) {
  constexpr int KPW = 32 / TPK;
  const int lane = threadIdx.x & 31;
  const int sub = lane / TPK;
  const int d0 = (lane % TPK) * kFrag;
  const AttnShape& s = p.shape;
  const int64_t L = s.q_len, Hq = s.q_heads, Hk = s.kv_heads;
  const int D = static_cast<int>(s.head_dim);
  const int64_t G = Hq / Hk, chunks = G / HPW;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kAttnWarps + threadIdx.x / 32;
  if (warp >= s.batch * Hk * chunks * L) return;  // uniform per warp
  const int64_t i = warp % L;
  const int64_t rest = warp / L;
  const int64_t hc = rest % (Hk * chunks);
  const int64_t b = rest / (Hk * chunks);
  const int64_t g = hc / chunks;
  const int64_t h0 = g * G + (hc % chunks) * HPW;
  float* lse_row = p.lse + (b * L + i) * Hq + h0;

  float acc[HPW][kFrag], m[HPW], l[HPW];
#pragma unroll
  for (int hh = 0; hh < HPW; ++hh) {
    zero_frag(acc[hh]);
    m[hh] = -INFINITY;
    l[hh] = 0.f;
  }

  if (pol.query_valid(b, i)) {
    // q pre-multiplied by scale * log2(e): the softmax runs in base 2.
    const float qs = static_cast<float>(s.scale) * kLog2e;
    float q[HPW][kFrag];
#pragma unroll
    for (int hh = 0; hh < HPW; ++hh) {
      load_frag<VEC>(p.q.at(b, i, h0 + hh), d0, D, q[hh]);
#pragma unroll
      for (int e = 0; e < kFrag; ++e) q[hh][e] *= qs;
    }
    const int64_t n_slots = pol.fwd_slots(b, i, g);
    for (int64_t n0 = 0; n0 < n_slots; n0 += KPW) {
      const int64_t n = n0 + sub;
      const int64_t j = n < n_slots ? pol.fwd_key(b, i, g, n) : -1;
      float kf[kFrag], vf[kFrag];
      if (j >= 0) {
        load_frag<VEC>(p.k.at(b, j, g), d0, D, kf);
        load_frag<VEC>(p.v.at(b, j, g), d0, D, vf);
      } else {
        zero_frag(kf);
        zero_frag(vf);
      }
#pragma unroll
      for (int hh = 0; hh < HPW; ++hh) {
        const float sc = group_sum<TPK>(dot_frag(q[hh], kf));
        if (j >= 0) {
          const float mn = fmaxf(m[hh], sc);
          const float alpha = exp2f(m[hh] - mn);
          const float pr = exp2f(sc - mn);
          l[hh] = l[hh] * alpha + pr;
#pragma unroll
          for (int e = 0; e < kFrag; ++e) acc[hh][e] = fmaf(acc[hh][e], alpha, pr * vf[e]);
          m[hh] = mn;
        }
      }
    }
  }

  // Merge the KPW sub-group states (all lanes take part in the shuffles).
#pragma unroll
  for (int o = TPK; o < 32; o <<= 1) {
#pragma unroll
    for (int hh = 0; hh < HPW; ++hh) {
      const float m2 = __shfl_xor_sync(kFullMask, m[hh], o);
      const float l2 = __shfl_xor_sync(kFullMask, l[hh], o);
      float a2[kFrag];
#pragma unroll
      for (int e = 0; e < kFrag; ++e) a2[e] = __shfl_xor_sync(kFullMask, acc[hh][e], o);
      const float mn = fmaxf(m[hh], m2);
      if (mn != -INFINITY) {
        const float c1 = exp2f(m[hh] - mn), c2 = exp2f(m2 - mn);
        l[hh] = l[hh] * c1 + l2 * c2;
#pragma unroll
        for (int e = 0; e < kFrag; ++e) acc[hh][e] = acc[hh][e] * c1 + a2[e] * c2;
        m[hh] = mn;
      }
    }
  }

  if (sub == 0) {
#pragma unroll
    for (int hh = 0; hh < HPW; ++hh) {
      const float inv = l[hh] > 0.f ? 1.f / l[hh] : 0.f;
      float o[kFrag];
#pragma unroll
      for (int e = 0; e < kFrag; ++e) o[e] = acc[hh][e] * inv;
      store_frag<VEC>(p.out.at(b, i, h0 + hh), d0, D, o);
      if (lane == 0) lse_row[hh] = l[hh] > 0.f ? (m[hh] + __log2f(l[hh])) * kLn2 : -INFINITY;
    }
  }
}

// ------------------------------------------------------------------------------ dQ
// Also writes delta[b, i, h] = dot(dO, O) - grad_lse (0 for padded rows) for the dK/dV pass;
// gated (p.gate set): the gate gradient and lse' too (attn_gate_fold.cuh).
template <typename T, int TPK, int HPW, bool VEC, class Policy>
__global__ void __launch_bounds__(kAttnWarps * 32)
    attn_dq_kernel_simple(const AttnBwdParams<T, float> p, const Policy pol,
                          float* __restrict__ delta) {
  constexpr int KPW = 32 / TPK;
  const int lane = threadIdx.x & 31;
  const int sub = lane / TPK;
  const int d0 = (lane % TPK) * kFrag;
  const AttnShape& s = p.shape;
  const int64_t L = s.q_len, Hq = s.q_heads, Hk = s.kv_heads;
  const int D = static_cast<int>(s.head_dim);
  const int64_t G = Hq / Hk, chunks = G / HPW;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kAttnWarps + threadIdx.x / 32;
  if (warp >= s.batch * Hk * chunks * L) return;
  const int64_t i = warp % L;
  const int64_t rest = warp / L;
  const int64_t hc = rest % (Hk * chunks);
  const int64_t b = rest / (Hk * chunks);
  const int64_t g = hc / chunks;
  const int64_t h0 = g * G + (hc % chunks) * HPW;
  const int64_t row = (b * L + i) * Hq + h0;

  float dq[HPW][kFrag];
#pragma unroll
  for (int hh = 0; hh < HPW; ++hh) zero_frag(dq[hh]);
  const bool qv = pol.query_valid(b, i);

  // Per-row terms (delta, lse; gated: lse', grad_gate) of head h0 + hl, computed by lane hl
  // and broadcast (attn_gate_fold.cuh); every sub-group holds the same rowsums.
  const int hl = lane < HPW ? lane : 0;
  if (qv) {
    const float qs = static_cast<float>(s.scale) * kLog2e;
    float q[HPW][kFrag], dout[HPW][kFrag], lse2[HPW], dlt[HPW], x[HPW];
#pragma unroll
    for (int hh = 0; hh < HPW; ++hh) {
      float of[kFrag];
      load_frag<VEC>(p.q.at(b, i, h0 + hh), d0, D, q[hh]);
      load_frag<VEC>(p.grad_out.at(b, i, h0 + hh), d0, D, dout[hh]);
      load_frag<VEC>(p.out.at(b, i, h0 + hh), d0, D, of);
#pragma unroll
      for (int e = 0; e < kFrag; ++e) q[hh][e] *= qs;
      x[hh] = group_sum<TPK>(dot_frag(dout[hh], of));
    }
    float my_dlt, my_lse2;
    dq_row_terms(p, b, i, h0 + hl, row + hl, pick<HPW>(x, hl), true, lane < HPW, delta, my_dlt,
                 my_lse2);
#pragma unroll
    for (int hh = 0; hh < HPW; ++hh) {
      dlt[hh] = __shfl_sync(kFullMask, my_dlt, hh);
      lse2[hh] = __shfl_sync(kFullMask, my_lse2, hh);
    }
    const int64_t n_slots = pol.fwd_slots(b, i, g);
    for (int64_t n0 = 0; n0 < n_slots; n0 += KPW) {
      const int64_t n = n0 + sub;
      const int64_t j = n < n_slots ? pol.fwd_key(b, i, g, n) : -1;
      float kf[kFrag], vf[kFrag];
      if (j >= 0) {
        load_frag<VEC>(p.k.at(b, j, g), d0, D, kf);
        load_frag<VEC>(p.v.at(b, j, g), d0, D, vf);
      } else {
        zero_frag(kf);
        zero_frag(vf);
      }
#pragma unroll
      for (int hh = 0; hh < HPW; ++hh) {
        const float sc = group_sum<TPK>(dot_frag(q[hh], kf));
        const float dp = group_sum<TPK>(dot_frag(dout[hh], vf));
        if (j >= 0) {
          const float ds = exp2f(sc - lse2[hh]) * (dp - dlt[hh]);
#pragma unroll
          for (int e = 0; e < kFrag; ++e) dq[hh][e] = fmaf(ds, kf[e], dq[hh][e]);
        }
      }
    }
  } else if (p.gate.ptr != nullptr) {
    // A padded row still has a gate gradient, rowsum(dO * O) s (1 - s) (O is 0 there, as in
    // gate_fusion's backward); delta 0 and lse' are written too.
    float x[HPW];
#pragma unroll
    for (int hh = 0; hh < HPW; ++hh) {
      float df[kFrag], of[kFrag];
      load_frag<VEC>(p.grad_out.at(b, i, h0 + hh), d0, D, df);
      load_frag<VEC>(p.out.at(b, i, h0 + hh), d0, D, of);
      x[hh] = group_sum<TPK>(dot_frag(df, of));
    }
    float unused_dlt, unused_lse2;
    dq_row_terms(p, b, i, h0 + hl, row + hl, pick<HPW>(x, hl), false, lane < HPW, delta,
                 unused_dlt, unused_lse2);
  } else if (lane == 0) {
#pragma unroll
    for (int hh = 0; hh < HPW; ++hh) delta[row + hh] = 0.f;
  }

#pragma unroll
  for (int o = TPK; o < 32; o <<= 1)
#pragma unroll
    for (int hh = 0; hh < HPW; ++hh)
#pragma unroll
      for (int e = 0; e < kFrag; ++e) dq[hh][e] += __shfl_xor_sync(kFullMask, dq[hh][e], o);

  if (sub == 0) {
    const float sc = static_cast<float>(s.scale);
#pragma unroll
    for (int hh = 0; hh < HPW; ++hh) {
#pragma unroll
      for (int e = 0; e < kFrag; ++e) dq[hh][e] *= sc;
      store_frag_acc<VEC>(p.grad_q.at(b, i, h0 + hh), d0, D, dq[hh], p.accumulate);
    }
  }
}

// ------------------------------------------------------------------------------ dK / dV
template <typename T, int TPK, bool VEC, class Policy>
__global__ void __launch_bounds__(kAttnWarps * 32)
    attn_dkdv_kernel(const AttnBwdParams<T, float> p, const Policy pol,
                     const float* __restrict__ delta) {
  constexpr int KPW = 32 / TPK;
  const int lane = threadIdx.x & 31;
  const int sub = lane / TPK;
  const int d0 = (lane % TPK) * kFrag;
  const AttnShape& s = p.shape;
  const int64_t L = s.q_len, Lk = s.kv_len, Hq = s.q_heads, Hk = s.kv_heads;
  const int D = static_cast<int>(s.head_dim);
  const int64_t G = Hq / Hk;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kAttnWarps + threadIdx.x / 32;
  if (warp >= s.batch * Hk * Lk) return;
  const int64_t j = warp % Lk;
  const int64_t rest = warp / Lk;
  const int64_t g = rest % Hk;
  const int64_t b = rest / Hk;

  float dk[kFrag], dv[kFrag];
  zero_frag(dk);
  zero_frag(dv);
  if (pol.key_valid(b, j)) {
    // k pre-multiplied by scale * log2(e), so q . k is a base-2 logit.
    const float ks = static_cast<float>(s.scale) * kLog2e;
    float kf[kFrag], vf[kFrag];
    load_frag<VEC>(p.k.at(b, j, g), d0, D, kf);
    load_frag<VEC>(p.v.at(b, j, g), d0, D, vf);
#pragma unroll
    for (int e = 0; e < kFrag; ++e) kf[e] *= ks;
    const int64_t n_pairs = pol.bwd_slots(b, j, g) * G;
    for (int64_t n0 = 0; n0 < n_pairs; n0 += KPW) {
      const int64_t n = n0 + sub;
      int64_t i = -1, h = 0;
      float lse2 = 0.f, dlt = 0.f;
      if (n < n_pairs) {
        const int slot = static_cast<int>(n) / static_cast<int>(G);  // 32-bit: cheaper
        h = g * G + (static_cast<int>(n) - slot * static_cast<int>(G));
        i = pol.bwd_query(b, j, g, slot);
        if (i >= 0) {
          const float lse = p.lse[(b * L + i) * Hq + h];
          if (lse == -INFINITY) {
            i = -1;
          } else {
            lse2 = lse * kLog2e;
            dlt = delta[(b * L + i) * Hq + h];
          }
        }
      }
      float qf[kFrag], df[kFrag];
      if (i >= 0) {
        load_frag<VEC>(p.q.at(b, i, h), d0, D, qf);
        load_frag<VEC>(p.grad_out.at(b, i, h), d0, D, df);
      } else {
        zero_frag(qf);
        zero_frag(df);
      }
      const float sc = group_sum<TPK>(dot_frag(qf, kf));
      const float dp = group_sum<TPK>(dot_frag(df, vf));
      if (i >= 0) {
        const float pr = exp2f(sc - lse2);
        const float ds = pr * (dp - dlt);
#pragma unroll
        for (int e = 0; e < kFrag; ++e) {
          dv[e] = fmaf(pr, df[e], dv[e]);
          dk[e] = fmaf(ds, qf[e], dk[e]);
        }
      }
    }
  }

#pragma unroll
  for (int o = TPK; o < 32; o <<= 1)
#pragma unroll
    for (int e = 0; e < kFrag; ++e) {
      dk[e] += __shfl_xor_sync(kFullMask, dk[e], o);
      dv[e] += __shfl_xor_sync(kFullMask, dv[e], o);
    }

  if (sub == 0) {
    const float sc = static_cast<float>(s.scale);
#pragma unroll
    for (int e = 0; e < kFrag; ++e) dk[e] *= sc;
    store_frag_acc<VEC>(p.grad_k.at(b, j, g), d0, D, dk, p.accumulate);
    store_frag_acc<VEC>(p.grad_v.at(b, j, g), d0, D, dv, p.accumulate);
  }
}

// ------------------------------------------------------------------------------ dispatch
// Lanes per key: the smallest power of two whose 8-element chunks cover D (16 -> 2,
// 32 -> 4, 64 -> 8, 128 -> 16, up to 256 -> 32). Layouts that do not allow 16-byte
// fragments (D % 8 != 0, odd strides or alignment) take the generic scalar path, 32 lanes.
inline int lanes_per_key(int64_t D) {
  int t = 2;
  while (t * kFrag < D && t < 32) t *= 2;
  return t;
}

// Heads per warp: the G query heads of a group share each K/V load; up to 4 at a time.
inline int heads_per_warp(int64_t G) { return G % 4 == 0 ? 4 : (G % 2 == 0 ? 2 : 1); }

template <typename T>
inline bool attn_vec_ok(const AttnShape& s, std::initializer_list<Bshd<const T>> views) {
  for (const auto& v : views)
    if (!vec_ok<T>(v.ptr, s.head_dim, v.stride_b, v.stride_l, v.stride_h)) return false;
  return true;
}
template <typename T>
inline bool attn_vec_ok_out(const AttnShape& s, std::initializer_list<Bshd<T>> views) {
  for (const auto& v : views)
    if (!vec_ok<T>(v.ptr, s.head_dim, v.stride_b, v.stride_l, v.stride_h)) return false;
  return true;
}

inline unsigned attn_grid(int64_t warps) {
  const int64_t blocks = ceil_div(warps, kAttnWarps);
  BLOSSOM_CHECK(blocks < (int64_t(1) << 31), "blossom_ops: problem too large for one launch");
  return static_cast<unsigned>(blocks);
}

// Calls f(std::integral_constant<int, TPK>{}, std::integral_constant<int, HPW>{},
// std::bool_constant<VEC>{}) with the compile-time configuration for this shape.
template <class F>
inline void dispatch_row_config(int64_t D, int64_t G, bool vec, F&& f) {
  using std::integral_constant;
  // One warp covers at most 32 lanes x 8 elements of a row.
  BLOSSOM_CHECK(D >= 1 && D <= 32 * kFrag, "blossom_ops CUDA kernels: head_dim must be in [1, ",
               32 * kFrag, "], got ", D);
  BLOSSOM_CHECK(G >= 1,
                "blossom_ops CUDA kernels: q_heads must be a positive multiple of kv_heads");
  if (!vec) {
    f(integral_constant<int, 32>{}, integral_constant<int, 1>{}, std::false_type{});
    return;
  }
  const int tpk = lanes_per_key(D);
  const int hpw = heads_per_warp(G);
  auto with_hpw = [&](auto tpk_c) {
    if (hpw == 4) f(tpk_c, integral_constant<int, 4>{}, std::true_type{});
    else if (hpw == 2) f(tpk_c, integral_constant<int, 2>{}, std::true_type{});
    else f(tpk_c, integral_constant<int, 1>{}, std::true_type{});
  };
  switch (tpk) {
    case 2: with_hpw(integral_constant<int, 2>{}); break;
    case 4: with_hpw(integral_constant<int, 4>{}); break;
    case 8: with_hpw(integral_constant<int, 8>{}); break;
    case 16: with_hpw(integral_constant<int, 16>{}); break;
    default: with_hpw(integral_constant<int, 32>{}); break;
  }
}

template <typename T>
inline bool attn_fwd_vec_ok(const AttnFwdParams<T, float>& p) {
  return attn_vec_ok<T>(p.shape, {p.q, p.k, p.v}) && attn_vec_ok_out<T>(p.shape, {p.out});
}

// Returns whether blossom_attention's gate (p.gate, when set) was applied in the epilogue;
// when not, the caller runs the gate kernel (attn_gate_epilogue.cuh).
template <typename T, class Policy>
bool launch_attn_fwd(const AttnFwdParams<T, float>& p, const Policy& pol, cudaStream_t stream,
                     const char* name) {
  const AttnShape& s = p.shape;
  if (s.batch == 0 || s.q_len == 0 || s.q_heads == 0) return false;
  const bool vec = attn_fwd_vec_ok(p);
  bool gated = false;
  if (launch_attn_fwd_staged(p, pol, vec, stream, &gated)) {  // fast path (attn_staged_tc.cuh)
    check_launch(name);
    return gated;
  }
  dispatch_row_config(s.head_dim, s.group(), vec, [&](auto tpk, auto hpw, auto v) {
    constexpr int TPK = decltype(tpk)::value, HPW = decltype(hpw)::value;
    constexpr bool VEC = decltype(v)::value;
    const int64_t warps = s.batch * s.kv_heads * (s.group() / HPW) * s.q_len;
    attn_fwd_kernel_simple<T, TPK, HPW, VEC, Policy>
        <<<attn_grid(warps), kAttnWarps * 32, 0, stream>>>(p, pol);
  });
  check_launch(name);
  return false;
}

// Workspace of every attention backward: delta [B, L, Hq] float; a gated backward
// (attn_gate_fold.cuh) keeps lse' [B, L, Hq] right after it.
inline size_t attn_delta_bytes(const AttnShape& s, bool gated = false) {
  return align_up(static_cast<size_t>(attn_rows(s)) * (gated ? 2 : 1) * sizeof(float));
}

template <typename T>
inline bool attn_bwd_vec_ok(const AttnBwdParams<T, float>& p) {
  return attn_vec_ok<T>(p.shape, {p.q, p.k, p.v, p.out, p.grad_out}) &&
         attn_vec_ok_out<T>(p.shape, {p.grad_q, p.grad_k, p.grad_v});
}

// dQ pass; also writes delta, which the dK/dV pass reads (same stream, so ordered).
// Both dQ kernels it may pick (staged, simple) honour a gate (AttnBwdParams::gate); then
// delta must have room for lse' (attn_delta_bytes(s, true)) and the dK/dV pass must run with
// dkdv_params(p, delta).
template <typename T, class Policy>
void launch_attn_dq(const AttnBwdParams<T, float>& p, const Policy& pol, float* delta,
                    cudaStream_t stream, const char* name) {
  const AttnShape& s = p.shape;
  if (bwd_gated(p))
    BLOSSOM_CHECK(p.grad_lse == nullptr && p.grad_gate.ptr != nullptr && p.gate_r >= 0, name,
                  ": a gated backward needs grad_gate and no grad_lse");
  if (s.batch == 0 || s.q_heads == 0 || s.q_len == 0) return;
  const bool vec = attn_bwd_vec_ok(p);
  if (launch_attn_dq_staged(p, pol, delta, vec, stream)) {  // fast path (attn_staged_tc.cuh)
    check_launch(name);
    return;
  }
  dispatch_row_config(s.head_dim, s.group(), vec, [&](auto tpk, auto hpw, auto v) {
    constexpr int TPK = decltype(tpk)::value, HPW = decltype(hpw)::value;
    constexpr bool VEC = decltype(v)::value;
    const int64_t warps = s.batch * s.kv_heads * (s.group() / HPW) * s.q_len;
    attn_dq_kernel_simple<T, TPK, HPW, VEC, Policy>
        <<<attn_grid(warps), kAttnWarps * 32, 0, stream>>>(p, pol, delta);
  });
  check_launch(name);
}

// dK/dV pass, one warp per key: reads delta written by launch_attn_dq. p has no gate (a
// gated backward passes dkdv_params(p, delta), whose lse carries the gate).
template <typename T, class Policy>
void launch_attn_dkdv(const AttnBwdParams<T, float>& p, const Policy& pol, const float* delta,
                      cudaStream_t stream, const char* name) {
  const AttnShape& s = p.shape;
  BLOSSOM_CHECK(!bwd_gated(p), name, ": the dK/dV pass takes dkdv_params(p, delta)");
  if (s.batch == 0 || s.q_heads == 0 || s.kv_len == 0) return;
  // dK/dV has no head loop: only the lanes-per-key choice matters (HPW ignored).
  dispatch_row_config(s.head_dim, 1, attn_bwd_vec_ok(p), [&](auto tpk, auto, auto v) {
    constexpr int TPK = decltype(tpk)::value;
    constexpr bool VEC = decltype(v)::value;
    const int64_t warps = s.batch * s.kv_heads * s.kv_len;
    attn_dkdv_kernel<T, TPK, VEC, Policy>
        <<<attn_grid(warps), kAttnWarps * 32, 0, stream>>>(p, pol, delta);
  });
  check_launch(name);
}

template <typename T, class Policy>
void launch_attn_bwd(const AttnBwdParams<T, float>& p, const Policy& pol, float* delta,
                     cudaStream_t stream, const char* name) {
  launch_attn_dq(p, pol, delta, stream, name);
  launch_attn_dkdv(dkdv_params(p, delta), pol, delta, stream, name);
}

}  // namespace detail
}  // namespace gpu
}  // namespace blossom
