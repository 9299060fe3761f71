// STIS on the GPU: sliding-window attention with optional power-of-two offsets.
// Query i's keys are a band of distances d in [0, window) (both sides when not causal)
// plus the ~log2(L) distances 2^p >= window when dilated. The mask depends only on |i - j|
// (and j <= i when causal), so the queries attending to key j are the mirrored set
// i = j + d: the dK/dV pass enumerates them directly, with no index structure. Seen from
// 16 consecutive keys the same mask is a dense block plus one diagonal per large distance,
// which the dK/dV fast path runs on tensor cores (window_dkdv_tc.cuh).
#include "cuda/attn_dkdv_staged.cuh"
#include "cuda/attn_kernels.cuh"
#include "cuda/launch.h"
#include "cuda/sliding_window_policy.cuh"
#include "cuda/window_dkdv_tc.cuh"

namespace blossom {
namespace gpu {

template <typename T>
bool sliding_window_attention_fwd(const AttnFwdParams<T, float>& p, const SlidingWindowMask& m,
                                  cudaStream_t stream) {
  const auto pol = SlidingPolicy::make(p.shape.q_len, m, p.valid);
  return detail::launch_attn_fwd(p, pol, stream, "sliding_window_attention_fwd");
}

size_t sliding_window_attention_bwd_workspace_bytes(const AttnShape& shape,
                                                    const SlidingWindowMask&, bool gated) {
  // delta (and lse'), then the head-major copies of lse / delta the dK/dV tiles read
  // (window_dkdv_tc.cuh; 0 bytes when that kernel will not use them).
  return detail::attn_delta_bytes(shape, gated) + detail::win_meta_t_bytes(shape);
}

template <typename T>
void sliding_window_attention_bwd(const AttnBwdParams<T, float>& p, const SlidingWindowMask& m,
                                  void* workspace, size_t workspace_bytes, cudaStream_t stream,
                                  bool dq_done) {
  BLOSSOM_CHECK(workspace_bytes >= sliding_window_attention_bwd_workspace_bytes(
                                       p.shape, m, detail::bwd_gated(p)),
               "sliding_window_attention_bwd: workspace too small");
  const auto pol = SlidingPolicy::make(p.shape.q_len, m, p.valid);
  float* delta = static_cast<float*>(workspace);  // at the start (blossom_branches_bwd)
  // dQ writes delta (and, gated, lse': attn_gate_fold.cuh); the dK/dV pass reads them on the
  // same stream: key tiles on tensor cores (window_dkdv_tc.cuh) where they apply, else the
  // staged per-key kernel (attn_dkdv_staged.cuh; also under BLOSSOM_OPS_CUDA_WIN_DKDV=old).
  if (!dq_done) detail::launch_attn_dq(p, pol, delta, stream, "sliding_window_attention_bwd");
  const auto pk = detail::dkdv_params(p, delta);
  const detail::WinTilePlan plan =
      detail::make_win_tile_plan(pol.L, pol.band, pol.p0, pol.n_pow, pol.causal);
  const size_t dbytes = detail::attn_delta_bytes(p.shape, detail::bwd_gated(p));
  void* meta_ws = workspace_bytes > dbytes ? static_cast<char*>(workspace) + dbytes : nullptr;
  if (detail::launch_window_dkdv_tc(pk, plan, delta, meta_ws,
                                    meta_ws != nullptr ? workspace_bytes - dbytes : 0, stream))
    detail::check_launch("sliding_window_attention_bwd (dK/dV tiles)");
  else
    detail::launch_attn_dkdv_staged(pk, pol, delta, stream, "sliding_window_attention_bwd");
}

#define BLOSSOM_INSTANTIATE(T)                                                               \
  template bool sliding_window_attention_fwd<T>(const AttnFwdParams<T, float>&,              \
                                                const SlidingWindowMask&, cudaStream_t);     \
  template void sliding_window_attention_bwd<T>(const AttnBwdParams<T, float>&,              \
                                                const SlidingWindowMask&, void*, size_t,     \
                                                cudaStream_t, bool);
BLOSSOM_INSTANTIATE(float)
BLOSSOM_INSTANTIATE(c10::Half)
BLOSSOM_INSTANTIATE(c10::BFloat16)
#undef BLOSSOM_INSTANTIATE

}  // namespace gpu
}  // namespace blossom
