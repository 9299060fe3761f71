// Instantiations of the previous tensor-core selection (select_blocks_tc_old.cuh, kept for A/B
// runs: BLOSSOM_OPS_CUDA_SELECT=old) for float (which declines) and half.
#include "cuda/select_blocks_tc_old.cuh"

namespace blossom {
namespace gpu {
template bool select_blocks_tc_old_fwd<float>(const SelectParams<float>&, cudaStream_t);
template bool select_blocks_tc_old_fwd<c10::Half>(const SelectParams<c10::Half>&, cudaStream_t);
}  // namespace gpu
}  // namespace blossom
