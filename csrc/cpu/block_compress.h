// CPU kernels of block_compress (DESIGN.md op 2): mean pooling of x (+ pos) over the valid
// positions of each compression window W_t = [(t+1)*stride - block_len, (t+1)*stride) ∩ [0, L).
// Instantiated for <float, float>, <double, double> and <c10::BFloat16, float>.
#pragma once
#include "common/params.h"

namespace blossom {
namespace cpu {

// Writes p.out [B, T, H, D] and p.valid_out [B, T] (when not null).
template <typename T, typename Acc>
void block_compress_fwd(const CompressParams<T, Acc>& p);

// grad_out [B, T, H, D] contiguous in; grad_x [B, L, H, D] contiguous and grad_pos
// [H, block_len, D] contiguous (null when there is no pos) are written in full.
// Every output element has exactly one writer, so the result is deterministic.
template <typename T, typename Acc>
void block_compress_bwd(const CompressParams<T, Acc>& p, const T* grad_out, T* grad_x,
                        T* grad_pos);

}  // namespace cpu
}  // namespace blossom
