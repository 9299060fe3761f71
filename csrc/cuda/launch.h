// Declarations of the CUDA kernel launchers, called by the bindings in csrc/ops/*.cpp when
// the inputs are CUDA tensors. Compiled only with BLOSSOM_WITH_CUDA. Each launcher is a
// template over the storage type T, explicitly instantiated in csrc/cuda/<op>.cu for
// float, c10::Half and c10::BFloat16 (accumulation always in float), and enqueues its work
// on `stream` without synchronising the host.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime_api.h>

#include "common/params.h"

namespace blossom {
namespace gpu {

template <typename T>
void sliding_window_attention_fwd(const AttnFwdParams<T, float>& p, const SlidingWindowMask& m,
                                  cudaStream_t stream);
template <typename T>
void sliding_window_attention_bwd(const AttnBwdParams<T, float>& p, const SlidingWindowMask& m,
                                  cudaStream_t stream);

template <typename T>
void block_sparse_attention_fwd(const AttnFwdParams<T, float>& p, const BlockSparseMask& m,
                                cudaStream_t stream);
template <typename T>
void block_sparse_attention_bwd(const AttnBwdParams<T, float>& p, const BlockSparseMask& m,
                                cudaStream_t stream);

template <typename T>
void compressed_attention_fwd(const AttnFwdParams<T, float>& p, const CompressedMask& m,
                              cudaStream_t stream);
template <typename T>
void compressed_attention_bwd(const AttnBwdParams<T, float>& p, const CompressedMask& m,
                              cudaStream_t stream);

template <typename T>
void block_compress_fwd(const CompressParams<T, float>& p, cudaStream_t stream);
// grad_x [B, L, H, D] contiguous and grad_pos [H, block_len, D] (may be null).
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

}  // namespace gpu
}  // namespace blossom
