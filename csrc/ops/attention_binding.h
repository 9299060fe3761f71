// Binding helpers shared by the three attention operators (sliding window, block sparse,
// compressed): output allocation, backward-input checks, parameter-struct filling and
// the dtype switch. Op-specific checks and masks stay in each csrc/ops/<op>.cpp.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
#include <utility>

#include "common/checks.h"
#include "common/params.h"
#include "ops/ops.h"

namespace blossom {
namespace attn {

// Storage type T and accumulation type Acc of one dispatch branch.
template <typename T_, typename Acc_>
struct Types {
  using T = T_;
  using Acc = Acc_;
};

// Calls f(Types<T, Acc>{}) for the CPU dtypes: float, double, bfloat16.
template <typename F>
void dispatch_cpu(const char* op, at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(Types<float, float>{});
    case at::kDouble: return f(Types<double, double>{});
    case at::kBFloat16: return f(Types<c10::BFloat16, float>{});
    default: BLOSSOM_CHECK(false, op, ": no CPU kernel for dtype ", dtype);
  }
}

// The GPU launchers exist for float, half and bfloat16, all accumulating in float.
template <typename F>
void dispatch_cuda(const char* op, at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(Types<float, float>{});
    case at::kHalf: return f(Types<c10::Half, float>{});
    case at::kBFloat16: return f(Types<c10::BFloat16, float>{});
    default: BLOSSOM_CHECK(false, op, ": no CUDA kernel for dtype ", dtype);
  }
}

// out [B, L, Hq, D] (dtype of q, contiguous) and lse [B, L, Hq] (float32, float64 for
// float64 inputs).
inline std::tuple<at::Tensor, at::Tensor> alloc_outputs(const at::Tensor& q) {
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)},
                       q.options().dtype(acc_dtype(q.scalar_type())));
  return {out, lse};
}

// Backward inputs after checking: grad_out and out keep their strides when the last dim is
// contiguous; lse and grad_lse (undefined when absent) are contiguous.
struct BwdInputs {
  at::Tensor grad_out, out, lse, grad_lse;
};

inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.stride(-1) == 1 || t.size(-1) <= 1) ? t : t.contiguous();
}

// Checks grad_out, out (like q) and lse, grad_lse ([B, L, Hq], accumulation dtype), in the
// fixed order device, dtype, shape. q, k, v are checked by the caller beforehand.
inline BwdInputs check_backward_inputs(const char* op, const at::Tensor& grad_out,
                                       const OptTensor& grad_lse, const at::Tensor& q,
                                       const at::Tensor& out, const at::Tensor& lse) {
  check_like(op, "grad_out", grad_out, q, q.sizes(), "(batch, seq, q_heads, head_dim)");
  check_like(op, "out", out, q, q.sizes(), "(batch, seq, q_heads, head_dim)");
  const auto acc = acc_dtype(q.scalar_type());
  const std::vector<int64_t> lse_shape{q.size(0), q.size(1), q.size(2)};
  auto check_lse = [&](const char* name, const at::Tensor& t) {
    BLOSSOM_CHECK(t.device() == q.device(), op, ": ", name, " must be on ", q.device(), ", got ",
                 t.device());
    BLOSSOM_CHECK(t.scalar_type() == acc, op, ": ", name, " must have dtype ", acc, ", got ",
                 t.scalar_type());
    BLOSSOM_CHECK(t.sizes() == at::IntArrayRef(lse_shape), op, ": ", name,
                 " must have shape (batch, seq, q_heads) = (", lse_shape[0], ", ", lse_shape[1],
                 ", ", lse_shape[2], "), got ", t.sizes());
  };
  check_lse("lse", lse);
  BwdInputs in;
  if (grad_lse.has_value() && grad_lse->defined()) {
    check_lse("grad_lse", *grad_lse);
    in.grad_lse = grad_lse->contiguous();
  }
  in.grad_out = last_dim_contiguous(grad_out);
  in.out = last_dim_contiguous(out);
  in.lse = lse.contiguous();
  return in;
}

// grad_q [B, L, Hq, D], grad_k and grad_v like k, contiguous. The kernels write every
// element (zeros for padded rows and unseen keys), so there is no zero fill here.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> alloc_grads(const at::Tensor& q,
                                                                   const at::Tensor& k,
                                                                   const at::Tensor& v) {
  auto opts = at::MemoryFormat::Contiguous;
  return {at::empty(q.sizes(), q.options().memory_format(opts)),
          at::empty(k.sizes(), k.options().memory_format(opts)),
          at::empty(v.sizes(), v.options().memory_format(opts))};
}

inline AttnShape attn_shape(const at::Tensor& q, const at::Tensor& k, double scale) {
  AttnShape s;
  s.batch = q.size(0);
  s.q_len = q.size(1);
  s.kv_len = k.size(1);
  s.q_heads = q.size(2);
  s.kv_heads = k.size(2);
  s.head_dim = q.size(3);
  s.scale = scale;
  return s;
}

