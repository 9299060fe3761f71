// Instantiations of the tensor-core selection (select_blocks_tc.cuh) for float (which
// declines: fp32 keeps the SIMT kernel) and half.
#include "cuda/select_blocks_tc.cuh"

namespace blossom {
namespace gpu {
template bool select_blocks_tc_fwd<float>(const SelectParams<float>&, cudaStream_t);
template bool select_blocks_tc_fwd<c10::Half>(const SelectParams<c10::Half>&, cudaStream_t);
}  // namespace gpu
}  // namespace blossom
