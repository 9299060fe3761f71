// CPU kernels of block_sparse_attention (DESIGN.md). Instantiated for T = float, double and
// c10::BFloat16 with Acc = float (double for double).
#pragma once
#include "common/params.h"

namespace blossom {
namespace cpu {

template <typename T, typename Acc>
void block_sparse_attention_fwd(const AttnFwdParams<T, Acc>& p, const BlockSparseMask& m);

template <typename T, typename Acc>
void block_sparse_attention_bwd(const AttnBwdParams<T, Acc>& p, const BlockSparseMask& m);

}  // namespace cpu
}  // namespace blossom
