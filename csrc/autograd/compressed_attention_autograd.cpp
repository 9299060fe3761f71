// Autograd of blossom_ops::compressed_attention, in C++ (why C++ rather than
// torch.library.register_autograd: host time per step, see blossom_attention_autograd.cpp).
// out and lse are both differentiable; an unused one gets an undefined gradient (lse: None to
// the backward op; out: zeros). Gradients flow to q, k_cmp, v_cmp only.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

#include "autograd/autograd_util.h"

namespace blossom {
namespace autograd {
namespace {

using at::Tensor;
using Outputs = std::tuple<Tensor, Tensor>;
using Grads = std::tuple<Tensor, Tensor, Tensor>;
constexpr size_t kNumArgs = 9;

const auto& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("blossom_ops::compressed_attention", "")
          .typed<Outputs(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                         const OptTensor&, int64_t, int64_t, bool, double)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("blossom_ops::compressed_attention_backward", "")
          .typed<Grads(const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
                       const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                       const OptTensor&, int64_t, int64_t, bool, double)>();
  return op;
}

class CompressedAttentionFunction
    : public torch::autograd::Function<CompressedAttentionFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const Tensor& q, const Tensor& k_cmp,
                                                const Tensor& v_cmp, const OptTensor& lengths,
                                                const OptTensor& valid, int64_t block_len,
                                                int64_t stride, bool causal, double scale) {
    ctx->set_materialize_grads(false);  // unused outputs: undefined, not full-size zeros
    Tensor out, lse;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, lse) = forward_op().call(q, k_cmp, v_cmp, lengths, valid, block_len,
                                             stride, causal, scale);
    }
    ctx->save_for_backward(
        {q, k_cmp, v_cmp, out, lse, value_or_undefined(lengths), value_or_undefined(valid)});
    ctx->saved_data["block_len"] = block_len;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const torch::autograd::variable_list s = ctx->get_saved_variables();
    const Tensor& out = s[3];
    const Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(out);  // lse only
    Tensor gq, gk, gv;
    std::tie(gq, gk, gv) = backward_op().call(
        grad_out, opt(grads[1]), s[0], s[1], s[2], out, s[4], opt(s[5]), opt(s[6]),
        ctx->saved_data["block_len"].toInt(), ctx->saved_data["stride"].toInt(),
        ctx->saved_data["causal"].toBool(), ctx->saved_data["scale"].toDouble());
    GradSlots slots(ctx, kNumArgs);
    slots.set(0, std::move(gq));
    slots.set(1, std::move(gk));
    slots.set(2, std::move(gv));
    return slots.take();
  }
};

Outputs compressed_attention_autograd(const Tensor& q, const Tensor& k_cmp, const Tensor& v_cmp,
                                      const OptTensor& lengths, const OptTensor& valid,
                                      int64_t block_len, int64_t stride, bool causal,
                                      double scale) {
  if (!records_graph(q, k_cmp, v_cmp)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return forward_op().call(q, k_cmp, v_cmp, lengths, valid, block_len, stride, causal, scale);
  }
  const torch::autograd::variable_list r = CompressedAttentionFunction::apply(
      q, k_cmp, v_cmp, lengths, valid, block_len, stride, causal, scale);
  return {r[0], r[1]};
}

}  // namespace
}  // namespace autograd
}  // namespace blossom

TORCH_LIBRARY_IMPL(blossom_ops, Autograd, m) {
  m.impl("compressed_attention", &blossom::autograd::compressed_attention_autograd);
}
