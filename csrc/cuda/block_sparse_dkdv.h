// Block-tiled dK/dV pass of block_sparse_attention (tensor cores), see block_sparse_dkdv.cu.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/params.h"

namespace blossom {
namespace gpu {
namespace detail {

// dK/dV of block_sparse_attention from the inverse index built by block_index_kernel
// (off [B*Hk, C+1], entries [B*Hk, L*n]) and delta written by the dQ pass (same stream).
// Writes every element of grad_k and grad_v. Runs the mma.sync kernel
// (block_sparse_dkdv_mma.cuh: 16-bit, D in {16, 32, 64, 128}) or else the wmma one
// (block_sparse_dkdv_wmma.cuh; every case with BLOSSOM_OPS_CUDA_BS_DKDV=old). Returns false,
// launching nothing, when the case is outside both (float32, block_size % 16 != 0, head_dim
// not in {16, 32, 64, 128}, rows not 16-byte aligned, or BLOSSOM_OPS_CUDA_SIMPLE=1): the
// caller then runs the generic per-key kernel. p carries no gate: a gated backward passes
// dkdv_params(p, delta) (attn_gate_fold.cuh), whose lse folds the gate in.
template <typename T>
bool launch_block_sparse_dkdv(const AttnBwdParams<T, float>& p, const BlockSparseMask& m,
                              int64_t num_blocks, const int32_t* off, const int32_t* entries,
                              const float* delta, cudaStream_t stream);

}  // namespace detail
}  // namespace gpu
}  // namespace blossom
