// blossom_attention's block-sparse and sliding-window backwards in one call (launch.h), so
// that their dQ passes can share one kernel (attn_dq_fused.cuh). Order on the stream: the
// fused dQ (both branches' delta, lse' and grad_gate columns), then the block-sparse backward
// without its dQ (inverse index, dK/dV), then the window backward without its dQ (dK/dV
// added). Without the fused kernel: the two backwards as before.
#include "cuda/attn_dq_fused.cuh"
#include "cuda/block_sparse_policy.cuh"
#include "cuda/launch.h"
#include "cuda/sliding_window_policy.cuh"

namespace blossom {
namespace gpu {

template <typename T>
void blossom_branches_bwd(const AttnBwdParams<T, float>& p_sel, const BlockSparseMask& m_sel,
                          void* ws_sel, size_t ws_sel_bytes, const AttnBwdParams<T, float>& p_win,
                          const SlidingWindowMask& m_win, void* ws_win, size_t ws_win_bytes,
                          cudaStream_t stream) {
  const AttnShape& s = p_sel.shape;
  BLOSSOM_CHECK(ws_sel_bytes >= block_sparse_attention_bwd_workspace_bytes(
                                    s, m_sel, detail::bwd_gated(p_sel)) &&
                    ws_win_bytes >= sliding_window_attention_bwd_workspace_bytes(
                                        p_win.shape, m_win, detail::bwd_gated(p_win)),
                "blossom_branches_bwd: workspace too small");
  bool fused = false;
  if (s.batch > 0 && s.q_heads > 0 && s.q_len > 0) {
    // Both delta regions start their workspaces (the two backwards' layouts).
    fused = detail::launch_attn_dq_fused(
        p_sel, make_block_sparse_policy(s, m_sel, p_sel.valid), static_cast<float*>(ws_sel),
        p_win, SlidingPolicy::make(p_win.shape.q_len, m_win, p_win.valid),
        static_cast<float*>(ws_win), stream);
  }
  block_sparse_attention_bwd<T>(p_sel, m_sel, ws_sel, ws_sel_bytes, stream, fused);
  sliding_window_attention_bwd<T>(p_win, m_win, ws_win, ws_win_bytes, stream, fused);
}

#define BLOSSOM_INSTANTIATE(T)                                                                \
  template void blossom_branches_bwd<T>(const AttnBwdParams<T, float>&, const BlockSparseMask&, \
                                        void*, size_t, const AttnBwdParams<T, float>&,          \
                                        const SlidingWindowMask&, void*, size_t, cudaStream_t);
BLOSSOM_INSTANTIATE(float)
BLOSSOM_INSTANTIATE(c10::Half)
BLOSSOM_INSTANTIATE(c10::BFloat16)
#undef BLOSSOM_INSTANTIATE

}  // namespace gpu
}  // namespace blossom
