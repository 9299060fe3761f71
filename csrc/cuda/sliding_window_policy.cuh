// The STIS mask of sliding_window_attention as a Policy of the attention kernels
// (attn_kernels.cuh, attn_staged_tc.cuh): the slot offsets of the band and the dilation
// distances, and the query-pair tail of the deduped pair kernels. Shared by
// sliding_window_attention.cu and the fused branch kernels (blossom_branches.cu).
#pragma once
#include "common/params.h"
#include "cuda/common.cuh"

namespace blossom {
namespace gpu {

struct SlidingPolicy {
  // The last branch of blossom_attention's forward: its query-pair kernel may apply the gate
  // in the epilogue (attn_gate_epilogue.cuh).
  static constexpr bool kGateEpilogue = true;
  int64_t L = 0;
  int64_t band = 0;   // distances 0 .. band-1 are in the window
  int64_t n_pow = 0;  // dilation distances 2^(p0 + k), k < n_pow (all >= window, <= L - 1)
  int p0 = 0;
  bool causal = true;
  Validity valid;
  // Query pairs without repeated keys (attn_staged_tc.cuh, TcWarp DD): the slots of query
  // i + 1 whose keys query i does not attend are pair_a (when >= 0), then pair_b .. slots() - 1.
  // Which of i + 1's slots query i shares depends only on the offsets (a key outside [0, L) or
  // invalid is dropped by both), so make() finds them once; pair_ok = false when they do not
  // have this form (the pairs then stage shared keys twice).
  int64_t pair_a = -1, pair_b = 0;
  bool pair_ok = false;
  // near() in 32 bits for the kernels (keys < 2^31 there: kidx holds ints): the band, and
  // the smallest dilation distance (INT_MAX without dilation distances).
  int band32 = 0, pow_lo32 = 0x7fffffff;

  static SlidingPolicy make(int64_t L, const SlidingWindowMask& m, const Validity& valid) {
    SlidingPolicy pol;
    pol.L = L;
    pol.band = m.window >= 1 ? (m.window < L ? m.window : L) : 0;
    pol.causal = m.causal;
    pol.valid = valid;
    if (m.dilated) {
      const int64_t lo = m.window > 1 ? m.window : 1;
      int p = 0;
      while (p < 62 && (int64_t(1) << p) < lo) ++p;
      pol.p0 = p;
      while (p < 62 && (int64_t(1) << p) <= L - 1) {
        ++pol.n_pow;
        ++p;
      }
    }
    pol.find_pair_tail();
    pol.band32 = static_cast<int>(pol.band < 0x7fffffff ? pol.band : 0x7fffffff);
    pol.pow_lo32 = pol.n_pow > 0 && pol.p0 < 31 ? (1 << pol.p0) : 0x7fffffff;
    return pol;
  }

  // Whether a query attends the key at signed distance d = i - j (causal: d >= 0): the band,
  // or a power of two >= 2^p0 (<= L - 1 for keys in range, so one of the n_pow distances).
  __host__ __device__ __forceinline__ bool near(int64_t d) const {
    if (causal ? d < 0 : false) return false;
    const int64_t a = d < 0 ? -d : d;
    return a < band || (n_pow > 0 && a >= (int64_t(1) << p0) && (a & (a - 1)) == 0);
  }

  // Host: query i + 1's slots n whose key (distance offset(n) - 1 from query i, causal;
  // -(offset(n) + 1) otherwise) query i does not attend, as {pair_a} + [pair_b, slots()).
  void find_pair_tail() {
    const int64_t ns = slots();
    int64_t first = -1, second = -1, count = 0;
    for (int64_t n = 0; n < ns; ++n) {
      const int64_t o = offset(n);
      if (near(causal ? o - 1 : -(o + 1))) continue;  // shared with query i
      if (count == 0) first = n;
      if (count == 1) second = n;
      ++count;
    }
    pair_ok = true;
    if (count == 0) {
      pair_a = -1;
      pair_b = ns;
    } else if (first + count == ns) {  // one run to the end
      pair_a = -1;
      pair_b = first;
    } else if (count == 1 || second + (count - 1) == ns) {  // one slot, then a run to the end
      pair_a = first;
      pair_b = count == 1 ? ns : second;
    } else {
      pair_ok = false;
    }
  }

  bool pair_dedupe_ok() const { return pair_ok; }
  __device__ __forceinline__ void pair_tail(int64_t, int64_t, int64_t, int64_t& a,
                                            int64_t& first, int64_t& n) const {
    a = pair_a;
    first = pair_b;
    n = (pair_a >= 0 ? 1 : 0) + slots() - pair_b;
  }
  // Query q attends key j (valid, in [0, L)): near(q - j) in 32 bits (|q - j| < 2^31).
  __device__ __forceinline__ bool pair_attends(int64_t, int64_t q, int64_t j) const {
    const int d = static_cast<int>(q - j), a = d < 0 ? -d : d;
    const bool side = causal ? d >= 0 : true;
    return side & ((a < band32) | ((a >= pow_lo32) & ((a & (a - 1)) == 0)));
  }

  __host__ __device__ __forceinline__ int64_t slots() const {
    return causal ? band + n_pow : (band > 0 ? 2 * band - 1 : 0) + 2 * n_pow;
  }
  // Signed offset of slot n (key = i - offset when causal, else i + offset). The set of
  // offsets is symmetric when not causal, so the same list serves both directions.
  __host__ __device__ __forceinline__ int64_t offset(int64_t n) const {
    if (causal) return n < band ? n : (int64_t(1) << (p0 + (n - band)));
    const int64_t nb = band > 0 ? 2 * band - 1 : 0;
    if (n < nb) return n - (band - 1);
    const int64_t k = n - nb;
    const int64_t d = int64_t(1) << (p0 + k / 2);
    return (k & 1) ? d : -d;
  }

  __device__ __forceinline__ bool query_valid(int64_t b, int64_t i) const { return valid(b, i); }
  __device__ __forceinline__ bool key_valid(int64_t b, int64_t j) const { return valid(b, j); }
  __device__ __forceinline__ int64_t fwd_slots(int64_t, int64_t, int64_t) const { return slots(); }
  __device__ __forceinline__ int64_t fwd_key(int64_t b, int64_t i, int64_t, int64_t n) const {
    const int64_t j = causal ? i - offset(n) : i + offset(n);
    return (j >= 0 && j < L && valid(b, j)) ? j : -1;
  }
  __device__ __forceinline__ int64_t bwd_slots(int64_t, int64_t, int64_t) const { return slots(); }
  __device__ __forceinline__ int64_t bwd_query(int64_t b, int64_t j, int64_t, int64_t n) const {
    const int64_t i = j + offset(n);
    return (i >= 0 && i < L && valid(b, i)) ? i : -1;
  }
};

}  // namespace gpu
}  // namespace blossom
