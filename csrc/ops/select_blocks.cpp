// Binding of select_blocks (DESIGN.md op 3). Checks, in this order: block_len >= stride
// >= 1, block_size a multiple of stride, top_n >= 1, then q / k_cmp (device, dtype,
// rank, last-dim contiguity, k_cmp shape (batch, ceil(seq / stride), kv_heads, head_dim),
// heads), then lengths / valid. The compressed-token validity is derived here from the
// key validity, so callers pass the same lengths / valid as to every other op.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>

#include "common/checks.h"
#include "cpu/select_blocks.h"
#include "ops/ops.h"

#ifdef BLOSSOM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>

#include "cuda/launch.h"
#endif

namespace blossom {
namespace {

constexpr const char* kOp = "select_blocks";

// Calls f(T{}) for the tensor's dtype: float, double, bfloat16 on CPU; float, half,
// bfloat16 on CUDA.
template <typename F>
void dispatch(const at::Tensor& like, F&& f) {
#ifdef BLOSSOM_WITH_CUDA
  if (like.is_cuda()) {
    AT_DISPATCH_SWITCH(like.scalar_type(), kOp,
                       AT_DISPATCH_CASE(at::kFloat, [&] { f(scalar_t()); })
                       AT_DISPATCH_CASE(at::kHalf, [&] { f(scalar_t()); })
                       AT_DISPATCH_CASE(at::kBFloat16, [&] { f(scalar_t()); }));
    return;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, like.scalar_type(), kOp, [&] { f(scalar_t()); });
}

template <typename T>
constexpr bool kCpuType = !std::is_same<T, c10::Half>::value;
template <typename T>
constexpr bool kCudaType = !std::is_same<T, double>::value;

}  // namespace

at::Tensor select_blocks(const at::Tensor& q, const at::Tensor& k_cmp, const OptTensor& lengths,
                         const OptTensor& valid, int64_t top_n, int64_t block_size,
                         int64_t stride, int64_t block_len, bool causal, double scale) {
  BLOSSOM_CHECK(stride >= 1, kOp, ": stride must be >= 1, got ", stride);
  BLOSSOM_CHECK(block_len >= stride, kOp, ": block_len (", block_len, ") must be >= stride (",
               stride, ")");
  BLOSSOM_CHECK(block_size >= stride && block_size % stride == 0, kOp, ": block_size (",
               block_size, ") must be a positive multiple of stride (", stride, ")");
  BLOSSOM_CHECK(top_n >= 1, kOp, ": top_n must be >= 1, got ", top_n);
  BLOSSOM_CHECK(q.dim() == 4, kOp, ": q must have shape (batch, seq, q_heads, head_dim), got ",
               q.sizes());
  const int64_t B = q.size(0), L = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t T = num_compressed(L, stride);
  check_attention_inputs(kOp, q, k_cmp, k_cmp, T, "k_cmp", "k_cmp");
  BLOSSOM_CHECK(num_compressed(L, block_size) <= std::numeric_limits<int32_t>::max(), kOp,
               ": too many blocks for int32 indices");
  const int64_t Hk = k_cmp.size(2);
  const at::Tensor ok = resolve_validity(kOp, lengths, valid, B, L, q);
  const at::Tensor ok_cmp = compressed_validity(ok, L, block_len, stride);

  at::Tensor out = at::empty({B, L, Hk, top_n}, q.options().dtype(at::kInt));
  if (out.numel() == 0) return out;

  dispatch(q, [&](auto tag) {
    using T_ = decltype(tag);
    SelectParams<T_> p;
    p.shape.batch = B;
    p.shape.q_len = L;
    p.shape.kv_len = T;
    p.shape.q_heads = Hq;
    p.shape.kv_heads = Hk;
    p.shape.head_dim = D;
    p.shape.scale = scale;
    p.q = bshd_view<const T_>(q);
    p.k_cmp = bshd_view<const T_>(k_cmp);
    p.top_n = top_n;
    p.block_size = block_size;
    p.stride = stride;
    p.block_len = block_len;
    p.causal = causal;
    p.valid = validity_view(ok);
    p.valid_cmp = validity_view(ok_cmp);
    p.out = out.data_ptr<int32_t>();
#ifdef BLOSSOM_WITH_CUDA
    if constexpr (kCudaType<T_>) {
      if (q.is_cuda()) {
        gpu::select_blocks_fwd<T_>(p, at::cuda::getCurrentCUDAStream(q.get_device()).stream());
        return;
      }
    }
#endif
    if constexpr (kCpuType<T_>) cpu::select_blocks_fwd<T_>(p);
  });
  return out;
}

TORCH_LIBRARY_IMPL(blossom_ops, CPU, m) { m.impl("select_blocks", &select_blocks); }

#ifdef BLOSSOM_WITH_CUDA
TORCH_LIBRARY_IMPL(blossom_ops, CUDA, m) { m.impl("select_blocks", &select_blocks); }
#endif

}  // namespace blossom
