// Binding of block_compress and its backward (DESIGN.md op 2). Checks, in this order:
// device and dtype of x and pos, rank and last-dim contiguity of x, block_len >= stride
// >= 1, pos shape (heads, block_len, head_dim), then lengths / valid.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cpu/block_compress.h"
#include "ops/ops.h"

#include <type_traits>

#ifdef BLOSSOM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>

#include "cuda/launch.h"
#endif

namespace blossom {
namespace {

constexpr const char* kOp = "block_compress";

void check_x(const char* op, const at::Tensor& x) {
  const auto d = x.scalar_type();
  const bool ok_dtype = d == at::kFloat || d == at::kBFloat16 ||
                        (d == at::kDouble && x.is_cpu()) || (d == at::kHalf && x.is_cuda());
  BLOSSOM_CHECK(ok_dtype, op, ": unsupported dtype ", d, " on ", x.device(),
               " (float32 and bfloat16 everywhere, float64 on CPU, float16 on CUDA)");
  BLOSSOM_CHECK(x.dim() == 4, op, ": x must have shape (batch, seq, heads, head_dim), got ",
               x.sizes());
  BLOSSOM_CHECK(x.stride(-1) == 1 || x.size(-1) <= 1, op,
               ": x must have a contiguous last dimension");
}

// Shared by forward and backward; returns pos made contiguous (or undefined).
at::Tensor check_args(const char* op, const at::Tensor& x, const OptTensor& pos,
                      int64_t block_len, int64_t stride) {
  const bool has_pos = pos.has_value() && pos->defined();
  if (has_pos) {
    BLOSSOM_CHECK(pos->device() == x.device(), op, ": pos must be on ", x.device(), ", got ",
                 pos->device());
  }
  check_x(op, x);
  BLOSSOM_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  BLOSSOM_CHECK(block_len >= stride, op, ": block_len (", block_len,
               ") must be >= stride (", stride, ")");
  if (!has_pos) return at::Tensor();
  check_like(op, "pos", *pos, x, {x.size(2), block_len, x.size(3)},
             "(heads, block_len, head_dim)");
  return pos->contiguous();
}

// Calls f(T{}, Acc{}) with the storage and accumulation types of `dtype`: float, double
// and bfloat16 on CPU; float, half and bfloat16 (all accumulating in float) on CUDA.
template <typename F>
void dispatch(const at::Tensor& like, F&& f) {
#ifdef BLOSSOM_WITH_CUDA
  if (like.is_cuda()) {
    AT_DISPATCH_SWITCH(like.scalar_type(), "block_compress",
                       AT_DISPATCH_CASE(at::kFloat, [&] { f(scalar_t(), float()); })
                       AT_DISPATCH_CASE(at::kHalf, [&] { f(scalar_t(), float()); })
                       AT_DISPATCH_CASE(at::kBFloat16, [&] { f(scalar_t(), float()); }));
    return;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, like.scalar_type(), "block_compress", [&] {
    f(scalar_t(), at::opmath_type<scalar_t>());
  });
}

// Which storage types each backend's kernels are instantiated for (the dispatch above
// never mixes them up, but a generic lambda compiles both branches).
template <typename T>
constexpr bool kCpuType = !std::is_same<T, c10::Half>::value;
template <typename T>
constexpr bool kCudaType = !std::is_same<T, double>::value;

template <typename T, typename Acc>
CompressParams<T, Acc> make_params(const at::Tensor& x, const at::Tensor& pos,
                                   const at::Tensor& ok, int64_t block_len, int64_t stride) {
  CompressParams<T, Acc> p;
  p.batch = x.size(0);
  p.seq_len = x.size(1);
  p.heads = x.size(2);
  p.head_dim = x.size(3);
  p.num_tokens = num_compressed(p.seq_len, stride);
  p.block_len = block_len;
  p.stride = stride;
  p.x = bshd_view<const T>(x);
  p.pos = pos.defined() ? static_cast<const T*>(pos.data_ptr()) : nullptr;
  p.valid = validity_view(ok);
  return p;
}

}  // namespace

Tensor2 block_compress(const at::Tensor& x, const OptTensor& pos, const OptTensor& lengths,
                       const OptTensor& valid, int64_t block_len, int64_t stride) {
  const at::Tensor pos_c = check_args(kOp, x, pos, block_len, stride);
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2), D = x.size(3);
  const at::Tensor ok = resolve_validity(kOp, lengths, valid, B, L, x);
  const int64_t T = num_compressed(L, stride);
  at::Tensor out = at::empty({B, T, H, D}, x.options());
  at::Tensor valid_cmp = at::empty({B, T}, x.options().dtype(at::kBool));
  if (B * T == 0) return {out, valid_cmp};
  dispatch(x, [&](auto t_tag, auto acc_tag) {
    using T_ = decltype(t_tag);
    using Acc = decltype(acc_tag);
    auto p = make_params<T_, Acc>(x, pos_c, ok, block_len, stride);
    p.out = bshd_view<T_>(out);
    p.valid_out = valid_cmp.data_ptr<bool>();
#ifdef BLOSSOM_WITH_CUDA
    if constexpr (kCudaType<T_>) {
      if (x.is_cuda()) {
        gpu::block_compress_fwd<T_>(p, at::cuda::getCurrentCUDAStream(x.get_device()).stream());
        return;
      }
    }
#endif
    if constexpr (kCpuType<T_>) cpu::block_compress_fwd<T_, Acc>(p);
  });
  return {out, valid_cmp};
}

