// Warp-level tensor-core building blocks (sm_80+): ldmatrix loads, the 8x8 transpose
// movmatrix, mma.sync m16n8k16 with fp32 accumulation and 16-bit packing. Shared by the
// selection kernel and the staged attention kernels.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with 16-bit inputs); gid = lane / 4, tig = lane % 4:
//   A 16x16 row-major, 4 registers: {a0,a1} (row gid, cols 2 tig + {0,1}), {a2,a3} (row gid + 8),
//     {a4,a5} (row gid, cols + 8), {a6,a7} (row gid + 8, cols + 8);
//   B 16x8 col-major, 2 registers: {b0,b1} (rows k = 2 tig + {0,1}, col n = gid), {b2,b3} (k + 8);
//   C 16x8 fp32, 4 floats: c0, c1 (row gid, cols 2 tig + {0,1}), c2, c3 (row gid + 8).
// An 8x8 16-bit matrix "in fragment layout" is one register per lane holding
// (row gid, cols 2 tig + {0,1}), the lower column in the low half.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/cp_async.cuh"  // smem_addr

namespace blossom {
namespace gpu {
namespace detail {

// Four 8x8 16-bit matrices; thread t gives the address of row t % 8 of matrix t / 8 and
// receives, of matrix j, register j = elements (row lane / 4, cols 2 (lane % 4) + {0, 1}).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// The same, transposed: register j holds the fragment of matrix j's transpose, i.e. the
// stored elements (rows 2 (lane % 4) + {0, 1}, col lane / 4). A column-major operand (the
// stored rows are its columns) becomes a row-major A fragment this way.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// Transposes an 8x8 16-bit matrix held in fragment layout, in registers.
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// d += a (16x16 row-major) * b (16x8 col-major), fp32 accumulate.
template <typename E>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same<E, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats rounded (to nearest) to the 16-bit type E, lo in the low half.
template <typename E>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same<E, __nv_bfloat16>::value) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

}  // namespace detail
}  // namespace gpu
}  // namespace blossom
