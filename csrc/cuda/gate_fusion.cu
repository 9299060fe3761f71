// gate_fusion on the GPU: out = sum_r sigmoid(gate[row, r]) * branch[r][row, :].
// blossom_attention's composed forward applies the same gate in its window branch's epilogue
// instead (attn_gate_epilogue.cuh), bit for bit; this kernel stays its fallback and the op's.
// Memory-bound: one thread per 8-element chunk (16-byte accesses for 16-bit types when
// D % 8 == 0 and the buffers are aligned). The backward reduces grad_out . branch[r] per row
// inside a sub-group of lanes (fixed butterfly, so grad_gate is bit-reproducible).
// The branches are addressed through a pointer list (BranchList), so blossom_attention can
// hand its separately allocated branch outputs over without stacking them first (at::stack
// was a full extra read and write of every branch: 0.5 ms of 17.5 at D=64 L=4096).
#include "cuda/attn_gate_epilogue.cuh"
#include "cuda/attn_kernels.cuh"
#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace blossom {
namespace gpu {
namespace {

using namespace detail;

// One definition with the gate epilogue of blossom_attention's window forward, which must
// give the same bits (attn_gate_epilogue.cuh).
__device__ __forceinline__ float sigmoidf(float x) { return gate_sigmoid_ieee(x); }

// Branch r of the inputs (and of the gradients) at in[r] / grad[r] when r < kListMax; past
// that (only the stacked gate_fusion op can have R > kListMax) at base + r * stride.
constexpr int kListMax = 4;
template <typename T>
struct BranchList {
  const T* in[kListMax] = {};
  T* grad[kListMax] = {};
  const T* in_base = nullptr;
  T* grad_base = nullptr;
  int64_t stride = 0;  // elements between stacked branches
  __device__ __forceinline__ const T* input(int64_t r) const {
    return r < kListMax ? in[r] : in_base + r * stride;
  }
  __device__ __forceinline__ T* gradient(int64_t r) const {
    return r < kListMax ? grad[r] : grad_base + r * stride;
  }
};

template <typename T>
BranchList<T> stacked(const GateParams<T>& p, T* grad_branches) {
  BranchList<T> l;
  l.in_base = p.branch;
  l.grad_base = grad_branches;
  l.stride = p.rows * p.head_dim;
  for (int r = 0; r < kListMax && r < p.branches; ++r) {
    l.in[r] = p.branch + r * l.stride;
    l.grad[r] = grad_branches == nullptr ? nullptr : grad_branches + r * l.stride;
  }
  return l;
}

template <typename T>
BranchList<T> listed(const GateParams<T>& p, const T* const* branch, T* const* grad_branch) {
  BLOSSOM_CHECK(p.branches <= kListMax, "gate_fusion: at most ", kListMax,
               " separately stored branches, got ", p.branches);
  BranchList<T> l;
  for (int r = 0; r < p.branches; ++r) {
    l.in[r] = branch[r];
    l.grad[r] = grad_branch == nullptr ? nullptr : grad_branch[r];
  }
  return l;
}

template <typename T, bool VEC>
__global__ void gate_fwd_kernel(const GateParams<T> p, const BranchList<T> br) {
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
      load_frag<VEC>(br.input(r) + row * D, d0, D, f);
#pragma unroll
      for (int e = 0; e < kFrag; ++e) acc[e] = fmaf(gate, f[e], acc[e]);
    }
    store_frag<VEC>(p.out + row * D, d0, D, acc);
  }
}

// One sub-group of TPR lanes per row; lane x handles chunks x, x + TPR, ...
template <typename T, int TPR, bool VEC>
__global__ void gate_bwd_kernel(const GateParams<T> p, const BranchList<T> bl,
                                const T* __restrict__ grad_out, T* __restrict__ grad_gate) {
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
        load_frag<VEC>(bl.input(r) + row * D, d0, D, br);
      } else {
        zero_frag(go);
        zero_frag(br);
      }
      partial += dot_frag(go, br);
#pragma unroll
      for (int e = 0; e < kFrag; ++e) gb[e] = sg * go[e];
      if (live) store_frag<VEC>(bl.gradient(r) + row * D, d0, D, gb);
    }
    // The chunk loop holds no shuffle, so lanes may leave it after different trip counts;
    // all lanes meet again here for the reduction.
    const float dot = group_sum<TPR>(partial);
    if (live && lane % TPR == 0) grad_gate[row * p.branches + r] = from_float<T>(dot * sg * (1.f - sg));
  }
}

