// Binding of gate_fusion and its backward (DESIGN.md op 5). Checks, in this order:
// device, dtype, ranks, last-dim contiguity, R >= 1, gate_logits shape
// (batch, seq, q_heads, R) matching branches (R, batch, seq, q_heads, head_dim).
// The kernels take contiguous [R, rows, D] / [rows, R] buffers, so inputs are made
// contiguous here (a no-op for the stacked branches of blossom_attention).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <type_traits>

#include "common/checks.h"
#include "cpu/gate_fusion.h"
#include "ops/ops.h"

#ifdef BLOSSOM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>

#include "cuda/launch.h"
#endif

namespace blossom {
namespace {

template <typename F>
void dispatch(const at::Tensor& like, F&& f) {
#ifdef BLOSSOM_WITH_CUDA
  if (like.is_cuda()) {
    AT_DISPATCH_SWITCH(like.scalar_type(), "gate_fusion",
                       AT_DISPATCH_CASE(at::kFloat, [&] { f(scalar_t()); })
                       AT_DISPATCH_CASE(at::kHalf, [&] { f(scalar_t()); })
                       AT_DISPATCH_CASE(at::kBFloat16, [&] { f(scalar_t()); }));
    return;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, like.scalar_type(), "gate_fusion", [&] { f(scalar_t()); });
}

template <typename T>
constexpr bool kCpuType = !std::is_same<T, c10::Half>::value;
template <typename T>
constexpr bool kCudaType = !std::is_same<T, double>::value;

void check_gate_inputs(const char* op, const at::Tensor& branches, const at::Tensor& gate) {
  BLOSSOM_CHECK(branches.device() == gate.device(), op,
               ": branches and gate_logits must be on the same device, got ", branches.device(),
               ", ", gate.device());
  BLOSSOM_CHECK(branches.scalar_type() == gate.scalar_type(), op,
               ": branches and gate_logits must have the same dtype, got ",
               branches.scalar_type(), ", ", gate.scalar_type());
  const auto d = branches.scalar_type();
  const bool ok_dtype = d == at::kFloat || d == at::kBFloat16 ||
                        (d == at::kDouble && branches.is_cpu()) ||
                        (d == at::kHalf && branches.is_cuda());
  BLOSSOM_CHECK(ok_dtype, op, ": unsupported dtype ", d, " on ", branches.device(),
               " (float32 and bfloat16 everywhere, float64 on CPU, float16 on CUDA)");
  BLOSSOM_CHECK(branches.dim() == 5, op,
               ": branches must have shape (R, batch, seq, q_heads, head_dim), got ",
               branches.sizes());
  BLOSSOM_CHECK(gate.dim() == 4, op, ": gate_logits must have shape (batch, seq, q_heads, R), got ",
               gate.sizes());
  BLOSSOM_CHECK(branches.stride(-1) == 1 || branches.size(-1) <= 1, op,
               ": branches must have a contiguous last dimension");
  BLOSSOM_CHECK(gate.stride(-1) == 1 || gate.size(-1) <= 1, op,
               ": gate_logits must have a contiguous last dimension");
  const int64_t R = branches.size(0);
  BLOSSOM_CHECK(R >= 1, op, ": need at least one branch (R >= 1), got R = ", R);
  const std::vector<int64_t> want{branches.size(1), branches.size(2), branches.size(3), R};
  BLOSSOM_CHECK(gate.sizes() == at::IntArrayRef(want), op,
               ": gate_logits must have shape (batch, seq, q_heads, R) = ", at::IntArrayRef(want),
               " to match branches ", branches.sizes(), ", got ", gate.sizes());
}

template <typename T>
GateParams<T> make_params(const at::Tensor& branches, const at::Tensor& gate) {
  GateParams<T> p;
  p.branches = branches.size(0);
  p.rows = branches.size(1) * branches.size(2) * branches.size(3);
  p.head_dim = branches.size(4);
  p.branch = static_cast<const T*>(branches.data_ptr());
  p.gate = static_cast<const T*>(gate.data_ptr());
  return p;
}

}  // namespace

at::Tensor gate_fusion(const at::Tensor& branches, const at::Tensor& gate_logits) {
  constexpr const char* op = "gate_fusion";
  check_gate_inputs(op, branches, gate_logits);
  const at::Tensor br = branches.contiguous(), gate = gate_logits.contiguous();
  at::Tensor out = at::empty(br.sizes().slice(1), br.options());
  if (out.numel() == 0) return out;
  dispatch(br, [&](auto tag) {
    using T_ = decltype(tag);
    auto p = make_params<T_>(br, gate);
    p.out = static_cast<T_*>(out.data_ptr());
#ifdef BLOSSOM_WITH_CUDA
    if constexpr (kCudaType<T_>) {
      if (br.is_cuda()) {
        gpu::gate_fusion_fwd<T_>(p, at::cuda::getCurrentCUDAStream(br.get_device()).stream());
        return;
      }
    }
#endif
    if constexpr (kCpuType<T_>) cpu::gate_fusion_fwd<T_>(p);
  });
  return out;
}

Tensor2 gate_fusion_backward(const at::Tensor& grad_out, const at::Tensor& branches,
                             const at::Tensor& gate_logits) {
  constexpr const char* op = "gate_fusion_backward";
  check_gate_inputs(op, branches, gate_logits);
  check_like(op, "grad_out", grad_out, branches, branches.sizes().slice(1),
             "(batch, seq, q_heads, head_dim)");
  const at::Tensor br = branches.contiguous(), gate = gate_logits.contiguous();
  const at::Tensor go = grad_out.contiguous();
  at::Tensor grad_branches = at::empty(br.sizes(), br.options());
  at::Tensor grad_gate = at::empty(gate.sizes(), gate.options());
  if (go.numel() == 0) {  // D == 0 still leaves gate rows to zero
    grad_gate.zero_();
    return {grad_branches, grad_gate};
  }
  dispatch(br, [&](auto tag) {
    using T_ = decltype(tag);
    const auto p = make_params<T_>(br, gate);
    const T_* g = static_cast<const T_*>(go.data_ptr());
    T_* gb = static_cast<T_*>(grad_branches.data_ptr());
    T_* gg = static_cast<T_*>(grad_gate.data_ptr());
#ifdef BLOSSOM_WITH_CUDA
    if constexpr (kCudaType<T_>) {
      if (br.is_cuda()) {
        gpu::gate_fusion_bwd<T_>(p, g, gb, gg,
                                 at::cuda::getCurrentCUDAStream(br.get_device()).stream());
        return;
      }
    }
#endif
    if constexpr (kCpuType<T_>) cpu::gate_fusion_bwd<T_>(p, g, gb, gg);
  });
  return {grad_branches, grad_gate};
}

TORCH_LIBRARY_IMPL(blossom_ops, CPU, m) {
  m.impl("gate_fusion", &gate_fusion);
  m.impl("gate_fusion_backward", &gate_fusion_backward);
}

#ifdef BLOSSOM_WITH_CUDA
TORCH_LIBRARY_IMPL(blossom_ops, CUDA, m) {
  m.impl("gate_fusion", &gate_fusion);
  m.impl("gate_fusion_backward", &gate_fusion_backward);
}
#endif

}  // namespace blossom
