// Instantiation of the tensor-core selection (select_blocks_tc.cuh) for bfloat16.
#include "cuda/select_blocks_tc.cuh"

namespace blossom {
namespace gpu {
template bool select_blocks_tc_fwd<c10::BFloat16>(const SelectParams<c10::BFloat16>&,
                                                  cudaStream_t);
}  // namespace gpu
}  // namespace blossom
