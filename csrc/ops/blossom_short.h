// The fused short-sequence CUDA path of blossom_attention (csrc/cuda/blossom_short.cu),
// as used by csrc/ops/blossom_attention.cpp. CUDA builds only.
#pragma once
#ifdef BLOSSOM_WITH_CUDA
#include <ATen/ATen.h>

#include "ops/ops.h"

namespace blossom {
namespace short_path {

// True when the fused kernels take this call: CUDA, R == 2, half / bfloat16, L and D and
// G in the kernels' range (gpu::blossom_short_eligible, which also honours
// BLOSSOM_OPS_CUDA_SIMPLE and BLOSSOM_OPS_CUDA_SHORT_MAX_LEN), q/k/v rows 16-byte aligned.
bool usable(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t R);

// Branch outputs, lse and the gated output from the selection `idx` (int32 [B, L, Hk, n]);
// `ok` is the resolved bool [B, L] validity or undefined. Returns the op's 8 outputs with
// the R == 2 placeholders for the compressed branch.
BlossomOutputs forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& gate_logits, const at::Tensor& ok,
                       const at::Tensor& idx, int64_t block_size, int64_t window, bool dilated,
                       bool causal, double scale);

// (grad_q, grad_k, grad_v, grad_gate) of forward().
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& gate_logits, const at::Tensor& ok, const at::Tensor& o_sel,
    const at::Tensor& lse_sel, const at::Tensor& o_win, const at::Tensor& lse_win,
    const at::Tensor& block_idx, int64_t block_size, int64_t window, bool dilated, bool causal,
    double scale);

}  // namespace short_path
}  // namespace blossom
#endif
