// Binding of sliding_window_attention (STIS, DESIGN.md op 1): checks, normalisation,
// dispatch to the CPU kernel or the CUDA launcher.
#include <torch/library.h>

#include "cpu/sliding_window_attention.h"
#include "ops/attention_binding.h"
#include "ops/ops.h"

#ifdef BLOSSOM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/launch.h"
#endif

namespace blossom {
namespace {

constexpr const char* kOp = "sliding_window_attention";

// The gate epilogue's tensors, checked against q (GateEpilogue in ops.h).
void check_gate_epilogue(const char* op, const GateEpilogue& gate, const at::Tensor& q) {
  BLOSSOM_CHECK(q.is_cuda(), op, ": the gate epilogue is implemented for CUDA tensors only");
  BLOSSOM_CHECK(gate.logits.defined() && gate.logits.dim() == 4, op,
               ": gate_logits must have shape (batch, seq, q_heads, R)");
  const int64_t R = gate.logits.size(3);
  BLOSSOM_CHECK(R == 2 || R == 3, op, ": the gate epilogue takes 2 or 3 branches, got ", R);
  check_like(op, "gate_logits", gate.logits, q, {q.size(0), q.size(1), q.size(2), R},
             "(batch, seq, q_heads, R)");
  BLOSSOM_CHECK(gate.logits.is_contiguous(), op, ": gate_logits must be contiguous");
  BLOSSOM_CHECK(static_cast<int64_t>(gate.branches.size()) == R && gate.self >= 0 &&
                    gate.self < R,
                op, ": the gate epilogue needs R branch slots and this branch's index");
  for (int64_t r = 0; r < R; ++r) {
    if (r == gate.self) continue;
    const at::Tensor& b = gate.branches[static_cast<size_t>(r)];
    BLOSSOM_CHECK(b.defined(), op, ": gate branch ", r, " missing");
    check_like(op, "gate branch", b, q, q.sizes(), "(batch, seq, q_heads, head_dim)");
    BLOSSOM_CHECK(b.is_contiguous(), op, ": gate branch ", r, " must be contiguous");
  }
  BLOSSOM_CHECK(gate.out.defined(), op, ": the gate epilogue needs an output tensor");
  check_like(op, "gated out", gate.out, q, q.sizes(), "(batch, seq, q_heads, head_dim)");
  BLOSSOM_CHECK(gate.out.is_contiguous(), op, ": the gated output must be contiguous");
  if (gate.sel_idx.defined()) {  // branch 0 computed here: its index and lse output
    const at::Tensor& idx = gate.sel_idx;
    BLOSSOM_CHECK(gate.self == 1 && idx.device() == q.device() && idx.scalar_type() == at::kInt &&
                      idx.dim() == 4 && idx.size(0) == q.size(0) && idx.size(1) == q.size(1) &&
                      idx.is_contiguous(),
                  op, ": the selected branch needs an int32 contiguous (batch, seq, kv_heads, n) "
                  "index on q's device");
    check_positive(op, "block_size", gate.sel_block_size);
    BLOSSOM_CHECK(gate.sel_lse.defined() && gate.sel_lse.is_contiguous() &&
                      gate.sel_lse.scalar_type() == at::kFloat &&
                      gate.sel_lse.device() == q.device() &&
                      gate.sel_lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2)}),
                  op, ": the selected branch needs a contiguous (batch, seq, q_heads) lse output");
  }
}

// The forward; with `gate`, *applied tells whether the kernel wrote gate->out.
Tensor2 forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const OptTensor& lengths, const OptTensor& valid, int64_t window, bool dilated,
                bool causal, double scale, const GateEpilogue* gate, bool* applied) {
  if (applied != nullptr) *applied = false;
  check_attention_inputs(kOp, q, k, v);
  if (gate != nullptr) check_gate_epilogue(kOp, *gate, q);
  const at::Tensor ok = resolve_validity(kOp, lengths, valid, q.size(0), q.size(1), q);
  const SlidingWindowMask m = attn::sliding_window_mask(kOp, q.size(1), window, dilated, causal);
  at::Tensor out, lse;
  std::tie(out, lse) = attn::alloc_outputs(q);
  if (q.numel() == 0) return {out, lse};
#ifdef BLOSSOM_WITH_CUDA
  if (q.is_cuda()) {
    const c10::cuda::CUDAGuard guard(q.device());
    attn::dispatch_cuda(kOp, q.scalar_type(), [&](auto types) {
      using T = typename decltype(types)::T;
      auto p = attn::fwd_params<T, float>(q, k, v, out, lse, ok, scale);
      if (gate != nullptr) {
        p.gate.logits = gate->logits.const_data_ptr<T>();
        for (size_t r = 0; r < gate->branches.size(); ++r)
          if (static_cast<int64_t>(r) != gate->self)
            p.gate.branch[r] = gate->branches[r].const_data_ptr<T>();
        p.gate.out = gate->out.mutable_data_ptr<T>();
        p.gate.branches = static_cast<int32_t>(gate->branches.size());
        p.gate.self = static_cast<int32_t>(gate->self);
      }
      const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
      bool gated;
      if (gate != nullptr && gate->sel_idx.defined()) {  // branch 0 too (GateEpilogue)
        const auto ps = attn::fwd_params<T, float>(q, k, v, gate->branches[0], gate->sel_lse, ok,
                                                   scale);
        const BlockSparseMask ms =
            attn::block_sparse_view(gate->sel_idx, gate->sel_block_size, m.causal);
        gated = gpu::blossom_branches_fwd<T>(ps, ms, p, m, stream);
      } else {
        gated = gpu::sliding_window_attention_fwd<T>(p, m, stream);
      }
      if (applied != nullptr) *applied = gate != nullptr && gated;
    });
    return {out, lse};
  }
#endif
  attn::dispatch_cpu(kOp, q.scalar_type(), [&](auto types) {
    using T = typename decltype(types)::T;
    using Acc = typename decltype(types)::Acc;
    cpu::sliding_window_attention_fwd<T, Acc>(
        attn::fwd_params<T, Acc>(q, k, v, out, lse, ok, scale), m);
  });
  return {out, lse};
}

}  // namespace

