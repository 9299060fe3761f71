// Small helpers shared by the C++ autograd kernels in csrc/autograd/ (one file per op).
//
// Each op's autograd is a torch::autograd::Function registered for the Autograd key: the
// forward redispatches below autograd to the op, the backward calls the op's registered
// `<op>_backward`, both through the dispatcher (so CPU, CUDA and the fake kernels all work).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/autograd.h>

#include <cstddef>
#include <utility>

namespace blossom {
namespace autograd {

using OptTensor = c10::optional<at::Tensor>;

// save_for_backward takes tensors; an absent optional is saved as an undefined tensor ...
inline at::Tensor value_or_undefined(const OptTensor& t) {
  return t.has_value() ? *t : at::Tensor();
}

// ... and handed back to the backward op as None.
inline OptTensor opt(const at::Tensor& t) {
  return t.defined() ? OptTensor(t) : c10::nullopt;
}

inline bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_grad(const OptTensor& t) { return t.has_value() && requires_grad(*t); }

// True when the forward must record a node: grad mode on and some input needs a gradient.
// Otherwise the kernels call the op directly, without building a node.
template <typename... Ts>
bool records_graph(const Ts&... differentiable_inputs) {
  return at::GradMode::is_enabled() && (requires_grad(differentiable_inputs) || ...);
}

// Fills the backward's return list: one entry per schema argument, left undefined where the
// argument is not a tensor, was not given, or needs no gradient. needs_input_grad counts only
// the tensors that were given (an absent optional has no edge), so `set` must be called in
// schema order for every given tensor argument up to the last one with a gradient.
class GradSlots {
 public:
  GradSlots(torch::autograd::AutogradContext* ctx, size_t num_args)
      : ctx_(ctx), grads_(num_args) {}

  // Argument `arg` is a given tensor with gradient `g`.
  void set(size_t arg, at::Tensor g) {
    if (ctx_->needs_input_grad(edge_++)) grads_[arg] = std::move(g);
  }

  torch::autograd::variable_list take() { return std::move(grads_); }

 private:
  torch::autograd::AutogradContext* ctx_;
  torch::autograd::variable_list grads_;
  size_t edge_ = 0;
};

}  // namespace autograd
}  // namespace blossom
