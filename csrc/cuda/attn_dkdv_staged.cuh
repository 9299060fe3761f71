// Staged dK/dV pass for the attention operators whose mask Policy enumerates the queries of
// a key cheaply (sliding window, compressed branch). Same contract and numerics as
// detail::attn_dkdv_kernel (attn_kernels.cuh); what changes is how the q / dO rows arrive.
//
// Why: attn_dkdv_kernel walks the (query, head) pairs of key j KPW at a time, each pair a
// dependent chain (index -> lse load -> q/dO row loads -> math), so a warp has ~4 row loads
// in flight and the pass is latency bound (window, B=64 L=4096 D=64 bf16: 4.05 ms).
//
// Work decomposition
//   * One warp per (b, key j, KV head g); a CTA holds 4 warps = 4 consecutive keys of the
//     same (b, g), so the band queries they share can hit in L1 (rows are fetched with
//     cp.async.ca, which allocates in L1).
//   * The pair list n = slot * G + (h - g*G) is cut into chunks of CHUNK pairs. Stage:
//     lane n of the warp evaluates pair n of the chunk (pol.bwd_query), the valid pairs are
//     compacted (ballot + popc rank), lse[b,i,h] and delta[b,i,h] go to shared memory by a
//     4-byte cp.async each, and the warp copies the q and dO rows of the valid pairs with
//     16-byte cp.async, consecutive lanes on consecutive 16 bytes of a row (coalesced, no
//     bank conflicts). Two stages: chunk c+1 is in flight while chunk c is computed.
//   * Compute: as attn_dkdv_kernel. Sub-group s of TPK = D/8 lanes takes the staged pairs
//     s, s + KPW, ...; lane x owns head-dim elements [8x, 8x+8) of the key; k (pre-scaled by
//     scale*log2e) and v live in registers; q / dO fragments come from shared memory.
//     p = exp2(q.k' - lse*log2e), ds = p * (dO.v - delta), dv += p*dO, dk += ds*q in fp32;
//     rows with lse == -inf are skipped; the KPW partial sums merge by a butterfly and
//     sub-group 0 writes dK*scale and dV. Fixed order, no atomics: bit-reproducible. Every
//     element of grad_k / grad_v is written (zeros for invalid or unattended keys).
//   * Fast path: 16-bit T, D in {16, 32, 64, 128}, 16-byte aligned rows (vec_ok). Anything
//     else, and BLOSSOM_OPS_CUDA_SIMPLE=1, goes to detail::launch_attn_dkdv.
//
// Count, window 8 + dilated, causal, B=64 L=4096 Hq=8 Hk=2 (G=4) D=64 bf16 (the brief's case)
//   Queries per key: band offsets 0..7 and powers 8..2048 -> 65,516 (i, j) pairs per (b, g),
//   16.0 per key; pairs (with heads) = 64 * 2 * 65,516 * 4 = 33,544,192.
//   Staged into shared memory per pair: q row 128 B + dO row 128 B + lse 4 + delta 4 = 264 B
//   -> 8.86 GB of L2 -> SM traffic (the L1 may catch part of the band: at most ~1/3).
//   DRAM (compulsory): q 268 MB + dO 268 MB + lse 8.4 + delta 8.4 + k 67 + v 67 + dk 67 +
//   dv 67 = 0.82 GB -> 0.24 ms at 3.35 TB/s (a (b, g) slice of q/dO is 4 MB, L2 resident
//   while its keys are processed).
//   FLOPs: 4 D-length products per pair = 512 -> 17.2 GFLOP fp32 (SIMT; 0.3 ms at peak).
//   Instructions: ~75 per sub-group step (2 LDS.128, 16 unpacks, 32 FMA, 6 SHFL + 6 FADD,
//   exp2, predicates) x 33.5M/4 steps = 0.63 G warp-instructions, plus ~150 per 16-pair
//   stage (enumeration, ballot, 8 cp.async, waits) = 0.3 G -> ~0.9 ms of issue on 132 SMs.
//   Predicted: 1.2 - 1.6 ms (L2 traffic and issue overlapping), from 4.05 ms. At L=16384
//   (~19 queries per key, 4.75x the pairs): ~6 - 7.5 ms, from 17.8 ms.
//   Next lever if the L2 traffic dominates: a key tile per CTA sharing the staged band rows
//   (needs a Policy hook saying which queries are shared), or tensor cores on the band.
#pragma once
#include <cstdlib>
#include <cstring>

