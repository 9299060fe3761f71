// blossom_attention's gate in the epilogue of its last branch's forward
// (GateEpilogueParams in common/params.h; BLOSSOM_OPS_CUDA_GATE_EPILOGUE=0 keeps the separate
// gate kernel for A/B runs).
//
// Why: the composed forward wrote out_sel and out_win (both kept for the backward), then
// gate_fusion's gate_fwd_kernel read them and the gate logits and wrote out: 3 full-size
// tensors at the DRAM floor (0.275 ms at B=64 L=4096 Hq=8 D=64 bf16 on an H100, 1.093 ms at
// L=16384). The last branch (the sliding window, on the LEAN per-slot staged forward with query
// pairs) has its own output rows in registers at its end: it reads the earlier branches'
// outputs (written by earlier kernels of the same stream) and its rows' logits and writes out.
// One full-size read (268 MB at L=4096 D=64 bf16: ~0.09 ms) and one launch fewer.
//
// Same bits as gate_fwd_kernel (no tolerance): per element it computes, in fp32,
//   acc = 0; for r = 0 .. R-1 in order: acc = fmaf(gate_sigmoid_ieee(g_r), x_r, acc)
// and rounds acc to T once, where x_r is branch r as stored in T (the kernel reads it back
// with load8_aligned). Here x_self is this branch's own value as stored: the 16-bit words
// written to its output are unpacked again (unpack2, as load8_aligned does), so it is the
// stored value by construction; the other branches are read with load8_aligned itself, the
// logits with to_float, and gate_fusion.cu's sigmoid is gate_sigmoid_ieee below (one
// definition; no fast-math flag in setup.py, so 1.f / y is the IEEE division in both TUs).
// The weight goes through shared memory as a float (exact), computed once per (row, r).
// gate_fwd_kernel's VEC and non-VEC loads convert exactly, so either gives these values.
//
// Cost, per warp of the query-pair window forward (HPW = 4, 8 rows): one sigmoid per lane
// (8 x R weights) through shared memory, then per 16-byte piece (D / 8 per row, 2 per lane at
// D = 64) R - 1 16-byte loads, one 16-byte store, 8 R FMAs and the unpacking; the addresses
// are the piece's element offset in its own (contiguous) output.
#pragma once
#include "common/params.h"
#include "cuda/common.cuh"

