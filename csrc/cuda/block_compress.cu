// block_compress on the GPU: out[b, t, h] = mean over the valid j of window
// W_t = [(t+1)*stride - block_len, (t+1)*stride) ∩ [0, L) of x[b, j, h] + pos[h, j - start_t].
// Memory-bound and small (T = L / stride rows): one thread per 8-element output chunk.
// Backward: grad_x[b, j, h] gathers from the ~block_len / stride windows holding j (no
// atomics); grad_pos[h, r] is a reduction over (b, t), done by one CTA per (h, r) with a
// fixed-order tree, so it is bit-reproducible.
#include "cuda/attn_kernels.cuh"
#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace blossom {
namespace gpu {
namespace {

using namespace detail;

struct Window {
  int64_t origin, lo, hi;  // origin may be negative; [lo, hi) is the clipped window
};

__device__ __forceinline__ Window window_of(int64_t t, int64_t block_len, int64_t stride,
                                            int64_t L) {
  Window w;
  w.origin = (t + 1) * stride - block_len;
  w.lo = w.origin > 0 ? w.origin : 0;
  w.hi = (t + 1) * stride < L ? (t + 1) * stride : L;
  return w;
}

__device__ __forceinline__ int64_t valid_count(const Validity& valid, int64_t b, const Window& w) {
  if (valid.ptr == nullptr) return w.hi > w.lo ? w.hi - w.lo : 0;
  int64_t n = 0;
  for (int64_t j = w.lo; j < w.hi; ++j) n += valid(b, j) ? 1 : 0;
  return n;
}

template <typename T, bool VEC>
__global__ void compress_fwd_kernel(const CompressParams<T, float> p) {
  const int D = static_cast<int>(p.head_dim);
  const int64_t nc = (D + kFrag - 1) / kFrag;
  const int64_t total = p.batch * p.num_tokens * p.heads * nc;
  for (int64_t x = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; x < total;
       x += int64_t(gridDim.x) * blockDim.x) {
    const int d0 = static_cast<int>(x % nc) * kFrag;
    int64_t r = x / nc;
    const int64_t h = r % p.heads;
    r /= p.heads;
    const int64_t t = r % p.num_tokens, b = r / p.num_tokens;
    const Window w = window_of(t, p.block_len, p.stride, p.seq_len);
    float acc[kFrag], f[kFrag];
    zero_frag(acc);
    int64_t count = 0;
    for (int64_t j = w.lo; j < w.hi; ++j) {
      if (!p.valid(b, j)) continue;
      ++count;
      load_frag<VEC>(p.x.at(b, j, h), d0, D, f);
#pragma unroll
      for (int e = 0; e < kFrag; ++e) acc[e] += f[e];
      if (p.pos != nullptr) {
        load_frag<VEC>(p.pos + (h * p.block_len + (j - w.origin)) * D, d0, D, f);
#pragma unroll
        for (int e = 0; e < kFrag; ++e) acc[e] += f[e];
      }
    }
    const float inv = 1.f / static_cast<float>(count > 0 ? count : 1);
#pragma unroll
    for (int e = 0; e < kFrag; ++e) acc[e] *= inv;
    store_frag<VEC>(p.out.at(b, t, h), d0, D, acc);
    if (h == 0 && d0 == 0 && p.valid_out != nullptr)
      p.valid_out[b * p.num_tokens + t] = count > 0;
  }
}

// grad_out: [B, T, H, D] contiguous; grad_x: [B, L, H, D] contiguous.
template <typename T, bool VEC>
__global__ void compress_bwd_x_kernel(const CompressParams<T, float> p,
                                      const T* __restrict__ grad_out, T* __restrict__ grad_x) {
  const int D = static_cast<int>(p.head_dim);
  const int64_t nc = (D + kFrag - 1) / kFrag;
  const int64_t H = p.heads, L = p.seq_len, Tn = p.num_tokens;
  const int64_t total = p.batch * L * H * nc;
  for (int64_t x = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; x < total;
       x += int64_t(gridDim.x) * blockDim.x) {
    const int d0 = static_cast<int>(x % nc) * kFrag;
    int64_t r = x / nc;
    const int64_t h = r % H;
    r /= H;
    const int64_t j = r % L, b = r / L;
    float acc[kFrag];
    zero_frag(acc);
    if (p.valid(b, j)) {
      // Windows holding j: (t+1)*stride - block_len <= j < (t+1)*stride.
      const int64_t t_lo = j / p.stride;
      int64_t t_hi = (j + p.block_len) / p.stride - 1;
      if (t_hi > Tn - 1) t_hi = Tn - 1;
      for (int64_t t = t_lo; t <= t_hi; ++t) {
        const Window w = window_of(t, p.block_len, p.stride, L);
        if (j < w.lo || j >= w.hi) continue;
        const float inv = 1.f / static_cast<float>(valid_count(p.valid, b, w));
        float f[kFrag];
        load_frag<VEC>(grad_out + ((b * Tn + t) * H + h) * D, d0, D, f);
#pragma unroll
        for (int e = 0; e < kFrag; ++e) acc[e] = fmaf(f[e], inv, acc[e]);
      }
    }
    store_frag<VEC>(grad_x + ((b * L + j) * H + h) * D, d0, D, acc);
  }
}

constexpr int kPosRows = 16;  // threadIdx.y extent of the grad_pos CTA (x: 32 chunks)

// grid (H * block_len, ceil(nc / 32)); block (32, kPosRows).
template <typename T, bool VEC>
__global__ void __launch_bounds__(32 * kPosRows)
    compress_bwd_pos_kernel(const CompressParams<T, float> p, const T* __restrict__ grad_out,
                            T* __restrict__ grad_pos) {
  __shared__ float part[kPosRows][32][kFrag];
  const int D = static_cast<int>(p.head_dim);
  const int64_t nc = (D + kFrag - 1) / kFrag;
  const int64_t H = p.heads, L = p.seq_len, Tn = p.num_tokens;
  const int64_t h = blockIdx.x / p.block_len, rr = blockIdx.x % p.block_len;
  const int64_t c = blockIdx.y * 32 + threadIdx.x;
  const int d0 = static_cast<int>(c) * kFrag;
  float acc[kFrag];
  zero_frag(acc);
  if (c < nc) {
    for (int64_t q = threadIdx.y; q < p.batch * Tn; q += kPosRows) {
      const int64_t b = q / Tn, t = q % Tn;
      const Window w = window_of(t, p.block_len, p.stride, L);
      const int64_t j = w.origin + rr;
      if (j < w.lo || j >= w.hi || !p.valid(b, j)) continue;
      const float inv = 1.f / static_cast<float>(valid_count(p.valid, b, w));
      float f[kFrag];
      load_frag<VEC>(grad_out + ((b * Tn + t) * H + h) * D, d0, D, f);
#pragma unroll
      for (int e = 0; e < kFrag; ++e) acc[e] = fmaf(f[e], inv, acc[e]);
    }
  }
#pragma unroll
  for (int e = 0; e < kFrag; ++e) part[threadIdx.y][threadIdx.x][e] = acc[e];
  __syncthreads();
  if (threadIdx.y == 0 && c < nc) {
    for (int y = 1; y < kPosRows; ++y)
#pragma unroll
      for (int e = 0; e < kFrag; ++e) acc[e] += part[y][threadIdx.x][e];
    store_frag<VEC>(grad_pos + (h * p.block_len + rr) * D, d0, D, acc);
  }
}

unsigned grid_for(int64_t threads, int block) {
  const int64_t blocks = ceil_div(threads, block);
  return static_cast<unsigned>(blocks < 65535 * 64 ? blocks : 65535 * 64);
}

}  // namespace

template <typename T>
void block_compress_fwd(const CompressParams<T, float>& p, cudaStream_t stream) {
  BLOSSOM_CHECK(p.stride >= 1 && p.block_len >= 1,
                "block_compress: block_len and stride must be >= 1");
  const int64_t work = p.batch * p.num_tokens * p.heads * ceil_div(p.head_dim, kFrag);
  if (work == 0) return;
  const bool vec = vec_ok<T>(p.x.ptr, p.head_dim, p.x.stride_b, p.x.stride_l, p.x.stride_h) &&
                   vec_ok<T>(p.out.ptr, p.head_dim, p.out.stride_b, p.out.stride_l,
                             p.out.stride_h) &&
                   (p.pos == nullptr || aligned16(p.pos));
  if (vec)
    compress_fwd_kernel<T, true><<<grid_for(work, 256), 256, 0, stream>>>(p);
  else
    compress_fwd_kernel<T, false><<<grid_for(work, 256), 256, 0, stream>>>(p);
  check_launch("block_compress_fwd");
}

template <typename T>
void block_compress_bwd(const CompressParams<T, float>& p, const T* grad_out, T* grad_x,
                        T* grad_pos, cudaStream_t stream) {
  BLOSSOM_CHECK(p.stride >= 1 && p.block_len >= 1,
                "block_compress: block_len and stride must be >= 1");
  const int64_t nc = ceil_div(p.head_dim, kFrag);
  const bool vec = p.head_dim % kFrag == 0 && aligned16(grad_out) && aligned16(grad_x) &&
                   (grad_pos == nullptr || aligned16(grad_pos));
  const int64_t work = p.batch * p.seq_len * p.heads * nc;
  if (work > 0) {
    if (vec)
      compress_bwd_x_kernel<T, true><<<grid_for(work, 256), 256, 0, stream>>>(p, grad_out, grad_x);
    else
      compress_bwd_x_kernel<T, false><<<grid_for(work, 256), 256, 0, stream>>>(p, grad_out, grad_x);
    check_launch("block_compress_bwd (x)");
  }
  if (grad_pos != nullptr && p.heads * p.block_len * nc > 0) {
    const dim3 grid(static_cast<unsigned>(p.heads * p.block_len), static_cast<unsigned>(ceil_div(nc, 32)));
    const dim3 block(32, kPosRows);
    if (vec)
      compress_bwd_pos_kernel<T, true><<<grid, block, 0, stream>>>(p, grad_out, grad_pos);
    else
      compress_bwd_pos_kernel<T, false><<<grid, block, 0, stream>>>(p, grad_out, grad_pos);
    check_launch("block_compress_bwd (pos)");
  }
}

#define BLOSSOM_INSTANTIATE(T)                                                             \
  template void block_compress_fwd<T>(const CompressParams<T, float>&, cudaStream_t);      \
  template void block_compress_bwd<T>(const CompressParams<T, float>&, const T*, T*, T*,   \
                                      cudaStream_t);
BLOSSOM_INSTANTIATE(float)
BLOSSOM_INSTANTIATE(c10::Half)
BLOSSOM_INSTANTIATE(c10::BFloat16)
#undef BLOSSOM_INSTANTIATE

}  // namespace gpu
}  // namespace blossom
