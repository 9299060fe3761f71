// Declarations of the CUDA kernel launchers, called by the bindings in csrc/ops/*.cpp when
// the inputs are CUDA tensors. Compiled only with BLOSSOM_WITH_CUDA. Each launcher is a
// template over the storage type T, explicitly instantiated in csrc/cuda/<op>.cu for
// float, c10::Half and c10::BFloat16 (accumulation always in float), and enqueues its work
// on `stream` without synchronising the host.
//
// Workspace: the attention backwards need device scratch (delta = rowsum(dO * O) - dlse,
// and for block-sparse an inverse block -> query index). The launchers never allocate:
// the binding asks `*_bwd_workspace_bytes(...)` for the size, allocates that many bytes
// (e.g. at::empty({bytes}, q.options().dtype(at::kByte)), uninitialised is fine; the
// caching allocator keeps it graph-safe) and passes the pointer and size. A size of 0
// means no workspace (a null pointer is then fine). A backward whose params carry a gate
// (AttnBwdParams::gate, blossom_attention's composed path) needs the size asked with
// gated = true.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime_api.h>

#include "common/params.h"

namespace blossom {
namespace gpu {

// Returns whether it applied p.gate (blossom_attention's gate in the epilogue: only its
// query-pair staged kernel does, when the buffers allow and BLOSSOM_OPS_CUDA_GATE_EPILOGUE is
// not 0); false: p.gate.out was not written and the caller runs the gate kernel.
template <typename T>
bool sliding_window_attention_fwd(const AttnFwdParams<T, float>& p, const SlidingWindowMask& m,
                                  cudaStream_t stream);
size_t sliding_window_attention_bwd_workspace_bytes(const AttnShape& shape,
                                                    const SlidingWindowMask& m,
                                                    bool gated = false);
// dq_done: blossom_branches_bwd already ran this backward's dQ pass (and wrote delta at the
// start of the workspace, which both backwards' workspace layouts keep there).
template <typename T>
void sliding_window_attention_bwd(const AttnBwdParams<T, float>& p, const SlidingWindowMask& m,
                                  void* workspace, size_t workspace_bytes, cudaStream_t stream,
                                  bool dq_done = false);

template <typename T>
void block_sparse_attention_fwd(const AttnFwdParams<T, float>& p, const BlockSparseMask& m,
                                cudaStream_t stream);
size_t block_sparse_attention_bwd_workspace_bytes(const AttnShape& shape,
                                                  const BlockSparseMask& m, bool gated = false);
template <typename T>
void block_sparse_attention_bwd(const AttnBwdParams<T, float>& p, const BlockSparseMask& m,
                                void* workspace, size_t workspace_bytes, cudaStream_t stream,
                                bool dq_done = false);

// blossom_attention's block-sparse (p_sel) and sliding-window (p_win, with the gate
// epilogue's parameters, p_sel's output as branch 0) forwards, on the same q, k, v and
// validity: one kernel for both and the gate (attn_fwd_fused.cuh, unless
// BLOSSOM_OPS_CUDA_FUSED_FWD=0) when both would take the 16-bit query-pair fast paths and the
// epilogue applies, else the two forwards in that order. Returns whether p_win.gate.out holds
// the gated sum (false: the caller runs the gate kernel).
template <typename T>
bool blossom_branches_fwd(const AttnFwdParams<T, float>& p_sel, const BlockSparseMask& m_sel,
                          const AttnFwdParams<T, float>& p_win, const SlidingWindowMask& m_win,
                          cudaStream_t stream);

// blossom_attention's block-sparse (p_sel, writes the gradients) and sliding-window (p_win,
// accumulate: adds to them) backwards, gated, on the same q, k, v, dO and validity, each with
// its own workspace (sized by the two *_bwd_workspace_bytes with gated = true). When both
// would take the 16-bit query-pair fast paths, their dQ passes run as one kernel
// (attn_dq_fused.cuh, unless BLOSSOM_OPS_CUDA_FUSED_DQ=0); otherwise this is the two
// backwards one after the other.
template <typename T>
void blossom_branches_bwd(const AttnBwdParams<T, float>& p_sel, const BlockSparseMask& m_sel,
                          void* ws_sel, size_t ws_sel_bytes, const AttnBwdParams<T, float>& p_win,
                          const SlidingWindowMask& m_win, void* ws_win, size_t ws_win_bytes,
                          cudaStream_t stream);

template <typename T>
void compressed_attention_fwd(const AttnFwdParams<T, float>& p, const CompressedMask& m,
                              cudaStream_t stream);
size_t compressed_attention_bwd_workspace_bytes(const AttnShape& shape,
                                                const CompressedMask& m, bool gated = false);
template <typename T>
void compressed_attention_bwd(const AttnBwdParams<T, float>& p, const CompressedMask& m,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream);

template <typename T>
void block_compress_fwd(const CompressParams<T, float>& p, cudaStream_t stream);
// grad_out [B, T, H, D], grad_x [B, L, H, D] and grad_pos [H, block_len, D] (may be null),
// all contiguous.
template <typename T>
void block_compress_bwd(const CompressParams<T, float>& p, const T* grad_out, T* grad_x,
                        T* grad_pos, cudaStream_t stream);

template <typename T>
void select_blocks_fwd(const SelectParams<T>& p, cudaStream_t stream);

template <typename T>
void gate_fusion_fwd(const GateParams<T>& p, cudaStream_t stream);
// grad_branches [R, rows, D], grad_gate [rows, R], both contiguous.
template <typename T>
void gate_fusion_bwd(const GateParams<T>& p, const T* grad_out, T* grad_branches, T* grad_gate,
                     cudaStream_t stream);
// The same with the R <= 4 branches (and their gradients) as separate contiguous [rows, D]
// buffers; p.branch is not read. Lets blossom_attention skip stacking its branch outputs.
template <typename T>
void gate_fusion_fwd_list(const GateParams<T>& p, const T* const* branch, cudaStream_t stream);
template <typename T>
void gate_fusion_bwd_list(const GateParams<T>& p, const T* const* branch, const T* grad_out,
                          T* const* grad_branch, T* grad_gate, cudaStream_t stream);

}  // namespace gpu
}  // namespace blossom
