// Shared CPU row kernels of the three sparse attention operators (sliding window, block
// sparse, compressed). Each operator only says which keys a query may see, as a sorted
// list of disjoint [begin, end) ranges; everything else (validity filtering, exact
// softmax, the weighted sum, the backward) lives here once.
//
// Work split:
//   forward  - one unit = (batch b, query i, kv head g); the G query heads of the group
//              are processed together so every key/value row is loaded once for G heads.
//   backward - one unit = (batch b, kv head g), looping over every query i in order, so
//              dK/dV of that (b, g) have a single writer: no atomics, deterministic.
// Extra memory: per thread O(keys per row * G) scores, plus O(Lk * D) dK/dV accumulators
// per backward unit. No L x L tensor is ever built.
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/params.h"

namespace blossom {
namespace cpu {

// Keys [begin, end) a query may see (before the key-validity filter).
struct KeyRange {
  int64_t begin;
  int64_t end;
};
using RangeList = std::vector<KeyRange>;

namespace detail {

// exp that GCC vectorises inside `omp simd` loops (std::exp is a scalar libm call). Float
// only: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial for e^r
// (relative error ~2 ulp), 2^n built in the exponent bits. Arguments here are always
// <= 0 (score minus row max, or minus lse); they are clamped at -86 so 2^n stays a
// normal number (e^-86 ~ 4e-38 is zero for every purpose here).
inline float exp_nonpos(float x) {
  x = std::max(x, -86.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = std::fma(n, -0.693359375f, x);  // ln2 split in two for an exact first step
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3333337670e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p * r, r, r) + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) * (1 << 23);  // p * 2^n, p in [0.7, 1.5]
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
inline double exp_nonpos(double x) { return std::exp(x); }

template <typename Acc>
constexpr Acc neg_inf() {
  return -std::numeric_limits<Acc>::infinity();
}

// n is a compile-time constant for the specialised head dims (kD > 0), D otherwise.
template <int kD>
inline int64_t dim(int64_t D) {
  return kD > 0 ? kD : D;
}

template <int kD, typename Acc>
inline Acc dot(const Acc* __restrict a, const Acc* __restrict b, int64_t D) {
  const int64_t n = dim<kD>(D);
  Acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

// y += a * x
template <int kD, typename Acc>
inline void axpy(Acc a, const Acc* __restrict x, Acc* __restrict y, int64_t D) {
  const int64_t n = dim<kD>(D);
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
}

// A row of storage type T seen as Acc: the row itself when T == Acc, else converted into
// buf (bfloat16 -> float).
template <int kD, typename T, typename Acc>
inline const Acc* as_acc(const T* row, Acc* buf, int64_t D) {
  if constexpr (std::is_same<T, Acc>::value) {
    (void)buf;
    (void)D;
    return row;
  } else {
    const int64_t n = dim<kD>(D);
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) buf[d] = static_cast<Acc>(row[d]);
    return buf;
  }
}

template <int kD, typename T, typename Acc>
inline void store(const Acc* src, Acc mul, T* dst, int64_t D) {
  const int64_t n = dim<kD>(D);
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<T>(src[d] * mul);
}

template <typename T>
inline void zero_row(T* dst, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = T(0);
}

// Expands sorted disjoint ranges into the key indices, dropping padded keys.
inline void expand_keys(const RangeList& ranges, const Validity& key_valid, int64_t b,
                        std::vector<int64_t>& keys) {
  keys.clear();
  for (const KeyRange& r : ranges)
    for (int64_t j = r.begin; j < r.end; ++j)
      if (key_valid(b, j)) keys.push_back(j);
}

// ---------------------------------------------------------------------------- forward
template <int kD, typename T, typename Acc, typename RangesOf>
void attention_fwd_impl(const AttnFwdParams<T, Acc>& p, const Validity& key_valid,
                        const RangesOf& ranges_of) {
  const AttnShape& s = p.shape;
  const int64_t L = s.q_len, Hq = s.q_heads, Hk = s.kv_heads, D = s.head_dim, G = s.group();
  const Acc scale = static_cast<Acc>(s.scale);
  const int64_t units = s.batch * L * Hk;
  // ~ a few hundred key rows of work per unit: small grains balance uneven rows.
  at::parallel_for(0, units, 16, [&](int64_t lo, int64_t hi) {
    RangeList ranges;
    std::vector<int64_t> keys;
    std::vector<Acc> qa(G * D), acc(G * D), kbuf(D), scores, row_max(G), row_sum(G);
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t g = u % Hk, i = (u / Hk) % L, b = u / (Hk * L);
      keys.clear();
      if (p.valid(b, i)) {
        ranges.clear();
        ranges_of(b, i, g, ranges);
        expand_keys(ranges, key_valid, b, keys);
      }
      const int64_t n = static_cast<int64_t>(keys.size());
      Acc* lse = p.lse + (b * L + i) * Hq + g * G;
      if (n == 0) {  // no allowed key: out = 0, lse = -inf
        for (int64_t h = 0; h < G; ++h) {
          zero_row(p.out.at(b, i, g * G + h), D);
          lse[h] = neg_inf<Acc>();
        }
        continue;
      }
      for (int64_t h = 0; h < G; ++h) {
        const T* qr = p.q.at(b, i, g * G + h);
        for (int64_t d = 0; d < D; ++d) qa[h * D + d] = static_cast<Acc>(qr[d]) * scale;
      }
      scores.resize(G * n);
      for (int64_t t = 0; t < n; ++t) {
        const Acc* kr = as_acc<kD>(p.k.at(b, keys[t], g), kbuf.data(), D);
        for (int64_t h = 0; h < G; ++h) scores[h * n + t] = dot<kD>(qa.data() + h * D, kr, D);
      }
      for (int64_t h = 0; h < G; ++h) {
        Acc* sh = scores.data() + h * n;
        Acc m = sh[0];
        for (int64_t t = 1; t < n; ++t) m = std::max(m, sh[t]);
        Acc sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; ++t) {
          sh[t] = exp_nonpos(sh[t] - m);
          sum += sh[t];
        }
        row_max[h] = m;
        row_sum[h] = sum;
      }
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (int64_t t = 0; t < n; ++t) {
        const Acc* vr = as_acc<kD>(p.v.at(b, keys[t], g), kbuf.data(), D);
        for (int64_t h = 0; h < G; ++h) axpy<kD>(scores[h * n + t], vr, acc.data() + h * D, D);
      }
      for (int64_t h = 0; h < G; ++h) {
        store<kD>(acc.data() + h * D, Acc(1) / row_sum[h], p.out.at(b, i, g * G + h), D);
        lse[h] = row_max[h] + std::log(row_sum[h]);
      }
    }
  });
}

// ---------------------------------------------------------------------------- backward
template <int kD, typename T, typename Acc, typename RangesOf>
void attention_bwd_impl(const AttnBwdParams<T, Acc>& p, const Validity& key_valid,
                        const RangesOf& ranges_of) {
  const AttnShape& s = p.shape;
  const int64_t L = s.q_len, Lk = s.kv_len, Hq = s.q_heads, Hk = s.kv_heads, D = s.head_dim,
                G = s.group();
  const Acc scale = static_cast<Acc>(s.scale);
  at::parallel_for(0, s.batch * Hk, 1, [&](int64_t lo, int64_t hi) {
    RangeList ranges;
    std::vector<int64_t> keys;
    std::vector<Acc> qa(G * D), doa(G * D), dq(G * D), kbuf(D), vbuf(D), obuf(D), delta(G),
        lse(G), dk(Lk * D), dv(Lk * D), probs, dsc;
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t g = u % Hk, b = u / Hk;
      std::fill(dk.begin(), dk.end(), Acc(0));
      std::fill(dv.begin(), dv.end(), Acc(0));
      for (int64_t i = 0; i < L; ++i) {
        keys.clear();
        if (p.valid(b, i)) {
          ranges.clear();
          ranges_of(b, i, g, ranges);
          expand_keys(ranges, key_valid, b, keys);
        }
        const int64_t n = static_cast<int64_t>(keys.size());
        if (n == 0) {  // the row saw nothing: it contributes no gradient anywhere
          for (int64_t h = 0; h < G; ++h) zero_row(p.grad_q.at(b, i, g * G + h), D);
          continue;
        }
        const int64_t row = (b * L + i) * Hq + g * G;
        for (int64_t h = 0; h < G; ++h) {
          const int64_t hq = g * G + h;
          const T* qr = p.q.at(b, i, hq);
          const T* dr = p.grad_out.at(b, i, hq);
          for (int64_t d = 0; d < D; ++d) {
            qa[h * D + d] = static_cast<Acc>(qr[d]);
            doa[h * D + d] = static_cast<Acc>(dr[d]);
          }
          const Acc* orow = as_acc<kD>(p.out.at(b, i, hq), obuf.data(), D);
          // delta = dO . O - dlse: the softmax Jacobian's row term, lse's gradient folded in
          delta[h] = dot<kD>(doa.data() + h * D, orow, D) -
                     (p.grad_lse ? p.grad_lse[row + h] : Acc(0));
          lse[h] = p.lse[row + h];
        }
        // Pass 1: scores and dP = dO . v for every key (each k/v row loaded once for G
        // heads). Pass 2: P and dS over contiguous arrays, so the exp vectorises. Pass 3:
        // the three rank-1 updates.
        probs.resize(G * n);
        dsc.resize(G * n);
        for (int64_t t = 0; t < n; ++t) {
          const Acc* kr = as_acc<kD>(p.k.at(b, keys[t], g), kbuf.data(), D);
          const Acc* vr = as_acc<kD>(p.v.at(b, keys[t], g), vbuf.data(), D);
          for (int64_t h = 0; h < G; ++h) {
            probs[h * n + t] = dot<kD>(qa.data() + h * D, kr, D);
            dsc[h * n + t] = dot<kD>(doa.data() + h * D, vr, D);
          }
        }
        for (int64_t h = 0; h < G; ++h) {
          Acc* ph = probs.data() + h * n;
          Acc* dh = dsc.data() + h * n;
          const Acc lse_h = lse[h], delta_h = delta[h];
#pragma omp simd
          for (int64_t t = 0; t < n; ++t) {
            ph[t] = exp_nonpos(scale * ph[t] - lse_h);
            dh[t] = ph[t] * (dh[t] - delta_h);
          }
        }
        std::fill(dq.begin(), dq.end(), Acc(0));
        for (int64_t t = 0; t < n; ++t) {
          const int64_t j = keys[t];
          const Acc* kr = as_acc<kD>(p.k.at(b, j, g), kbuf.data(), D);
          Acc* dkj = dk.data() + j * D;
          Acc* dvj = dv.data() + j * D;
          for (int64_t h = 0; h < G; ++h) {
            const Acc ds = dsc[h * n + t];
            axpy<kD>(ds, kr, dq.data() + h * D, D);
            axpy<kD>(scale * ds, qa.data() + h * D, dkj, D);
            axpy<kD>(probs[h * n + t], doa.data() + h * D, dvj, D);
          }
        }
        for (int64_t h = 0; h < G; ++h)
          store<kD>(dq.data() + h * D, scale, p.grad_q.at(b, i, g * G + h), D);
      }
      for (int64_t j = 0; j < Lk; ++j) {
        store<kD>(dk.data() + j * D, Acc(1), p.grad_k.at(b, j, g), D);
        store<kD>(dv.data() + j * D, Acc(1), p.grad_v.at(b, j, g), D);
      }
    }
  });
}

}  // namespace detail

