// gate_fusion on the GPU: out = sum_r sigmoid(gate[row, r]) * branch[r, row, :].
// Memory-bound: one thread per 8-element chunk (16-byte accesses for 16-bit types when
// D % 8 == 0 and the buffers are aligned). The backward reduces grad_out . branch[r] per row
// inside a sub-group of lanes (fixed butterfly, so grad_gate is bit-reproducible).
#include "cuda/attn_kernels.cuh"
#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace blossom {
namespace gpu {
namespace {

using namespace detail;

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + __expf(-x)); }

template <typename T, bool VEC>
__global__ void gate_fwd_kernel(const GateParams<T> p) {
  const int D = static_cast<int>(p.head_dim);
  const int64_t nc = (D + kFrag - 1) / kFrag;
  const int64_t total = p.rows * nc;
  for (int64_t x = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; x < total;
       x += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = x / nc;
    const int d0 = static_cast<int>(x % nc) * kFrag;
    float acc[kFrag];
    zero_frag(acc);
    for (int64_t r = 0; r < p.branches; ++r) {
      const float gate = sigmoidf(to_float(p.gate[row * p.branches + r]));
      float f[kFrag];
      load_frag<VEC>(p.branch + (r * p.rows + row) * D, d0, D, f);
#pragma unroll
      for (int e = 0; e < kFrag; ++e) acc[e] = fmaf(gate, f[e], acc[e]);
    }
    store_frag<VEC>(p.out + row * D, d0, D, acc);
  }
}

// One sub-group of TPR lanes per row; lane x handles chunks x, x + TPR, ...
template <typename T, int TPR, bool VEC>
__global__ void gate_bwd_kernel(const GateParams<T> p, const T* __restrict__ grad_out,
                                T* __restrict__ grad_branch, T* __restrict__ grad_gate) {
  constexpr int RPW = 32 / TPR;
  const int lane = threadIdx.x & 31;
  const int D = static_cast<int>(p.head_dim);
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  const int64_t row = warp * RPW + lane / TPR;
  const bool live = row < p.rows;  // lanes past the end still join the shuffles
  const int first = (lane % TPR) * kFrag;
  for (int64_t r = 0; r < p.branches; ++r) {
    const float gl = live ? to_float(p.gate[row * p.branches + r]) : 0.f;
    const float sg = sigmoidf(gl);
    float partial = 0.f;
    for (int d0 = first; d0 < D; d0 += TPR * kFrag) {
      float go[kFrag], br[kFrag], gb[kFrag];
      if (live) {
        load_frag<VEC>(grad_out + row * D, d0, D, go);
        load_frag<VEC>(p.branch + (r * p.rows + row) * D, d0, D, br);
      } else {
        zero_frag(go);
        zero_frag(br);
      }
      partial += dot_frag(go, br);
#pragma unroll
      for (int e = 0; e < kFrag; ++e) gb[e] = sg * go[e];
      if (live) store_frag<VEC>(grad_branch + (r * p.rows + row) * D, d0, D, gb);
    }
    // The chunk loop holds no shuffle, so lanes may leave it after different trip counts;
    // all lanes meet again here for the reduction.
    const float dot = group_sum<TPR>(partial);
    if (live && lane % TPR == 0) grad_gate[row * p.branches + r] = from_float<T>(dot * sg * (1.f - sg));
  }
}

template <typename T>
bool gate_vec(const GateParams<T>& p, const void* a, const void* b) {
  return p.head_dim % kFrag == 0 && aligned16(p.branch) && aligned16(p.out) &&
         (a == nullptr || aligned16(a)) && (b == nullptr || aligned16(b));
}

unsigned grid_for(int64_t threads, int block) {
  const int64_t blocks = ceil_div(threads, block);
  return static_cast<unsigned>(blocks < 65535 * 64 ? blocks : 65535 * 64);
}

}  // namespace

template <typename T>
void gate_fusion_fwd(const GateParams<T>& p, cudaStream_t stream) {
  if (p.rows == 0 || p.head_dim == 0) return;
  const int64_t work = p.rows * ceil_div(p.head_dim, kFrag);
  if (gate_vec(p, nullptr, nullptr))
    gate_fwd_kernel<T, true><<<grid_for(work, 256), 256, 0, stream>>>(p);
  else
    gate_fwd_kernel<T, false><<<grid_for(work, 256), 256, 0, stream>>>(p);
  check_launch("gate_fusion_fwd");
}

template <typename T>
void gate_fusion_bwd(const GateParams<T>& p, const T* grad_out, T* grad_branches, T* grad_gate,
                     cudaStream_t stream) {
  if (p.rows == 0) return;
  const bool vec = gate_vec(p, grad_out, grad_branches);
  const int tpr = lanes_per_key(p.head_dim);
  auto go = [&](auto tpr_c, auto vec_c) {
    constexpr int TPR = decltype(tpr_c)::value;
    constexpr bool VEC = decltype(vec_c)::value;
    const int64_t warps = ceil_div(p.rows, 32 / TPR);
    gate_bwd_kernel<T, TPR, VEC><<<static_cast<unsigned>(ceil_div(warps, 8)), 256, 0, stream>>>(
        p, grad_out, grad_branches, grad_gate);
  };
  auto with_vec = [&](auto tpr_c) {
    if (vec) go(tpr_c, std::true_type{});
    else go(tpr_c, std::false_type{});
  };
  switch (tpr) {
    case 2: with_vec(std::integral_constant<int, 2>{}); break;
    case 4: with_vec(std::integral_constant<int, 4>{}); break;
    case 8: with_vec(std::integral_constant<int, 8>{}); break;
    case 16: with_vec(std::integral_constant<int, 16>{}); break;
    default: with_vec(std::integral_constant<int, 32>{}); break;
  }
  check_launch("gate_fusion_bwd");
}

#define BLOSSOM_INSTANTIATE(T)                                                         \
  template void gate_fusion_fwd<T>(const GateParams<T>&, cudaStream_t);                \
  template void gate_fusion_bwd<T>(const GateParams<T>&, const T*, T*, T*, cudaStream_t);
BLOSSOM_INSTANTIATE(float)
BLOSSOM_INSTANTIATE(c10::Half)
BLOSSOM_INSTANTIATE(c10::BFloat16)
#undef BLOSSOM_INSTANTIATE

}  // namespace gpu
}  // namespace blossom
