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

// 16 bytes when `bits` != 0, else 16 zero bytes written without reading src (the
// ignore-src predicate; src should still point into the tensor). A masked row becomes zeros
// with no separate fill and no branch: the staged block-chunk kernels rely on it to keep
// padding NaNs out of shared memory. Passing a mask word (mask & bit) lets ptxas turn four
// of them into one R2P.
__device__ __forceinline__ void cp_async16_masked(void* dst, const void* src, unsigned bits) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "{\n .reg .pred ign;\n setp.eq.u32 ign, %2, 0;\n"
      " cp.async.ca.shared.global [%0], [%1], 16, ign;\n}\n" ::"r"(smem_addr(dst)),
      "l"(src), "r"(bits)
      : "memory");
#else
  *reinterpret_cast<uint4*>(dst) = bits != 0u ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
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
