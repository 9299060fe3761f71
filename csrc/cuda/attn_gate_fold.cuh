// blossom_attention's gate folded into an attention branch's backward (AttnBwdParams::gate).
//
// The branch sees the gradient s * dO, s = sigmoid(g_r) per (b, i, h), dO = the gate's output
// gradient. Instead of scaling every dO element (the separate gate backward stored
// dO_r = round_T(s * dO) per branch), s is folded into the softmax probabilities:
//   dV  = P^T (s dO)                    = (s P)^T dO
//   dS  = P o (s dO V^T - rowsum(s dO o O))   = (s P) o (dO V^T - rowsum(dO o O))
// and s P = exp(S - lse') with lse' = lse - ln s = lse + softplus(-g). So a gated backward
// is the plain one with lse replaced by lse' and delta by rowsum(dO o O) (grad_lse must be
// null): the dQ pass computes both per row from one rowsum, together with the gate gradient
// grad_gate[..., r] = rowsum(dO o O) * s (1 - s), and the dK/dV pass (any of its kernels)
// reads lse' from the workspace through dkdv_params() and needs no change at all. dO is
// never rounded after scaling: s stays fp32 inside the fp32 exponent, so the result is at
// least as accurate as the old route (and not bit-identical to it).
// Edge cases: lse = -inf (no key) stays -inf, so every dK/dV kernel still skips the row;
// s underflowing to 0 (g < ~-88) gives lse' = +inf and s P = exp2(-inf) = 0 exactly, as the
// old route's dO_r = 0 did (dq_row_terms).
//
// Workspace: the delta region of a gated backward is [2][B, L, Hq] float: delta, then lse'.
//
// Bytes, B=64 L=4096 Hq=8 Hk=2 D=64 bf16, R=2 (H200): the gate backward moved dO, O_sel,
// O_win in and dO_sel, dO_win out (5 x 268 MB) plus gate and grad_gate (2 x 8.4 MB) =
// 1.36 GB, 0.61 ms measured (0.16 ms at D=16; ~2.8 ms at L=16384). The fold adds per branch
// a gate read (8.4 MB), a grad_gate column write (8.4 MB) and the lse' write (8.4 MB), ~50 MB
// in all (~0.015 ms); the dQ pass already reads dO and O_r for delta, and the dK/dV pass reads
// lse' instead of lse. Instructions: ~35 more per dQ warp (dq_row_terms runs once per warp,
// one head per lane), 0.52 M warps per branch: ~37 M warp-instructions, ~0.04 ms of issue.
// Saved: ~1.31 GB of DRAM traffic, one launch and the 2 x 268 MB dO_r allocations.
// Predicted: -0.55 ms at D=64 L=4096 (12.97 -> ~12.4 ms fwd+bwd), -0.13 ms at D=16,
// ~-2.6 ms at L=16384.
#pragma once
#include "common/params.h"
#include "cuda/common.cuh"

