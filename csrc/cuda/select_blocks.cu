// select_blocks on the GPU: LTIS scoring and top-n, fused per query row, so the
// [B, L, Hq, T] score tensor never exists in device memory.
//
// One warp per (b, i, kv head g); a CTA holds kSelWarps warps of the same (b, g) and
// kRowsPerCta consecutive queries, and first computes which selection blocks hold a valid
// key (shared memory, reused by all its rows). For each chunk of HPW query heads of the group:
//   pass 1: online softmax statistics (base-2 max and sum) of scale * q . k_cmp_t over the
//           scored tokens (valid, inside a valid candidate block), per head;
//   pass 2: p_t recomputed, summed over the block's tokens and the chunk's heads, and added
//           to the row's importance[c] in shared memory (one writer per block, chunks in a
//           fixed order: deterministic).
// Then top_n rounds of a warp arg-max (importance desc, block index asc), ascending sort,
// -1 padding. Lanes are split into sub-groups of TPK lanes as in the attention kernels: a
// sub-group scores one block at a time, TPK lanes sharing the head-dim dot product.
#include "cuda/attn_kernels.cuh"
#include "cuda/common.cuh"
#include "cuda/launch.h"
#include "cuda/launch_cache.h"
#include "cuda/select_blocks_tc.h"

#include <cstdlib>
#include <cstring>

namespace blossom {
namespace gpu {
namespace {

using namespace detail;

constexpr int kSelWarps = 4;
constexpr int kRowsPerWarp = 8;
constexpr int kRowsPerCta = kSelWarps * kRowsPerWarp;

struct SelectSmem {
  int64_t blockvalid = 0, importance = 0, chosen = 0, total = 0;  // byte offsets
};

SelectSmem select_smem(int64_t C, int64_t top_n) {
  SelectSmem s;
  s.blockvalid = 0;
  s.importance = ((C + 15) / 16) * 16;
  s.chosen = s.importance + kSelWarps * C * static_cast<int64_t>(sizeof(float));
  s.total = s.chosen + kSelWarps * top_n * static_cast<int64_t>(sizeof(int));
  return s;
}

template <typename T, int TPK, int HPW, bool VEC>
__global__ void __launch_bounds__(kSelWarps * 32)
    select_kernel(const SelectParams<T> p, const int64_t C, const SelectSmem lay) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int KPW = 32 / TPK;
  const AttnShape& s = p.shape;
  const int64_t L = s.q_len, Tn = s.kv_len, Hq = s.q_heads, Hk = s.kv_heads;
  const int D = static_cast<int>(s.head_dim);
  const int64_t G = Hq / Hk;
  const int64_t tiles = (L + kRowsPerCta - 1) / kRowsPerCta;
  const int64_t tile = blockIdx.x % tiles;
  const int64_t bg = blockIdx.x / tiles, b = bg / Hk, g = bg % Hk;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int sub = lane / TPK;
  const int d0 = (lane % TPK) * kFrag;
  const int64_t bs = p.block_size, tpb = p.block_size / p.stride;

  unsigned char* blockvalid = smem + lay.blockvalid;
  float* imp = reinterpret_cast<float*>(smem + lay.importance) + w * C;
  int* chosen = reinterpret_cast<int*>(smem + lay.chosen) + w * p.top_n;

  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    bool any = p.valid.ptr == nullptr;
    for (int64_t j = c * bs; !any && j < (c + 1) * bs && j < L; ++j) any = p.valid(b, j);
    blockvalid[c] = any ? 1 : 0;
  }
  __syncthreads();

  const float qs = static_cast<float>(s.scale) * kLog2e;
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = tile * kRowsPerCta + r * kSelWarps + w;
    if (i >= L) break;  // warp-uniform
    int32_t* out = p.out + ((b * L + i) * Hk + g) * p.top_n;
    if (!p.valid(b, i)) {
      for (int64_t k = lane; k < p.top_n; k += 32) out[k] = -1;
      continue;
    }
    const int64_t own = i / bs;
    const int64_t ncand = p.causal ? own : C - 1;

