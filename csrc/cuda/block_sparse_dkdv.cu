// dK/dV pass of block_sparse_attention on tensor cores: which kernel runs.
//
//   * block_sparse_dkdv_mma.cuh (default): mma.sync m16n8k16 with S / P / dP / dS in
//     registers, rows gathered by cp.async, 16-bit T, D in {16, 32, 64, 128}, block_size a
//     multiple of 16, 32-bit in-slice offsets. Its header has the decomposition and counts.
//   * block_sparse_dkdv_wmma.cuh: the first tensor-core kernel (wmma 16x16x16 through shared
//     memory): whatever the mma.sync kernel declines (offsets past 32 bits); all cases when
//     BLOSSOM_OPS_CUDA_BS_DKDV=old (read once per process, on the host: A/B runs).
//   * Neither (float32, other block sizes or head dims, unaligned rows,
//     BLOSSOM_OPS_CUDA_SIMPLE=1): launch_block_sparse_dkdv returns false and the caller runs
//     the generic per-key kernel (attn_kernels.cuh).
// Every path writes each element of grad_k / grad_v (zeros for keys nobody attends) and sums
// in a fixed order (no float atomics).
#include "cuda/block_sparse_dkdv.h"

#include <type_traits>

#include "cuda/attn_gate_fold.cuh"
#include "cuda/block_sparse_dkdv_mma.cuh"
#include "cuda/block_sparse_dkdv_wmma.cuh"

namespace blossom {
namespace gpu {
namespace detail {

template <typename T>
bool launch_block_sparse_dkdv(const AttnBwdParams<T, float>& p, const BlockSparseMask& m,
                              int64_t num_blocks, const int32_t* off, const int32_t* entries,
                              const float* delta, cudaStream_t stream) {
  BLOSSOM_CHECK(!bwd_gated(p), "block_sparse_attention_bwd: the dK/dV pass takes dkdv_params");
  if constexpr (std::is_same<T, float>::value) {
    return false;  // no fp32 tensor-core path: the generic kernel keeps full precision
  } else {
    if (simple_kernels_requested()) return false;
    if (!bs_dkdv_old_requested() &&
        launch_bs_dkdv_mma(p, m, num_blocks, off, entries, delta, stream)) {
      check_launch("block_sparse_attention_bwd (dK/dV, mma.sync tiles)");
      return true;
    }
    return bs_wmma::launch_bs_dkdv_wmma(p, m, num_blocks, off, entries, delta, stream);
  }
}

#define BLOSSOM_INSTANTIATE(T)                                                              \
  template bool launch_block_sparse_dkdv<T>(const AttnBwdParams<T, float>&,                 \
                                            const BlockSparseMask&, int64_t, const int32_t*, \
                                            const int32_t*, const float*, cudaStream_t);
BLOSSOM_INSTANTIATE(float)
BLOSSOM_INSTANTIATE(c10::Half)
BLOSSOM_INSTANTIATE(c10::BFloat16)
#undef BLOSSOM_INSTANTIATE

}  // namespace detail
}  // namespace gpu
}  // namespace blossom
