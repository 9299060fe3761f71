// blossom_attention's two dQ passes in one kernel: the block-sparse branch (block chunks,
// attn_dq_kernel_tc_blk) and the sliding-window branch (deduped query pairs, the LEAN
// attn_dq_kernel_tc) accumulate into the same dQ registers of one warp.
//
// Why: run separately, the two kernels each read the warp's Q and dO rows, the first writes
// dQ and the second reads it back and adds (p.accumulate). At B = 64, Hq = 8, D = 64,
// L = 4096, bf16 that is 4 x 268 MB of DRAM traffic (Q, dO, the dQ read and its rewrite)
// that one kernel does not need: ~1.07 GB, ~0.35 ms at 3 TB/s, against 1.96 ms for the two
// dQ kernels (H100, run n). dQ is also rounded to the storage type once instead of twice.
//
// Work split: one warp per (b, query pair i0, i0 + 1, four heads h0 .. h0 + 3 of KV group g):
// the block-chunk kernel's query groups at HPW = 4 (8 / HPW = 2 queries) and the window's
// query pairs are the same warps, with the same N = 8 column layout (column n = head
// h0 + n % 4 of query i0 + n / 4). Per warp:
//   1. both prologues at once (dq_prologue_pair: rowsums of dO * O_sel and dO * O_win in one
//      pass over dO, delta, lse' and the gate gradient of branches 0 and 1), Q / dO fragments
//      loaded once, the block-chunk loop (blk_dq_chunks);
//   2. the per-slot pair loop (slot_dq_chunks) on the same fragments and accumulators, with
//      the window's terms kept from step 1;
//   3. one store of dQ (not added: this is the first write of grad_q).
// Each branch keeps its own lse / delta / column masks, so the sum is the two kernels'
// accumulators added in registers (fp32) before the single rounding; every other output
// (delta, lse', grad_gate) is bit-identical to the separate kernels.
// Shared memory per warp: the larger of the two kernels' areas (they run one after the
// other; equal at D >= 64). Registers: bounded like the window's deduped dQ (the tighter of
// the two, tc_min_ctas<D, true, true>).
// Launched by blossom_branches.cu when both branches would take these two kernels (16-bit,
// D in {16, 32, 64, 128}, G with HPW = 4, block size a power of two >= 16, a window whose
// query pairs the dedupe accepts: fused_pair_warps); BLOSSOM_OPS_CUDA_FUSED_DQ=0 keeps the two
// kernels (A/B).
#pragma once
#include "cuda/fused_branches.cuh"

