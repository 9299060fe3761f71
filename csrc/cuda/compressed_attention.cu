// NSA's compressed branch on the GPU: query i attends to the valid compressed tokens t of
// k_cmp / v_cmp [B, T, Hk, D]; causal queries see t once its window has ended,
// (t + 1) * stride - 1 <= i. For key t the attending queries are i >= (t + 1) * stride - 1
// (causal) or all valid i, so the dK/dV pass enumerates them directly.
#include "cuda/attn_dkdv_staged.cuh"
#include "cuda/attn_kernels.cuh"
#include "cuda/launch.h"

namespace blossom {
namespace gpu {
namespace {

struct CompressedPolicy {
  int64_t L = 0, T = 0, stride = 16;
  bool causal = true;
  Validity valid, valid_cmp;

  __device__ __forceinline__ bool query_valid(int64_t b, int64_t i) const { return valid(b, i); }
  __device__ __forceinline__ bool key_valid(int64_t b, int64_t t) const {
    return valid_cmp(b, t);
  }
  __device__ __forceinline__ int64_t fwd_slots(int64_t, int64_t i, int64_t) const {
    if (!causal) return T;
    const int64_t seen = (i + 1) / stride;  // tokens with (t + 1) * stride - 1 <= i
    return seen < T ? seen : T;
  }
  __device__ __forceinline__ int64_t fwd_key(int64_t b, int64_t, int64_t, int64_t n) const {
    return valid_cmp(b, n) ? n : -1;
  }
  // Query pairs without repeated keys (attn_staged_tc.cuh, TcWarp DD): query i + 1 sees the
  // tokens of query i and those of slots [fwd_slots(i), fwd_slots(i + 1)) (causal: 0 or 1).
  bool pair_dedupe_ok() const { return true; }
  __device__ __forceinline__ void pair_tail(int64_t b, int64_t i, int64_t g, int64_t& a,
                                            int64_t& first, int64_t& n) const {
    a = -1;
    first = fwd_slots(b, i, g);
    n = fwd_slots(b, i + 1, g) - first;
  }
  // Query q attends token t of query q - 1's list: always ((t + 1) * stride - 1 <= q - 1
  // when causal), so query i's entries all count for query i + 1.
  __device__ __forceinline__ bool pair_attends(int64_t, int64_t, int64_t) const {
    return true;
  }
  __device__ __forceinline__ int64_t first_query(int64_t t) const {
    return causal ? (t + 1) * stride - 1 : 0;
  }
  __device__ __forceinline__ int64_t bwd_slots(int64_t, int64_t t, int64_t) const {
    const int64_t i0 = first_query(t);
    return i0 < L ? L - i0 : 0;
  }
  __device__ __forceinline__ int64_t bwd_query(int64_t b, int64_t t, int64_t, int64_t n) const {
    const int64_t i = first_query(t) + n;
    return valid(b, i) ? i : -1;
  }
};

CompressedPolicy make_policy(const AttnShape& s, const CompressedMask& m, const Validity& v) {
  BLOSSOM_CHECK(m.stride >= 1, "compressed_attention: stride must be >= 1");
  CompressedPolicy pol;
  pol.L = s.q_len;
  pol.T = s.kv_len;
  pol.stride = m.stride;
  pol.causal = m.causal;
  pol.valid = v;
  pol.valid_cmp = m.valid_cmp;
  return pol;
}

}  // namespace

template <typename T>
void compressed_attention_fwd(const AttnFwdParams<T, float>& p, const CompressedMask& m,
                              cudaStream_t stream) {
  detail::launch_attn_fwd(p, make_policy(p.shape, m, p.valid), stream,
                          "compressed_attention_fwd");
}

size_t compressed_attention_bwd_workspace_bytes(const AttnShape& shape, const CompressedMask&,
                                                bool gated) {
  return detail::attn_delta_bytes(shape, gated);
}

template <typename T>
void compressed_attention_bwd(const AttnBwdParams<T, float>& p, const CompressedMask& m,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  BLOSSOM_CHECK(workspace_bytes >= compressed_attention_bwd_workspace_bytes(
                                       p.shape, m, detail::bwd_gated(p)),
               "compressed_attention_bwd: workspace too small");
  const auto pol = make_policy(p.shape, m, p.valid);
  float* delta = static_cast<float*>(workspace);
  // dQ writes delta (and, gated, lse'); the staged dK/dV pass (attn_dkdv_staged.cuh) reads
  // them on the same stream.
  detail::launch_attn_dq(p, pol, delta, stream, "compressed_attention_bwd");
  detail::launch_attn_dkdv_staged(detail::dkdv_params(p, delta), pol, delta, stream,
                                  "compressed_attention_bwd");
}

#define BLOSSOM_INSTANTIATE(T)                                                                \
  template void compressed_attention_fwd<T>(const AttnFwdParams<T, float>&,                   \
                                            const CompressedMask&, cudaStream_t);             \
  template void compressed_attention_bwd<T>(const AttnBwdParams<T, float>&,                   \
                                            const CompressedMask&, void*, size_t, cudaStream_t);
BLOSSOM_INSTANTIATE(float)
BLOSSOM_INSTANTIATE(c10::Half)
BLOSSOM_INSTANTIATE(c10::BFloat16)
#undef BLOSSOM_INSTANTIATE

}  // namespace gpu
}  // namespace blossom
