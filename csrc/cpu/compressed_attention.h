// CPU kernels of compressed_attention (DESIGN.md). Instantiated for T = float, double and
// c10::BFloat16 with Acc = float (double for double).
#pragma once
#include "common/params.h"

namespace blossom {
namespace cpu {

template <typename T, typename Acc>
void compressed_attention_fwd(const AttnFwdParams<T, Acc>& p, const CompressedMask& m);

template <typename T, typename Acc>
void compressed_attention_bwd(const AttnBwdParams<T, Acc>& p, const CompressedMask& m);

}  // namespace cpu
}  // namespace blossom
