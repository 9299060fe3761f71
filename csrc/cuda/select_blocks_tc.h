// Tensor-core fast path of select_blocks (csrc/cuda/select_blocks_tc.cuh). Called by
// select_blocks_fwd (select_blocks.cu) before its generic kernel.
#pragma once
#include <cuda_runtime_api.h>

#include "common/params.h"

namespace blossom {
namespace gpu {

// Enqueues the fast kernel and returns true when it covers the call (16-bit inputs,
// head_dim % 8 == 0 and <= 128, 16-byte aligned rows, G in {1, 2, 4, 8, 16},
// block_size / stride a power of two <= 64, top_n <= 8, shared memory within the device
// limit);
// returns false without doing anything otherwise, and the caller runs the generic kernel.
// The current kernel (select_blocks_tc.cuh) additionally needs a positive finite scale.
template <typename T>
bool select_blocks_tc_fwd(const SelectParams<T>& p, cudaStream_t stream);

// The previous kernel (select_blocks_tc_old.cuh), same contract without the scale condition:
// for A/B runs (BLOSSOM_OPS_CUDA_SELECT=old) and the calls the current one declines.
template <typename T>
bool select_blocks_tc_old_fwd(const SelectParams<T>& p, cudaStream_t stream);

}  // namespace gpu
}  // namespace blossom