    for (int64_t h0 = g * G; h0 < (g + 1) * G; h0 += HPW) {
      float q[HPW][kFrag];
#pragma unroll
      for (int hh = 0; hh < HPW; ++hh) {
        load_frag<VEC>(p.q.at(b, i, h0 + hh), d0, D, q[hh]);
#pragma unroll
        for (int e = 0; e < kFrag; ++e) q[hh][e] *= qs;
      }
      // pass 1: softmax statistics per head
      float m[HPW], l[HPW];
#pragma unroll
      for (int hh = 0; hh < HPW; ++hh) {
        m[hh] = -INFINITY;
        l[hh] = 0.f;
      }
      for (int64_t n0 = 0; n0 < ncand; n0 += KPW) {
        const int64_t n = n0 + sub;
        const int64_t c = n < own ? n : n + 1;
        const bool cand = n < ncand && blockvalid[c];
        for (int64_t k = 0; k < tpb; ++k) {  // same trip count in every lane
          const int64_t t = c * tpb + k;
          const bool ok = cand && t < Tn && p.valid_cmp(b, t);
          float kf[kFrag];
          if (ok) load_frag<VEC>(p.k_cmp.at(b, t, g), d0, D, kf);
          else zero_frag(kf);
#pragma unroll
          for (int hh = 0; hh < HPW; ++hh) {
            const float sc = group_sum<TPK>(dot_frag(q[hh], kf));
            if (ok) {
              const float mn = fmaxf(m[hh], sc);
              l[hh] = l[hh] * exp2f(m[hh] - mn) + exp2f(sc - mn);
              m[hh] = mn;
            }
          }
        }
      }
      float lse2[HPW];
#pragma unroll
      for (int hh = 0; hh < HPW; ++hh) {
#pragma unroll
        for (int o = TPK; o < 32; o <<= 1) {
          const float m2 = __shfl_xor_sync(kFullMask, m[hh], o);
          const float l2 = __shfl_xor_sync(kFullMask, l[hh], o);
          const float mn = fmaxf(m[hh], m2);
          if (mn != -INFINITY) {
            l[hh] = l[hh] * exp2f(m[hh] - mn) + l2 * exp2f(m2 - mn);
            m[hh] = mn;
          }
        }
        lse2[hh] = l[hh] > 0.f ? m[hh] + __log2f(l[hh]) : INFINITY;  // +inf: every p is 0
      }
      // pass 2: importance of each candidate block, accumulated over head chunks in order
      for (int64_t n0 = 0; n0 < ncand; n0 += KPW) {
        const int64_t n = n0 + sub;
        const int64_t c = n < own ? n : n + 1;
        const bool cand = n < ncand && blockvalid[c];
        float mass = 0.f;
        for (int64_t k = 0; k < tpb; ++k) {
          const int64_t t = c * tpb + k;
          const bool ok = cand && t < Tn && p.valid_cmp(b, t);
          float kf[kFrag];
          if (ok) load_frag<VEC>(p.k_cmp.at(b, t, g), d0, D, kf);
          else zero_frag(kf);
#pragma unroll
          for (int hh = 0; hh < HPW; ++hh) {
            const float sc = group_sum<TPK>(dot_frag(q[hh], kf));
            if (ok) mass += exp2f(sc - lse2[hh]);
          }
        }
        if (n < ncand && lane % TPK == 0) {
          if (!blockvalid[c]) imp[c] = -INFINITY;  // not a candidate
          else imp[c] = (h0 == g * G ? 0.f : imp[c]) + mass;
        }
      }
    }
    __syncwarp();

