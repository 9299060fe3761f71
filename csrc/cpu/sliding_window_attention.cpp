// STIS on CPU: key ranges of query i are the window [i - w + 1, i + w - 1] (clipped, and
// j <= i when causal) plus, when dilated, the single keys i -/+ 2^k lying beyond it.
#include "cpu/sliding_window_attention.h"

#include <algorithm>

#include "cpu/attention_core.h"

namespace blossom {
namespace cpu {
namespace {

struct SlidingRanges {
  int64_t seq_len;
  SlidingWindowMask m;

  // Every key of the queries <= i lies below this.
  int64_t key_bound(int64_t i) const { return m.causal ? i + 1 : seq_len; }

  void operator()(int64_t /*b*/, int64_t i, int64_t /*g*/, RangeList& out) const {
    const int64_t w = std::min(m.window, seq_len);  // |i - j| < L always holds
    const int64_t lo = std::max<int64_t>(0, i - w + 1);
    const int64_t hi = m.causal ? i + 1 : std::min(seq_len, i + w);
    // Offsets below w are inside the window already; the first one outside is the
    // smallest power of two >= w.
    int64_t first = 1;
    while (first < w) first <<= 1;
    if (m.dilated && i >= first) {
      int64_t top = first;
      while (top * 2 <= i) top <<= 1;
      for (int64_t d = top; d >= first; d >>= 1) out.push_back({i - d, i - d + 1});
    }
    if (hi > lo) out.push_back({lo, hi});
    if (m.dilated && !m.causal)
      for (int64_t d = first; i + d < seq_len; d <<= 1) out.push_back({i + d, i + d + 1});
  }
};

}  // namespace

template <typename T, typename Acc>
void sliding_window_attention_fwd(const AttnFwdParams<T, Acc>& p, const SlidingWindowMask& m) {
  attention_fwd(p, p.valid, SlidingRanges{p.shape.q_len, m});
}

template <typename T, typename Acc>
void sliding_window_attention_bwd(const AttnBwdParams<T, Acc>& p, const SlidingWindowMask& m) {
  attention_bwd(p, p.valid, SlidingRanges{p.shape.q_len, m});
}

#define BLOSSOM_INSTANTIATE(T, Acc)                                                          \
  template void sliding_window_attention_fwd<T, Acc>(const AttnFwdParams<T, Acc>&,          \
                                                     const SlidingWindowMask&);              \
  template void sliding_window_attention_bwd<T, Acc>(const AttnBwdParams<T, Acc>&,          \
                                                     const SlidingWindowMask&);
BLOSSOM_INSTANTIATE(float, float)
BLOSSOM_INSTANTIATE(double, double)
BLOSSOM_INSTANTIATE(c10::BFloat16, float)
#undef BLOSSOM_INSTANTIATE

}  // namespace cpu
}  // namespace blossom
