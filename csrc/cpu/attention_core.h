// Shared CPU row kernels of the three sparse attention operators (sliding window, block
// sparse, compressed). Each operator only says which keys a query may see, as a sorted
// list of disjoint [begin, end) ranges; everything else (validity filtering, exact
// softmax, the weighted sum, the backward) lives here once.
//
// Work split:
//   forward  - one unit = (batch b, kv head g, a chunk of queries); the G query heads of
//              the group are processed together so every key/value load serves G heads.
//   backward - one unit = (batch b, kv head g), looping over every query i in order, so
//              dK/dV of that (b, g) have a single writer: no atomics, deterministic.
//
// Speed: a D-long dot product per (head, key) pair ends in a horizontal reduction, which
// costs more than the multiply-adds themselves at D = 16. So each unit first stages the
// keys (and, for the backward, the values) of its (b, g) transposed, Kt[d][j]; the scores
// of a run of consecutive keys are then vertical FMAs, s[j:j+W] += q[d] * Kt[d][j:j+W],
// several query heads at once. Weighted sums over keys (P @ V, dQ, dK, dV) are vertical
// over D on row-major data. Key runs of a row are computed once per row, split at padded
// keys with a per-unit table, so inner loops have no per-key branches.
// Extra memory per unit: O(Lk * D) staged keys/values (and dK/dV accumulators in the
// backward) plus O(keys per row * G) scores. No L x L tensor is ever built.
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

// ------------------------------------------------------------------ SIMD micro-kernels
// N lanes of Acc as a GCC/Clang vector type: plain arithmetic on it compiles to AVX2 FMAs
// when the build passes -mavx2 -mfma and to narrower code (SSE, NEON, scalar) otherwise,
// so there is no intrinsic and no #ifdef. N = 1 is the plain scalar, used when D is not a
// multiple of the vector width.
template <typename Acc, int N>
struct SimdOf {
  typedef Acc type __attribute__((vector_size(N * sizeof(Acc))));
};
template <typename Acc>
struct SimdOf<Acc, 1> {
  using type = Acc;
};

template <typename V, typename Acc>
inline V vload(const Acc* p) {
  V v;
  std::memcpy(&v, p, sizeof v);  // unaligned load
  return v;
}
template <typename V, typename Acc>
inline void vstore(Acc* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}
template <int N, typename Acc, typename V>
inline Acc hsum(const V& v) {
  if constexpr (N == 1) {
    return v;
  } else {
    Acc s = v[0];
    for (int l = 1; l < N; ++l) s += v[l];
    return s;
  }
}

// Scores of NR rows against a run of n consecutive keys stored transposed:
// out[r][t] = sum_d a[r][d] * bt[d * ld + t]. Works in tiles of 2N (then N) keys and may
// write up to N - 1 entries past n (callers keep that slack; the next run overwrites it);
// it reads up to N - 1 columns past n, which the staged arrays pad.
template <int NR, int kD, int N, typename Acc>
inline void scores_tiled(const Acc* const* a, const Acc* bt, int64_t ld, int64_t n,
                         Acc* const* out, int64_t D) {
  using V = typename SimdOf<Acc, N>::type;
  const int64_t nd = dim<kD>(D);
  int64_t t = 0;
  for (; t + N < n; t += 2 * N) {
    V s0[NR], s1[NR];
    for (int r = 0; r < NR; ++r) s0[r] = s1[r] = V{};
    const Acc* col = bt + t;
    for (int64_t d = 0; d < nd; ++d, col += ld) {
      const V k0 = vload<V>(col), k1 = vload<V>(col + N);
      for (int r = 0; r < NR; ++r) {
        const Acc x = a[r][d];
        s0[r] += x * k0;
        s1[r] += x * k1;
      }
    }
    for (int r = 0; r < NR; ++r) {
      vstore(out[r] + t, s0[r]);
      vstore(out[r] + t + N, s1[r]);
    }
  }
  if (t < n) {
    V s0[NR];
    for (int r = 0; r < NR; ++r) s0[r] = V{};
    const Acc* col = bt + t;
    for (int64_t d = 0; d < nd; ++d, col += ld) {
      const V k0 = vload<V>(col);
      for (int r = 0; r < NR; ++r) s0[r] += a[r][d] * k0;
    }
    for (int r = 0; r < NR; ++r) vstore(out[r] + t, s0[r]);
  }
}