#include "cuda/attn_kernels.cuh"
#include "cuda/cp_async.cuh"

namespace blossom {
namespace gpu {
namespace detail {

constexpr int kStagedWarps = 4;  // warps (= consecutive keys) per CTA

// 8 elements of a 16-bit row from shared memory (16-byte aligned) to float.
template <typename T>
__device__ __forceinline__ void lds8(const unsigned char* p, float (&f)[kFrag]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const T* tag = nullptr;
  unpack2(u.x, tag, f[0], f[1]);
  unpack2(u.y, tag, f[2], f[3]);
  unpack2(u.z, tag, f[4], f[5]);
  unpack2(u.w, tag, f[6], f[7]);
}

// Compile-time configuration and per-warp shared-memory layout for head_dim D.
template <typename T, int D>
struct StagedCfg {
  static_assert(sizeof(T) == 2, "staged dK/dV: 16-bit types only");
  static constexpr int TPK = D / kFrag;                 // lanes per pair (8 elements each)
  static constexpr int KPW = 32 / TPK;                  // pairs computed at once per warp
  static constexpr int CHUNK = D >= 128 ? 8 : (D >= 64 ? 16 : 32);  // pairs per stage
  static constexpr int CPR = D * 2 / 16;                // 16-byte pieces per row
  static constexpr int ROWB = D * 2 + 16;               // padded row stride (bytes)
  static constexpr int ROWS_BYTES = CHUNK * 2 * ROWB;   // q and dO rows, interleaved
  static constexpr int STAGE_BYTES = ROWS_BYTES + CHUNK * 2 * 4;  // + lse, delta
  static constexpr int OFF_BYTES = CHUNK * 2 * 8;       // element offsets of the rows
  static constexpr int WARP_BYTES = 2 * STAGE_BYTES + OFF_BYTES;
  static constexpr int CTA_BYTES = kStagedWarps * WARP_BYTES;
  static_assert(D % kFrag == 0 && 32 % TPK == 0 && CHUNK <= 32, "bad staged config");
  static_assert(STAGE_BYTES % 16 == 0 && WARP_BYTES % 16 == 0, "cp.async needs 16B alignment");
  static_assert(CTA_BYTES <= 48 * 1024, "staged dK/dV: keep under the default smem limit");
};

template <typename T, int D, class Policy>
__global__ void __launch_bounds__(kStagedWarps * 32)
    attn_dkdv_staged_kernel(const AttnBwdParams<T, float> p, const Policy pol,
                            const float* __restrict__ delta) {
  using Cfg = StagedCfg<T, D>;
  constexpr int TPK = Cfg::TPK, KPW = Cfg::KPW, CHUNK = Cfg::CHUNK, CPR = Cfg::CPR;
  extern __shared__ __align__(16) unsigned char staged_smem[];

  const int lane = threadIdx.x & 31;
  const int sub = lane / TPK;
  const int d0 = (lane % TPK) * kFrag;
  const AttnShape& s = p.shape;
  const int64_t L = s.q_len, Lk = s.kv_len, Hq = s.q_heads, Hk = s.kv_heads;
  const int G = static_cast<int>(Hq / Hk);
  const int wid = threadIdx.x / 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kStagedWarps + wid;
  if (warp >= s.batch * Hk * Lk) return;  // uniform per warp; no CTA-wide barrier below
  const int64_t j = warp % Lk;
  const int64_t rest = warp / Lk;
  const int64_t g = rest % Hk;
  const int64_t b = rest / Hk;

  unsigned char* wsm = staged_smem + wid * Cfg::WARP_BYTES;
  int64_t* s_off = reinterpret_cast<int64_t*>(wsm + 2 * Cfg::STAGE_BYTES);  // [CHUNK][2]

  float dk[kFrag], dv[kFrag];
  zero_frag(dk);
  zero_frag(dv);
  if (pol.key_valid(b, j)) {
    const float ks = static_cast<float>(s.scale) * kLog2e;
    float kf[kFrag], vf[kFrag];
    load8_aligned(p.k.at(b, j, g) + d0, kf);
    load8_aligned(p.v.at(b, j, g) + d0, vf);
#pragma unroll
    for (int e = 0; e < kFrag; ++e) kf[e] *= ks;

    const int64_t n_pairs = pol.bwd_slots(b, j, g) * G;
    const int64_t n_chunks = (n_pairs + CHUNK - 1) / CHUNK;
    const T* q_base = p.q.ptr;
    const T* do_base = p.grad_out.ptr;

    // Issues the copies of chunk c into stage buffer `buf`; returns the number of valid
    // pairs staged (warp-uniform). Always commits one cp.async group per lane.
    auto stage = [&](int64_t c, int buf) -> int {
      unsigned char* rows = wsm + buf * Cfg::STAGE_BYTES;
      float* s_lse = reinterpret_cast<float*>(rows + Cfg::ROWS_BYTES);
      float* s_dlt = s_lse + CHUNK;
      const int64_t n = c * CHUNK + lane;
      int64_t i = -1, h = 0;
      if (lane < CHUNK && n < n_pairs) {
        const int slot = static_cast<int>(n) / G;  // 32-bit: cheaper (checked by the launcher)
        h = g * G + (static_cast<int>(n) - slot * G);
        i = pol.bwd_query(b, j, g, slot);
      }
      const bool ok = i >= 0;
      const unsigned mask = __ballot_sync(kFullMask, ok);
      const int cnt = __popc(mask);
      if (ok) {
        const int r = __popc(mask & ((1u << lane) - 1u));
        const int64_t row = (b * L + i) * Hq + h;
        cp_async4(s_lse + r, p.lse + row);
        cp_async4(s_dlt + r, delta + row);
        s_off[2 * r] = b * p.q.stride_b + i * p.q.stride_l + h * p.q.stride_h;
        s_off[2 * r + 1] = b * p.grad_out.stride_b + i * p.grad_out.stride_l +
                           h * p.grad_out.stride_h;
      }
      __syncwarp();
      // Rows 2r (q) and 2r+1 (dO); consecutive lanes take consecutive 16-byte pieces.
      for (int t = lane; t < cnt * 2 * CPR; t += 32) {
        const int rr = t / CPR, piece = t % CPR;
        const T* src = ((rr & 1) ? do_base : q_base) + s_off[rr] + piece * 8;
        cp_async16(rows + rr * Cfg::ROWB + piece * 16, src);
      }
      cp_async_commit();
      __syncwarp();  // s_off is reused by the next stage call
      return cnt;
    };

    int cnt_next = n_chunks > 0 ? stage(0, 0) : 0;
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int buf = static_cast<int>(c & 1);
      const int cnt = cnt_next;
      if (c + 1 < n_chunks) {
        cnt_next = stage(c + 1, buf ^ 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncwarp();  // every lane's copies of chunk c are visible to the warp

      const unsigned char* rows = wsm + buf * Cfg::STAGE_BYTES;
      const float* s_lse = reinterpret_cast<const float*>(rows + Cfg::ROWS_BYTES);
      const float* s_dlt = s_lse + CHUNK;
      for (int r0 = 0; r0 < cnt; r0 += KPW) {  // cnt is warp-uniform: shuffles stay full
        const int r = r0 + sub;
        const int rc = r < cnt ? r : 0;  // pad sub-groups read a real row, then drop it
        const float lse = s_lse[rc];
        const bool use = r < cnt && lse != -INFINITY;
        float qf[kFrag], df[kFrag];
        lds8<T>(rows + (2 * rc) * Cfg::ROWB + d0 * 2, qf);
        lds8<T>(rows + (2 * rc + 1) * Cfg::ROWB + d0 * 2, df);
        const float sc = group_sum<TPK>(dot_frag(qf, kf));
        const float dp = group_sum<TPK>(dot_frag(df, vf));
        if (use) {
          const float pr = exp2f(sc - lse * kLog2e);
          const float ds = pr * (dp - s_dlt[rc]);
#pragma unroll
          for (int e = 0; e < kFrag; ++e) {
            dv[e] = fmaf(pr, df[e], dv[e]);
            dk[e] = fmaf(ds, qf[e], dk[e]);
          }
        }
      }
      __syncwarp();  // buffer `buf` is refilled by the stage issued in the next iteration
    }
  }

#pragma unroll
  for (int o = TPK; o < 32; o <<= 1)
#pragma unroll
    for (int e = 0; e < kFrag; ++e) {
      dk[e] += __shfl_xor_sync(kFullMask, dk[e], o);
      dv[e] += __shfl_xor_sync(kFullMask, dv[e], o);
    }

  if (sub == 0) {
    const float sc = static_cast<float>(s.scale);
#pragma unroll
    for (int e = 0; e < kFrag; ++e) dk[e] *= sc;
    store8_acc(p.grad_k.at(b, j, g) + d0, dk, p.accumulate);
    store8_acc(p.grad_v.at(b, j, g) + d0, dv, p.accumulate);
  }
}

template <typename T, int D, class Policy>
void launch_attn_dkdv_staged_d(const AttnBwdParams<T, float>& p, const Policy& pol,
                               const float* delta, cudaStream_t stream) {
  const AttnShape& s = p.shape;
  const int64_t warps = s.batch * s.kv_heads * s.kv_len;
  const int64_t blocks = ceil_div(warps, kStagedWarps);
  BLOSSOM_CHECK(blocks < (int64_t(1) << 31), "blossom_ops: problem too large for one launch");
  attn_dkdv_staged_kernel<T, D, Policy>
      <<<static_cast<unsigned>(blocks), kStagedWarps * 32, StagedCfg<T, D>::CTA_BYTES,
         stream>>>(p, pol, delta);
}

// Same contract as launch_attn_dkdv: reads delta written by launch_attn_dq on `stream`.
template <typename T, class Policy>
void launch_attn_dkdv_staged(const AttnBwdParams<T, float>& p, const Policy& pol,
                             const float* delta, cudaStream_t stream, const char* name) {
  const AttnShape& s = p.shape;
  BLOSSOM_CHECK(!bwd_gated(p), name, ": the dK/dV pass takes dkdv_params(p, delta)");
  if (s.batch == 0 || s.q_heads == 0 || s.kv_len == 0) return;
  constexpr bool k16 = sizeof(T) == 2;
  const int64_t D = s.head_dim;
  // Pair indices are 32-bit in the kernel: slots <= 2 L + 2 * 62 (non-causal window).
  const bool shape_ok = (D == 16 || D == 32 || D == 64 || D == 128) && s.kv_heads >= 1 &&
                        s.q_heads % s.kv_heads == 0 &&
                        (2 * s.q_len + 128) * s.group() < (int64_t(1) << 31);
  if (!k16 || !shape_ok || simple_kernels_requested() || !attn_bwd_vec_ok(p)) {
    launch_attn_dkdv(p, pol, delta, stream, name);
    return;
  }
  if constexpr (k16) {
    switch (D) {
      case 16: launch_attn_dkdv_staged_d<T, 16>(p, pol, delta, stream); break;
      case 32: launch_attn_dkdv_staged_d<T, 32>(p, pol, delta, stream); break;
      case 64: launch_attn_dkdv_staged_d<T, 64>(p, pol, delta, stream); break;
      default: launch_attn_dkdv_staged_d<T, 128>(p, pol, delta, stream); break;
    }
    check_launch(name);
  }
}

}  // namespace detail
}  // namespace gpu
}  // namespace blossom
