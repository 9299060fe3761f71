// Autograd of blossom_ops::block_compress, in C++ (why C++ rather than
// torch.library.register_autograd: host time per step, see blossom_attention_autograd.cpp).
// valid_cmp is a bool mask (not differentiable); gradients flow to x and, when given, pos.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

#include "autograd/autograd_util.h"

namespace blossom {
namespace autograd {
namespace {

using at::Tensor;
using Outputs = std::tuple<Tensor, Tensor>;
using Grads = std::tuple<Tensor, Tensor>;
constexpr size_t kNumArgs = 6;

const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("blossom_ops::block_compress", "")
                             .typed<Outputs(const Tensor&, const OptTensor&, const OptTensor&,
                                            const OptTensor&, int64_t, int64_t)>();
  return op;
}

const auto& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("blossom_ops::block_compress_backward", "")
                             .typed<Grads(const Tensor&, const Tensor&, const OptTensor&,
                                          const OptTensor&, const OptTensor&, int64_t,
                                          int64_t)>();
  return op;
}

class BlockCompressFunction : public torch::autograd::Function<BlockCompressFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const Tensor& x, const OptTensor& pos,
                                                const OptTensor& lengths,
                                                const OptTensor& valid, int64_t block_len,
                                                int64_t stride) {
    // Gradients stay materialised (as in the former Python registration): an unused `out`
    // reaches the backward op as zeros.
    Tensor out, valid_cmp;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, valid_cmp) = forward_op().call(x, pos, lengths, valid, block_len, stride);
    }
    ctx->save_for_backward(
        {x, value_or_undefined(pos), value_or_undefined(lengths), value_or_undefined(valid)});
    ctx->saved_data["block_len"] = block_len;
    ctx->saved_data["stride"] = stride;
    ctx->mark_non_differentiable({valid_cmp});
    return {out, valid_cmp};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const torch::autograd::variable_list s = ctx->get_saved_variables();
    Tensor gx, gpos;
    std::tie(gx, gpos) =
        backward_op().call(grads[0], s[0], opt(s[1]), opt(s[2]), opt(s[3]),
                           ctx->saved_data["block_len"].toInt(),
                           ctx->saved_data["stride"].toInt());
    GradSlots slots(ctx, kNumArgs);
    slots.set(0, std::move(gx));
    if (s[1].defined()) slots.set(1, std::move(gpos));  // else an empty placeholder
    return slots.take();
  }
};

Outputs block_compress_autograd(const Tensor& x, const OptTensor& pos, const OptTensor& lengths,
                                const OptTensor& valid, int64_t block_len, int64_t stride) {
  if (!records_graph(x, pos)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return forward_op().call(x, pos, lengths, valid, block_len, stride);
  }
  const torch::autograd::variable_list r =
      BlockCompressFunction::apply(x, pos, lengths, valid, block_len, stride);
  return {r[0], r[1]};
}

}  // namespace
}  // namespace autograd
}  // namespace blossom

TORCH_LIBRARY_IMPL(blossom_ops, Autograd, m) {
  m.impl("block_compress", &blossom::autograd::block_compress_autograd);
}
