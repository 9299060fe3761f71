// Host side of the fused short-sequence CUDA path of blossom_attention: eligibility,
// allocation and parameter filling (the kernels are in csrc/cuda/blossom_short.cu).
// Compiled to nothing without BLOSSOM_WITH_CUDA.
#ifdef BLOSSOM_WITH_CUDA
#include "ops/blossom_short.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/checks.h"
#include "ops/attention_binding.h"
#include "cuda/blossom_short.h"

namespace blossom {
namespace short_path {
namespace {

// Rows of a [B, L, H, D] tensor can be moved in 16-byte pieces.
bool rows_aligned(const at::Tensor& t) {
  const int64_t e = 16 / static_cast<int64_t>(t.element_size());
  return (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15u) == 0 && t.stride(3) == 1 &&
         t.stride(0) % e == 0 && t.stride(1) % e == 0 && t.stride(2) % e == 0;
}

// t itself when its rows are aligned, else an aligned contiguous copy.
at::Tensor aligned(const at::Tensor& t) {
  if (rows_aligned(t)) return t;
  at::Tensor c = t.contiguous();
  return rows_aligned(c) ? c : t.clone(at::MemoryFormat::Contiguous);
}

// block_idx rows are read with unit stride (a strided index is copied).
at::Tensor index_rows(const at::Tensor& idx, const at::Tensor& q, const at::Tensor& k) {
  BLOSSOM_CHECK(idx.device() == q.device() && idx.scalar_type() == at::kInt && idx.dim() == 4 &&
                  idx.size(0) == q.size(0) && idx.size(1) == q.size(1) &&
                  idx.size(2) == k.size(2),
               "blossom_attention_backward: block_idx must be int32 (batch, seq, kv_heads, n) "
               "on ", q.device(), ", got ", idx.scalar_type(), " ", idx.sizes());
  return (idx.stride(3) == 1 || idx.size(3) <= 1) ? idx : idx.contiguous();
}

SlidingWindowMask win_mask(int64_t window, bool dilated, bool causal) {
  SlidingWindowMask m;
  m.window = window;
  m.dilated = dilated;
  m.causal = causal;
  return m;
}

// The fields the forward and backward parameters share: shape, q / k / v / gate views,
// both masks and the validity.
template <typename T, typename P>
void fill_common(P& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& gate_logits, const at::Tensor& ok, const at::Tensor& idx,
                 int64_t block_size, int64_t window, bool dilated, bool causal, double scale) {
  p.shape = attn::attn_shape(q, k, scale);
  p.q = bshd_view<const T>(q);
  p.k = bshd_view<const T>(k);
  p.v = bshd_view<const T>(v);
  p.gate = bshd_view<const T>(gate_logits);
  p.sel = attn::block_sparse_view(idx, block_size, causal);
  p.win = win_mask(window, dilated, causal);
  p.valid = validity_view(ok);
}

template <typename F>
void dispatch16(at::ScalarType t, F&& f) {
  if (t == at::kHalf) return f(c10::Half{});
  BLOSSOM_CHECK(t == at::kBFloat16, "blossom_attention: fused path needs half or bfloat16");
  return f(c10::BFloat16{});
}

}  // namespace

bool usable(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t R) {
  if (!q.is_cuda() || R != 2) return false;
  if (q.scalar_type() != at::kHalf && q.scalar_type() != at::kBFloat16) return false;
  if (q.size(0) == 0 || q.size(1) == 0 || q.size(2) == 0) return false;
  if (!gpu::blossom_short_eligible(q.size(1), q.size(3), q.size(2) / k.size(2))) return false;
  return rows_aligned(q) && rows_aligned(k) && rows_aligned(v);
}

BlossomOutputs forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& gate_logits, const at::Tensor& ok,
                       const at::Tensor& idx_in, int64_t block_size, int64_t window,
                       bool dilated, bool causal, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor idx = index_rows(idx_in, q, k);
  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty(q.sizes(), opts), o_sel = at::empty(q.sizes(), opts),
             o_win = at::empty(q.sizes(), opts);
  const auto fopts = q.options().dtype(at::kFloat);
  at::Tensor lse_sel = at::empty({q.size(0), q.size(1), q.size(2)}, fopts);
  at::Tensor lse_win = at::empty({q.size(0), q.size(1), q.size(2)}, fopts);
  dispatch16(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    gpu::ShortFwdParams<T> p;
    fill_common<T>(p, q, k, v, gate_logits, ok, idx, block_size, window, dilated, causal, scale);
    p.out = out.data_ptr<T>();
    p.o_sel = o_sel.data_ptr<T>();
    p.o_win = o_win.data_ptr<T>();
    p.lse_sel = lse_sel.data_ptr<float>();
    p.lse_win = lse_win.data_ptr<float>();
    gpu::blossom_short_fwd<T>(p, at::cuda::getCurrentCUDAStream());
  });
  // Same placeholders as the fake kernel in blossom_ops/ops.py for R == 2.
  return {out,     o_sel,   lse_sel, o_win, lse_win, at::empty({0}, q.options()),
          at::empty({0}, fopts), idx_in};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& gate_logits, const at::Tensor& ok, const at::Tensor& o_sel,
    const at::Tensor& lse_sel, const at::Tensor& o_win, const at::Tensor& lse_win,
    const at::Tensor& block_idx, int64_t block_size, int64_t window, bool dilated, bool causal,
    double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor idx = index_rows(block_idx, q, k);
  const at::Tensor go = aligned(grad_out), os = aligned(o_sel), ow = aligned(o_win);
  const std::vector<int64_t> lse_shape{q.size(0), q.size(1), q.size(2)};
  for (const at::Tensor* t : {&lse_sel, &lse_win})
    BLOSSOM_CHECK(t->device() == q.device() && t->scalar_type() == at::kFloat &&
                    t->sizes() == at::IntArrayRef(lse_shape),
                 "blossom_attention_backward: lse_sel / lse_win must be float32 (batch, seq, "
                 "q_heads) on ", q.device(), ", got ", t->scalar_type(), " ", t->sizes());
  const at::Tensor ls = lse_sel.contiguous(), lw = lse_win.contiguous();
  const auto opts = at::MemoryFormat::Contiguous;
  at::Tensor gq = at::empty(q.sizes(), q.options().memory_format(opts));
  at::Tensor gk = at::empty(k.sizes(), k.options().memory_format(opts));
  at::Tensor gv = at::empty(v.sizes(), v.options().memory_format(opts));
  at::Tensor gg = at::empty(gate_logits.sizes(), gate_logits.options().memory_format(opts));
  const size_t ws_bytes = gpu::blossom_short_bwd_workspace_bytes(attn::attn_shape(q, k, scale));
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  dispatch16(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    gpu::ShortBwdParams<T> p;
    fill_common<T>(p, q, k, v, gate_logits, ok, idx, block_size, window, dilated, causal, scale);
    p.grad_out = bshd_view<const T>(go);
    p.o_sel = bshd_view<const T>(os);
    p.o_win = bshd_view<const T>(ow);
    p.lse_sel = ls.data_ptr<float>();
    p.lse_win = lw.data_ptr<float>();
    p.grad_q = gq.data_ptr<T>();
    p.grad_k = gk.data_ptr<T>();
    p.grad_v = gv.data_ptr<T>();
    p.grad_gate = gg.data_ptr<T>();
    gpu::blossom_short_bwd<T>(p, ws.data_ptr(), ws_bytes, at::cuda::getCurrentCUDAStream());
  });
  return {gq, gk, gv, gg};
}

}  // namespace short_path
}  // namespace blossom
#endif  // BLOSSOM_WITH_CUDA