Tensor2 block_compress_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                const OptTensor& pos, const OptTensor& lengths,
                                const OptTensor& valid, int64_t block_len, int64_t stride) {
  constexpr const char* op = "block_compress_backward";
  const at::Tensor pos_c = check_args(op, x, pos, block_len, stride);
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2), D = x.size(3);
  const int64_t T = num_compressed(L, stride);
  check_like(op, "grad_out", grad_out, x, {B, T, H, D},
             "(batch, num_compressed, heads, head_dim)");
  const at::Tensor ok = resolve_validity(op, lengths, valid, B, L, x);
  const at::Tensor go = grad_out.contiguous();
  at::Tensor grad_x = at::empty({B, L, H, D}, x.options());
  at::Tensor grad_pos = pos_c.defined() ? at::empty_like(pos_c) : at::empty({0}, x.options());
  if (B * T == 0) {  // no window: nothing flows back
    grad_x.zero_();
    grad_pos.zero_();
    return {grad_x, grad_pos};
  }
  dispatch(x, [&](auto t_tag, auto acc_tag) {
    using T_ = decltype(t_tag);
    using Acc = decltype(acc_tag);
    const auto p = make_params<T_, Acc>(x, pos_c, ok, block_len, stride);
    const T_* g = static_cast<const T_*>(go.data_ptr());
    T_* gx = static_cast<T_*>(grad_x.data_ptr());
    T_* gp = pos_c.defined() ? static_cast<T_*>(grad_pos.data_ptr()) : nullptr;
#ifdef BLOSSOM_WITH_CUDA
    if constexpr (kCudaType<T_>) {
      if (x.is_cuda()) {
        gpu::block_compress_bwd<T_>(p, g, gx, gp,
                                    at::cuda::getCurrentCUDAStream(x.get_device()).stream());
        return;
      }
    }
#endif
    if constexpr (kCpuType<T_>) cpu::block_compress_bwd<T_, Acc>(p, g, gx, gp);
  });
  return {grad_x, grad_pos};
}

TORCH_LIBRARY_IMPL(blossom_ops, CPU, m) {
  m.impl("block_compress", &block_compress);
  m.impl("block_compress_backward", &block_compress_backward);
}

#ifdef BLOSSOM_WITH_CUDA
TORCH_LIBRARY_IMPL(blossom_ops, CUDA, m) {
  m.impl("block_compress", &block_compress);
  m.impl("block_compress_backward", &block_compress_backward);
}
#endif

}  // namespace blossom
