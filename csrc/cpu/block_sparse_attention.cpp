// LTIS selected attention on CPU: key ranges of query i are its own block plus the blocks
// listed in block_idx[b, i, g] (-1 and duplicates ignored), sorted, cut at j <= i when
// causal. One softmax over the union.
#include "cpu/block_sparse_attention.h"

#include <algorithm>

#include "cpu/attention_core.h"

namespace blossom {
namespace cpu {
namespace {

struct BlockRanges {
  int64_t seq_len;
  BlockSparseMask m;

  // Every key of the queries <= i lies below this.
  int64_t key_bound(int64_t i) const { return m.causal ? std::min(seq_len, i + 1) : seq_len; }

  void operator()(int64_t b, int64_t i, int64_t g, RangeList& out) const {
    const int64_t bs = m.block_size;
    const int64_t end_cap = m.causal ? std::min(seq_len, i + 1) : seq_len;
    auto add = [&](int64_t c) {
      const int64_t begin = c * bs, end = std::min((c + 1) * bs, end_cap);
      if (begin < end) out.push_back({begin, end});
    };
    add(i / bs);
    const int32_t* sel = m.at(b, i, g);
    for (int64_t r = 0; r < m.n; ++r)
      if (sel[r] >= 0) add(sel[r]);
    // blocks are disjoint, so ranges with equal begins are duplicates of one block
    std::sort(out.begin(), out.end(),
              [](const KeyRange& x, const KeyRange& y) { return x.begin < y.begin; });
    out.erase(std::unique(out.begin(), out.end(),
                          [](const KeyRange& x, const KeyRange& y) { return x.begin == y.begin; }),
              out.end());
  }
};

}  // namespace

template <typename T, typename Acc>
void block_sparse_attention_fwd(const AttnFwdParams<T, Acc>& p, const BlockSparseMask& m) {
  attention_fwd(p, p.valid, BlockRanges{p.shape.q_len, m});
}

template <typename T, typename Acc>
void block_sparse_attention_bwd(const AttnBwdParams<T, Acc>& p, const BlockSparseMask& m) {
  attention_bwd(p, p.valid, BlockRanges{p.shape.q_len, m});
}

#define BLOSSOM_INSTANTIATE(T, Acc)                                                          \
  template void block_sparse_attention_fwd<T, Acc>(const AttnFwdParams<T, Acc>&,            \
                                                   const BlockSparseMask&);                  \
  template void block_sparse_attention_bwd<T, Acc>(const AttnBwdParams<T, Acc>&,            \
                                                   const BlockSparseMask&);
BLOSSOM_INSTANTIATE(float, float)
BLOSSOM_INSTANTIATE(double, double)
BLOSSOM_INSTANTIATE(c10::BFloat16, float)
#undef BLOSSOM_INSTANTIATE

}  // namespace cpu
}  // namespace blossom
