// The fused compression + block selection of the short CUDA path of blossom_attention
// (csrc/cuda/short_select.cu), as used by csrc/ops/blossom_attention.cpp. CUDA builds only.
#pragma once
#ifdef BLOSSOM_WITH_CUDA
#include <ATen/ATen.h>

#include "ops/ops.h"

namespace blossom {
namespace short_path {

// select_blocks(q, block_compress(k, k_pos, valid = ok, block_len, stride), top_n, ...) as
// one kernel: int32 [B, L, Hk, top_n]. Returns an undefined tensor when the fused kernel
// does not cover the call (gpu::short_select_eligible, BLOSSOM_OPS_CUDA_SHORT_SELECT=0, or
// too little shared memory); the caller then runs the two ops. Expects what
// short_path::usable checked (CUDA, half / bfloat16, aligned q/k rows) and what
// blossom_attention's check_config checked (k_pos shape, dtype, device; block_size a
// multiple of stride; top_n >= 1). `ok` is the resolved bool [B, L] validity or undefined.
at::Tensor select(const at::Tensor& q, const at::Tensor& k, const OptTensor& k_pos,
                  const at::Tensor& ok, int64_t block_len, int64_t stride, int64_t block_size,
                  int64_t top_n, bool causal, double scale);

}  // namespace short_path
}  // namespace blossom
#endif