// Same scores for a few keys given as rows (b + t * ld): short runs, where a transposed
// tile would be mostly empty lanes. One horizontal sum per (row, key).
template <int NR, int kD, int N, typename Acc>
inline void scores_rows(const Acc* const* a, const Acc* b, int64_t ld, int64_t n,
                        Acc* const* out, int64_t D) {
  using V = typename SimdOf<Acc, N>::type;
  const int64_t nd = dim<kD>(D);
  for (int64_t t = 0; t < n; ++t) {
    const Acc* br = b + t * ld;
    V s[NR];
    for (int r = 0; r < NR; ++r) s[r] = V{};
    for (int64_t c = 0; c < nd; c += N) {
      const V bv = vload<V>(br + c);
      for (int r = 0; r < NR; ++r) s[r] += vload<V>(a[r] + c) * bv;
    }
    for (int r = 0; r < NR; ++r) out[r][t] = hsum<N, Acc>(s[r]);
  }
}

// out[r][c:c+NV*N] += sum_t w[r][t] * b[t * ld + c : ...]: NR * NV independent
// accumulators kept in registers over the whole run.
template <int NR, int NV, int N, typename Acc>
inline void wsum_chunk(const Acc* const* w, const Acc* b, int64_t ld, int64_t n,
                       Acc* const* out, int64_t c) {
  using V = typename SimdOf<Acc, N>::type;
  V acc[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vload<V>(out[r] + c + v * N);
  for (int64_t t = 0; t < n; ++t) {
    const Acc* br = b + t * ld + c;
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = vload<V>(br + v * N);
    for (int r = 0; r < NR; ++r) {
      const Acc x = w[r][t];
      for (int v = 0; v < NV; ++v) acc[r][v] += x * bv[v];
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) vstore(out[r] + c + v * N, acc[r][v]);
}

template <int NR, int kD, int N, typename Acc>
inline void wsum(const Acc* const* w, const Acc* b, int64_t ld, int64_t n, Acc* const* out,
                 int64_t D) {
  const int64_t nd = dim<kD>(D);
  int64_t c = 0;
  for (; c + 2 * N <= nd; c += 2 * N) wsum_chunk<NR, 2, N>(w, b, ld, n, out, c);
  if (c < nd) wsum_chunk<NR, 1, N>(w, b, ld, n, out, c);
}

// dst[t * ld + c : ...] += sum_r w[r][t] * x[r][c : ...]: the x chunk stays in registers,
// each dst row is loaded and stored once per call.
template <int NR, int NV, int N, typename Acc>
inline void ger_chunk(const Acc* const* w, const Acc* const* x, Acc* dst, int64_t ld,
                      int64_t n, int64_t c) {
  using V = typename SimdOf<Acc, N>::type;
  V xr[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) xr[r][v] = vload<V>(x[r] + c + v * N);
  for (int64_t t = 0; t < n; ++t) {
    Acc* dr = dst + t * ld + c;
    V a[NV];
    for (int v = 0; v < NV; ++v) a[v] = vload<V>(dr + v * N);
    for (int r = 0; r < NR; ++r) {
      const Acc wt = w[r][t];
      for (int v = 0; v < NV; ++v) a[v] += wt * xr[r][v];
    }
    for (int v = 0; v < NV; ++v) vstore(dr + v * N, a[v]);
  }
}

template <int NR, int kD, int N, typename Acc>
inline void ger(const Acc* const* w, const Acc* const* x, Acc* dst, int64_t ld, int64_t n,
                int64_t D) {
  const int64_t nd = dim<kD>(D);
  int64_t c = 0;
  for (; c + 2 * N <= nd; c += 2 * N) ger_chunk<NR, 2, N>(w, x, dst, ld, n, c);
  if (c < nd) ger_chunk<NR, 1, N>(w, x, dst, ld, n, c);
}

// exp_nonpos on 8 float lanes, bit-identical to the scalar one (the reduction rounds to
// nearest even through the 1.5 * 2^23 trick, as nearbyint does): the scalar loops with a
// reduction did not vectorise, and the exp was a quarter of the forward.
typedef float F8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));
inline F8 exp_nonpos(F8 x) {
  const F8 lo = F8{} - 86.0f;
  x = x < lo ? lo : x;
  const F8 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  F8 r = n * -0.693359375f + x;
  r = n * 2.12194440e-4f + r;
  F8 p = F8{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3333337670e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  I8 bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += __builtin_convertvector(n, I8) * (1 << 23);
  std::memcpy(&p, &bits, sizeof p);
  return p;
}

// s[t] = exp(s[t] - m) for t < n; returns the sum.
template <typename Acc>
inline Acc exp_shift_sum(Acc* s, int64_t n, Acc m) {
  int64_t t = 0;
  Acc sum = 0;
  if constexpr (std::is_same<Acc, float>::value) {
    F8 acc = F8{};
    for (; t + 8 <= n; t += 8) {
      const F8 e = exp_nonpos(vload<F8>(s + t) - m);
      vstore(s + t, e);
      acc += e;
    }
    sum = hsum<8, float>(acc);
  }
  for (; t < n; ++t) {
    s[t] = exp_nonpos(s[t] - m);
    sum += s[t];
  }
  return sum;
}

// p[t] = exp(p[t] - lse); ds[t] = p[t] * (ds[t] - delta) for t < n.
template <typename Acc>
inline void probs_and_dscores(Acc* p, Acc* ds, int64_t n, Acc lse, Acc delta) {
  int64_t t = 0;
  if constexpr (std::is_same<Acc, float>::value) {
    for (; t + 8 <= n; t += 8) {
      const F8 e = exp_nonpos(vload<F8>(p + t) - lse);
      vstore(p + t, e);
      vstore(ds + t, e * (vload<F8>(ds + t) - delta));
    }
  }
  for (; t < n; ++t) {
    p[t] = exp_nonpos(p[t] - lse);
    ds[t] = p[t] * (ds[t] - delta);
  }
}

template <typename Acc>
inline Acc row_maximum(const Acc* s, int64_t n) {
  Acc m = s[0];
  int64_t t = 1;
  if constexpr (std::is_same<Acc, float>::value) {
    if (n >= 8) {
      F8 mv = vload<F8>(s);
      for (t = 8; t + 8 <= n; t += 8) {
        const F8 x = vload<F8>(s + t);
        mv = mv > x ? mv : x;
      }
      m = mv[0];
      for (int l = 1; l < 8; ++l) m = std::max(m, mv[l]);
    }
  }
  for (; t < n; ++t) m = std::max(m, s[t]);
  return m;
}

// Pulls the rows of a later query towards L1 while this one computes: the per-query q /
// dO / O rows were the largest stall once the arithmetic got cheap.
template <typename T>
inline void prefetch_rows(const Bshd<const T>& x, int64_t b, int64_t i, int64_t h_first,
                          int64_t G, int64_t D) {
  const char* lo = reinterpret_cast<const char*>(x.at(b, i, h_first));
  const char* hi = reinterpret_cast<const char*>(x.at(b, i, h_first + G - 1) + D);
  for (const char* c = lo; c < hi; c += 64) __builtin_prefetch(c);
}

// Calls f.template operator()<NR>(h0) for blocks of at most 4 of the G heads: 4 rows keep
// the score and accumulator tiles inside the 16 vector registers of AVX2.
template <typename F>
inline void for_head_blocks(int64_t G, F&& f) {
  for (int64_t h0 = 0; h0 < G; h0 += 4) {
    switch (std::min<int64_t>(4, G - h0)) {
      case 4: f.template operator()<4>(h0); break;
      case 3: f.template operator()<3>(h0); break;
      case 2: f.template operator()<2>(h0); break;
      default: f.template operator()<1>(h0); break;
    }
  }
}

// ---------------------------------------------------------------- staging and key runs
// A run of consecutive valid keys of one row, and where its scores start in the row.
struct KeyRun {
  int64_t begin, count, offset;
};

// Keys [0, kend) of one (b, g): transposed (for scores) and, when T is not Acc, converted
// row-major (for the weighted sums; when T == Acc the input rows are read in place).
template <typename T, typename Acc>
struct StagedKeys {
  std::vector<Acc> t;     // [D][ld] transposed, columns >= kend zero
  std::vector<Acc> rows;  // [kend][D] converted rows (T != Acc only)
  int64_t ld = 0;
  const Acc* row_ptr = nullptr;  // row j at row_ptr + j * row_ld
  int64_t row_ld = 0;

  void stage(const Bshd<const T>& x, int64_t b, int64_t g, int64_t kend, int64_t D,
             int64_t pad, bool transposed) {
    if (transposed) {
      ld = kend + pad;
      t.resize(D * ld);
      for (int64_t d = 0; d < D; ++d)
        std::fill(t.begin() + d * ld + kend, t.begin() + (d + 1) * ld, Acc(0));
      for (int64_t j = 0; j < kend; ++j) {
        const T* xr = x.at(b, j, g);
        for (int64_t d = 0; d < D; ++d) t[d * ld + j] = static_cast<Acc>(xr[d]);
      }
    }
    if constexpr (std::is_same<T, Acc>::value) {
      row_ptr = x.at(b, 0, g);
      row_ld = x.stride_l;
    } else {
      rows.resize(kend * D);
      for (int64_t j = 0; j < kend; ++j) {
        const T* xr = x.at(b, j, g);
        for (int64_t d = 0; d < D; ++d) rows[j * D + d] = static_cast<Acc>(xr[d]);
      }
      row_ptr = rows.data();
      row_ld = D;
    }
  }
};

// run_end[j] = end of the maximal stretch of keys with the validity of key j, for keys
// [0, kend) of batch row b; empty when every key is valid.
inline void key_validity_runs(const Validity& key_valid, int64_t b, int64_t kend,
                              std::vector<int64_t>& run_end) {
  run_end.clear();
  if (key_valid.ptr == nullptr) return;
  const bool* v = key_valid.ptr + b * key_valid.stride_b;
  run_end.resize(kend);
  for (int64_t j = kend - 1; j >= 0; --j)
    run_end[j] = (j + 1 < kend && v[j + 1] == v[j]) ? run_end[j + 1] : j + 1;
}

// Splits a row's ranges (clipped to kend) into runs of valid keys; returns the key count.
inline int64_t make_runs(const RangeList& ranges, const Validity& key_valid, int64_t b,
                         const std::vector<int64_t>& run_end, int64_t kend,
                         std::vector<KeyRun>& runs) {
  runs.clear();
  int64_t n = 0;
  for (const KeyRange& r : ranges) {
    const int64_t e = std::min(r.end, kend);
    if (run_end.empty()) {
      if (r.begin < e) {
        runs.push_back({r.begin, e - r.begin, n});
        n += e - r.begin;
      }
      continue;
    }
    for (int64_t j = r.begin; j < e;) {
      const int64_t je = std::min(run_end[j], e);
      if (key_valid(b, j)) {
        runs.push_back({j, je - j, n});
        n += je - j;
      }
      j = je;
    }
  }
  return n;
}

// Scores of the heads [h0, h0 + NR) against every run of a row: a[h] (D each) times keys.
template <int NR, int kD, int N, typename T, typename Acc>
inline void row_scores(const Acc* a, int64_t h0, const StagedKeys<T, Acc>& keys,
                       const std::vector<KeyRun>& runs, Acc* scores, int64_t cap, int64_t D) {
  const Acc* ar[NR];
  Acc* out[NR];
  for (const KeyRun& run : runs) {
    for (int r = 0; r < NR; ++r) {
      ar[r] = a + (h0 + r) * D;
      out[r] = scores + (h0 + r) * cap + run.offset;
    }
    if (run.count >= N)
      scores_tiled<NR, kD, N>(ar, keys.t.data() + run.begin, keys.ld, run.count, out, D);
    else
      scores_rows<NR, kD, N>(ar, keys.row_ptr + run.begin * keys.row_ld, keys.row_ld,
                             run.count, out, D);
  }
}

// out[h] += sum over the row's keys of w[h][t] * rows[key t], heads [h0, h0 + NR).
template <int NR, int kD, int N, typename T, typename Acc>
inline void row_wsum(const Acc* w, int64_t h0, const StagedKeys<T, Acc>& keys,
                     const std::vector<KeyRun>& runs, int64_t cap, Acc* out, int64_t D) {
  const Acc* wr[NR];
  Acc* o[NR];
  for (int r = 0; r < NR; ++r) o[r] = out + (h0 + r) * D;
  for (const KeyRun& run : runs) {
    for (int r = 0; r < NR; ++r) wr[r] = w + (h0 + r) * cap + run.offset;
    wsum<NR, kD, N>(wr, keys.row_ptr + run.begin * keys.row_ld, keys.row_ld, run.count, o, D);
  }
}

template <typename T, typename Acc>
inline const Acc* load_rows(const Bshd<const T>& x, int64_t b, int64_t i, int64_t h_first,
                            int64_t G, int64_t D, Acc mul, Acc* buf) {
  for (int64_t h = 0; h < G; ++h) {
    const T* xr = x.at(b, i, h_first + h);
    for (int64_t d = 0; d < D; ++d) buf[h * D + d] = static_cast<Acc>(xr[d]) * mul;
  }
  return buf;
}

template <typename T, typename Acc>
inline void store_row(const Acc* src, Acc mul, T* dst, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d] * mul);
}

