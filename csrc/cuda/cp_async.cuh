// Asynchronous global -> shared copies (cp.async, sm_80+), shared by the staged kernels.
// The data skips registers and many copies can be in flight per thread, which is what the
// gather-heavy sparse kernels need to hide memory latency. Older targets copy
// synchronously through registers (same results, no overlap).
#pragma once
#include <cuda_runtime.h>

namespace blossom {
namespace gpu {
namespace detail {

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes; .ca keeps the line in L1, where neighbouring rows of the same SM share it
// (window rows, the own block), .cg (CacheGlobal) streams through L2 only.
template <bool kL1 = true>
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if (kL1)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src)
                 : "memory");
  else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src)
                 : "memory");
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

// 16 bytes when ok, else 16 zero bytes (src-size 0: nothing is read from src, which should
// still be a mapped address, e.g. the tensor base). Branch-free zero fill of padded or
// out-of-range rows; kL1 as in cp_async16.
template <bool kL1 = true>
__device__ __forceinline__ void cp_async16_zfill(void* dst, const void* src, bool ok) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int n = ok ? 16 : 0;
  if (kL1)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(n)
                 : "memory");
  else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(n)
                 : "memory");
#else
  *reinterpret_cast<uint4*>(dst) =
      ok ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}

// The same zero fill through the ignore-src predicate: copies when `bits` != 0. Passing a
// mask word (mask & bit) instead of a bool lets ptxas set four of the predicates with one
// R2P (the src-size form costs a shift, a mask and a compare per row). The staged
// block-chunk kernels use it to keep padding NaNs and stale rows out of shared memory.
__device__ __forceinline__ void cp_async16_masked(void* dst, const void* src, unsigned bits) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "{\n .reg .pred ign;\n setp.eq.u32 ign, %2, 0;\n"
      " cp.async.ca.shared.global [%0], [%1], 16, ign;\n}\n" ::"r"(smem_addr(dst)),
      "l"(src), "r"(bits)
      : "memory");
#else
  *reinterpret_cast<uint4*>(dst) =
      bits != 0u ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(dst)), "l"(src)
               : "memory");
#else
  *reinterpret_cast<float*>(dst) = *reinterpret_cast<const float*>(src);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace detail
}  // namespace gpu
}  // namespace blossom
