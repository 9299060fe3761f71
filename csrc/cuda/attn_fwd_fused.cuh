// blossom_attention's block-sparse and sliding-window forwards in one kernel, the gate in its
// epilogue: the forward counterpart of attn_dq_fused.cuh.
//
// Why: run separately, the block-sparse forward reads Q and writes out_sel, then the window's
// gated forward reads Q again and reads out_sel back for the gate (attn_gate_epilogue.cuh).
// Here one warp runs both chunk loops on one set of Q fragments, and the gate takes
// out_sel's pieces from the registers of the lanes that stored them. At B = 64, Hq = 8,
// D = 64, L = 4096, bf16: 2 x 268 MB less DRAM traffic, ~0.18 ms at 3 TB/s, against 1.84 ms
// for the two forwards (H100, run q). Every output (out_sel, lse_sel, out_win, lse_win, out)
// is bit-identical to the two kernels': the same loops, the same stores, the gate's branch 0
// being the words that were stored.
//
// Work split: one warp per (b, query pair i0, i0 + 1, four heads h0 .. h0 + 3 of KV group g),
// the block-chunk query groups at HPW = 4 and the window's query pairs (the same warps and
// N = 8 column layout as the fused dQ). Per warp: Q fragments once; blk_fwd_chunks, the
// block-sparse epilogue (out_sel, lse_sel; each lane keeps the words of its pieces); the
// accumulators reset; slot_fwd_chunks (deduped pairs); the window's gated epilogue.
// Launched by blossom_branches.cu when both forwards would take these kernels and the gate
// epilogue applies; BLOSSOM_OPS_CUDA_FUSED_FWD=0 keeps the two kernels (A/B).
#pragma once
#include "cuda/fused_branches.cuh"

