// STIS on the GPU: sliding-window attention with optional power-of-two offsets.
// Query i's keys are a band of distances d in [0, window) (both sides when not causal)
// plus the ~log2(L) distances 2^p >= window when dilated. The mask depends only on |i - j|
// (and j <= i when causal), so the queries attending to key j are the mirrored set
// i = j + d: the dK/dV pass enumerates them directly, with no index structure. Seen from
// 16 consecutive keys the same mask is a dense block plus one diagonal per large distance,
// which the dK/dV fast path runs on tensor cores (window_dkdv_tc.cuh).
#include "cuda/attn_dkdv_staged.cuh"
#include "cuda/attn_kernels.cuh"
#include "cuda/launch.h"
#include "cuda/window_dkdv_tc.cuh"

namespace blossom {
namespace gpu {
namespace {

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
    return pol;
  }

  __device__ __forceinline__ int64_t slots() const {
    return causal ? band + n_pow : (band > 0 ? 2 * band - 1 : 0) + 2 * n_pow;
  }
  // Signed offset of slot n (key = i - offset when causal, else i + offset). The set of
  // offsets is symmetric when not causal, so the same list serves both directions.
  __device__ __forceinline__ int64_t offset(int64_t n) const {
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

}  // namespace

template <typename T>
bool sliding_window_attention_fwd(const AttnFwdParams<T, float>& p, const SlidingWindowMask& m,
                                  cudaStream_t stream) {
  const auto pol = SlidingPolicy::make(p.shape.q_len, m, p.valid);
  return detail::launch_attn_fwd(p, pol, stream, "sliding_window_attention_fwd");
}

size_t sliding_window_attention_bwd_workspace_bytes(const AttnShape& shape,
                                                    const SlidingWindowMask&, bool gated) {
  return detail::attn_delta_bytes(shape, gated);
}

template <typename T>
void sliding_window_attention_bwd(const AttnBwdParams<T, float>& p, const SlidingWindowMask& m,
                                  void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  BLOSSOM_CHECK(workspace_bytes >= sliding_window_attention_bwd_workspace_bytes(
                                       p.shape, m, detail::bwd_gated(p)),
               "sliding_window_attention_bwd: workspace too small");
  const auto pol = SlidingPolicy::make(p.shape.q_len, m, p.valid);
  float* delta = static_cast<float*>(workspace);
  // dQ writes delta (and, gated, lse': attn_gate_fold.cuh); the dK/dV pass reads them on the
  // same stream: key tiles on tensor cores (window_dkdv_tc.cuh) where they apply, else the
  // staged per-key kernel (attn_dkdv_staged.cuh; also under BLOSSOM_OPS_CUDA_WIN_DKDV=old).
  detail::launch_attn_dq(p, pol, delta, stream, "sliding_window_attention_bwd");
  const auto pk = detail::dkdv_params(p, delta);
  const detail::WinTilePlan plan =
      detail::make_win_tile_plan(pol.L, pol.band, pol.p0, pol.n_pow, pol.causal);
  if (detail::launch_window_dkdv_tc(pk, plan, delta, stream))
    detail::check_launch("sliding_window_attention_bwd (dK/dV tiles)");
  else
    detail::launch_attn_dkdv_staged(pk, pol, delta, stream, "sliding_window_attention_bwd");
}

#define BLOSSOM_INSTANTIATE(T)                                                               \
  template bool sliding_window_attention_fwd<T>(const AttnFwdParams<T, float>&,              \
                                                const SlidingWindowMask&, cudaStream_t);     \
  template void sliding_window_attention_bwd<T>(const AttnBwdParams<T, float>&,              \
                                                const SlidingWindowMask&, void*, size_t,     \
                                                cudaStream_t);
BLOSSOM_INSTANTIATE(float)
BLOSSOM_INSTANTIATE(c10::Half)
BLOSSOM_INSTANTIATE(c10::BFloat16)
#undef BLOSSOM_INSTANTIATE

}  // namespace gpu
}  // namespace blossom