// Entry points: pick a compile-time head dim for the common sizes. ranges_of(b, i, g,
// ranges) appends the sorted disjoint key ranges of a valid query i for kv head g;
// key_valid filters padded keys (p.valid filters padded queries).
template <typename T, typename Acc, typename RangesOf>
void attention_fwd(const AttnFwdParams<T, Acc>& p, const Validity& key_valid,
                   const RangesOf& ranges_of) {
  switch (p.shape.head_dim) {
    case 16: return detail::attention_fwd_impl<16>(p, key_valid, ranges_of);
    case 32: return detail::attention_fwd_impl<32>(p, key_valid, ranges_of);
    case 64: return detail::attention_fwd_impl<64>(p, key_valid, ranges_of);
    default: return detail::attention_fwd_impl<0>(p, key_valid, ranges_of);
  }
}

template <typename T, typename Acc, typename RangesOf>
void attention_bwd(const AttnBwdParams<T, Acc>& p, const Validity& key_valid,
                   const RangesOf& ranges_of) {
  switch (p.shape.head_dim) {
    case 16: return detail::attention_bwd_impl<16>(p, key_valid, ranges_of);
    case 32: return detail::attention_bwd_impl<32>(p, key_valid, ranges_of);
    case 64: return detail::attention_bwd_impl<64>(p, key_valid, ranges_of);
    default: return detail::attention_bwd_impl<0>(p, key_valid, ranges_of);
  }
}

}  // namespace cpu
}  // namespace blossom