namespace blossom {
namespace gpu {
namespace detail {

// The forward gate's sigmoid (gate_fusion.cu and the epilogue): IEEE division, so the two
// routes agree bit for bit. (attn_gate_fold.cuh's gate_sigmoid is the approximate one of
// the backward's s (1 - s).)
__device__ __forceinline__ float gate_sigmoid_ieee(float x) { return 1.f / (1.f + __expf(-x)); }

// The gate weights sigmoid(logits[row, r]) of a warp's (query, head) rows, once per warp
// rather than once per 16-byte piece (a row has D / 8 pieces, on as many lanes): lane x takes
// column n = x % 8 (head h0 + n % HPW of query i0 + n / HPW) and branch r = x / 8, and
// leaves the weight in w[r * 8 + n] (shared memory; the caller syncs the warp before reading).
// Rows of queries past L are skipped, as the epilogue skips them.
template <typename T, int HPW, int QPW>
__device__ __forceinline__ void stage_gate_weights(const GateEpilogueParams<T>& g, float* w,
                                                   int64_t b, int64_t i0, int64_t h0,
                                                   int64_t L, int64_t Hq, int lane) {
  const int n = lane & 7, r = lane >> 3;
  const int q = n / HPW, hh = n % HPW;
  if (n < HPW * QPW && r < g.branches && i0 + q < L) {
    const int64_t row = (b * L + i0 + q) * Hq + h0 + hh;
    w[r * 8 + n] = gate_sigmoid_ieee(to_float(g.logits[row * g.branches + r]));
  }
}

// One 16-byte piece of a forward's output at element offset `off` of every [B*L*Hq, D]
// buffer (its own output included: gate_epilogue_usable requires it contiguous too): `own`
// (fp32) stored to dst as store8_aligned stores it, and the gated sum of the branches to
// g.out, with w[r * 8] the piece's row weight of branch r (stage_gate_weights). This branch
// is r = 1 (g.self, checked on the host): r = 0 and r = 2 (R = 3) come from memory, in the
// gate kernel's order. Every buffer 16-byte aligned (gate_epilogue_usable). b0: branch 0's
// piece as the same warp stored it earlier in this kernel (the fused forward,
// attn_fwd_fused.cuh: read through the non-coherent path it would not be defined), else null.
template <typename T>
__device__ __forceinline__ void store8_gated(const GateEpilogueParams<T>& g, int64_t off,
                                             const float (&own)[kFrag], T* dst, const float* w,
                                             const uint4* b0 = nullptr) {
  uint4 u;
  u.x = pack2(own[0], own[1], dst);
  u.y = pack2(own[2], own[3], dst);
  u.z = pack2(own[4], own[5], dst);
  u.w = pack2(own[6], own[7], dst);
  *reinterpret_cast<uint4*>(dst) = u;
  float mine[kFrag];  // the stored values, unpacked as the gate kernel's load does
  unpack2(u.x, dst, mine[0], mine[1]);
  unpack2(u.y, dst, mine[2], mine[3]);
  unpack2(u.z, dst, mine[4], mine[5]);
  unpack2(u.w, dst, mine[6], mine[7]);
  float acc[kFrag], f[kFrag];
  zero_frag(acc);
  if (b0 != nullptr)
    unpack8(*b0, g.branch[0], f);
  else
    load8_aligned(g.branch[0] + off, f);
  const float w0 = w[0], w1 = w[8];
#pragma unroll
  for (int e = 0; e < kFrag; ++e) acc[e] = fmaf(w0, f[e], acc[e]);
#pragma unroll
  for (int e = 0; e < kFrag; ++e) acc[e] = fmaf(w1, mine[e], acc[e]);
  if (g.branches == 3) {
    load8_aligned(g.branch[2] + off, f);
    const float w2 = w[16];
#pragma unroll
    for (int e = 0; e < kFrag; ++e) acc[e] = fmaf(w2, f[e], acc[e]);
  }
  store8_aligned(g.out + off, acc);
}

// ---- host side ---------------------------------------------------------------------------
// False when BLOSSOM_OPS_CUDA_GATE_EPILOGUE=0 (read once per process).
inline bool gate_epilogue_on() {
  static const bool off = env_equals("BLOSSOM_OPS_CUDA_GATE_EPILOGUE", "0");
  return !off;
}

// Whether a launcher that has the gated epilogue may apply p.gate: requested, switched on,
// R in {2, 3} with this branch r = 1 (blossom_attention's window), the forward's own output
// contiguous (its element offsets address the other buffers), and every buffer it touches
// 16-byte aligned (rows are multiples of D % 8 == 0 elements from each buffer's start, so
// the starts decide).
template <typename T>
inline bool gate_epilogue_usable(const AttnFwdParams<T, float>& p) {
  const GateEpilogueParams<T>& g = p.gate;
  if (g.out == nullptr || !gate_epilogue_on()) return false;
  if ((g.branches != 2 && g.branches != 3) || g.self != 1 || g.logits == nullptr ||
      !aligned16(g.out) || g.branch[0] == nullptr || !aligned16(g.branch[0]) ||
      (g.branches == 3 && (g.branch[2] == nullptr || !aligned16(g.branch[2]))))
    return false;
  const AttnShape& s = p.shape;
  return s.head_dim % kFrag == 0 && p.out.stride_h == s.head_dim &&
         p.out.stride_l == s.q_heads * s.head_dim &&
         p.out.stride_b == s.q_len * s.q_heads * s.head_dim;
}

}  // namespace detail
}  // namespace gpu
}  // namespace blossom
