// Binding of blossom_attention, the whole mechanism (DESIGN.md op 6), and its backward.
// It composes the other bindings (csrc/ops/ops.h) rather than kernels, so it is device
// agnostic: it runs wherever the component operators have kernels. Every argument is
// validated up front, in this order: q/k/v (device, dtype, rank, contiguity, shapes,
// heads), gate_logits (device, dtype, shape (batch, seq, q_heads, R), R in {2, 3}),
// k_pos / v_pos (heads, block_len, head_dim), the integer parameters, then lengths /
// valid, which are resolved once into a bool [B, L] mask handed to every part.
//
// Forward on CUDA, composed path: the window branch runs last and applies the gate in its
// epilogue (csrc/cuda/attn_gate_epilogue.cuh) when its query-pair kernel runs; otherwise, and
// with BLOSSOM_OPS_CUDA_GATE_EPILOGUE=0, the separate gate kernel (fuse_gate) does.
//
// Backward on CUDA, composed path (whatever the fused short path does not take: L > 256,
// R = 3, fp32, ...): the gate backward is folded into the branches' own backwards (GateFold
// in ops.h, the *_backward_gated bindings, csrc/cuda/attn_gate_fold.cuh). Each branch is
// handed the gate's output gradient dO and its gate column; its dQ pass writes that column of
// grad_gate, and no per-branch dO_r = sigmoid(g_r) * dO is stored. R = 3 is folded as well
// (compressed_attention's dQ is the same launcher).
// B=64 L=4096 Hq=8 Hk=2 D=64 bf16, R=2: saves the gate kernel's 1.36 GB of DRAM traffic
// (dO, O_sel, O_win read, dO_sel, dO_win written: 5 x 268 MB, plus 17 MB of gate rows) for
// ~50 MB added to the dQ passes (gate column read, grad_gate column and lse' written), and
// the 2 x 268 MB dO_r allocations; ~35 instructions more per dQ warp (~0.04 ms). Predicted:
// -0.55 ms (gate_bwd measured 0.61 ms of 12.97 ms on an H200; 0.16 ms at D=16 -> -0.13 ms),
// ~-2.6 ms at L=16384. BLOSSOM_OPS_CUDA_GATE_FOLD=0 (read once) restores the separate gate
// kernel for A/B runs (benchmarks/check_gate_fold_gpu.py). The CPU path is unchanged.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "cpu/gate_fusion.h"
#include "ops/attention_binding.h"
#include "ops/blossom_short.h"
#include "ops/ops.h"
#include "ops/short_select.h"

#ifdef BLOSSOM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/launch.h"
#endif