Tensor2 sliding_window_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const OptTensor& lengths, const OptTensor& valid,
                                 int64_t window, bool dilated, bool causal, double scale) {
  return forward(q, k, v, lengths, valid, window, dilated, causal, scale, nullptr, nullptr);
}

Tensor2 sliding_window_attention_gated(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const OptTensor& valid,
                                       int64_t window, bool dilated, bool causal, double scale,
                                       const GateEpilogue& gate, bool* applied) {
  return forward(q, k, v, c10::nullopt, valid, window, dilated, causal, scale, &gate, applied);
}

namespace {

// The backward into given gradient tensors: overwritten, or added to when `add` (CUDA only).
void backward_into(const char* op, const at::Tensor& grad_out, const OptTensor& grad_lse,
                   const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, const OptTensor& lengths,
                   const OptTensor& valid, int64_t window, bool dilated, bool causal,
                   double scale, const at::Tensor& gq, const at::Tensor& gk,
                   const at::Tensor& gv, bool add) {
  check_attention_inputs(op, q, k, v);
  const attn::BwdInputs in = attn::check_backward_inputs(op, grad_out, grad_lse, q, out, lse);
  const at::Tensor ok = resolve_validity(op, lengths, valid, q.size(0), q.size(1), q);
  const SlidingWindowMask m = attn::sliding_window_mask(kOp, q.size(1), window, dilated, causal);
  if (q.numel() == 0) {
    if (!add) {
      gk.zero_();
      gv.zero_();
    }
    return;
  }
#ifdef BLOSSOM_WITH_CUDA
  if (q.is_cuda()) {
    const c10::cuda::CUDAGuard guard(q.device());
    attn::dispatch_cuda(op, q.scalar_type(), [&](auto types) {
      using T = typename decltype(types)::T;
      auto p = attn::bwd_params<T, float>(in, q, k, v, gq, gk, gv, ok, scale);
      p.accumulate = add;
      const at::Tensor ws =
          attn::workspace(gpu::sliding_window_attention_bwd_workspace_bytes(p.shape, m), q);
      gpu::sliding_window_attention_bwd<T>(p, m, ws.data_ptr(), static_cast<size_t>(ws.numel()),
                       at::cuda::getCurrentCUDAStream());
    });
    return;
  }
#endif
  BLOSSOM_CHECK(!add, op, ": accumulating into the gradients is implemented for CUDA only");
  attn::dispatch_cpu(op, q.scalar_type(), [&](auto types) {
    using T = typename decltype(types)::T;
    using Acc = typename decltype(types)::Acc;
    cpu::sliding_window_attention_bwd<T, Acc>(
        attn::bwd_params<T, Acc>(in, q, k, v, gq, gk, gv, ok, scale), m);
  });
}

}  // namespace

Tensor3 sliding_window_attention_backward(const at::Tensor& grad_out, const OptTensor& grad_lse,
                                          const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& out,
                                          const at::Tensor& lse, const OptTensor& lengths,
                                          const OptTensor& valid, int64_t window, bool dilated,
                                          bool causal, double scale) {
  at::Tensor gq, gk, gv;
  std::tie(gq, gk, gv) = attn::alloc_grads(q, k, v);
  backward_into(kOp, grad_out, grad_lse, q, k, v, out, lse, lengths, valid, window, dilated,
                causal, scale, gq, gk, gv, /*add=*/false);
  return {gq, gk, gv};
}

void sliding_window_attention_backward_add(const at::Tensor& grad_out, const at::Tensor& q,
                                           const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& out, const at::Tensor& lse,
                                           const OptTensor& valid, int64_t window, bool dilated,
                                           bool causal, double scale, const at::Tensor& grad_q,
                                           const at::Tensor& grad_k, const at::Tensor& grad_v) {
  const char* op = "sliding_window_attention_backward";
  BLOSSOM_CHECK(q.is_cuda(), op, ": accumulating into the gradients is implemented for CUDA only");
  check_like(op, "grad_q", grad_q, q, q.sizes(), "(batch, seq, q_heads, head_dim)");
  check_like(op, "grad_k", grad_k, k, k.sizes(), "(batch, seq, kv_heads, head_dim)");
  check_like(op, "grad_v", grad_v, v, v.sizes(), "(batch, seq, kv_heads, head_dim)");
  backward_into(op, grad_out, c10::nullopt, q, k, v, out, lse, c10::nullopt, valid, window,
                dilated, causal, scale, grad_q, grad_k, grad_v, /*add=*/true);
}

}  // namespace blossom

TORCH_LIBRARY_IMPL(blossom_ops, CPU, m) {
  m.impl("sliding_window_attention", &blossom::sliding_window_attention);
  m.impl("sliding_window_attention_backward", &blossom::sliding_window_attention_backward);
}

#ifdef BLOSSOM_WITH_CUDA
TORCH_LIBRARY_IMPL(blossom_ops, CUDA, m) {
  m.impl("sliding_window_attention", &blossom::sliding_window_attention);
  m.impl("sliding_window_attention_backward", &blossom::sliding_window_attention_backward);
}
#endif