template <typename T>
inline void zero_row(T* dst, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = T(0);
}

// ---------------------------------------------------------------------------- forward
template <int kD, int N, typename T, typename Acc, typename RangesOf>
void attention_fwd_impl(const AttnFwdParams<T, Acc>& p, const Validity& key_valid,
                        const RangesOf& ranges_of) {
  const AttnShape& s = p.shape;
  const int64_t L = s.q_len, Lk = s.kv_len, Hq = s.q_heads, Hk = s.kv_heads, D = s.head_dim,
                G = s.group();
  const Acc scale = static_cast<Acc>(s.scale);
  // Enough units for the threads; each unit stages its (b, g) keys once, so no more.
  const int64_t bg = s.batch * Hk;
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t chunks = std::clamp<int64_t>((want + bg - 1) / bg, 1, std::max<int64_t>(L, 1));
  const int64_t per_chunk = (L + chunks - 1) / chunks;
  at::parallel_for(0, bg * chunks, 1, [&](int64_t lo, int64_t hi) {
    RangeList ranges;
    std::vector<KeyRun> runs;
    std::vector<int64_t> run_end;
    StagedKeys<T, Acc> keys, vals;
    std::vector<Acc> qa(G * D), acc(G * D), scores, row_max(G), row_sum(G);
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t c = u % chunks, g = (u / chunks) % Hk, b = u / (chunks * Hk);
      const int64_t i_lo = c * per_chunk, i_hi = std::min(L, i_lo + per_chunk);
      if (i_lo >= i_hi) continue;
      const int64_t kend = std::min(Lk, ranges_of.key_bound(i_hi - 1));
      keys.stage(p.k, b, g, kend, D, 2 * N, true);
      vals.stage(p.v, b, g, kend, D, 2 * N, false);
      key_validity_runs(key_valid, b, kend, run_end);
      const int64_t cap = kend + 2 * N;  // scores per head, with the tiles' slack
      scores.resize(G * cap);
      for (int64_t i = i_lo; i < i_hi; ++i) {
        int64_t n = 0;
        if (p.valid(b, i)) {
          ranges.clear();
          ranges_of(b, i, g, ranges);
          n = make_runs(ranges, key_valid, b, run_end, kend, runs);
        }
        Acc* lse = p.lse + (b * L + i) * Hq + g * G;
        if (n == 0) {  // no allowed key: out = 0, lse = -inf
          for (int64_t h = 0; h < G; ++h) {
            zero_row(p.out.at(b, i, g * G + h), D);
            lse[h] = neg_inf<Acc>();
          }
          continue;
        }
        if (i + 2 < i_hi) prefetch_rows(p.q, b, i + 2, g * G, G, D);
        load_rows(p.q, b, i, g * G, G, D, scale, qa.data());
        for_head_blocks(G, [&]<int NR>(int64_t h0) {
          row_scores<NR, kD, N>(qa.data(), h0, keys, runs, scores.data(), cap, D);
        });
        for (int64_t h = 0; h < G; ++h) {
          Acc* sh = scores.data() + h * cap;
          const Acc m = row_maximum(sh, n);
          row_max[h] = m;
          row_sum[h] = exp_shift_sum(sh, n, m);
        }
        std::fill(acc.begin(), acc.end(), Acc(0));
        for_head_blocks(G, [&]<int NR>(int64_t h0) {
          row_wsum<NR, kD, N>(scores.data(), h0, vals, runs, cap, acc.data(), D);
        });
        for (int64_t h = 0; h < G; ++h) {
          store_row(acc.data() + h * D, Acc(1) / row_sum[h], p.out.at(b, i, g * G + h), D);
          lse[h] = row_max[h] + std::log(row_sum[h]);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------- backward
template <int kD, int N, typename T, typename Acc, typename RangesOf>
void attention_bwd_impl(const AttnBwdParams<T, Acc>& p, const Validity& key_valid,
                        const RangesOf& ranges_of) {
  const AttnShape& s = p.shape;
  const int64_t L = s.q_len, Lk = s.kv_len, Hq = s.q_heads, Hk = s.kv_heads, D = s.head_dim,
                G = s.group();
  const Acc scale = static_cast<Acc>(s.scale);
  at::parallel_for(0, s.batch * Hk, 1, [&](int64_t lo, int64_t hi) {
    RangeList ranges;
    std::vector<KeyRun> runs;
    std::vector<int64_t> run_end;
    StagedKeys<T, Acc> keys, vals;
    const int64_t cap = Lk + 2 * N;
    std::vector<Acc> qa(G * D), doa(G * D), oa(G * D), dq(G * D), delta(G), lse(G),
        dk(Lk * D), dv(Lk * D), probs(G * cap), dsc(G * cap);
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t g = u % Hk, b = u / Hk;
      keys.stage(p.k, b, g, Lk, D, 2 * N, true);
      vals.stage(p.v, b, g, Lk, D, 2 * N, true);
      key_validity_runs(key_valid, b, Lk, run_end);
      std::fill(dk.begin(), dk.end(), Acc(0));
      std::fill(dv.begin(), dv.end(), Acc(0));
      for (int64_t i = 0; i < L; ++i) {
        int64_t n = 0;
        if (p.valid(b, i)) {
          ranges.clear();
          ranges_of(b, i, g, ranges);
          n = make_runs(ranges, key_valid, b, run_end, Lk, runs);
        }
        if (n == 0) {  // the row saw nothing: it contributes no gradient anywhere
          for (int64_t h = 0; h < G; ++h) zero_row(p.grad_q.at(b, i, g * G + h), D);
          continue;
        }
        const int64_t row = (b * L + i) * Hq + g * G;
        if (i + 2 < L) {
          prefetch_rows(p.q, b, i + 2, g * G, G, D);
          prefetch_rows(p.grad_out, b, i + 2, g * G, G, D);
          prefetch_rows(p.out, b, i + 2, g * G, G, D);
        }
        load_rows(p.q, b, i, g * G, G, D, scale, qa.data());  // scaled q
        load_rows(p.grad_out, b, i, g * G, G, D, Acc(1), doa.data());
        load_rows(p.out, b, i, g * G, G, D, Acc(1), oa.data());
        for (int64_t h = 0; h < G; ++h) {
          // delta = dO . O - dlse: the softmax Jacobian's row term, lse's gradient folded in
          Acc dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += doa[h * D + d] * oa[h * D + d];
          delta[h] = dot - (p.grad_lse ? p.grad_lse[row + h] : Acc(0));
          lse[h] = p.lse[row + h];
        }
        // S = (scale q) . k and dP = dO . v over every run; then P and dS over contiguous
        // arrays (the exp vectorises); then dQ, dK, dV.
        for_head_blocks(G, [&]<int NR>(int64_t h0) {
          row_scores<NR, kD, N>(qa.data(), h0, keys, runs, probs.data(), cap, D);
          row_scores<NR, kD, N>(doa.data(), h0, vals, runs, dsc.data(), cap, D);
        });
        for (int64_t h = 0; h < G; ++h) {
          probs_and_dscores(probs.data() + h * cap, dsc.data() + h * cap, n, lse[h],
                            delta[h]);
        }
        std::fill(dq.begin(), dq.end(), Acc(0));
        for_head_blocks(G, [&]<int NR>(int64_t h0) {
          row_wsum<NR, kD, N>(dsc.data(), h0, keys, runs, cap, dq.data(), D);
          const Acc *ds_r[NR], *p_r[NR], *q_r[NR], *do_r[NR];
          for (int r = 0; r < NR; ++r) {
            q_r[r] = qa.data() + (h0 + r) * D;
            do_r[r] = doa.data() + (h0 + r) * D;
          }
          for (const KeyRun& run : runs) {
            for (int r = 0; r < NR; ++r) {
              ds_r[r] = dsc.data() + (h0 + r) * cap + run.offset;
              p_r[r] = probs.data() + (h0 + r) * cap + run.offset;
            }
            ger<NR, kD, N>(ds_r, q_r, dk.data() + run.begin * D, D, run.count, D);
            ger<NR, kD, N>(p_r, do_r, dv.data() + run.begin * D, D, run.count, D);
          }
        });
        for (int64_t h = 0; h < G; ++h)
          store_row(dq.data() + h * D, scale, p.grad_q.at(b, i, g * G + h), D);
      }
      for (int64_t j = 0; j < Lk; ++j) {
        store_row(dk.data() + j * D, Acc(1), p.grad_k.at(b, j, g), D);
        store_row(dv.data() + j * D, Acc(1), p.grad_v.at(b, j, g), D);
      }
    }
  });
}

// 32-byte vectors (AVX2 width) when D is a multiple of their lane count, scalars else.
template <typename Acc>
constexpr int kLanes = 32 / static_cast<int>(sizeof(Acc));

}  // namespace detail

// Entry points: pick a compile-time head dim for the common sizes. ranges_of(b, i, g,
// ranges) appends the sorted disjoint key ranges of a valid query i for kv head g, and
// ranges_of.key_bound(i) bounds (exclusive) every key of the queries <= i; key_valid
// filters padded keys (p.valid filters padded queries).
template <typename T, typename Acc, typename RangesOf>
void attention_fwd(const AttnFwdParams<T, Acc>& p, const Validity& key_valid,
                   const RangesOf& ranges_of) {
  constexpr int N = detail::kLanes<Acc>;
  const int64_t D = p.shape.head_dim;
  if (D % N != 0) return detail::attention_fwd_impl<0, 1>(p, key_valid, ranges_of);
  switch (D) {
    case 16: return detail::attention_fwd_impl<16, N>(p, key_valid, ranges_of);
    case 32: return detail::attention_fwd_impl<32, N>(p, key_valid, ranges_of);
    case 64: return detail::attention_fwd_impl<64, N>(p, key_valid, ranges_of);
    default: return detail::attention_fwd_impl<0, N>(p, key_valid, ranges_of);
  }
}

template <typename T, typename Acc, typename RangesOf>
void attention_bwd(const AttnBwdParams<T, Acc>& p, const Validity& key_valid,
                   const RangesOf& ranges_of) {
  constexpr int N = detail::kLanes<Acc>;
  const int64_t D = p.shape.head_dim;
  if (D % N != 0) return detail::attention_bwd_impl<0, 1>(p, key_valid, ranges_of);
  switch (D) {
    case 16: return detail::attention_bwd_impl<16, N>(p, key_valid, ranges_of);
    case 32: return detail::attention_bwd_impl<32, N>(p, key_valid, ranges_of);
    case 64: return detail::attention_bwd_impl<64, N>(p, key_valid, ranges_of);
    default: return detail::attention_bwd_impl<0, N>(p, key_valid, ranges_of);
  }
}

}  // namespace cpu
}  // namespace blossom
