#include "cpu/select_blocks.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace blossom {
namespace cpu {
namespace {

template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// Dot product with eight independent partial sums, so the compiler can keep them in one
// vector register (a single running sum would serialise on the FP add latency).
template <typename Acc, typename T>
inline Acc dot(const Acc* a, const T* b, int64_t n) {
  Acc part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int l = 0; l < 8; ++l) part[l] += a[d + l] * static_cast<Acc>(b[d + l]);
  Acc s = 0;
  for (; d < n; ++d) s += a[d] * static_cast<Acc>(b[d]);
  return s + ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// Scratch reused by every query row a thread handles.
template <typename Acc>
struct RowScratch {
  std::vector<Acc> q;           // [G, D]: the group's query rows in Acc
  std::vector<int32_t> tokens;  // scored compressed tokens of this row
  std::vector<Acc> logits;      // [G, n_tokens]
  std::vector<Acc> importance;  // [C]
  std::vector<int32_t> cands;   // candidate blocks of this row
  std::vector<int32_t> chosen;  // partial selection among cands
};

}  // namespace

template <typename T>
void select_blocks_fwd(const SelectParams<T>& p) {
  using Acc = acc_t<T>;
  const int64_t B = p.shape.batch, L = p.shape.q_len, NT = p.shape.kv_len;
  const int64_t Hk = p.shape.kv_heads, G = p.shape.group(), D = p.shape.head_dim;
  const int64_t bs = p.block_size, S = p.stride, top_n = p.top_n;
  const int64_t C = (L + bs - 1) / bs;
  const int64_t chunks_per_block = bs / S;
  const Acc scale = static_cast<Acc>(p.shape.scale);

  // block_has_valid[b, c]: block c holds a valid key (a candidate condition).
  std::vector<uint8_t> block_has_valid(B * C, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < L; ++j)
      if (p.valid(b, j)) block_has_valid[b * C + j / bs] = 1;

  const int64_t row_work = std::max<int64_t>(1, NT * G * D * Hk);
  const int64_t grain = std::max<int64_t>(1, 16384 / row_work);
  at::parallel_for(0, B * L, grain, [&](int64_t begin, int64_t end) {
    RowScratch<Acc> s;
    s.q.resize(G * D);
    s.tokens.reserve(NT);
    s.logits.resize(G * NT);
    s.importance.resize(C);
    s.cands.reserve(C);
    s.chosen.reserve(C);
    for (int64_t bi = begin; bi < end; ++bi) {
      const int64_t b = bi / L, i = bi % L;
      int32_t* out_row = p.out + bi * Hk * top_n;
      std::fill(out_row, out_row + Hk * top_n, int32_t(-1));
      if (!p.valid(b, i)) continue;  // a padded query selects nothing

      // Candidates depend on (b, own block) only, so tokens are shared by all heads.
      const int64_t own = i / bs;
      const uint8_t* has_valid = block_has_valid.data() + b * C;
      s.cands.clear();
      const int64_t c_end = p.causal ? own : C;
      for (int64_t c = 0; c < c_end; ++c)
        if (has_valid[c] && c != own) s.cands.push_back(static_cast<int32_t>(c));
      if (s.cands.empty()) continue;
      s.tokens.clear();
      for (int32_t c : s.cands) {
        // chunk t covers [t*S, (t+1)*S), inside block c for t in [c*bs/S, (c+1)*bs/S)
        const int64_t t_end = std::min<int64_t>(NT, (c + 1) * chunks_per_block);
        for (int64_t t = c * chunks_per_block; t < t_end; ++t)
          if (p.valid_cmp(b, t)) s.tokens.push_back(static_cast<int32_t>(t));
      }
      const int64_t n_tok = static_cast<int64_t>(s.tokens.size());

      for (int64_t g = 0; g < Hk; ++g) {
        for (int64_t hh = 0; hh < G; ++hh) {
          const T* qh = p.q.at(b, i, g * G + hh);
          for (int64_t d = 0; d < D; ++d) s.q[hh * D + d] = static_cast<Acc>(qh[d]) * scale;
        }
        // logits[hh, k] = scale * q_h . k_cmp[tokens[k]]; each key row read once per group
        for (int64_t k = 0; k < n_tok; ++k) {
          const T* kc = p.k_cmp.at(b, s.tokens[k], g);
          for (int64_t hh = 0; hh < G; ++hh) s.logits[hh * n_tok + k] = dot(&s.q[hh * D], kc, D);
        }
        std::fill(s.importance.begin(), s.importance.end(), Acc(0));
        for (int64_t hh = 0; hh < G; ++hh) {
          Acc* lg = &s.logits[hh * n_tok];
          Acc mx = -std::numeric_limits<Acc>::infinity();
          for (int64_t k = 0; k < n_tok; ++k) mx = std::max(mx, lg[k]);
          Acc sum = 0;
          for (int64_t k = 0; k < n_tok; ++k) {
            lg[k] = std::exp(lg[k] - mx);
            sum += lg[k];
          }
          const Acc inv = sum > 0 ? Acc(1) / sum : Acc(0);
          for (int64_t k = 0; k < n_tok; ++k)
            s.importance[s.tokens[k] / chunks_per_block] += lg[k] * inv;
        }

        // top-n by (importance desc, block asc): partial selection, then ascending order.
        // NaN (only from NaN inputs) ranks last so the order stays a strict weak order.
        const Acc* imp = s.importance.data();
        auto key = [imp](int32_t c) {
          const Acc v = imp[c];
          return std::isnan(v) ? -std::numeric_limits<Acc>::infinity() : v;
        };
        auto better = [&key](int32_t a, int32_t c) {
          const Acc ka = key(a), kc = key(c);
          return ka > kc || (ka == kc && a < c);
        };
        int32_t* out = out_row + g * top_n;
        const int64_t n_cand = static_cast<int64_t>(s.cands.size());
        const int64_t n = std::min(top_n, n_cand);
        const std::vector<int32_t>& cands = s.cands;
        std::vector<int32_t>& chosen = s.chosen;
        if (n < n_cand) {
          // work on a copy: cands is shared by the other kv heads of this row
          chosen.assign(cands.begin(), cands.end());
          std::nth_element(chosen.begin(), chosen.begin() + (n - 1), chosen.end(), better);
          chosen.resize(n);
          std::sort(chosen.begin(), chosen.end());
          std::copy(chosen.begin(), chosen.end(), out);
        } else {
          std::copy(cands.begin(), cands.end(), out);  // already ascending
        }
      }
    }
  });
}

template void select_blocks_fwd<float>(const SelectParams<float>&);
template void select_blocks_fwd<double>(const SelectParams<double>&);
template void select_blocks_fwd<c10::BFloat16>(const SelectParams<c10::BFloat16>&);

}  // namespace cpu
}  // namespace blossom
