// CPU kernels of sliding_window_attention (DESIGN.md). Instantiated for T = float, double and
// c10::BFloat16 with Acc = float (double for double).
#pragma once
#include "common/params.h"

namespace blossom {
namespace cpu {

template <typename T, typename Acc>
void sliding_window_attention_fwd(const AttnFwdParams<T, Acc>& p, const SlidingWindowMask& m);

template <typename T, typename Acc>
void sliding_window_attention_bwd(const AttnBwdParams<T, Acc>& p, const SlidingWindowMask& m);

}  // namespace cpu
}  // namespace blossom