// 16-byte accesses: D % 8 == 0 and every row start aligned (row starts are multiples of D
// elements from each buffer's start, so the buffer starts decide).
template <typename T>
bool gate_vec(const GateParams<T>& p, const BranchList<T>& l, const void* a, const void* b) {
  bool ok = p.head_dim % kFrag == 0 && (p.out == nullptr || aligned16(p.out)) &&
            (a == nullptr || aligned16(a)) && (b == nullptr || aligned16(b));
  for (int64_t r = 0; r < p.branches && r < kListMax; ++r)
    ok = ok && aligned16(l.in[r]) && (l.grad[r] == nullptr || aligned16(l.grad[r]));
  if (p.branches > kListMax)
    ok = ok && aligned16(l.in_base) && (l.grad_base == nullptr || aligned16(l.grad_base));
  return ok;
}

unsigned grid_for(int64_t threads, int block) {
  const int64_t blocks = ceil_div(threads, block);
  return static_cast<unsigned>(blocks < 65535 * 64 ? blocks : 65535 * 64);
}

template <typename T>
void launch_fwd(const GateParams<T>& p, const BranchList<T>& l, cudaStream_t stream) {
  if (p.rows == 0 || p.head_dim == 0) return;
  const int64_t work = p.rows * ceil_div(p.head_dim, kFrag);
  if (gate_vec(p, l, nullptr, nullptr))
    gate_fwd_kernel<T, true><<<grid_for(work, 256), 256, 0, stream>>>(p, l);
  else
    gate_fwd_kernel<T, false><<<grid_for(work, 256), 256, 0, stream>>>(p, l);
  check_launch("gate_fusion_fwd");
}

template <typename T>
void launch_bwd(const GateParams<T>& p, const BranchList<T>& l, const T* grad_out,
                T* grad_gate, cudaStream_t stream) {
  if (p.rows == 0) return;
  const bool vec = gate_vec(p, l, grad_out, nullptr);
  const int tpr = lanes_per_key(p.head_dim);
  auto go = [&](auto tpr_c, auto vec_c) {
    constexpr int TPR = decltype(tpr_c)::value;
    constexpr bool VEC = decltype(vec_c)::value;
    const int64_t warps = ceil_div(p.rows, 32 / TPR);
    gate_bwd_kernel<T, TPR, VEC><<<static_cast<unsigned>(ceil_div(warps, 8)), 256, 0, stream>>>(
        p, l, grad_out, grad_gate);
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

}  // namespace

template <typename T>
void gate_fusion_fwd(const GateParams<T>& p, cudaStream_t stream) {
  launch_fwd(p, stacked(p, static_cast<T*>(nullptr)), stream);
}

template <typename T>
void gate_fusion_bwd(const GateParams<T>& p, const T* grad_out, T* grad_branches, T* grad_gate,
                     cudaStream_t stream) {
  launch_bwd(p, stacked(p, grad_branches), grad_out, grad_gate, stream);
}

template <typename T>
void gate_fusion_fwd_list(const GateParams<T>& p, const T* const* branch, cudaStream_t stream) {
  launch_fwd(p, listed(p, branch, static_cast<T* const*>(nullptr)), stream);
}

template <typename T>
void gate_fusion_bwd_list(const GateParams<T>& p, const T* const* branch, const T* grad_out,
                          T* const* grad_branch, T* grad_gate, cudaStream_t stream) {
  launch_bwd(p, listed(p, branch, grad_branch), grad_out, grad_gate, stream);
}

#define BLOSSOM_INSTANTIATE(T)                                                         \
  template void gate_fusion_fwd<T>(const GateParams<T>&, cudaStream_t);                \
  template void gate_fusion_bwd<T>(const GateParams<T>&, const T*, T*, T*, cudaStream_t); \
  template void gate_fusion_fwd_list<T>(const GateParams<T>&, const T* const*, cudaStream_t); \
  template void gate_fusion_bwd_list<T>(const GateParams<T>&, const T* const*, const T*,   \
                                        T* const*, T*, cudaStream_t);
BLOSSOM_INSTANTIATE(float)
BLOSSOM_INSTANTIATE(c10::Half)
BLOSSOM_INSTANTIATE(c10::BFloat16)
#undef BLOSSOM_INSTANTIATE

}  // namespace gpu
}  // namespace blossom
