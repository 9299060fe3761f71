#include "cpu/select_blocks.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BLOSSOM_SELECT_AVX2 1
#endif

namespace blossom {
namespace cpu {
namespace {

template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

#ifdef BLOSSOM_SELECT_AVX2
// exp(x) for x <= 0 (the logits minus their max), 8 lanes; relative error ~1e-8 on the
// reduced range, and exactly 0 below -87.3 (so masked -inf tokens weigh nothing). The
// scoring softmax is evaluated once per (query, head, token): a libm call per element
// costs more than all the dot products.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 split in two
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);  // Taylor series to r^7, |r| <= ln2 / 2
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

// x[k] = exp(x[k] - mx) for k < n; returns the sum.
inline float exp_shift_sum(float* x, int64_t n, float mx) {
  int64_t k = 0;
  float sum = 0.f;
#ifdef BLOSSOM_SELECT_AVX2
  __m256 acc = _mm256_setzero_ps();
  const __m256 m = _mm256_set1_ps(mx);
  for (; k + 8 <= n; k += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + k), m));
    _mm256_storeu_ps(x + k, e);
    acc = _mm256_add_ps(acc, e);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  for (float l : lanes) sum += l;
#endif
  for (; k < n; ++k) {
    x[k] = std::exp(x[k] - mx);
    sum += x[k];
  }
  return sum;
}

inline double exp_shift_sum(double* x, int64_t n, double mx) {
  double sum = 0;
  for (int64_t k = 0; k < n; ++k) {
    x[k] = std::exp(x[k] - mx);
    sum += x[k];
  }
  return sum;
}

// Max with eight running lanes (one vector register) rather than one serial chain.
template <typename Acc>
inline Acc max_of(const Acc* x, int64_t n) {
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  Acc part[8] = {ninf, ninf, ninf, ninf, ninf, ninf, ninf, ninf};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int l = 0; l < 8; ++l) part[l] = part[l] < x[k + l] ? x[k + l] : part[l];
  Acc m = ninf;
  for (; k < n; ++k) m = m < x[k] ? x[k] : m;
  for (Acc p : part) m = m < p ? p : m;
  return m;
}

// Scratch reused by every query row a thread handles.
template <typename Acc>
struct RowScratch {
  std::vector<Acc> q;           // [D]: one scaled query row in Acc
  std::vector<Acc> logits;      // [n_tok]: one head's logits, then probabilities
  std::vector<Acc> mass;        // [n_tok]: probabilities summed over the head group
  std::vector<Acc> importance;  // [C]
  std::vector<int32_t> cands;   // candidate blocks of this row, ascending
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
  const int64_t cpb = bs / S;  // stride chunks per block; chunk t lies in block t / cpb
  const Acc scale = static_cast<Acc>(p.shape.scale);
  const Acc ninf = -std::numeric_limits<Acc>::infinity();

