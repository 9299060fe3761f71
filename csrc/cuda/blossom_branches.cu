// blossom_attention's block-sparse and sliding-window branches in one call each way
// (launch.h), so that the two branches can share kernels.
// Forward: one kernel for both branches and the gate (attn_fwd_fused.cuh) when it applies,
// else the block-sparse forward, then the window forward (gate in its epilogue when it can).
// Backward: the fused dQ (attn_dq_fused.cuh: both branches' delta, lse' and grad_gate
// columns), then the block-sparse backward without its dQ (inverse index, dK/dV), then the
// window backward without its dQ (dK/dV added). Without the fused dQ: the two backwards.
#include "cuda/attn_dq_fused.cuh"
#include "cuda/attn_fwd_fused.cuh"
#include "cuda/block_sparse_policy.cuh"
#include "cuda/launch.h"
#include "cuda/sliding_window_policy.cuh"

namespace blossom {
namespace gpu {

template <typename T>
bool blossom_branches_fwd(const AttnFwdParams<T, float>& p_sel, const BlockSparseMask& m_sel,
                          const AttnFwdParams<T, float>& p_win, const SlidingWindowMask& m_win,
                          cudaStream_t stream) {
  const AttnShape& s = p_sel.shape;
  if (s.batch > 0 && s.q_heads > 0 && s.q_len > 0 &&
      detail::launch_attn_fwd_fused(p_sel, make_block_sparse_policy(s, m_sel, p_sel.valid),
                                    p_win,
                                    SlidingPolicy::make(p_win.shape.q_len, m_win, p_win.valid),
                                    stream))
    return true;
  block_sparse_attention_fwd<T>(p_sel, m_sel, stream);
  return sliding_window_attention_fwd<T>(p_win, m_win, stream);
}

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
  template bool blossom_branches_fwd<T>(const AttnFwdParams<T, float>&, const BlockSparseMask&, \
                                        const AttnFwdParams<T, float>&,                         \
                                        const SlidingWindowMask&, cudaStream_t);                \
  template void blossom_branches_bwd<T>(const AttnBwdParams<T, float>&, const BlockSparseMask&, \
                                        void*, size_t, const AttnBwdParams<T, float>&,          \
                                        const SlidingWindowMask&, void*, size_t, cudaStream_t);
BLOSSOM_INSTANTIATE(float)
BLOSSOM_INSTANTIATE(c10::Half)
BLOSSOM_INSTANTIATE(c10::BFloat16)
#undef BLOSSOM_INSTANTIATE

}  // namespace gpu
}  // namespace blossom