namespace blossom {
namespace {

constexpr const char* kOp = "blossom_attention";

inline bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// Returns R (2: selected + window, 3: plus the compressed branch).
int64_t check_config(const char* op, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& gate_logits,
                     const OptTensor& k_pos, const OptTensor& v_pos, int64_t block_len,
                     int64_t stride, int64_t block_size, int64_t top_n, int64_t window) {
  check_attention_inputs(op, q, k, v);
  const int64_t B = q.size(0), L = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hk = k.size(2);
  BLOSSOM_CHECK(gate_logits.dim() == 4, op,
               ": gate_logits must have shape (batch, seq, q_heads, R), got ", gate_logits.sizes());
  const int64_t R = gate_logits.size(3);
  check_like(op, "gate_logits", gate_logits, q, {B, L, Hq, R}, "(batch, seq, q_heads, R)");
  BLOSSOM_CHECK(R == 2 || R == 3, op,
               ": gate_logits must have 2 (selected, window) or 3 (+ compressed) branches in its "
               "last dimension, got ",
               R);
  BLOSSOM_CHECK(gate_logits.stride(-1) == 1, op, ": gate_logits must have a contiguous last dimension");
  check_positive(op, "stride", stride);
  BLOSSOM_CHECK(block_len >= stride, op, ": block_len (", block_len, ") must be >= stride (",
               stride, ")");
  BLOSSOM_CHECK(block_size >= stride && block_size % stride == 0, op, ": block_size (",
               block_size, ") must be a positive multiple of stride (", stride, ")");
  check_positive(op, "top_n", top_n);
  check_positive(op, "window", window);
  if (present(k_pos))
    check_like(op, "k_pos", *k_pos, q, {Hk, block_len, D}, "(kv_heads, block_len, head_dim)");
  if (present(v_pos))
    check_like(op, "v_pos", *v_pos, q, {Hk, block_len, D}, "(kv_heads, block_len, head_dim)");
  return R;
}

// The resolved validity as the `valid` argument of the parts (None when all valid).
OptTensor as_valid(const at::Tensor& ok) { return ok.defined() ? OptTensor(ok) : c10::nullopt; }

// f(T{}) for the storage type of `like` (CPU: float, double, bfloat16; CUDA: float, half,
// bfloat16).
template <typename F>
void dispatch_gate(const at::Tensor& like, F&& f) {
  auto call = [&](auto types) { f(typename decltype(types)::T{}); };
#ifdef BLOSSOM_WITH_CUDA
  if (like.is_cuda()) return attn::dispatch_cuda(kOp, like.scalar_type(), call);
#endif
  attn::dispatch_cpu(kOp, like.scalar_type(), call);
}

template <typename T>
GateParams<T> gate_params(const at::Tensor& like, const at::Tensor& gate, int64_t R) {
  GateParams<T> p;
  p.branches = R;
  p.rows = like.numel() / like.size(-1);
  p.head_dim = like.size(-1);
  p.gate = gate.const_data_ptr<T>();
  return p;
}

// The gate reads (and its backward writes) the branch tensors in place, through pointer
// lists: the gate_fusion op takes them stacked, and stacking copies R full-size tensors.
// Branches have q's shape and dtype (checked by the caller). `into`: a contiguous tensor of
// their shape to write (the one the gate epilogue was offered), else a new one.
at::Tensor fuse_gate(const std::vector<at::Tensor>& branches, const at::Tensor& gate_logits,
                     const at::Tensor& into = at::Tensor()) {
  const at::Tensor gate = gate_logits.contiguous();
  std::vector<at::Tensor> br;
  for (const at::Tensor& b : branches) br.push_back(b.contiguous());
  at::Tensor out = into.defined() ? into : at::empty_like(br[0], at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  dispatch_gate(out, [&](auto tag) {
    using T = decltype(tag);
    GateParams<T> p = gate_params<T>(out, gate, static_cast<int64_t>(br.size()));
    p.out = out.mutable_data_ptr<T>();
    std::vector<const T*> ptrs;
    for (const at::Tensor& b : br) ptrs.push_back(b.const_data_ptr<T>());
#ifdef BLOSSOM_WITH_CUDA
    if constexpr (!std::is_same<T, double>::value) {  // no CUDA kernel for double
      if (out.is_cuda()) {
        const c10::cuda::CUDAGuard guard(out.device());
        gpu::gate_fusion_fwd_list<T>(p, ptrs.data(), at::cuda::getCurrentCUDAStream());
        return;
      }
    }
#endif
    if constexpr (!std::is_same<T, c10::Half>::value) cpu::gate_fusion_fwd_list<T>(p, ptrs.data());
  });
  return out;
}

// (grad_branches, grad_gate) of fuse_gate; grad_out has q's shape and dtype.
std::pair<std::vector<at::Tensor>, at::Tensor> fuse_gate_backward(
    const at::Tensor& grad_out, const std::vector<at::Tensor>& branches,
    const at::Tensor& gate_logits) {
  const at::Tensor gate = gate_logits.contiguous(), go = grad_out.contiguous();
  std::vector<at::Tensor> br, grads;
  for (const at::Tensor& b : branches) {
    br.push_back(b.contiguous());
    grads.push_back(at::empty_like(br.back(), at::MemoryFormat::Contiguous));
  }
  at::Tensor grad_gate = at::empty(gate.sizes(), gate.options());
  if (go.numel() == 0) {  // D == 0 still leaves gate rows to zero
    grad_gate.zero_();
    return {grads, grad_gate};
  }
  dispatch_gate(go, [&](auto tag) {
    using T = decltype(tag);
    const GateParams<T> p = gate_params<T>(go, gate, static_cast<int64_t>(br.size()));
    std::vector<const T*> in;
    std::vector<T*> out;
    for (size_t r = 0; r < br.size(); ++r) {
      in.push_back(br[r].const_data_ptr<T>());
      out.push_back(grads[r].mutable_data_ptr<T>());
    }
    const T* g = go.const_data_ptr<T>();
    T* gg = grad_gate.mutable_data_ptr<T>();
#ifdef BLOSSOM_WITH_CUDA
    if constexpr (!std::is_same<T, double>::value) {  // no CUDA kernel for double
      if (go.is_cuda()) {
        const c10::cuda::CUDAGuard guard(go.device());
        gpu::gate_fusion_bwd_list<T>(p, in.data(), g, out.data(), gg,
                                     at::cuda::getCurrentCUDAStream());
        return;
      }
    }
#endif
    if constexpr (!std::is_same<T, c10::Half>::value)
      cpu::gate_fusion_bwd_list<T>(p, in.data(), g, out.data(), gg);
  });
  return {grads, grad_gate};
}

// False when BLOSSOM_OPS_CUDA_GATE_FOLD=0: the CUDA composed backward then runs the separate
// gate backward (fuse_gate_backward) before the branches, as before the fold. Read once.
bool gate_fold_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("BLOSSOM_OPS_CUDA_GATE_FOLD");
    return e == nullptr || std::strcmp(e, "0") != 0;
  }();
  return on;
}

}  // namespace

