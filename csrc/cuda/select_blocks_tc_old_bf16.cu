// Instantiation of the previous tensor-core selection (select_blocks_tc_old.cuh, kept for A/B
// runs: BLOSSOM_OPS_CUDA_SELECT=old) for bfloat16.
#include "cuda/select_blocks_tc_old.cuh"

namespace blossom {
namespace gpu {
template bool select_blocks_tc_old_fwd<c10::BFloat16>(const SelectParams<c10::BFloat16>&,
                                                      cudaStream_t);
}  // namespace gpu
}  // namespace blossom
