// Device helpers shared by every CUDA kernel of blossom_ops: conversions between the
// storage types and float, 8-element fragment loads/stores (one 16-byte access for
// 16-bit types when the layout allows it), sub-warp reductions, and launch checks.
//
// Fragment convention used throughout: a row of D elements is split into chunks of 8
// consecutive elements; lane `x` of a sub-group owns chunk x (elements [8x, 8x + 8)).
// Elements at or past D read as 0 and are never written.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include "common/message.h"
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace blossom {
namespace gpu {
namespace detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kFrag = 8;  // elements per lane fragment

// ---- scalar conversions ---------------------------------------------------------------
// 2^x on the SFU (ex2.approx.ftz), -inf -> exactly 0, ~2 ulp, denormal results flushed to 0.
// The tensor-core kernels call it on base-2 logits minus a running max or a log-sum-exp
// (results <= ~1), where a flushed denormal changes nothing measurable; exp2f adds a
// range fix-up of ~4 instructions per call, and a branch when the call is conditional.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 1 / x on the SFU (rcp.approx.ftz, <= 1 ulp): one instruction where 1.f / x is an IEEE
// division (~10 instructions and a slow-path branch). For the staged forwards' 1 / l, l >= 1.
__device__ __forceinline__ float fast_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(c10::Half x) {
  return __half2float(__ushort_as_half(x.x));
}
__device__ __forceinline__ float to_float(c10::BFloat16 x) {
  return __bfloat162float(__ushort_as_bfloat16(x.x));
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ c10::Half from_float<c10::Half>(float x) {
  return c10::Half(__half_as_ushort(__float2half_rn(x)), c10::Half::from_bits());
}
template <>
__device__ __forceinline__ c10::BFloat16 from_float<c10::BFloat16>(float x) {
  return c10::BFloat16(__bfloat16_as_ushort(__float2bfloat16_rn(x)), c10::BFloat16::from_bits());
}

// The CUDA 16-bit type a tensor-core (wmma) operand of storage type T is made of, with its
// conversions (round to nearest) from and to float.
template <typename T>
struct TcElem;
template <>
struct TcElem<c10::Half> {
  using type = __half;
  static __device__ __forceinline__ type from(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float to(type x) { return __half2float(x); }
};
template <>
struct TcElem<c10::BFloat16> {
  using type = __nv_bfloat16;
  static __device__ __forceinline__ type from(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ float to(type x) { return __bfloat162float(x); }
};

// True when the environment variable `name` is set to exactly `value` (host side; the A/B
// switches of the CUDA path call it once per process and keep the answer in a static).
inline bool env_equals(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e != nullptr && std::strcmp(e, value) == 0;
}

// True when BLOSSOM_OPS_CUDA_SIMPLE=1: every launcher then takes the first-generation SIMT
// kernels instead of its fast path (A/B runs, and a way out if a fast path misbehaves).
// Read once per process, on the host.
inline bool simple_kernels_requested() {
  static const bool simple = env_equals("BLOSSOM_OPS_CUDA_SIMPLE", "1");
  return simple;
}

// ---- 8-element fragments ----------------------------------------------------------------
// 16-byte aligned load of 8 elements (one uint4 for 16-bit types, two float4 for float).
__device__ __forceinline__ void load8_aligned(const float* p, float (&f)[kFrag]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
  f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
__device__ __forceinline__ void unpack2(uint32_t w, const c10::Half*, float& lo, float& hi) {
  const float2 t = __half22float2(*reinterpret_cast<const __half2*>(&w));
  lo = t.x; hi = t.y;
}
__device__ __forceinline__ void unpack2(uint32_t w, const c10::BFloat16*, float& lo, float& hi) {
  const float2 t = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
  lo = t.x; hi = t.y;
}
template <typename T>
__device__ __forceinline__ void load8_aligned(const T* p, float (&f)[kFrag]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  unpack2(u.x, p, f[0], f[1]);
  unpack2(u.y, p, f[2], f[3]);
  unpack2(u.z, p, f[4], f[5]);
  unpack2(u.w, p, f[6], f[7]);
}

__device__ __forceinline__ void store8_aligned(float* p, const float (&f)[kFrag]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, c10::Half*) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, c10::BFloat16*) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
// 8 floats rounded to T as store8_aligned stores them, and back (as load8_aligned reads them).
template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&f)[kFrag], T* p) {
  uint4 u;
  u.x = pack2(f[0], f[1], p);
  u.y = pack2(f[2], f[3], p);
  u.z = pack2(f[4], f[5], p);
  u.w = pack2(f[6], f[7], p);
  return u;
}
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& u, const T* p, float (&f)[kFrag]) {
  unpack2(u.x, p, f[0], f[1]);
  unpack2(u.y, p, f[2], f[3]);
  unpack2(u.z, p, f[4], f[5]);
  unpack2(u.w, p, f[6], f[7]);
}
template <typename T>
__device__ __forceinline__ void store8_aligned(T* p, const float (&f)[kFrag]) {
  *reinterpret_cast<uint4*>(p) = pack8(f, p);
}

// Loads the chunk starting at element d0 of a row of length D. VEC: the row start is 16-byte
// aligned and D % 8 == 0, so a chunk is either fully inside or fully outside the row.
template <bool VEC, typename T>
__device__ __forceinline__ void load_frag(const T* row, int d0, int D, float (&f)[kFrag]) {
  if (VEC) {
    if (d0 < D) {
      load8_aligned(row + d0, f);
    } else {
#pragma unroll
      for (int e = 0; e < kFrag; ++e) f[e] = 0.f;
    }
  } else {
#pragma unroll
    for (int e = 0; e < kFrag; ++e) f[e] = (d0 + e < D) ? to_float(row[d0 + e]) : 0.f;
  }
}

template <bool VEC, typename T>
__device__ __forceinline__ void store_frag(T* row, int d0, int D, const float (&f)[kFrag]) {
  if (VEC) {
    if (d0 < D) store8_aligned(row + d0, f);
  } else {
#pragma unroll
    for (int e = 0; e < kFrag; ++e)
      if (d0 + e < D) row[d0 + e] = from_float<T>(f[e]);
  }
}

// Stores f, or f plus what the row already holds when `add` (AttnBwdParams::accumulate):
// one rounding of the fp32 sum.
template <bool VEC, typename T>
__device__ __forceinline__ void store_frag_acc(T* row, int d0, int D, float (&f)[kFrag],
                                               bool add) {
  if (add) {
    float old[kFrag];
    load_frag<VEC>(row, d0, D, old);
#pragma unroll
    for (int e = 0; e < kFrag; ++e) f[e] += old[e];
  }
  store_frag<VEC>(row, d0, D, f);
}
template <typename T>
__device__ __forceinline__ void store8_acc(T* p, float (&f)[kFrag], bool add) {
  if (add) {
    float old[kFrag];
    load8_aligned(p, old);
#pragma unroll
    for (int e = 0; e < kFrag; ++e) f[e] += old[e];
  }
  store8_aligned(p, f);
}

__device__ __forceinline__ void zero_frag(float (&f)[kFrag]) {
#pragma unroll
  for (int e = 0; e < kFrag; ++e) f[e] = 0.f;
}

__device__ __forceinline__ float dot_frag(const float (&a)[kFrag], const float (&b)[kFrag]) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < kFrag; ++e) s = fmaf(a[e], b[e], s);
  return s;
}

// Sum over the WIDTH consecutive lanes of an aligned sub-group. A butterfly: every lane
// ends with the same bits (each step adds the same two values, in commuted order).
template <int WIDTH>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int o = WIDTH / 2; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

// ---- host-side helpers -----------------------------------------------------------------
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// True when every row start of a [b, l, h] view is 16-byte aligned and D % 8 == 0, so
// fragments can be moved with 16-byte accesses.
template <typename T>
inline bool vec_ok(const void* ptr, int64_t D, int64_t sb, int64_t sl, int64_t sh) {
  const int64_t e = 16 / static_cast<int64_t>(sizeof(T));
  return ptr == nullptr ||
         (D % kFrag == 0 && aligned16(ptr) && sb % e == 0 && sl % e == 0 && sh % e == 0);
}

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  BLOSSOM_CHECK(err == cudaSuccess, "blossom_ops CUDA kernel ", what, " failed to launch: ",
               cudaGetErrorString(err));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Byte offsets of workspace regions, each 256-byte aligned.
inline size_t align_up(size_t bytes) { return (bytes + 255) & ~static_cast<size_t>(255); }

}  // namespace detail
}  // namespace gpu
}  // namespace blossom
