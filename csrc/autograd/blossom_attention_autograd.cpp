// Autograd of blossom_ops::blossom_attention, in C++.
//
// Why not torch.library.register_autograd in Python: that wrapper (argument defaulting over
// the 16-argument schema, a Python autograd.Function, a Python backward node) was half the
// host time of a small training step (405 -> 203 us per step on the CPU, benchmarks/README.md),
// and on a GPU host time is what bounds short-sequence steps. Here the same formula is a
// torch::autograd::Function registered for the Autograd key; forward and backward both go
// through the dispatcher, so every backend (CPU, CUDA) and the fake kernels (Meta,
// torch.compile) keep working.
//
// Semantics match the former Python registration exactly: outputs 1..7 (per-branch outputs,
// lse and block_idx) are returned for the backward and for inspection and are not
// differentiable; an unused `out` (undefined grad) counts as zeros; gradients flow to q, k, v,
// gate_logits and the optional k_pos / v_pos, none to lengths / valid or the scalars.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

#include "autograd/autograd_util.h"

namespace blossom {
namespace autograd {
namespace {

using at::Tensor;
using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// Argument positions in the schema (csrc/schema.cpp): the backward returns one entry each.
enum Arg { kQ = 0, kK, kV, kGate, kKPos, kVPos, kNumArgs = 16 };

const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("blossom_ops::blossom_attention", "")
                             .typed<Outputs(const Tensor&, const Tensor&, const Tensor&,
                                            const Tensor&, const OptTensor&, const OptTensor&,
                                            const OptTensor&, const OptTensor&, int64_t, int64_t,
                                            int64_t, int64_t, int64_t, bool, bool, double)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("blossom_ops::blossom_attention_backward", "")
          .typed<Grads(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                       const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                       const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                       const Tensor&, const Tensor&, int64_t, int64_t, int64_t, int64_t, int64_t,
                       bool, bool, double)>();
  return op;
}

class BlossomAttentionFunction : public torch::autograd::Function<BlossomAttentionFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
      const Tensor& gate_logits, const OptTensor& k_pos, const OptTensor& v_pos,
      const OptTensor& lengths, const OptTensor& valid, int64_t block_len, int64_t stride,
      int64_t block_size, int64_t top_n, int64_t window, bool dilated, bool causal,
      double scale) {
    ctx->set_materialize_grads(false);  // unused outputs: undefined, not full-size zeros
    Outputs res;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      res = forward_op().call(q, k, v, gate_logits, k_pos, v_pos, lengths, valid, block_len,
                              stride, block_size, top_n, window, dilated, causal, scale);
    }
    auto& [out, o_sel, lse_sel, o_win, lse_win, o_cmp, lse_cmp, idx] = res;
    ctx->save_for_backward({q, k, v, gate_logits, value_or_undefined(k_pos),
                            value_or_undefined(v_pos), value_or_undefined(lengths),
                            value_or_undefined(valid), o_sel, lse_sel, o_win, lse_win, o_cmp,
                            lse_cmp, idx});
    // block_len .. causal in schema order, as one entry (the map is keyed by strings).
    ctx->saved_data["ints"] = c10::List<int64_t>({block_len, stride, block_size, top_n, window,
                                                  static_cast<int64_t>(dilated),
                                                  static_cast<int64_t>(causal)});
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({o_sel, lse_sel, o_win, lse_win, o_cmp, lse_cmp, idx});
    return {out, o_sel, lse_sel, o_win, lse_win, o_cmp, lse_cmp, idx};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const torch::autograd::variable_list s = ctx->get_saved_variables();
    const Tensor &q = s[0], &k = s[1], &v = s[2], &gate = s[3];
    const c10::List<int64_t> a = ctx->saved_data["ints"].toIntList();
    const double scale = ctx->saved_data["scale"].toDouble();
    // `out` received no gradient (only reachable when something upstream returned None
    // for it; the other outputs are not differentiable): it counts as zeros.
    const Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(q);
    auto call = [&] {
      return backward_op().call(grad_out, q, k, v, gate, opt(s[4]), opt(s[5]), opt(s[6]),
                                opt(s[7]), s[8], s[9], s[10], s[11], s[12], s[13], s[14],
                                a.get(0), a.get(1), a.get(2), a.get(3), a.get(4), a.get(5) != 0,
                                a.get(6) != 0, scale);
    };
    Tensor gq, gk, gv, gg, gkp, gvp;
    if (at::GradMode::is_enabled()) {
      // create_graph=True: through the Autograd key as before (torch's fallback for an op
      // without an autograd kernel decides what a second derivative does).
      std::tie(gq, gk, gv, gg, gkp, gvp) = call();
    } else {
      // The usual backward (grad mode off): the Autograd key has no kernel for the backward
      // op, so torch's boxed autograd fallback boxed its 24 arguments into IValues only to
      // redispatch below autograd. Going there directly gives the same kernel call and
      // results, for less host time per step.
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(gq, gk, gv, gg, gkp, gvp) = call();
    }
    GradSlots slots(ctx, kNumArgs);
    slots.set(kQ, std::move(gq));
    slots.set(kK, std::move(gk));
    slots.set(kV, std::move(gv));
    slots.set(kGate, std::move(gg));
    // The backward op returns empty placeholders for an absent k_pos / v_pos.
    if (s[4].defined()) slots.set(kKPos, std::move(gkp));
    if (s[5].defined()) slots.set(kVPos, std::move(gvp));
    return slots.take();
  }
};

Outputs blossom_attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                   const Tensor& gate_logits, const OptTensor& k_pos,
                                   const OptTensor& v_pos, const OptTensor& lengths,
                                   const OptTensor& valid, int64_t block_len, int64_t stride,
                                   int64_t block_size, int64_t top_n, int64_t window,
                                   bool dilated, bool causal, double scale) {
  if (!records_graph(q, k, v, gate_logits, k_pos, v_pos)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return forward_op().call(q, k, v, gate_logits, k_pos, v_pos, lengths, valid, block_len,
                             stride, block_size, top_n, window, dilated, causal, scale);
  }
  const torch::autograd::variable_list r = BlossomAttentionFunction::apply(
      q, k, v, gate_logits, k_pos, v_pos, lengths, valid, block_len, stride, block_size, top_n,
      window, dilated, causal, scale);
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]};
}

}  // namespace
}  // namespace autograd
}  // namespace blossom

TORCH_LIBRARY_IMPL(blossom_ops, Autograd, m) {
  m.impl("blossom_attention", &blossom::autograd::blossom_attention_autograd);
}
