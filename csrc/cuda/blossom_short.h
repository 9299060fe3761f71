// Fused blossom_attention (selected + window branches and the gate, R == 2) for short
// sequences: one dense score tile per (batch, kv head, query tile) serves both masks.
// Declarations only (host-compilable): the bindings fill these plain structs; the
// launchers live in csrc/cuda/blossom_short.cu, instantiated for c10::Half and
// c10::BFloat16.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/params.h"

namespace blossom {
namespace gpu {

// Forward. q/k/v/gate views need 16-byte aligned rows (checked by the binding, see
// blossom_short_eligible). Outputs are contiguous: out/o_sel/o_win [B, L, Hq, D],
// lse_sel/lse_win [B, L, Hq] (natural log, -inf for rows with no allowed key).
template <typename T>
struct ShortFwdParams {
  AttnShape shape;         // kv_len == q_len
  Bshd<const T> q, k, v;
  Bshd<const T> gate;      // [B, L, Hq, 2] logits, branch index at unit stride
  BlockSparseMask sel;     // block_idx [B, L, Hk, n], block_size, causal
  SlidingWindowMask win;   // window, dilated (causal taken from sel.causal)
  Validity valid;          // resolved bool [B, L] (null: all valid)
  T* out = nullptr;
  T* o_sel = nullptr;
  T* o_win = nullptr;
  float* lse_sel = nullptr;
  float* lse_win = nullptr;
};

// Backward. o_sel/o_win/lse_* are the forward's saved outputs; grad_q/k/v contiguous like
// q/k/v, grad_gate [B, L, Hq, 2] contiguous. Every element of the outputs is written.
template <typename T>
struct ShortBwdParams {
  AttnShape shape;
  Bshd<const T> q, k, v, grad_out, gate, o_sel, o_win;
  const float* lse_sel = nullptr;
  const float* lse_win = nullptr;
  BlockSparseMask sel;
  SlidingWindowMask win;
  Validity valid;
  T* grad_q = nullptr;
  T* grad_k = nullptr;
  T* grad_v = nullptr;
  T* grad_gate = nullptr;
};

// True when the fused path handles this problem: not disabled by BLOSSOM_OPS_CUDA_SIMPLE=1,
// L <= min(256, BLOSSOM_OPS_CUDA_SHORT_MAX_LEN (default 256, read once)), D in {16, 32, 64},
// 1 <= G <= 64. dtype and alignment are the binding's part.
bool blossom_short_eligible(int64_t seq_len, int64_t head_dim, int64_t group);

template <typename T>
void blossom_short_fwd(const ShortFwdParams<T>& p, cudaStream_t stream);

// Scratch of the backward: 96 bytes per (b, i, query head) (8 floats of row data, then the
// row's (selected, window) masks of its at most 4 key chunks).
size_t blossom_short_bwd_workspace_bytes(const AttnShape& shape);
template <typename T>
void blossom_short_bwd(const ShortBwdParams<T>& p, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream);

}  // namespace gpu
}  // namespace blossom
