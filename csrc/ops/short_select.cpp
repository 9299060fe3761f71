// Host side of the fused compression + block selection of the short CUDA path
// (csrc/cuda/short_select.cu): eligibility, allocation, parameter filling. Compiled to
// nothing without BLOSSOM_WITH_CUDA.
#ifdef BLOSSOM_WITH_CUDA
#include "ops/short_select.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/checks.h"
#include "cuda/short_select.h"
#include "ops/attention_binding.h"

namespace blossom {
namespace short_path {

at::Tensor select(const at::Tensor& q, const at::Tensor& k, const OptTensor& k_pos,
                  const at::Tensor& ok, int64_t block_len, int64_t stride, int64_t block_size,
                  int64_t top_n, bool causal, double scale) {
  const int64_t B = q.size(0), L = q.size(1), Hq = q.size(2), D = q.size(3), Hk = k.size(2);
  if (Hk < 1 || Hq % Hk != 0 ||
      !gpu::short_select_eligible(L, D, Hq / Hk, stride, block_size, top_n))
    return at::Tensor();
  const c10::cuda::CUDAGuard guard(q.device());
  // k_pos is read in 8-byte pieces at offsets that are multiples of 16 bytes per row.
  at::Tensor pos;
  if (k_pos.has_value() && k_pos->defined()) {
    pos = k_pos->contiguous();
    if ((reinterpret_cast<uintptr_t>(pos.data_ptr()) & 15u) != 0)
      pos = pos.clone(at::MemoryFormat::Contiguous);
  }
  at::Tensor out = at::empty({B, L, Hk, top_n}, q.options().dtype(at::kInt));
  bool done = false;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    gpu::ShortSelectParams<T> p;
    p.shape = attn::attn_shape(q, k, scale);
    p.q = bshd_view<const T>(q);
    p.k = bshd_view<const T>(k);
    p.k_pos = pos.defined() ? static_cast<const T*>(pos.data_ptr()) : nullptr;
    p.valid = validity_view(ok);
    p.block_len = block_len;
    p.stride = stride;
    p.block_size = block_size;
    p.top_n = top_n;
    p.causal = causal;
    p.out = out.data_ptr<int32_t>();
    done = gpu::short_select_fwd<T>(p, at::cuda::getCurrentCUDAStream());
  };
  if (q.scalar_type() == at::kHalf) run(c10::Half{});
  else if (q.scalar_type() == at::kBFloat16) run(c10::BFloat16{});
  return done ? out : at::Tensor();
}

}  // namespace short_path
}  // namespace blossom
#endif  // BLOSSOM_WITH_CUDA