    // top_n rounds of arg-max; the comparator is a total order, so every lane agrees.
    int64_t found = 0;
    for (; found < p.top_n; ++found) {
      float bv = -INFINITY;
      int64_t bc = -1;
      for (int64_t n = lane; n < ncand; n += 32) {
        const int64_t c = n < own ? n : n + 1;
        const float v = imp[c];
        if (v != -INFINITY && (bc < 0 || v > bv)) {  // ascending scan: ties keep the lower c
          bv = v;
          bc = c;
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_xor_sync(kFullMask, bv, o);
        const int64_t c2 = __shfl_xor_sync(kFullMask, bc, o);
        if (c2 >= 0 && (bc < 0 || v2 > bv || (v2 == bv && c2 < bc))) {
          bv = v2;
          bc = c2;
        }
      }
      if (bc < 0) break;
      // Every lane has read imp[] for this round (shuffles give no memory ordering, so the
      // barrier is what makes the clearing write below race-free).
      __syncwarp();
      if (lane == 0) {
        chosen[found] = static_cast<int>(bc);
        imp[bc] = -INFINITY;
      }
      __syncwarp();
    }
    __syncwarp();
    if (lane == 0) {
      for (int64_t a = 1; a < found; ++a) {  // insertion sort, found <= top_n (small)
        const int x = chosen[a];
        int64_t z = a - 1;
        while (z >= 0 && chosen[z] > x) {
          chosen[z + 1] = chosen[z];
          --z;
        }
        chosen[z + 1] = x;
      }
    }
    __syncwarp();
    for (int64_t k = lane; k < p.top_n; k += 32) out[k] = k < found ? chosen[k] : -1;
    __syncwarp();
  }
}

}  // namespace

template <typename T>
void select_blocks_fwd(const SelectParams<T>& p, cudaStream_t stream) {
  const AttnShape& s = p.shape;
  BLOSSOM_CHECK(p.stride >= 1 && p.block_size >= p.stride && p.block_size % p.stride == 0,
               "select_blocks: block_size must be a positive multiple of stride");
  if (s.batch == 0 || s.q_len == 0 || s.kv_heads == 0 || p.top_n == 0) return;
  // Tensor-core path when it covers the call (select_blocks_tc.cuh, or the previous version
  // select_blocks_tc_old.cuh for what it declines or when BLOSSOM_OPS_CUDA_SELECT=old, read
  // once); this kernel otherwise.
  if (!detail::simple_kernels_requested()) {
    static const bool old_tc = detail::env_equals("BLOSSOM_OPS_CUDA_SELECT", "old");
    if (!old_tc && select_blocks_tc_fwd(p, stream)) return;
    if (select_blocks_tc_old_fwd(p, stream)) return;
  }
  const int64_t C = ceil_div(s.q_len, p.block_size);
  const SelectSmem lay = select_smem(C, p.top_n);
  // Device limit and opt-in once per device / kernel (cuda/launch_cache.h), not per call.
  const int max_smem = current_max_smem_optin();
  BLOSSOM_CHECK(lay.total <= max_smem, "select_blocks: ", C,
               " selection blocks need ", lay.total, " bytes of shared memory per CTA, over the "
               "device limit of ", max_smem, "; use a larger block_size");
  const bool vec = vec_ok<T>(p.q.ptr, s.head_dim, p.q.stride_b, p.q.stride_l, p.q.stride_h) &&
                   vec_ok<T>(p.k_cmp.ptr, s.head_dim, p.k_cmp.stride_b, p.k_cmp.stride_l,
                             p.k_cmp.stride_h);
  const int64_t ctas = s.batch * s.kv_heads * ceil_div(s.q_len, kRowsPerCta);
  BLOSSOM_CHECK(ctas < (int64_t(1) << 31), "select_blocks: problem too large for one launch");
  dispatch_row_config(s.head_dim, s.group(), vec, [&](auto tpk, auto hpw, auto v) {
    constexpr int TPK = decltype(tpk)::value, HPW = decltype(hpw)::value;
    constexpr bool VEC = decltype(v)::value;
    auto kernel = select_kernel<T, TPK, HPW, VEC>;
    opt_in_smem(kernel, static_cast<int>(lay.total));
    kernel<<<static_cast<unsigned>(ctas), kSelWarps * 32, static_cast<size_t>(lay.total),
             stream>>>(p, C, lay);
  });
  check_launch("select_blocks_fwd");
}

template void select_blocks_fwd<float>(const SelectParams<float>&, cudaStream_t);
template void select_blocks_fwd<c10::Half>(const SelectParams<c10::Half>&, cudaStream_t);
template void select_blocks_fwd<c10::BFloat16>(const SelectParams<c10::BFloat16>&, cudaStream_t);

}  // namespace gpu
}  // namespace blossom