namespace blossom {
namespace gpu {
namespace detail {

// Rows of the delta (and lse') arrays.
BLOSSOM_HD int64_t attn_rows(const AttnShape& s) { return s.batch * s.q_len * s.q_heads; }

// Where the dQ pass of a gated backward leaves lse' (after the delta rows).
BLOSSOM_HD float* gated_lse(float* delta, const AttnShape& s) { return delta + attn_rows(s); }

// The gate's sigmoid, as gate_fusion.cu computes it but with the approximate reciprocal
// (<= 2 ulp): the IEEE division's slow-path call made ptxas spill in the fallback dQ kernel.
// Its only use is s (1 - s) of grad_gate, whose rowsum order differs from the gate kernel's
// anyway. For x -> -inf, __expf gives inf and __fdividef(1, inf) = 0, the right limit.
__device__ __forceinline__ float gate_sigmoid(float x) {
  return __fdividef(1.f, 1.f + __expf(-x));
}

// What dq_row_terms reads for a row: lse and, gated, the gate logit (else grad_lse or 0).
// Split from the arithmetic so that the fused dQ can issue both branches' loads together
// (dq_prologue_pair in attn_staged_tc.cuh).
struct DqRowIn {
  float lse, gl;
};
template <typename T>
__device__ __forceinline__ DqRowIn dq_row_in(const AttnBwdParams<T, float>& p, int64_t b,
                                             int64_t i, int64_t h, int64_t row) {
  DqRowIn r;
  r.lse = p.lse[row];
  r.gl = p.gate.ptr != nullptr ? to_float(p.gate.at(b, i, h)[p.gate_r])
                               : (p.grad_lse != nullptr ? p.grad_lse[row] : 0.f);
  return r;
}

// Per-row terms of the dQ pass for row `row` = (b, i, h), from x = rowsum(dO o O): the delta
// and lse * log2(e) its key loop uses; when `writer`, the stores of delta (0 for a padded row,
// !qv) and, gated, of grad_gate[b, i, h][r] and lse' (after the delta rows). The dQ kernels
// give each head of a warp's row group to one lane (lane hh < HPW for head h0 + hh) and
// broadcast the results by shuffles: ~20 instructions per warp instead of per head.
// lse' = lse + ln(1 + e^-g), evaluated in base 2 on the SFU (ex2, lg2): ~1e-6 relative error
// in s P, far below bf16 / fp16 rounding and 50x under the fp32 tests' 5e-5. g -> -inf gives
// lse' = +inf and s P = exp2(-inf) = 0 exactly (every dK/dV kernel then adds 0); lse = -inf
// (no key, padded row) stays -inf.
template <typename T>
__device__ __forceinline__ void dq_row_terms(const AttnBwdParams<T, float>& p, const DqRowIn& in,
                                             int64_t b, int64_t i, int64_t h, int64_t row,
                                             float x, bool qv, bool writer,
                                             float* __restrict__ delta, float& dlt, float& lse2) {
  const float lse = in.lse;
  if (p.gate.ptr != nullptr) {
    const float gl = in.gl;
    const float neg_log2_s = __log2f(1.f + exp2f(-gl * kLog2e));
    const float shifted = lse == -INFINITY ? -INFINITY : fmaf(neg_log2_s, kLn2, lse);
    dlt = x;
    lse2 = shifted * kLog2e;
    if (writer) {
      const float sg = gate_sigmoid(gl);
      p.grad_gate.at(b, i, h)[p.gate_r] = from_float<T>(x * sg * (1.f - sg));
      gated_lse(delta, p.shape)[row] = shifted;
    }
  } else {
    dlt = x - in.gl;
    lse2 = lse * kLog2e;
  }
  if (writer) delta[row] = qv ? dlt : 0.f;
}
template <typename T>
__device__ __forceinline__ void dq_row_terms(const AttnBwdParams<T, float>& p, int64_t b,
                                             int64_t i, int64_t h, int64_t row, float x, bool qv,
                                             bool writer, float* __restrict__ delta, float& dlt,
                                             float& lse2) {
  dq_row_terms(p, dq_row_in(p, b, i, h, row), b, i, h, row, x, qv, writer, delta, dlt, lse2);
}

// ---- host side ---------------------------------------------------------------------------
template <typename T>
inline bool bwd_gated(const AttnBwdParams<T, float>& p) {
  return p.gate.ptr != nullptr;
}

// The parameters the dK/dV pass runs with: p itself, or for a gated backward p with lse
// replaced by lse' and the gate cleared, so every dK/dV kernel computes the gated gradient
// without knowing about the gate.
template <typename T>
inline AttnBwdParams<T, float> dkdv_params(const AttnBwdParams<T, float>& p, float* delta) {
  AttnBwdParams<T, float> k = p;
  if (bwd_gated(p)) {
    k.lse = gated_lse(delta, p.shape);
    k.gate = Bshd<const T>{};
    k.grad_gate = Bshd<T>{};
    k.gate_r = 0;
  }
  return k;
}

}  // namespace detail
}  // namespace gpu
}  // namespace blossom
