// Binding of block_sparse_attention (LTIS selected attention, DESIGN.md op 4): checks
// (including block_idx), dispatch to the CPU kernel or the CUDA launcher.
#include <torch/library.h>

#include "cpu/block_sparse_attention.h"
#include "ops/attention_binding.h"
#include "ops/ops.h"

#ifdef BLOSSOM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/launch.h"
#endif

namespace blossom {
namespace {

constexpr const char* kOp = "block_sparse_attention";

// block_idx: int32 [B, L, Hk, n] on q's device, last dim contiguous (device, dtype,
// contiguity, shape: checked before the validity tensors, like q/k/v).
void check_block_idx_layout(const at::Tensor& idx, const at::Tensor& q, const at::Tensor& k) {
  BLOSSOM_CHECK(idx.device() == q.device(), kOp, ": block_idx must be on ", q.device(), ", got ",
               idx.device());
  BLOSSOM_CHECK(idx.scalar_type() == at::kInt, kOp, ": block_idx must be int32, got ",
               idx.scalar_type());
  BLOSSOM_CHECK(idx.dim() == 4 && idx.size(0) == q.size(0) && idx.size(1) == q.size(1) &&
                  idx.size(2) == k.size(2),
               kOp, ": block_idx must have shape (batch, seq, kv_heads, n) = (", q.size(0), ", ",
               q.size(1), ", ", k.size(2), ", n), got ", idx.sizes());
}

// The kernels read index rows with unit stride; a strided index tensor (small: int32
// [B, L, Hk, n]) is copied rather than rejected.
at::Tensor unit_stride_rows(const at::Tensor& idx) {
  return (idx.stride(3) == 1 || idx.size(3) <= 1) ? idx : idx.contiguous();
}

// Ranges: block_size >= 1 and, on CPU, every entry in [-1, ceil(L / block_size)). On CUDA
// the value check would read back to the host, so it is skipped there.
BlockSparseMask make_mask(const at::Tensor& idx, int64_t seq_len, int64_t block_size,
                          bool causal) {
  check_positive(kOp, "block_size", block_size);
  const int64_t num_blocks = (seq_len + block_size - 1) / block_size;
  if (idx.is_cpu() && idx.numel() > 0) {
    const auto lo = idx.min().item<int32_t>(), hi = idx.max().item<int32_t>();
    BLOSSOM_CHECK(lo >= -1 && hi < num_blocks, kOp, ": block_idx entries must lie in [-1, ",
                 num_blocks, ") (ceil(seq / block_size) blocks), got values in [", lo, ", ", hi,
                "]");
  }
  return attn::block_sparse_view(idx, block_size, causal);
}

}  // namespace

Tensor2 block_sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& block_idx, const OptTensor& lengths,
                               const OptTensor& valid, int64_t block_size, bool causal,
                               double scale) {
  check_attention_inputs(kOp, q, k, v);
  check_block_idx_layout(block_idx, q, k);
  const at::Tensor ok = resolve_validity(kOp, lengths, valid, q.size(0), q.size(1), q);
  const at::Tensor idx = unit_stride_rows(block_idx);
  const BlockSparseMask m = make_mask(idx, q.size(1), block_size, causal);
  at::Tensor out, lse;
  std::tie(out, lse) = attn::alloc_outputs(q);
  if (q.numel() == 0) return {out, lse};
#ifdef BLOSSOM_WITH_CUDA
  if (q.is_cuda()) {
    const c10::cuda::CUDAGuard guard(q.device());
    attn::dispatch_cuda(kOp, q.scalar_type(), [&](auto types) {
      using T = typename decltype(types)::T;
      gpu::block_sparse_attention_fwd<T>(attn::fwd_params<T, float>(q, k, v, out, lse, ok, scale),
                                         m, at::cuda::getCurrentCUDAStream());
    });
    return {out, lse};
  }
#endif
  attn::dispatch_cpu(kOp, q.scalar_type(), [&](auto types) {
    using T = typename decltype(types)::T;
    using Acc = typename decltype(types)::Acc;
    cpu::block_sparse_attention_fwd<T, Acc>(
        attn::fwd_params<T, Acc>(q, k, v, out, lse, ok, scale), m);
  });
  return {out, lse};
}

