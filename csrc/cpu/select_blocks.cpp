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

// x[t] += bias[t] (0, or -inf for a token that is not scored) for t < n; returns the max.
// One pass, and a plain add that vectorises (a per-token select on a byte mask did not).
template <typename Acc>
inline Acc add_bias_max(Acc* x, const Acc* bias, int64_t n) {
  for (int64_t t = 0; t < n; ++t) x[t] += bias[t];
  return max_of(x, n);
}

#ifdef BLOSSOM_SELECT_AVX2
template <>
inline float add_bias_max<float>(float* x, const float* bias, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 v = _mm256_add_ps(_mm256_loadu_ps(x + t), _mm256_loadu_ps(bias + t));
    _mm256_storeu_ps(x + t, v);
    m = _mm256_max_ps(v, m);  // a NaN v keeps m, as max_of does
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, m);
  float mx = lanes[0];
  for (int l = 1; l < 8; ++l) mx = mx < lanes[l] ? lanes[l] : mx;
  for (; t < n; ++t) {
    x[t] += bias[t];
    mx = mx < x[t] ? x[t] : mx;
  }
  return mx;
}
#endif

// Logits of a panel of mr (<= 4) query rows against the tokens [0, n) of one kv head:
// out[r * ldo + t] = sum_d qs[r * D + d] * kt[d * ldk + t]. kt is k_cmp transposed and
// zero-padded to a multiple of 16 tokens, so the panel may run past n (up to ldk).
template <typename Acc>
void panel_logits(const Acc* qs, int64_t mr, const Acc* kt, int64_t ldk, int64_t D, int64_t n,
                  Acc* out, int64_t ldo) {
  for (int64_t r = 0; r < mr; ++r) {
    Acc* o = out + r * ldo;
    std::fill(o, o + n, Acc(0));
    for (int64_t d = 0; d < D; ++d) {
      const Acc qd = qs[r * D + d];
      const Acc* kd = kt + d * ldk;
      for (int64_t t = 0; t < n; ++t) o[t] += qd * kd[t];
    }
  }
}

