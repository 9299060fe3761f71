// Plain parameter structs shared by the CPU and CUDA kernels. Kernels see only these
// (raw pointers, element strides, sizes, flags) and never an at::Tensor, so they can be
// driven from C++ tests or another framework. The binding layer (csrc/ops/*.cpp) fills
// them after checking the tensors.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define BLOSSOM_HD __host__ __device__ __forceinline__
#else
#define BLOSSOM_HD inline
#endif

namespace blossom {

// A [batch, seq, heads, dim] tensor whose last dimension is contiguous.
// Strides are in elements; dim stride is 1 by contract.
template <typename T>
struct Bshd {
  T* ptr = nullptr;
  int64_t stride_b = 0;  // elements between consecutive batch entries
  int64_t stride_l = 0;  // ... sequence positions
  int64_t stride_h = 0;  // ... heads
  BLOSSOM_HD T* at(int64_t b, int64_t l, int64_t h) const {
    return ptr + b * stride_b + l * stride_l + h * stride_h;
  }
};

// Which positions are real items: bool [B, L] with unit stride along L, or null for
// "every position is valid" (no padding).
struct Validity {
  const bool* ptr = nullptr;
  int64_t stride_b = 0;  // elements between batch rows
  BLOSSOM_HD bool operator()(int64_t b, int64_t j) const {
    return ptr == nullptr || ptr[b * stride_b + j];
  }
};

// Sizes common to every attention operator.
struct AttnShape {
  int64_t batch = 0;
  int64_t q_len = 0;     // L: query positions
  int64_t kv_len = 0;    // keys: L, or T = ceil(L / stride) for the compressed branch
  int64_t q_heads = 0;   // Hq
  int64_t kv_heads = 0;  // Hk; query head h reads kv head h / (Hq / Hk)
  int64_t head_dim = 0;  // D
  double scale = 1.0;    // softmax scale (1/sqrt(D) by default)
  BLOSSOM_HD int64_t group() const { return q_heads / kv_heads; }
};

// blossom_attention's gate applied in the epilogue of its last branch's forward (CUDA fast
// path only, csrc/cuda/attn_gate_epilogue.cuh): out = sum_r sigmoid(logits[row, r]) *
// branch_r[row] in fp32 over r = 0 .. R-1 in order, branch `self` being this forward's own
// output as rounded to T, the others read back from memory; what gate_fusion's kernel
// computes from the stored outputs. All contiguous: logits [B*L*Hq, R], branch_r and out
// [B*L*Hq, D]. out == nullptr: no gate (every CPU kernel, every other launch).
template <typename T>
struct GateEpilogueParams {
  const T* logits = nullptr;
  const T* branch[3] = {nullptr, nullptr, nullptr};  // branch[self] is not read
  T* out = nullptr;
  int32_t branches = 0;  // R: 2 or 3
  int32_t self = 0;      // this forward's index r (the CUDA epilogue takes r = 1 only)
};

// Forward of one masked attention: out [B, L, Hq, D] and lse [B, L, Hq] (contiguous).
// Acc is the accumulation/lse type: float for float/half/bfloat16, double for double.
template <typename T, typename Acc>
struct AttnFwdParams {
  AttnShape shape;
  Bshd<const T> q, k, v;
  Bshd<T> out;
  Acc* lse = nullptr;  // [B, L, Hq] contiguous; -inf for rows with no allowed key
  Validity valid;      // validity of the query positions (and, for plain attention, keys)
  // Optional (CUDA only; the launchers that may honour it say so by their return value).
  GateEpilogueParams<T> gate;
  // CUDA staged kernels only (set by their launchers, on unless BLOSSOM_OPS_CUDA_LAZY_MAX=0; the CPU
  // kernels ignore it): the online softmax keeps its running reference while no score of a
  // chunk exceeds it by more than kLazyMax (csrc/cuda/attn_staged_tc.cuh, softmax_rescale).
  bool lazy_max = false;
};

// Backward of one masked attention. grad_q/grad_k/grad_v are written in full (not
// accumulated into). grad_lse may be null (no gradient flows into lse).
template <typename T, typename Acc>
struct AttnBwdParams {
  AttnShape shape;
  Bshd<const T> grad_out, q, k, v, out;
  const Acc* lse = nullptr;       // [B, L, Hq] contiguous, from the forward
  const Acc* grad_lse = nullptr;  // [B, L, Hq] contiguous, or null
  Bshd<T> grad_q, grad_k, grad_v;
  Validity valid;
  // Add the gradients to what grad_q / grad_k / grad_v already hold instead of overwriting
  // them (the second branch of blossom_attention's backward, so no separate add pass).
  // Honoured by the CUDA kernels; the CPU kernels require false.
  bool accumulate = false;
  // blossom_attention's gate folded into this branch's backward (CUDA only; the CPU kernels
  // require gate.ptr == nullptr). When gate.ptr is set, the gradient flowing into this
  // branch is sigmoid(g) * grad_out with g = gate.at(b, i, h)[gate_r] (grad_out is the
  // gate's output gradient), and the dQ pass also writes
  // grad_gate.at(b, i, h)[gate_r] = rowsum(grad_out * out) * s * (1 - s), s = sigmoid(g),
  // for every row (padded ones included), as gate_fusion's backward does. Requires
  // grad_lse == nullptr; the workspace of a gated backward is larger (launch.h).
  Bshd<const T> gate;   // gate_logits [B, L, Hq, R]: element strides, last dim contiguous
  Bshd<T> grad_gate;    // [B, L, Hq, R]: only column gate_r is written
  int64_t gate_r = 0;   // this branch's index r in the last dimension
};

// STIS mask: |i - j| < window, or (dilated and |i - j| a power of two); j <= i if causal.
struct SlidingWindowMask {
  int64_t window = 8;
  bool dilated = true;
  bool causal = true;
};

// LTIS mask: own block of i, plus blocks block_idx[b, i, g, :] (-1 and duplicates ignored).
struct BlockSparseMask {
  const int32_t* idx = nullptr;  // [B, L, Hk, n]
  int64_t stride_b = 0, stride_l = 0, stride_h = 0;  // element strides; last dim contiguous
  int64_t n = 0;                 // selected blocks per query
  int64_t block_size = 16;
  bool causal = true;
  BLOSSOM_HD const int32_t* at(int64_t b, int64_t i, int64_t g) const {
    return idx + b * stride_b + i * stride_l + g * stride_h;
  }
};

// Compressed branch mask: valid compressed token t, and (t + 1) * stride - 1 <= i if causal.
struct CompressedMask {
  int64_t block_len = 32;
  int64_t stride = 16;
  bool causal = true;
  Validity valid_cmp;  // bool [B, T]: W_t holds at least one valid key
};

// block_compress: out[b, t, h] = mean over valid j in W_t of x[b, j, h] + pos[h, j - start_t].
template <typename T, typename Acc>
struct CompressParams {
  int64_t batch = 0, seq_len = 0, heads = 0, head_dim = 0, num_tokens = 0;  // T
  int64_t block_len = 32, stride = 16;
  Bshd<const T> x;
  const T* pos = nullptr;  // [H, block_len, D] contiguous, or null
  Bshd<T> out;             // [B, T, H, D]
  bool* valid_out = nullptr;  // [B, T] contiguous
  Validity valid;
};

// select_blocks: top-n blocks per (b, i, kv head) by summed compressed-attention mass.
template <typename T>
struct SelectParams {
  AttnShape shape;  // kv_len = T (compressed tokens)
  Bshd<const T> q, k_cmp;
  int64_t top_n = 4, block_size = 16, stride = 16, block_len = 32;
  bool causal = true;
  Validity valid;      // key/query validity [B, L]
  Validity valid_cmp;  // [B, T]
  int32_t* out = nullptr;  // [B, L, Hk, top_n] contiguous
};

// gate_fusion: out = sum_r sigmoid(gate[..., r]) * branch[r].
template <typename T>
struct GateParams {
  int64_t branches = 2;   // R
  int64_t rows = 0;       // B * L * Hq (branches and out are [R, rows, D] contiguous)
  int64_t head_dim = 0;
  const T* branch = nullptr;  // [R, rows, D]
  const T* gate = nullptr;    // [rows, R]
  T* out = nullptr;           // [rows, D]
};

// ---- small mask helpers, shared by kernels and tests --------------------------------
BLOSSOM_HD bool is_pow2(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }

// Number of compressed tokens: ceil(L / stride).
BLOSSOM_HD int64_t num_compressed(int64_t seq_len, int64_t stride) {
  return (seq_len + stride - 1) / stride;
}

// First position (possibly negative) of compression window W_t; pos is indexed from here.
BLOSSOM_HD int64_t window_origin(int64_t t, int64_t block_len, int64_t stride) {
  return (t + 1) * stride - block_len;
}

}  // namespace blossom