BlossomOutputs blossom_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& gate_logits, const OptTensor& k_pos,
                                 const OptTensor& v_pos, const OptTensor& lengths,
                                 const OptTensor& valid, int64_t block_len, int64_t stride,
                                 int64_t block_size, int64_t top_n, int64_t window, bool dilated,
                                 bool causal, double scale) {
  const int64_t R = check_config(kOp, q, k, v, gate_logits, k_pos, v_pos, block_len, stride,
                                 block_size, top_n, window);
  const OptTensor ok =
      as_valid(resolve_validity(kOp, lengths, valid, q.size(0), q.size(1), q));
  const OptTensor none;

#ifdef BLOSSOM_WITH_CUDA
  // Short sequences: one fused kernel for both branches and the gate, and (when it covers
  // the configuration) one for compression + selection. R == 2 there, so nothing else
  // needs k_cmp (the short backward reads only block_idx).
  if (short_path::usable(q, k, v, R)) {
    at::Tensor idx = short_path::select(q, k, k_pos, ok.value_or(at::Tensor()), block_len,
                                        stride, block_size, top_n, causal, scale);
    if (!idx.defined()) {
      const at::Tensor k_cmp = std::get<0>(block_compress(k, k_pos, none, ok, block_len, stride));
      idx = select_blocks(q, k_cmp, none, ok, top_n, block_size, stride, block_len, causal,
                          scale);
    }
    return short_path::forward(q, k, v, gate_logits, ok.value_or(at::Tensor()), idx, block_size,
                               window, dilated, causal, scale);
  }
#endif
  const at::Tensor k_cmp = std::get<0>(block_compress(k, k_pos, none, ok, block_len, stride));
  const at::Tensor idx = select_blocks(q, k_cmp, none, ok, top_n, block_size, stride, block_len,
                                       causal, scale);
  at::Tensor o_sel, lse_sel, o_win, lse_win, o_cmp, lse_cmp;
  // CUDA: the block-sparse branch is computed by the window's call below (GateEpilogue's
  // sel_idx: one kernel for both branches and the gate where it applies).
  const bool cuda_gated = q.is_cuda() && q.numel() > 0 && gate_logits.is_contiguous();
  if (!cuda_gated)
    std::tie(o_sel, lse_sel) =
        block_sparse_attention(q, k, v, idx, none, ok, block_size, causal, scale);
  if (R == 3) {
    const at::Tensor v_cmp = std::get<0>(block_compress(v, v_pos, none, ok, block_len, stride));
    std::tie(o_cmp, lse_cmp) =
        compressed_attention(q, k_cmp, v_cmp, none, ok, block_len, stride, causal, scale);
  } else {
    // Same placeholders as the fake kernel in blossom_ops/ops.py.
    o_cmp = at::empty({0}, q.options());
    lse_cmp = at::empty({0}, q.options().dtype(acc_dtype(q.scalar_type())));
  }
  // The window runs last (the branches are independent): on CUDA its forward may apply the
  // gate in its epilogue (GateEpilogue in ops.h), reading the other branches' outputs, so
  // the separate gate kernel does not run. Bit-identical to it; contiguous buffers only.
  at::Tensor out;
  bool gated = false;
  if (cuda_gated) {
    GateEpilogue ge;
    ge.logits = gate_logits;
    std::tie(o_sel, lse_sel) = attn::alloc_outputs(q);
    ge.sel_idx = idx;
    ge.sel_lse = lse_sel;
    ge.sel_block_size = block_size;
    ge.branches = {o_sel, at::Tensor()};
    if (R == 3) ge.branches.push_back(o_cmp.contiguous());
    ge.self = 1;
    ge.out = at::empty_like(o_sel, at::MemoryFormat::Contiguous);
    std::tie(o_win, lse_win) = sliding_window_attention_gated(q, k, v, ok, window, dilated,
                                                              causal, scale, ge, &gated);
    out = ge.out;
  } else {
    std::tie(o_win, lse_win) =
        sliding_window_attention(q, k, v, none, ok, window, dilated, causal, scale);
  }
  if (!gated) {
    std::vector<at::Tensor> branches{o_sel, o_win};
    if (R == 3) branches.push_back(o_cmp);
    out = fuse_gate(branches, gate_logits, out);
  }
  return {out, o_sel, lse_sel, o_win, lse_win, o_cmp, lse_cmp, idx};
}