namespace blossom {
namespace gpu {
namespace detail {

// MINB: resident CTAs per SM the register budget must allow (the window forward's bound by
// default; at D = 64 the launcher picks kFusedFwdCtas64, see fused_fwd_ctas).
template <typename T, int D, class SelPolicy, class WinPolicy,
          int MINB = tc_min_ctas<D, false, true>()>
__global__ void __launch_bounds__(kStageWarps * 32, MINB)
    attn_fwd_fused_kernel(const AttnFwdParams<T, float> ps, const SelPolicy pol_s,
                          const AttnFwdParams<T, float> pw, const WinPolicy pol_w,
                          const TcGrid grid) {
  constexpr int HPW = 4, QPW = 2, NF = D / 16;
  using C = TcCfg<D>;
  extern __shared__ __align__(128) unsigned char smem_tc[];
  const int lane = threadIdx.x & 31;
  const int wib = threadIdx.x >> 5;
  const int64_t L = ps.shape.q_len;
  int64_t b, i0, g, h0;
  if (!stage_coords_fast<HPW>(grid, wib, b, i0, g, h0)) return;  // uniform per warp
  i0 *= QPW;
  unsigned char* base = smem_tc + wib * fused_warp_bytes<D>();

  float o[NF][4], m[2], lp[2];
  auto reset = [&]() {
#pragma unroll
    for (int f = 0; f < NF; ++f) o[f][0] = o[f][1] = o[f][2] = o[f][3] = 0.f;
    m[0] = m[1] = -INFINITY;
    lp[0] = lp[1] = 0.f;
  };
  // Both policies read the same validity (the launcher checks it): one set of query bits.
  const unsigned qbits = group_query_bits<QPW>(pol_s, b, i0, L);
  uint32_t qb[NF][2];
  if (qbits != 0u) load_group_frags<T, D, HPW, QPW>(qb, ps.q, b, i0, h0, qbits, lane);

  reset();
  if (qbits != 0u)
    blk_fwd_chunks<T, D, HPW, SelPolicy, QPW>(ps, pol_s, base, b, i0, g, qbits, qb, lane, o, m,
                                              lp);
  uint4 sel[staged_pieces_per_lane<C, HPW, QPW>()];  // out_sel's words of this lane's pieces
  finish_fwd_warp<C, HPW, QPW, T, false>(ps, base, o, m, lp, b, i0, h0, lane, sel);
  __syncwarp();  // the staging area becomes the window's K/V buffers

  reset();
  if (qbits != 0u)
    slot_fwd_chunks<T, D, HPW, WinPolicy, true, QPW, true>(pw, pol_w, base, b, i0, g, qbits, qb,
                                                           lane, o, m, lp);
  finish_fwd_warp<C, HPW, QPW, T, true>(pw, base, o, m, lp, b, i0, h0, lane, nullptr, sel);
}

// 2-warp CTAs per SM the fused forward's registers must allow at D = 64: 9 (<= 112; ptxas
// takes 96 without spills, so 10 fit: 20 warps per SM) since session 18, instead of the window
// forward's 8 (<= 128; 122 taken, 16 warps). H200, B=64 Hq=8 Hk=2 bf16, profile_gpu, fused
// forward ms 8 -> 9: L=4096 1.561, 1.562, 1.558 -> 1.499, 1.509; L=16384 6.43, 6.45, 6.54 ->
// 6.19, 6.36. 11 CTAs (80 registers, 42 bytes of spills) measured slower: 1.604 / 6.81.
// BLOSSOM_OPS_CUDA_FUSED_FWD_CTAS=8 (read once) keeps the previous bound for A/B runs.
constexpr int kFusedFwdCtas64 = 9;
inline int fused_fwd_ctas() {
  static const int n = env_equals("BLOSSOM_OPS_CUDA_FUSED_FWD_CTAS", "8") ? 8 : kFusedFwdCtas64;
  return n;
}

// Whether BLOSSOM_OPS_CUDA_FUSED_FWD=0 asked for the two separate forwards (read once).
inline bool fused_fwd_off() {
  static const bool off = env_equals("BLOSSOM_OPS_CUDA_FUSED_FWD", "0");
  return off;
}

// Launches the fused forward when both branches would take the kernels it merges (16-bit,
// D in {64, 128}, HPW = 4, block chunks with query pairs, deduped window pairs),
// with the same q, k, v and validity, and pw's gate epilogue applies with ps's output as
// branch 0. False: nothing launched.
template <typename T, class SelPolicy, class WinPolicy>
bool launch_attn_fwd_fused(const AttnFwdParams<T, float>& ps_in, const SelPolicy& pol_s,
                           const AttnFwdParams<T, float>& pw_in, const WinPolicy& pol_w,
                           cudaStream_t stream) {
  if constexpr (!stage_type_ok<T>()) {
    return false;
  } else {
    AttnFwdParams<T, float> ps = ps_in, pw = pw_in;
    ps.lazy_max = pw.lazy_max = lazy_max_on();
    const AttnShape& s = ps.shape;
    if (fused_fwd_off()) return false;
    const int64_t pair_warps = fused_pair_warps(ps, pol_s, pw, pol_w, false);
    if (pair_warps == 0 || !attn_fwd_vec_ok(ps) || !attn_fwd_vec_ok(pw)) return false;
    // The gate's branch 0 must be ps's output, stored with pw's output's layout.
    if (!gate_epilogue_usable(pw) || pw.gate.branch[0] != ps.out.ptr ||
        !same_layout(ps.out, pw.out))
      return false;
    // D >= 64 only: there both kernels' shared-memory areas are the same size. At D = 16 the
    // window's 32-key chunks double the fused warp's area against the block-chunk kernel's,
    // and the fused forward measured slower than the two kernels (run s, H100, L = 16384:
    // 3.46 ms against 2.25 + 1.13).
    if (s.head_dim < 64) return false;
    return dispatch_stage_config(s.head_dim, s.group(), true, [&](auto d_c, auto) {
      constexpr int D = decltype(d_c)::value;
      const size_t bytes = kStageWarps * fused_warp_bytes<D>();
      auto kernel = attn_fwd_fused_kernel<T, D, SelPolicy, WinPolicy>;
      if constexpr (D == 64) {
        kernel = attn_fwd_fused_kernel<T, D, SelPolicy, WinPolicy, kFusedFwdCtas64>;
        if (fused_fwd_ctas() == 8) kernel = attn_fwd_fused_kernel<T, D, SelPolicy, WinPolicy, 8>;
      }
      stage_smem_attr(kernel, bytes);
      kernel<<<stage_grid(pair_warps), kStageWarps * 32, bytes, stream>>>(
          ps, pol_s, pw, pol_w, TcGrid::make(s, 4, 2));
      check_launch("blossom_attention forward (fused branches)");
    });
  }
}

}  // namespace detail
}  // namespace gpu
}  // namespace blossom
