// Binding of compressed_attention (NSA's compressed branch, DESIGN.md op 6): q attends to
// the compressed keys/values k_cmp, v_cmp [B, ceil(L / stride), Hk, D]. The validity of
// compressed token t (W_t holds a valid position) is derived here from lengths/valid.
#include <torch/library.h>

#include "cpu/compressed_attention.h"
#include "ops/attention_binding.h"
#include "ops/ops.h"

#ifdef BLOSSOM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/launch.h"
#endif

namespace blossom {
namespace {

constexpr const char* kOp = "compressed_attention";

// The expected key length ceil(L / stride) needs stride >= 1, so the two integer
// arguments are checked before the tensors.
void check_compression_args(int64_t block_len, int64_t stride) {
  check_positive(kOp, "stride", stride);
  BLOSSOM_CHECK(block_len >= stride, kOp, ": block_len (", block_len,
               ") must be >= stride (", stride, ")");
}

CompressedMask make_mask(const at::Tensor& valid_cmp, int64_t block_len, int64_t stride,
                         bool causal) {
  CompressedMask m;
  m.block_len = block_len;
  m.stride = stride;
  m.causal = causal;
  m.valid_cmp = validity_view(valid_cmp);
  return m;
}

}  // namespace

Tensor2 compressed_attention(const at::Tensor& q, const at::Tensor& k_cmp,
                             const at::Tensor& v_cmp, const OptTensor& lengths,
                             const OptTensor& valid, int64_t block_len, int64_t stride,
                             bool causal, double scale) {
  check_compression_args(block_len, stride);
  check_attention_inputs(kOp, q, k_cmp, v_cmp, num_compressed(q.size(1), stride), "k_cmp",
                         "v_cmp");
  const at::Tensor ok = resolve_validity(kOp, lengths, valid, q.size(0), q.size(1), q);
  const at::Tensor ok_cmp = compressed_validity(ok, q.size(1), block_len, stride);
  const CompressedMask m = make_mask(ok_cmp, block_len, stride, causal);
  at::Tensor out, lse;
  std::tie(out, lse) = attn::alloc_outputs(q);
  if (q.numel() == 0) return {out, lse};
#ifdef BLOSSOM_WITH_CUDA
  if (q.is_cuda()) {
    const c10::cuda::CUDAGuard guard(q.device());
    attn::dispatch_cuda(kOp, q.scalar_type(), [&](auto types) {
      using T = typename decltype(types)::T;
      gpu::compressed_attention_fwd<T>(
          attn::fwd_params<T, float>(q, k_cmp, v_cmp, out, lse, ok, scale), m,
          at::cuda::getCurrentCUDAStream());
    });
    return {out, lse};
  }
#endif
  attn::dispatch_cpu(kOp, q.scalar_type(), [&](auto types) {
    using T = typename decltype(types)::T;
    using Acc = typename decltype(types)::Acc;
    cpu::compressed_attention_fwd<T, Acc>(
        attn::fwd_params<T, Acc>(q, k_cmp, v_cmp, out, lse, ok, scale), m);
  });
  return {out, lse};
}

namespace {

// The backward; with `gate` (CUDA only) the gate folded in (GateFold).
Tensor3 backward_impl(const at::Tensor& grad_out, const OptTensor& grad_lse, const at::Tensor& q,
                      const at::Tensor& k_cmp, const at::Tensor& v_cmp, const at::Tensor& out,
                      const at::Tensor& lse, const OptTensor& lengths, const OptTensor& valid,
                      int64_t block_len, int64_t stride, bool causal, double scale,
                      const GateFold* gate) {
  check_compression_args(block_len, stride);
  check_attention_inputs(kOp, q, k_cmp, v_cmp, num_compressed(q.size(1), stride), "k_cmp",
                         "v_cmp");
  const attn::BwdInputs in = attn::check_backward_inputs(kOp, grad_out, grad_lse, q, out, lse);
  if (gate != nullptr) {
    attn::check_gate_fold(kOp, *gate, q);
    BLOSSOM_CHECK(!in.grad_lse.defined(), kOp, ": the gate fold takes no grad_lse");
  }
  const at::Tensor ok = resolve_validity(kOp, lengths, valid, q.size(0), q.size(1), q);
  const at::Tensor ok_cmp = compressed_validity(ok, q.size(1), block_len, stride);
  const CompressedMask m = make_mask(ok_cmp, block_len, stride, causal);
  at::Tensor gq, gk, gv;
  std::tie(gq, gk, gv) = attn::alloc_grads(q, k_cmp, v_cmp);
  if (q.numel() == 0) return {gq, gk.zero_(), gv.zero_()};
#ifdef BLOSSOM_WITH_CUDA
  if (q.is_cuda()) {
    const c10::cuda::CUDAGuard guard(q.device());
    attn::dispatch_cuda(kOp, q.scalar_type(), [&](auto types) {
      using T = typename decltype(types)::T;
      auto p = attn::bwd_params<T, float>(in, q, k_cmp, v_cmp, gq, gk, gv, ok, scale);
      if (gate != nullptr) attn::set_gate_fold(p, *gate);
      const at::Tensor ws = attn::workspace(
          gpu::compressed_attention_bwd_workspace_bytes(p.shape, m, gate != nullptr), q);
      gpu::compressed_attention_bwd<T>(p, m, ws.data_ptr(), static_cast<size_t>(ws.numel()),
                       at::cuda::getCurrentCUDAStream());
    });
    return {gq, gk, gv};
  }
#endif
  attn::dispatch_cpu(kOp, q.scalar_type(), [&](auto types) {
    using T = typename decltype(types)::T;
    using Acc = typename decltype(types)::Acc;
    cpu::compressed_attention_bwd<T, Acc>(
        attn::bwd_params<T, Acc>(in, q, k_cmp, v_cmp, gq, gk, gv, ok, scale), m);
  });
  return {gq, gk, gv};
}

}  // namespace

Tensor3 compressed_attention_backward(const at::Tensor& grad_out, const OptTensor& grad_lse,
                                      const at::Tensor& q, const at::Tensor& k_cmp,
                                      const at::Tensor& v_cmp, const at::Tensor& out,
                                      const at::Tensor& lse, const OptTensor& lengths,
                                      const OptTensor& valid, int64_t block_len, int64_t stride,
                                      bool causal, double scale) {
  return backward_impl(grad_out, grad_lse, q, k_cmp, v_cmp, out, lse, lengths, valid, block_len,
                       stride, causal, scale, nullptr);
}

Tensor3 compressed_attention_backward_gated(const at::Tensor& grad_out, const at::Tensor& q,
                                            const at::Tensor& k_cmp, const at::Tensor& v_cmp,
                                            const at::Tensor& out, const at::Tensor& lse,
                                            const OptTensor& valid, int64_t block_len,
                                            int64_t stride, bool causal, double scale,
                                            const GateFold& gate) {
  return backward_impl(grad_out, c10::nullopt, q, k_cmp, v_cmp, out, lse, c10::nullopt, valid,
                       block_len, stride, causal, scale, &gate);
}

}  // namespace blossom

TORCH_LIBRARY_IMPL(blossom_ops, CPU, m) {
  m.impl("compressed_attention", &blossom::compressed_attention);
  m.impl("compressed_attention_backward", &blossom::compressed_attention_backward);
}

#ifdef BLOSSOM_WITH_CUDA
TORCH_LIBRARY_IMPL(blossom_ops, CUDA, m) {
  m.impl("compressed_attention", &blossom::compressed_attention);
  m.impl("compressed_attention_backward", &blossom::compressed_attention_backward);
}
#endif
