// The binding layer: one function per operator (and backward), at::Tensor in and out.
// Each checks its inputs (csrc/common/checks.h), normalises arguments, allocates outputs,
// fills a parameter struct (csrc/common/params.h) and calls the CPU or CUDA kernel for the
// tensors' device. csrc/cpu/register.cpp and csrc/cuda/register.cpp m.impl() these.
#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "common/checks.h"

namespace blossom {

using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// CUDA only, for blossom_attention's composed backward: the gate folded into one branch's
// backward (AttnBwdParams::gate, csrc/cuda/attn_gate_fold.cuh). The branch is then given the
// gate's output gradient dO itself, not sigmoid(g_r) * dO, and its dQ pass writes
// grad[..., r] for every row.
struct GateFold {
  at::Tensor logits;  // gate_logits [B, L, Hq, R]: q's device and dtype, last dim contiguous
  at::Tensor grad;    // [B, L, Hq, R] like logits, contiguous; only column r is written
  int64_t r = 0;      // the branch's index in the last dimension
};

// CUDA only, for blossom_attention's composed backward: the sliding-window branch handed to
// the block-sparse branch's gated backward, so that both branches' dQ passes can run as one
// kernel (csrc/cuda/attn_dq_fused.cuh: Q and dO read once, dQ written once). Same q, k, v,
// grad_out, validity, causality and scale as the block-sparse call; its gate folded in like
// that call's (GateFold, its own branch index).
struct WindowBranch {
  at::Tensor out, lse;  // the window forward's output and lse
  int64_t window = 8;
  bool dilated = true;
  GateFold gate;
};

// CUDA only, for blossom_attention's composed forward, whose last branch is the sliding
// window: the gate applied in the window forward's epilogue (GateEpilogueParams in
// common/params.h, csrc/cuda/attn_gate_epilogue.cuh), out = sum_r sigmoid(logits[..., r]) *
// branch_r, bit-identical to the gate kernel on the stored branch outputs. All contiguous, on
// q's device, q's dtype: logits [B, L, Hq, R] (R = 2 or 3), branches[r] (q's shape) the
// branch outputs in gate order with branches[self] undefined (the window's own output),
// out q's shape.
// With sel_idx defined, branch 0 (the block-sparse branch over that index) is computed by the
// same call into branches[0] (allocated by the caller like out) and sel_lse ([B, L, Hq] of the
// accumulation type, contiguous): in one kernel with the window when it can
// (csrc/cuda/attn_fwd_fused.cuh), else by the block-sparse forward first. sel_idx: int32
// [B, L, Hk, n], contiguous, entries in [-1, ceil(L / sel_block_size)) (not checked here:
// blossom_attention's own select_blocks output).
struct GateEpilogue {
  at::Tensor logits;
  std::vector<at::Tensor> branches;
  int64_t self = 1;
  at::Tensor out;
  at::Tensor sel_idx, sel_lse;
  int64_t sel_block_size = 16;
};

// csrc/ops/sliding_window_attention.cpp
Tensor2 sliding_window_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const OptTensor& lengths, const OptTensor& valid,
                                 int64_t window, bool dilated, bool causal, double scale);
Tensor3 sliding_window_attention_backward(const at::Tensor& grad_out, const OptTensor& grad_lse,
                                          const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& out,
                                          const at::Tensor& lse, const OptTensor& lengths,
                                          const OptTensor& valid, int64_t window, bool dilated,
                                          bool causal, double scale);
// CUDA only: sliding_window_attention's (out, lse), with the gate applied in its epilogue
// when the kernel that runs has the gated epilogue (16-bit, the query-pair fast path, and
// BLOSSOM_OPS_CUDA_GATE_EPILOGUE not 0): *applied then says gate.out holds the gated sum;
// false: gate.out was not written, the caller runs the gate kernel.
Tensor2 sliding_window_attention_gated(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const OptTensor& valid,
                                       int64_t window, bool dilated, bool causal, double scale,
                                       const GateEpilogue& gate, bool* applied);
// CUDA only: adds this op's gradients to grad_q / grad_k / grad_v (q's, k's, v's shape and
// dtype, on q's device) in the kernels' own stores, instead of returning new tensors: the
// second branch of blossom_attention's backward when the gate is not folded (the folded
// backward runs the window branch through block_sparse_attention_backward_gated's WindowBranch).
void sliding_window_attention_backward_add(const at::Tensor& grad_out, const at::Tensor& q,
                                           const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& out, const at::Tensor& lse,
                                           const OptTensor& valid, int64_t window, bool dilated,
                                           bool causal, double scale, const at::Tensor& grad_q,
                                           const at::Tensor& grad_k, const at::Tensor& grad_v);