template <typename T, typename Acc>
AttnFwdParams<T, Acc> fwd_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& out, const at::Tensor& lse,
                                 const at::Tensor& valid, double scale) {
  AttnFwdParams<T, Acc> p;
  p.shape = attn_shape(q, k, scale);
  p.q = bshd_view<const T>(q);
  p.k = bshd_view<const T>(k);
  p.v = bshd_view<const T>(v);
  p.out = bshd_view<T>(out);
  p.lse = lse.data_ptr<Acc>();
  p.valid = validity_view(valid);
  return p;
}

template <typename T, typename Acc>
AttnBwdParams<T, Acc> bwd_params(const BwdInputs& in, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& grad_q,
                                 const at::Tensor& grad_k, const at::Tensor& grad_v,
                                 const at::Tensor& valid, double scale) {
  AttnBwdParams<T, Acc> p;
  p.shape = attn_shape(q, k, scale);
  p.grad_out = bshd_view<const T>(in.grad_out);
  p.q = bshd_view<const T>(q);
  p.k = bshd_view<const T>(k);
  p.v = bshd_view<const T>(v);
  p.out = bshd_view<const T>(in.out);
  p.lse = in.lse.data_ptr<Acc>();
  p.grad_lse = in.grad_lse.defined() ? in.grad_lse.data_ptr<Acc>() : nullptr;
  p.grad_q = bshd_view<T>(grad_q);
  p.grad_k = bshd_view<T>(grad_k);
  p.grad_v = bshd_view<T>(grad_v);
  p.valid = validity_view(valid);
  return p;
}

// A gate folded into a backward (GateFold): CUDA only; logits like q with shape
// (batch, seq, q_heads, R) and a contiguous last dim, grad the same shape and contiguous,
// 0 <= r < R. Checked after the backward's own inputs.
inline void check_gate_fold(const char* op, const GateFold& gate, const at::Tensor& q) {
  BLOSSOM_CHECK(q.is_cuda(), op, ": the gate fold is implemented for CUDA tensors only");
  BLOSSOM_CHECK(gate.logits.defined() && gate.logits.dim() == 4, op,
               ": gate_logits must have shape (batch, seq, q_heads, R)");
  const int64_t R = gate.logits.size(3);
  const std::vector<int64_t> shape{q.size(0), q.size(1), q.size(2), R};
  check_like(op, "gate_logits", gate.logits, q, shape, "(batch, seq, q_heads, R)");
  BLOSSOM_CHECK(gate.logits.stride(3) == 1 || R <= 1, op,
               ": gate_logits must have a contiguous last dimension");
  BLOSSOM_CHECK(gate.grad.defined(), op, ": the gate fold needs a grad_gate tensor");
  check_like(op, "grad_gate", gate.grad, q, shape, "(batch, seq, q_heads, R)");
  BLOSSOM_CHECK(gate.grad.is_contiguous(), op, ": grad_gate must be contiguous");
  BLOSSOM_CHECK(gate.r >= 0 && gate.r < R, op, ": gate branch index ", gate.r,
               " out of range for ", R, " branches");
}

// Fills the gate fields of a (CUDA) backward's parameters.
template <typename T, typename Acc>
void set_gate_fold(AttnBwdParams<T, Acc>& p, const GateFold& gate) {
  p.gate = bshd_view<const T>(gate.logits);
  p.grad_gate = bshd_view<T>(gate.grad);
  p.gate_r = gate.r;
}

// The STIS mask of sliding_window_attention (window >= 1 checked). A window longer than the
// sequence means full attention: |i - j| < L always.
inline SlidingWindowMask sliding_window_mask(const char* op, int64_t seq_len, int64_t window,
                                             bool dilated, bool causal) {
  check_positive(op, "window", window);
  SlidingWindowMask m;
  m.window = std::max<int64_t>(1, std::min(window, seq_len));
  m.dilated = dilated;
  m.causal = causal;
  return m;
}

// The LTIS mask parameters over an int32 [B, L, Hk, n] index tensor whose rows have unit
// stride (no value checks here).
inline BlockSparseMask block_sparse_view(const at::Tensor& idx, int64_t block_size,
                                         bool causal) {
  BlockSparseMask m;
  m.idx = idx.data_ptr<int32_t>();
  m.stride_b = idx.stride(0);
  m.stride_l = idx.stride(1);
  m.stride_h = idx.stride(2);
  m.n = idx.size(3);
  m.block_size = block_size;
  m.causal = causal;
  return m;
}

// Device scratch a CUDA backward asks for (bytes; uninitialised). Taken from the caching
// allocator, so it is graph-safe and costs no cudaMalloc in steady state.
inline at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

}  // namespace attn
}  // namespace blossom
