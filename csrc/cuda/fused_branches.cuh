// What blossom_attention's fused two-branch kernels (attn_fwd_fused.cuh, attn_dq_fused.cuh)
// share: the per-warp shared-memory area and the launch conditions. Both run one warp per
// (b, query pair, four heads of a KV group): the block-chunk kernels' query groups at HPW = 4
// (two queries) and the window's deduped query pairs, which are the same warps with the same
// N = 8 column layout.
#pragma once
#include "cuda/attn_kernels.cuh"

namespace blossom {
namespace gpu {
namespace detail {

// Per-warp shared memory: the block-chunk and the per-slot areas are used one after the other.
template <int D>
constexpr size_t fused_warp_bytes() {
  return TcCfg<D>::warp_bytes > TcCfg<D, 16>::warp_bytes ? TcCfg<D>::warp_bytes
                                                         : TcCfg<D, 16>::warp_bytes;
}

// BLOSSOM_OPS_CUDA_EARLY_LOADS=0 (read once; A/B): the fused dQ issues the loads of its second
// branch's prologue after the first branch's chunk loop, as before session 13, instead of
// together with the first's (dq_prologue_pair). (The same for the fused forward's gate logit
// measured neutral in run z6 and was not kept.)
inline bool early_loads_off() {
  static const bool off = env_equals("BLOSSOM_OPS_CUDA_EARLY_LOADS", "0");
  return off;
}

// Whether two views have the same strides (an element's offset is the same in both).
template <typename T>
inline bool same_layout(const Bshd<T>& a, const Bshd<T>& b) {
  return a.stride_b == b.stride_b && a.stride_l == b.stride_l && a.stride_h == b.stride_h;
}
// Whether two parameter structs see the same tensor.
template <typename T>
inline bool same_view(const Bshd<T>& a, const Bshd<T>& b) {
  return a.ptr == b.ptr && same_layout(a, b);
}

// The fused kernel's warp count when both branches (ps: block-sparse, pw: window; forward or
// backward parameters) would take the kernels it merges, else 0: a nonempty problem on the
// same q, k, v, validity and scale; block chunks with two queries per warp (HPW = 4, which
// dispatch_stage_config picks for G % 4 == 0 and G % 8 != 0) and the window's deduped pairs,
// none of them switched off (dq: the switches of the dQ kernels, else the forward's).
template <class Params, class SelPolicy, class WinPolicy>
inline int64_t fused_pair_warps(const Params& ps, const SelPolicy& pol_s, const Params& pw,
                                const WinPolicy& pol_w, bool dq) {
  const AttnShape& s = ps.shape;
  if (s.batch == 0 || s.q_heads == 0 || s.q_len == 0) return 0;
  if (!same_view(ps.q, pw.q) || !same_view(ps.k, pw.k) || !same_view(ps.v, pw.v) ||
      ps.valid.ptr != pw.valid.ptr || ps.valid.stride_b != pw.valid.stride_b ||
      ps.shape.scale != pw.shape.scale)
    return 0;
  if (!use_block_chunks(pol_s, ps.k, ps.v) || !use_lean_staged(pw.k, pw.v)) return 0;
  if (!slot_pairs_on(dq) || !slot_dedupe_on(pol_w)) return 0;
  if (s.group() % 4 != 0 || s.group() % 8 == 0) return 0;
  if (block_group_size<4>(pol_s, dq) != 2) return 0;
  const int64_t warps = s.batch * s.kv_heads * (s.group() / 4) * ((s.q_len + 1) / 2);
  return warps < (int64_t(1) << 31) ? warps : 0;
}

}  // namespace detail
}  // namespace gpu
}  // namespace blossom