  // Per batch row, shared by all its queries:
  //   has_valid[b, c]  block c holds a valid key (a candidate condition);
  //   scorable[b, t]   token t is valid and its chunk's block has a valid key;
  //   kt[b, g, d, t]   k_cmp transposed, so one query's logits over a run of tokens are
  //                    D vertical multiply-adds (no horizontal reductions).
  std::vector<uint8_t> has_valid(B * C, 0);
  std::vector<uint8_t> scorable(B * NT, 0);
  std::vector<Acc> kt(B * Hk * D * NT);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t j = 0; j < L; ++j)
        if (p.valid(b, j)) has_valid[b * C + j / bs] = 1;
      for (int64_t t = 0; t < NT; ++t)
        scorable[b * NT + t] = p.valid_cmp(b, t) && has_valid[b * C + t / cpb];
      for (int64_t g = 0; g < Hk; ++g)
        for (int64_t t = 0; t < NT; ++t) {
          const T* k = p.k_cmp.at(b, t, g);
          Acc* dst = kt.data() + ((b * Hk + g) * D) * NT + t;
          for (int64_t d = 0; d < D; ++d) dst[d * NT] = static_cast<Acc>(k[d]);
        }
    }
  });

  const int64_t row_work = std::max<int64_t>(1, NT * G * D * Hk);
  const int64_t grain = std::max<int64_t>(1, 16384 / row_work);
  at::parallel_for(0, B * L, grain, [&](int64_t begin, int64_t end) {
    RowScratch<Acc> s;
    s.q.resize(D);
    s.logits.resize(NT);
    s.mass.resize(NT);
    s.importance.resize(C);
    s.cands.reserve(C);
    s.chosen.reserve(C);
    for (int64_t bi = begin; bi < end; ++bi) {
      const int64_t b = bi / L, i = bi % L;
      int32_t* out_row = p.out + bi * Hk * top_n;
      std::fill(out_row, out_row + Hk * top_n, int32_t(-1));
      if (!p.valid(b, i)) continue;  // a padded query selects nothing

      // Candidates depend on (b, own block) only, so they are shared by all heads.
      const int64_t own = i / bs;
      const uint8_t* hv = has_valid.data() + b * C;
      s.cands.clear();
      const int64_t c_end = p.causal ? own : C;
      for (int64_t c = 0; c < c_end; ++c)
        if (hv[c] && c != own) s.cands.push_back(static_cast<int32_t>(c));
      if (s.cands.empty()) continue;
      // Score the token run [0, n_tok): causal candidates are all before the own block.
      // Tokens that are not scorable (or in the own block) get logit -inf, i.e. p = 0.
      const int64_t n_tok = p.causal ? std::min(NT, own * cpb) : NT;
      const uint8_t* sc = scorable.data() + b * NT;
      const int64_t own_t0 = own * cpb, own_t1 = std::min(NT, (own + 1) * cpb);

      for (int64_t g = 0; g < Hk; ++g) {
        const Acc* ktg = kt.data() + ((b * Hk + g) * D) * NT;
        std::fill(s.mass.begin(), s.mass.begin() + n_tok, Acc(0));
        for (int64_t hh = 0; hh < G; ++hh) {
          const T* qh = p.q.at(b, i, g * G + hh);
          for (int64_t d = 0; d < D; ++d) s.q[d] = static_cast<Acc>(qh[d]) * scale;
          Acc* lg = s.logits.data();
          std::fill(lg, lg + n_tok, Acc(0));
          for (int64_t d = 0; d < D; ++d) {
            const Acc qd = s.q[d];
            const Acc* kd = ktg + d * NT;
            for (int64_t t = 0; t < n_tok; ++t) lg[t] += qd * kd[t];
          }
          for (int64_t t = 0; t < n_tok; ++t) lg[t] = sc[t] ? lg[t] : ninf;
          if (!p.causal)
            for (int64_t t = own_t0; t < own_t1; ++t) lg[t] = ninf;
          const Acc mx = max_of(lg, n_tok);
          if (!(mx > ninf)) continue;  // nothing scorable for this head
          const Acc sum = exp_shift_sum(lg, n_tok, mx);
          const Acc inv = Acc(1) / sum;
          for (int64_t t = 0; t < n_tok; ++t) s.mass[t] += lg[t] * inv;
        }
        std::fill(s.importance.begin(), s.importance.end(), Acc(0));
        for (int64_t t = 0; t < n_tok; ++t) s.importance[t / cpb] += s.mass[t];

        // top-n by (importance desc, block asc): partial selection, then ascending order.
        // NaN (only from NaN inputs) ranks last so the order stays a strict weak order.
        const Acc* imp = s.importance.data();
        auto key = [imp, ninf](int32_t c) {
          const Acc v = imp[c];
          return std::isnan(v) ? ninf : v;
        };
        auto better = [&key](int32_t a, int32_t c) {
          const Acc ka = key(a), kc = key(c);
          return ka > kc || (ka == kc && a < c);
        };
        int32_t* out = out_row + g * top_n;
        const int64_t n_cand = static_cast<int64_t>(s.cands.size());
        if (top_n >= n_cand) {
          std::copy(s.cands.begin(), s.cands.end(), out);  // already ascending
          continue;
        }
        // a copy: cands is shared by the other kv heads of this row
        s.chosen.assign(s.cands.begin(), s.cands.end());
        std::nth_element(s.chosen.begin(), s.chosen.begin() + (top_n - 1), s.chosen.end(),
                         better);
        std::sort(s.chosen.begin(), s.chosen.begin() + top_n);
        std::copy(s.chosen.begin(), s.chosen.begin() + top_n, out);
      }
    }
  });
}

template void select_blocks_fwd<float>(const SelectParams<float>&);
template void select_blocks_fwd<double>(const SelectParams<double>&);
template void select_blocks_fwd<c10::BFloat16>(const SelectParams<c10::BFloat16>&);

}  // namespace cpu
}  // namespace blossom