#ifdef BLOSSOM_SELECT_AVX2
// The float path as a register-blocked micro-kernel: MR rows x 16 tokens of accumulators,
// each k vector loaded once per d for all MR rows (the plain loop above reloads and
// re-stores the logit row once per d, which bounds it by L1 traffic, not by FMAs).
template <int MR>
void panel_logits_avx2(const float* qs, const float* kt, int64_t ldk, int64_t D, int64_t n,
                       float* out, int64_t ldo) {
  for (int64_t t = 0; t < n; t += 16) {
    __m256 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const __m256 k0 = _mm256_loadu_ps(kt + d * ldk + t);
      const __m256 k1 = _mm256_loadu_ps(kt + d * ldk + t + 8);
      for (int r = 0; r < MR; ++r) {
        const __m256 qb = _mm256_broadcast_ss(qs + r * D + d);
        acc[r][0] = _mm256_fmadd_ps(qb, k0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(qb, k1, acc[r][1]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      _mm256_storeu_ps(out + r * ldo + t, acc[r][0]);
      _mm256_storeu_ps(out + r * ldo + t + 8, acc[r][1]);
    }
  }
}

template <>
void panel_logits<float>(const float* qs, int64_t mr, const float* kt, int64_t ldk, int64_t D,
                         int64_t n, float* out, int64_t ldo) {
  switch (mr) {
    case 4: return panel_logits_avx2<4>(qs, kt, ldk, D, n, out, ldo);
    case 3: return panel_logits_avx2<3>(qs, kt, ldk, D, n, out, ldo);
    case 2: return panel_logits_avx2<2>(qs, kt, ldk, D, n, out, ldo);
    default: return panel_logits_avx2<1>(qs, kt, ldk, D, n, out, ldo);
  }
}
#endif

// The top_n best of cands (ascending block indices) by (importance desc, block asc), written
// ascending to out. NaN (only from NaN inputs) ranks last so the order stays a strict weak
// order. Small top_n: one insertion pass; large: nth_element on a copy.
template <typename Acc>
void top_n_blocks(const Acc* imp, const std::vector<int32_t>& cands, int64_t top_n,
                  std::vector<int32_t>& work, int32_t* out) {
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  auto key = [imp, ninf](int32_t c) {
    const Acc v = imp[c];
    return std::isnan(v) ? ninf : v;
  };
  auto better = [&key](int32_t a, int32_t c) {
    const Acc ka = key(a), kc = key(c);
    return ka > kc || (ka == kc && a < c);
  };
  const int64_t n_cand = static_cast<int64_t>(cands.size());
  if (top_n >= n_cand) {
    std::copy(cands.begin(), cands.end(), out);  // already ascending
    return;
  }
  work.clear();
  if (top_n <= 16) {
    // work holds the best so far, best first; a later candidate with an equal key has a
    // higher index, so it never displaces an earlier one (ties to the lower block).
    // thr: key of the worst kept block once top_n are kept. Most candidates fail the one
    // compare against it (a NaN importance fails it too, as its key is -inf).
    // Candidates go in runs of 8 with one branch per run ("does any beat thr?"), which is
    // mostly false once top_n are kept: a per-candidate branch mispredicts on random data.
    Acc thr = ninf;
    auto offer = [&](int32_t c) {
      const int64_t k = static_cast<int64_t>(work.size());
      if (k == top_n && !(imp[c] > thr)) return;
      int64_t j = std::min<int64_t>(k, top_n - 1);
      if (k < top_n) work.push_back(c);
      for (; j > 0 && better(c, work[j - 1]); --j) work[j] = work[j - 1];
      work[j] = c;
      thr = static_cast<int64_t>(work.size()) == top_n ? key(work.back()) : ninf;
    };
    int64_t k = 0;
    for (; k < std::min(top_n, n_cand); ++k) offer(cands[k]);
    for (; k + 8 <= n_cand; k += 8) {
      const int32_t* cs = cands.data() + k;
      bool any = false;
      for (int l = 0; l < 8; ++l) any |= imp[cs[l]] > thr;
      if (any)
        for (int l = 0; l < 8; ++l) offer(cs[l]);
    }
    for (; k < n_cand; ++k) offer(cands[k]);
  } else {
    work.assign(cands.begin(), cands.end());
    std::nth_element(work.begin(), work.begin() + (top_n - 1), work.end(), better);
    work.resize(top_n);
  }
  std::sort(work.begin(), work.end());
  std::copy(work.begin(), work.end(), out);
}

// Scratch reused by every tile a thread handles.
template <typename Acc>
struct TileScratch {
  std::vector<Acc> qs;          // [bs * G, D]: the tile's scaled query rows of one kv head
  std::vector<Acc> logits;      // [4, ldk]: one panel's logits, then probabilities
  std::vector<Acc> mass;        // [bs, ldk]: probabilities summed over the head group
  std::vector<Acc> importance;  // [C]
  std::vector<int32_t> queries; // valid query positions of the tile
  std::vector<int32_t> cands;   // candidate blocks of the tile, ascending
  std::vector<int32_t> work;    // partial selection
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
  const int64_t ldk = (NT + 15) / 16 * 16;  // token rows padded for the 16-wide panels
  const Acc scale = static_cast<Acc>(p.shape.scale);
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  constexpr int64_t MR = 4;  // query rows per logits panel

  // Per batch row, shared by all its queries:
  //   has_valid[b, c]  block c holds a valid key (a candidate condition);
  //   bias[b, t]       0 when token t is valid and its chunk's block has a valid key
  //                    (it is scored), else -inf;
  //   kt[b, g, d, t]   k_cmp transposed (0 past NT), so logits over a run of tokens are
  //                    vertical multiply-adds (no horizontal reductions).
  std::vector<uint8_t> has_valid(B * C, 0);
  std::vector<Acc> bias(B * NT, Acc(0));
  std::vector<Acc> kt(B * Hk * D * ldk, Acc(0));
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, Hk * D * NT)),
                   [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t j = 0; j < L; ++j)
        if (p.valid(b, j)) has_valid[b * C + j / bs] = 1;
      for (int64_t t = 0; t < NT; ++t)
        bias[b * NT + t] = p.valid_cmp(b, t) && has_valid[b * C + t / cpb] ? Acc(0) : ninf;
      for (int64_t g = 0; g < Hk; ++g)
        for (int64_t t = 0; t < NT; ++t) {
          // an unscored token's column stays 0 (its k_cmp may hold anything, NaN included),
          // so its logit is exactly 0 + bias = -inf
          if (bias[b * NT + t] != Acc(0)) continue;
          const T* k = p.k_cmp.at(b, t, g);
          Acc* dst = kt.data() + ((b * Hk + g) * D) * ldk + t;
          for (int64_t d = 0; d < D; ++d) dst[d * ldk] = static_cast<Acc>(k[d]);
        }
    }
  });

  // One task per (batch row, selection block): in either mode every query of a block has
  // the same candidates and the same scored token range, so its bs x G query rows are
  // scored together against one token run, a small GEMM.
  const int64_t tile_work = std::max<int64_t>(1, bs * Hk * G * (D + 8) * std::max<int64_t>(1, NT / 2));
  const int64_t grain = std::max<int64_t>(1, 65536 / tile_work);
  at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
    TileScratch<Acc> s;
    s.qs.resize(bs * G * D);
    s.logits.resize(MR * ldk);
    s.mass.resize(bs * ldk);
    s.importance.resize(C);
    s.queries.reserve(bs);
    s.cands.reserve(C);
    s.work.reserve(std::min(top_n, C) + 1);
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / C, own = bc % C;
      const int64_t i0 = own * bs, i1 = std::min(L, i0 + bs);
      std::fill(p.out + (b * L + i0) * Hk * top_n, p.out + (b * L + i1) * Hk * top_n,
                int32_t(-1));
      s.queries.clear();  // a padded query selects nothing
      for (int64_t i = i0; i < i1; ++i)
        if (p.valid(b, i)) s.queries.push_back(static_cast<int32_t>(i));
      if (s.queries.empty()) continue;
      const uint8_t* hv = has_valid.data() + b * C;
      s.cands.clear();
      const int64_t c_end = p.causal ? own : C;
      for (int64_t c = 0; c < c_end; ++c)
        if (hv[c] && c != own) s.cands.push_back(static_cast<int32_t>(c));
      if (s.cands.empty()) continue;
      // Score the token run [0, n_tok): causal candidates are all before the own block.
      // Tokens that are not scorable (or in the own block) get logit -inf, i.e. p = 0.
      const int64_t n_tok = p.causal ? std::min(NT, own * cpb) : NT;
      const Acc* bt = bias.data() + b * NT;
      const int64_t own_t0 = std::min(NT, own * cpb), own_t1 = std::min(NT, (own + 1) * cpb);
      const int64_t nq = static_cast<int64_t>(s.queries.size()), rows = nq * G;

      for (int64_t g = 0; g < Hk; ++g) {
        const Acc* ktg = kt.data() + ((b * Hk + g) * D) * ldk;
        // row r = query r / G, head g * G + r % G: a query's heads are consecutive rows
        for (int64_t qi = 0; qi < nq; ++qi)
          for (int64_t hh = 0; hh < G; ++hh) {
            const T* qh = p.q.at(b, s.queries[qi], g * G + hh);
            Acc* dst = s.qs.data() + (qi * G + hh) * D;
            for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<Acc>(qh[d]) * scale;
          }
        for (int64_t qi = 0; qi < nq; ++qi)
          std::fill(s.mass.begin() + qi * ldk, s.mass.begin() + qi * ldk + n_tok, Acc(0));
        for (int64_t r0 = 0; r0 < rows; r0 += MR) {
          const int64_t mr = std::min(MR, rows - r0);
          panel_logits<Acc>(s.qs.data() + r0 * D, mr, ktg, ldk, D, n_tok, s.logits.data(), ldk);
          for (int64_t r = 0; r < mr; ++r) {
            Acc* lg = s.logits.data() + r * ldk;
            if (!p.causal)
              for (int64_t t = own_t0; t < own_t1; ++t) lg[t] = ninf;
            const Acc mx = add_bias_max(lg, bt, n_tok);
            if (!(mx > ninf)) continue;  // nothing scorable for this head
            const Acc sum = exp_shift_sum(lg, n_tok, mx);
            const Acc inv = Acc(1) / sum;
            Acc* m = s.mass.data() + ((r0 + r) / G) * ldk;
            for (int64_t t = 0; t < n_tok; ++t) m[t] += lg[t] * inv;
          }
        }
        for (int64_t qi = 0; qi < nq; ++qi) {
          const Acc* m = s.mass.data() + qi * ldk;
          // block c sums its chunks [c * cpb, (c + 1) * cpb) in token order (no per-token
          // division: an integer divide per token cost as much as the whole softmax)
          Acc* imp = s.importance.data();
          if (cpb == 1) {
            std::copy(m, m + n_tok, imp);
          } else {
            for (int64_t c = 0, t = 0; t < n_tok; ++c) {
              Acc acc = 0;
              for (const int64_t te = std::min(n_tok, t + cpb); t < te; ++t) acc += m[t];
              imp[c] = acc;
            }
          }
          top_n_blocks(s.importance.data(), s.cands, top_n, s.work,
                       p.out + ((b * L + s.queries[qi]) * Hk + g) * top_n);
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