namespace blossom {
namespace gpu {
namespace detail {

// kPair: both prologues at once (dq_prologue_pair); false (BLOSSOM_OPS_CUDA_EARLY_LOADS=0,
// fused_branches.cuh): the window's prologue after the block-sparse loop, as before session 13.
template <typename T, int D, class SelPolicy, class WinPolicy, bool kPair = true>
__global__ void __launch_bounds__(kStageWarps * 32, tc_min_ctas<D, true, true>())
    attn_dq_fused_kernel(const AttnBwdParams<T, float> ps, const SelPolicy pol_s,
                         float* __restrict__ delta_s, const AttnBwdParams<T, float> pw,
                         const WinPolicy pol_w, float* __restrict__ delta_w, const TcGrid grid) {
  constexpr int HPW = 4, QPW = 2, NF = D / 16;
  extern __shared__ __align__(128) unsigned char smem_tc[];
  const int lane = threadIdx.x & 31;
  const int wib = threadIdx.x >> 5;
  const int64_t L = ps.shape.q_len;
  int64_t b, i0, g, h0;
  if (!stage_coords_fast<HPW>(grid, wib, b, i0, g, h0)) return;  // uniform per warp
  i0 *= QPW;

  unsigned char* base = smem_tc + wib * fused_warp_bytes<D>();
  float dq[NF][4];
#pragma unroll
  for (int f = 0; f < NF; ++f) dq[f][0] = dq[f][1] = dq[f][2] = dq[f][3] = 0.f;

  // Both policies read the same validity (the launcher checks it), so one set of query bits.
  const unsigned qbits = group_query_bits<QPW>(pol_s, b, i0, L);
  if constexpr (!kPair) {
    uint32_t qb[NF][2], ob[NF][2];
    dq_prologue<T, D, HPW, QPW>(ps, delta_s, b, i0, h0, qbits, lane,
                                [&](const float (&my_lse2)[2], const float (&my_dlt)[2]) {
      if (qbits != 0u) {
        load_group_frags<T, D, HPW, QPW>(qb, ps.q, b, i0, h0, qbits, lane);
        load_group_frags<T, D, HPW, QPW>(ob, ps.grad_out, b, i0, h0, qbits, lane);
        blk_dq_chunks<T, D, HPW, SelPolicy, QPW>(ps, pol_s, base, b, i0, g, qbits, qb, ob,
                                                 my_lse2, my_dlt, lane, dq);
      }
    });
    __syncwarp();
    dq_prologue<T, D, HPW, QPW>(pw, delta_w, b, i0, h0, qbits, lane,
                                [&](const float (&my_lse2)[2], const float (&my_dlt)[2]) {
      if (qbits != 0u)
        slot_dq_chunks<T, D, HPW, WinPolicy, true, QPW, true>(pw, pol_w, base, b, i0, g, qbits,
                                                              qb, ob, my_lse2, my_dlt, lane, dq);
    });
    store_dq_warp<TcCfg<D>, HPW, QPW>(ps, base, dq, b, i0, h0, lane);
    return;
  }
  // Both branches' prologues at once (their loads in flight together); the window's row terms
  // wait in t_w (two registers) through the block-sparse loop.
  float t_s[2], t_w[2];
  dq_prologue_pair<T, D, HPW, QPW>(ps, delta_s, pw, delta_w, b, i0, h0, qbits, lane, t_s, t_w);
  if (qbits != 0u) {  // then some row has terms (qbits is a subset of the prologue's rows)
    uint32_t qb[NF][2], ob[NF][2];
    load_group_frags<T, D, HPW, QPW>(qb, ps.q, b, i0, h0, qbits, lane);
    load_group_frags<T, D, HPW, QPW>(ob, ps.grad_out, b, i0, h0, qbits, lane);
    float my_lse2[2], my_dlt[2];
    dq_cols(t_s, lane, my_lse2, my_dlt);
    blk_dq_chunks<T, D, HPW, SelPolicy, QPW>(ps, pol_s, base, b, i0, g, qbits, qb, ob, my_lse2,
                                             my_dlt, lane, dq);
    __syncwarp();  // the block list and rows of the first loop are dead before the second
    dq_cols(t_w, lane, my_lse2, my_dlt);
    slot_dq_chunks<T, D, HPW, WinPolicy, true, QPW, true>(pw, pol_w, base, b, i0, g, qbits, qb,
                                                          ob, my_lse2, my_dlt, lane, dq);
  }

  store_dq_warp<TcCfg<D>, HPW, QPW>(ps, base, dq, b, i0, h0, lane);
}

// Whether BLOSSOM_OPS_CUDA_FUSED_DQ=0 asked for the two separate dQ kernels (read once).
inline bool fused_dq_off() {
  static const bool off = env_equals("BLOSSOM_OPS_CUDA_FUSED_DQ", "0");
  return off;
}

// Launches the fused dQ when both branches would take the kernels it merges, with the same
// q, dO, k, v, grad_q and validity, ps writing grad_q and pw adding to it; writes delta_s /
// delta_w (and, gated, lse' / grad_gate) as the two kernels would. False: nothing launched,
// the caller runs the two dQ passes.
template <typename T, class SelPolicy, class WinPolicy>
bool launch_attn_dq_fused(const AttnBwdParams<T, float>& ps, const SelPolicy& pol_s,
                          float* delta_s, const AttnBwdParams<T, float>& pw,
                          const WinPolicy& pol_w, float* delta_w, cudaStream_t stream) {
  if constexpr (!stage_type_ok<T>()) {
    return false;
  } else {
    const AttnShape& s = ps.shape;
    if (fused_dq_off()) return false;
    const int64_t pair_warps = fused_pair_warps(ps, pol_s, pw, pol_w, true);
    if (pair_warps == 0 || !same_view(ps.grad_out, pw.grad_out) ||
        !same_view(ps.grad_q, pw.grad_q) || ps.accumulate || !pw.accumulate ||
        bwd_gated(ps) != bwd_gated(pw) || !attn_bwd_vec_ok(ps) || !attn_bwd_vec_ok(pw))
      return false;
    return dispatch_stage_config(s.head_dim, s.group(), true, [&](auto d_c, auto) {
      constexpr int D = decltype(d_c)::value;
      const size_t bytes = kStageWarps * fused_warp_bytes<D>();
      auto kernel = early_loads_off() ? attn_dq_fused_kernel<T, D, SelPolicy, WinPolicy, false>
                                      : attn_dq_fused_kernel<T, D, SelPolicy, WinPolicy, true>;
      stage_smem_attr(kernel, bytes);
      kernel<<<stage_grid(pair_warps), kStageWarps * 32, bytes, stream>>>(
          ps, pol_s, delta_s, pw, pol_w, delta_w, TcGrid::make(s, 4, 2));
      check_launch("blossom_attention backward (fused dQ)");
    });
  }
}

}  // namespace detail
}  // namespace gpu
}  // namespace blossom
