// Fused block compression + top-n block selection for the short-sequence path of
// blossom_attention (csrc/cuda/short_select.cu). Declarations only (host-compilable): the
// binding (csrc/ops/short_select.cpp) fills the plain struct; the launcher is instantiated
// for c10::Half and c10::BFloat16.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/params.h"

namespace blossom {
namespace gpu {

// Computes what select_blocks(q, block_compress(k, k_pos, valid, block_len, stride), ...)
// returns, without the compressed keys ever leaving the CTA.
template <typename T>
struct ShortSelectParams {
  AttnShape shape;             // q_len = kv_len = L (raw keys), q/kv heads, head_dim, scale
  Bshd<const T> q, k;          // 16-byte aligned rows (the short path's requirement)
  const T* k_pos = nullptr;    // [kv_heads, block_len, head_dim] contiguous, 16-byte aligned,
                               // or null
  Validity valid;              // resolved bool [B, L] (null: all valid)
  int64_t block_len = 32, stride = 16, block_size = 16, top_n = 4;
  bool causal = true;
  int32_t* out = nullptr;      // [B, L, kv_heads, top_n] contiguous
};

// True when the fused kernel takes the call: not disabled by BLOSSOM_OPS_CUDA_SHORT_SELECT=0
// (read once), 1 <= L <= 256, head_dim in {16, 32, 64}, ceil(L / stride) <= 32 compressed
// tokens, 1 <= G <= 64, block_size a positive multiple of stride, top_n >= 1. dtype and row
// alignment are the binding's part.
bool short_select_eligible(int64_t seq_len, int64_t head_dim, int64_t group, int64_t stride,
                           int64_t block_size, int64_t top_n);

// Enqueues the kernel on `stream` and returns true; returns false without doing anything when
// the device cannot give the kernel its shared memory (the caller then runs the two ops).
template <typename T>
bool short_select_fwd(const ShortSelectParams<T>& p, cudaStream_t stream);

}  // namespace gpu
}  // namespace blossom
