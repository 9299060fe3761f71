// Autograd of blossom_ops::gate_fusion, in C++ (why C++ rather than
// torch.library.register_autograd: host time per step, see blossom_attention_autograd.cpp).
// Gradients flow to branches and gate_logits.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

#include "autograd/autograd_util.h"

namespace blossom {
namespace autograd {
namespace {

using at::Tensor;
using Grads = std::tuple<Tensor, Tensor>;
constexpr size_t kNumArgs = 2;

const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("blossom_ops::gate_fusion", "")
                             .typed<Tensor(const Tensor&, const Tensor&)>();
  return op;
}

const auto& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("blossom_ops::gate_fusion_backward", "")
                             .typed<Grads(const Tensor&, const Tensor&, const Tensor&)>();
  return op;
}

class GateFusionFunction : public torch::autograd::Function<GateFusionFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& branches,
                        const Tensor& gate_logits) {
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = forward_op().call(branches, gate_logits);
    }
    ctx->save_for_backward({branches, gate_logits});
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const torch::autograd::variable_list s = ctx->get_saved_variables();
    Tensor gb, gg;
    std::tie(gb, gg) = backward_op().call(grads[0], s[0], s[1]);
    GradSlots slots(ctx, kNumArgs);
    slots.set(0, std::move(gb));
    slots.set(1, std::move(gg));
    return slots.take();
  }
};

Tensor gate_fusion_autograd(const Tensor& branches, const Tensor& gate_logits) {
  if (!records_graph(branches, gate_logits)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return forward_op().call(branches, gate_logits);
  }
  return GateFusionFunction::apply(branches, gate_logits);
}

}  // namespace
}  // namespace autograd
}  // namespace blossom

TORCH_LIBRARY_IMPL(blossom_ops, Autograd, m) {
  m.impl("gate_fusion", &blossom::autograd::gate_fusion_autograd);
}