BlossomGrads blossom_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& gate_logits, const OptTensor& k_pos, const OptTensor& v_pos,
    const OptTensor& lengths, const OptTensor& valid, const at::Tensor& o_sel,
    const at::Tensor& lse_sel, const at::Tensor& o_win, const at::Tensor& lse_win,
    const at::Tensor& o_cmp, const at::Tensor& lse_cmp, const at::Tensor& block_idx,
    int64_t block_len, int64_t stride, int64_t block_size, int64_t top_n, int64_t window,
    bool dilated, bool causal, double scale) {
  constexpr const char* op = "blossom_attention_backward";
  const int64_t R = check_config(op, q, k, v, gate_logits, k_pos, v_pos, block_len, stride,
                                 block_size, top_n, window);
  check_like(op, "grad_out", grad_out, q, q.sizes(), "(batch, seq, q_heads, head_dim)");
  // The gate backward reads the saved branch outputs before the attention backwards
  // check them, so they are checked (like q) here.
  check_like(op, "o_sel", o_sel, q, q.sizes(), "(batch, seq, q_heads, head_dim)");
  check_like(op, "o_win", o_win, q, q.sizes(), "(batch, seq, q_heads, head_dim)");
  BLOSSOM_CHECK(R == 2 || o_cmp.sizes() == q.sizes(), op,
               ": o_cmp must have the shape of q when gate_logits has 3 branches, got ",
               o_cmp.sizes());
  if (R == 3) check_like(op, "o_cmp", o_cmp, q, q.sizes(), "(batch, seq, q_heads, head_dim)");
  const OptTensor ok =
      as_valid(resolve_validity(op, lengths, valid, q.size(0), q.size(1), q));
  const OptTensor none;
#ifdef BLOSSOM_WITH_CUDA
  if (short_path::usable(q, k, v, R)) {
    at::Tensor gq, gk, gv, gg;
    std::tie(gq, gk, gv, gg) = short_path::backward(
        grad_out, q, k, v, gate_logits, ok.value_or(at::Tensor()), o_sel, lse_sel, o_win,
        lse_win, block_idx, block_size, window, dilated, causal, scale);
    // R == 2: k_pos / v_pos do not reach the output.
    return {gq, gk, gv, gg,
            present(k_pos) ? at::zeros_like(*k_pos) : at::empty({0}, q.options()),
            present(v_pos) ? at::zeros_like(*v_pos) : at::empty({0}, q.options())};
  }
#endif

  // CUDA: the gate folded into the branch backwards (see the top of this file). Every
  // column r of grad_gate is written, for every row, by branch r's dQ pass; with no elements
  // (D = 0) the kernels do not run, so that case keeps the separate gate backward.
  const bool fold = q.is_cuda() && gate_fold_enabled() && grad_out.numel() > 0;
  std::vector<at::Tensor> g_branches;
  at::Tensor grad_gate;
  GateFold gate;
  if (fold) {
    grad_gate = at::empty(gate_logits.sizes(),
                          gate_logits.options().memory_format(at::MemoryFormat::Contiguous));
    gate.logits = gate_logits;
    gate.grad = grad_gate;
    // The branches read dO once per row pass; contiguous keeps their 16-byte fast paths.
    const at::Tensor go = grad_out.contiguous();
    g_branches.assign(static_cast<size_t>(R), go);
  } else {
    std::vector<at::Tensor> outs{o_sel, o_win};
    if (R == 3) outs.push_back(o_cmp);
    std::tie(g_branches, grad_gate) = fuse_gate_backward(grad_out, outs, gate_logits);
  }

  // The attention backwards write full gradients; the first of each is the accumulator.
  at::Tensor grad_q, grad_k, grad_v, gq, gk, gv;
  if (fold) {
    // Both branches in one call: their dQ passes may then share a kernel
    // (csrc/cuda/attn_dq_fused.cuh); the window's gradients are added to the block-sparse ones.
    gate.r = 0;
    WindowBranch win;
    win.out = o_win;
    win.lse = lse_win;
    win.window = window;
    win.dilated = dilated;
    win.gate = gate;
    win.gate.r = 1;
    std::tie(grad_q, grad_k, grad_v) =
        block_sparse_attention_backward_gated(g_branches[0], q, k, v, o_sel, lse_sel, block_idx,
                                              ok, block_size, causal, scale, gate, &win);
  } else {
    std::tie(grad_q, grad_k, grad_v) =
        block_sparse_attention_backward(g_branches[0], none, q, k, v, o_sel, lse_sel, block_idx,
                                        none, ok, block_size, causal, scale);
  }
  if (fold) {
    // The window branch ran in the call above.
  } else if (q.is_cuda()) {  // the window kernels add their gradients in their own stores
    sliding_window_attention_backward_add(g_branches[1], q, k, v, o_win, lse_win, ok, window,
                                          dilated, causal, scale, grad_q, grad_k, grad_v);
  } else {
    std::tie(gq, gk, gv) = sliding_window_attention_backward(
        g_branches[1], none, q, k, v, o_win, lse_win, none, ok, window, dilated, causal, scale);
    grad_q.add_(gq);
    grad_k.add_(gk);
    grad_v.add_(gv);
  }

  // k_pos reaches the output only through the compressed branch (selection is discrete).
  at::Tensor grad_k_pos = present(k_pos) ? at::zeros_like(*k_pos) : at::empty({0}, q.options());
  at::Tensor grad_v_pos = present(v_pos) ? at::zeros_like(*v_pos) : at::empty({0}, q.options());
  if (R == 3) {
    const at::Tensor k_cmp = std::get<0>(block_compress(k, k_pos, none, ok, block_len, stride));
    const at::Tensor v_cmp = std::get<0>(block_compress(v, v_pos, none, ok, block_len, stride));
    at::Tensor g_kcmp, g_vcmp, gx;
    if (fold) {
      gate.r = 2;
      std::tie(gq, g_kcmp, g_vcmp) = compressed_attention_backward_gated(
          g_branches[2], q, k_cmp, v_cmp, o_cmp, lse_cmp, ok, block_len, stride, causal, scale,
          gate);
    } else {
      std::tie(gq, g_kcmp, g_vcmp) =
          compressed_attention_backward(g_branches[2], none, q, k_cmp, v_cmp, o_cmp, lse_cmp,
                                        none, ok, block_len, stride, causal, scale);
    }
    grad_q.add_(gq);
    std::tie(gx, grad_k_pos) =
        block_compress_backward(g_kcmp, k, k_pos, none, ok, block_len, stride);
    grad_k.add_(gx);
    std::tie(gx, grad_v_pos) =
        block_compress_backward(g_vcmp, v, v_pos, none, ok, block_len, stride);
    grad_v.add_(gx);
  }
  return {grad_q, grad_k, grad_v, grad_gate, grad_k_pos, grad_v_pos};
}

}  // namespace blossom

TORCH_LIBRARY_IMPL(blossom_ops, CPU, m) {
  m.impl("blossom_attention", &blossom::blossom_attention);
  m.impl("blossom_attention_backward", &blossom::blossom_attention_backward);
}

#ifdef BLOSSOM_WITH_CUDA
TORCH_LIBRARY_IMPL(blossom_ops, CUDA, m) {
  m.impl("blossom_attention", &blossom::blossom_attention);
  m.impl("blossom_attention_backward", &blossom::blossom_attention_backward);
}
#endif
