// NSA's compressed branch on CPU: query i sees the valid compressed tokens t < T, and only
// those whose window has ended, (t + 1) * stride - 1 <= i, when causal. That is one prefix
// range [0, (i + 1) / stride) of the T tokens.
#include "cpu/compressed_attention.h"

#include <algorithm>

#include "cpu/attention_core.h"

namespace blossom {
namespace cpu {
namespace {

struct CompressedRanges {
  int64_t num_tokens;  // T
  CompressedMask m;

  // Every token seen by the queries <= i lies below this.
  int64_t key_bound(int64_t i) const {
    return m.causal ? std::min(num_tokens, (i + 1) / m.stride) : num_tokens;
  }

  void operator()(int64_t /*b*/, int64_t i, int64_t /*g*/, RangeList& out) const {
    const int64_t hi = m.causal ? std::min(num_tokens, (i + 1) / m.stride) : num_tokens;
    if (hi > 0) out.push_back({0, hi});
  }
};

}  // namespace

template <typename T, typename Acc>
void compressed_attention_fwd(const AttnFwdParams<T, Acc>& p, const CompressedMask& m) {
  attention_fwd(p, m.valid_cmp, CompressedRanges{p.shape.kv_len, m});
}

template <typename T, typename Acc>
void compressed_attention_bwd(const AttnBwdParams<T, Acc>& p, const CompressedMask& m) {
  attention_bwd(p, m.valid_cmp, CompressedRanges{p.shape.kv_len, m});
}

#define BLOSSOM_INSTANTIATE(T, Acc)                                                          \
  template void compressed_attention_fwd<T, Acc>(const AttnFwdParams<T, Acc>&,              \
                                                 const CompressedMask&);                     \
  template void compressed_attention_bwd<T, Acc>(const AttnBwdParams<T, Acc>&,              \
                                                 const CompressedMask&);
BLOSSOM_INSTANTIATE(float, float)
BLOSSOM_INSTANTIATE(double, double)
BLOSSOM_INSTANTIATE(c10::BFloat16, float)
#undef BLOSSOM_INSTANTIATE

}  // namespace cpu
}  // namespace blossom