namespace {

// The backward; with `gate` (CUDA only) the gate folded in (GateFold).
Tensor3 backward_impl(const at::Tensor& grad_out, const OptTensor& grad_lse, const at::Tensor& q,
                      const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                      const at::Tensor& lse, const at::Tensor& block_idx,
                      const OptTensor& lengths, const OptTensor& valid, int64_t block_size,
                      bool causal, double scale, const GateFold* gate,
                      const WindowBranch* win) {
  check_attention_inputs(kOp, q, k, v);
  const attn::BwdInputs in = attn::check_backward_inputs(kOp, grad_out, grad_lse, q, out, lse);
  check_block_idx_layout(block_idx, q, k);
  if (gate != nullptr) {
    attn::check_gate_fold(kOp, *gate, q);
    BLOSSOM_CHECK(!in.grad_lse.defined(), kOp, ": the gate fold takes no grad_lse");
  }
  // The window branch's inputs, checked like sliding_window_attention_backward checks them.
  constexpr const char* kWinOp = "sliding_window_attention_backward";
  attn::BwdInputs in_w;
  SlidingWindowMask mw;
  if (win != nullptr) {
    BLOSSOM_CHECK(q.is_cuda() && gate != nullptr, kOp,
                  ": the window branch rides only on the gated CUDA backward");
    in_w = attn::check_backward_inputs(kWinOp, grad_out, c10::nullopt, q, win->out, win->lse);
    attn::check_gate_fold(kWinOp, win->gate, q);
    mw = attn::sliding_window_mask(kWinOp, q.size(1), win->window, win->dilated, causal);
  }
  const at::Tensor ok = resolve_validity(kOp, lengths, valid, q.size(0), q.size(1), q);
  const at::Tensor idx = unit_stride_rows(block_idx);
  const BlockSparseMask m = make_mask(idx, q.size(1), block_size, causal);
  at::Tensor gq, gk, gv;
  std::tie(gq, gk, gv) = attn::alloc_grads(q, k, v);
  if (q.numel() == 0) return {gq, gk.zero_(), gv.zero_()};
#ifdef BLOSSOM_WITH_CUDA
  if (q.is_cuda()) {
    const c10::cuda::CUDAGuard guard(q.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    attn::dispatch_cuda(kOp, q.scalar_type(), [&](auto types) {
      using T = typename decltype(types)::T;
      auto p = attn::bwd_params<T, float>(in, q, k, v, gq, gk, gv, ok, scale);
      if (gate != nullptr) attn::set_gate_fold(p, *gate);
      const at::Tensor ws = attn::workspace(
          gpu::block_sparse_attention_bwd_workspace_bytes(p.shape, m, gate != nullptr), q);
      if (win == nullptr) {
        gpu::block_sparse_attention_bwd<T>(p, m, ws.data_ptr(), static_cast<size_t>(ws.numel()),
                                           stream);
        return;
      }
      auto pw = attn::bwd_params<T, float>(in_w, q, k, v, gq, gk, gv, ok, scale);
      pw.accumulate = true;  // added to the block-sparse gradients
      attn::set_gate_fold(pw, win->gate);
      const at::Tensor ws_w = attn::workspace(
          gpu::sliding_window_attention_bwd_workspace_bytes(pw.shape, mw, true), q);
      gpu::blossom_branches_bwd<T>(p, m, ws.data_ptr(), static_cast<size_t>(ws.numel()), pw, mw,
                                   ws_w.data_ptr(), static_cast<size_t>(ws_w.numel()), stream);
    });
    return {gq, gk, gv};
  }
#endif
  attn::dispatch_cpu(kOp, q.scalar_type(), [&](auto types) {
    using T = typename decltype(types)::T;
    using Acc = typename decltype(types)::Acc;
    cpu::block_sparse_attention_bwd<T, Acc>(
        attn::bwd_params<T, Acc>(in, q, k, v, gq, gk, gv, ok, scale), m);
  });
  return {gq, gk, gv};
}

}  // namespace

Tensor3 block_sparse_attention_backward(const at::Tensor& grad_out, const OptTensor& grad_lse,
                                        const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& out,
                                        const at::Tensor& lse, const at::Tensor& block_idx,
                                        const OptTensor& lengths, const OptTensor& valid,
                                        int64_t block_size, bool causal, double scale) {
  return backward_impl(grad_out, grad_lse, q, k, v, out, lse, block_idx, lengths, valid,
                       block_size, causal, scale, nullptr, nullptr);
}

Tensor3 block_sparse_attention_backward_gated(const at::Tensor& grad_out, const at::Tensor& q,
                                              const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& out, const at::Tensor& lse,
                                              const at::Tensor& block_idx,
                                              const OptTensor& valid, int64_t block_size,
                                              bool causal, double scale, const GateFold& gate,
                                              const WindowBranch* win) {
  return backward_impl(grad_out, c10::nullopt, q, k, v, out, lse, block_idx, c10::nullopt, valid,
                       block_size, causal, scale, &gate, win);
}

}  // namespace blossom

TORCH_LIBRARY_IMPL(blossom_ops, CPU, m) {
  m.impl("block_sparse_attention", &blossom::block_sparse_attention);
  m.impl("block_sparse_attention_backward", &blossom::block_sparse_attention_backward);
}

#ifdef BLOSSOM_WITH_CUDA
TORCH_LIBRARY_IMPL(blossom_ops, CUDA, m) {
  m.impl("block_sparse_attention", &blossom::block_sparse_attention);
  m.impl("block_sparse_attention_backward", &blossom::block_sparse_attention_backward);
}
#endif