// csrc/ops/block_compress.cpp
Tensor2 block_compress(const at::Tensor& x, const OptTensor& pos, const OptTensor& lengths,
                       const OptTensor& valid, int64_t block_len, int64_t stride);
Tensor2 block_compress_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                const OptTensor& pos, const OptTensor& lengths,
                                const OptTensor& valid, int64_t block_len, int64_t stride);

// csrc/ops/select_blocks.cpp
at::Tensor select_blocks(const at::Tensor& q, const at::Tensor& k_cmp, const OptTensor& lengths,
                         const OptTensor& valid, int64_t top_n, int64_t block_size,
                         int64_t stride, int64_t block_len, bool causal, double scale);

// csrc/ops/block_sparse_attention.cpp
Tensor2 block_sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& block_idx, const OptTensor& lengths,
                               const OptTensor& valid, int64_t block_size, bool causal,
                               double scale);
Tensor3 block_sparse_attention_backward(const at::Tensor& grad_out, const OptTensor& grad_lse,
                                        const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& out,
                                        const at::Tensor& lse, const at::Tensor& block_idx,
                                        const OptTensor& lengths, const OptTensor& valid,
                                        int64_t block_size, bool causal, double scale);
// CUDA only: the backward with the gate folded in (GateFold); no grad_lse. With `win`, the
// sliding-window branch's backward too (WindowBranch), its gradients added to these.
Tensor3 block_sparse_attention_backward_gated(const at::Tensor& grad_out, const at::Tensor& q,
                                              const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& out, const at::Tensor& lse,
                                              const at::Tensor& block_idx,
                                              const OptTensor& valid, int64_t block_size,
                                              bool causal, double scale, const GateFold& gate,
                                              const WindowBranch* win = nullptr);

// csrc/ops/compressed_attention.cpp
Tensor2 compressed_attention(const at::Tensor& q, const at::Tensor& k_cmp,
                             const at::Tensor& v_cmp, const OptTensor& lengths,
                             const OptTensor& valid, int64_t block_len, int64_t stride,
                             bool causal, double scale);
Tensor3 compressed_attention_backward(const at::Tensor& grad_out, const OptTensor& grad_lse,
                                      const at::Tensor& q, const at::Tensor& k_cmp,
                                      const at::Tensor& v_cmp, const at::Tensor& out,
                                      const at::Tensor& lse, const OptTensor& lengths,
                                      const OptTensor& valid, int64_t block_len, int64_t stride,
                                      bool causal, double scale);
// CUDA only: the backward with the gate folded in (GateFold); no grad_lse.
Tensor3 compressed_attention_backward_gated(const at::Tensor& grad_out, const at::Tensor& q,
                                            const at::Tensor& k_cmp, const at::Tensor& v_cmp,
                                            const at::Tensor& out, const at::Tensor& lse,
                                            const OptTensor& valid, int64_t block_len,
                                            int64_t stride, bool causal, double scale,
                                            const GateFold& gate);

// csrc/ops/gate_fusion.cpp
at::Tensor gate_fusion(const at::Tensor& branches, const at::Tensor& gate_logits);
Tensor2 gate_fusion_backward(const at::Tensor& grad_out, const at::Tensor& branches,
                             const at::Tensor& gate_logits);

// csrc/ops/blossom_attention.cpp
using BlossomOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor, at::Tensor>;
BlossomOutputs blossom_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& gate_logits, const OptTensor& k_pos,
                                 const OptTensor& v_pos, const OptTensor& lengths,
                                 const OptTensor& valid, int64_t block_len, int64_t stride,
                                 int64_t block_size, int64_t top_n, int64_t window, bool dilated,
                                 bool causal, double scale);
using BlossomGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                at::Tensor>;
BlossomGrads blossom_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& gate_logits, const OptTensor& k_pos, const OptTensor& v_pos,
    const OptTensor& lengths, const OptTensor& valid, const at::Tensor& o_sel,
    const at::Tensor& lse_sel, const at::Tensor& o_win, const at::Tensor& lse_win,
    const at::Tensor& o_cmp, const at::Tensor& lse_cmp, const at::Tensor& block_idx,
    int64_t block_len, int64_t stride, int64_t block_size, int64_t top_n, int64_t window,
    bool dilated, bool causal, double scale);

}  // namespace blossom
