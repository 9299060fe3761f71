// Block-sparse dK/dV on mma.sync m16n8k16, S / P / dP / dS in registers (FlashAttention-2
// style), one CTA per 16-key tile; the successor of the wmma kernel (block_sparse_dkdv_wmma.cuh).
//
// Why: the wmma kernel (1.95 ms at D=64 L=4096, H100) round-trips S, dP, P and dS through
// shared memory (two stores, two loads and warp syncs per 16 x 16 tile), loads each chunk's rows
// synchronously (one chunk in flight per warp) and divides by G per row. Here the products
// stay in registers, as in the sliding window's key-tile kernel (window_dkdv_tc.cuh, 2.33 ->
// 0.76 ms): keys are the M side (S^T = K Q^T), so P^T / dS^T come out of the first products
// already in the A-fragment layout of dV += P^T dO and dK += dS^T Q, and the rows of two more
// chunks are in flight by cp.async while one is computed.
//
// Work decomposition
//   * CTA = (b, KV head g, block c, 16-key tile kt; bs / 16 tiles per block), W = kBsWarps = 2
//     warps on the same tile (4 before session 15, see kBsWarps); grid order kt, c fastest, so
//     the CTAs running together gather rows of one or two (b, g) slices (4 MB of q + dO at D=64
//     L=4096: L2-resident). K and V of the tile are staged once per CTA by cp.async (zeros for
//     keys past L or padded) and kept in registers as A fragments by every warp (D <= 64; at
//     D = 128 re-read by ldmatrix per chunk).
//   * The tile's query list is a list of slots: the own-block queries (from j0 on when causal:
//     earlier ones see none of the tile's keys), clipped to L, then the bucket of block c in
//     the inverse index (block_index_kernel: valid queries only, no duplicates, the own block
//     excluded, and when causal only queries after the block, so no causal test is needed
//     there). Chunk u = 16 slots (group u / G) of one query head (u % G): the columns of the
//     products. Warp w walks chunks w, w + W, w + 2 W, ... (G = 4, W = 2: warp w = heads w
//     and w + 2 of every group), so long lists (popular blocks) are split W ways and the
//     warps' loads stay even.
//   * Stage (3 buffers per warp, 2 at D = 128: chunks k+1, k+2 in flight while k is
//     computed): the 16 slot positions were loaded one issue ahead (index entry, or own
//     position + validity); ballot of the valid slots; lse (lanes < 16) / delta (lanes >= 16)
//     by 4-byte cp.async (-inf / 0 stored for empty slots); the 16 q and 16 dO rows by 16-byte
//     cp.async, each lane on piece lane % (D/8) of rows lane / (D/8) + k 32 / (D/8), positions
//     fetched by shuffle, 32-bit offsets; rows of empty slots zero-filled, never read
//     (NaN-safe).
//   * Compute per chunk (as window_dkdv_tc.cuh's dense chunk): S^T and dP^T (2 n-tiles, D/16
//     k-steps, B fragments by ldmatrix), P = exp2(S scale log2e - lse log2e) (0 where lse is
//     -inf, or +inf: a folded gate that underflowed, attn_gate_fold.cuh), the causal triangle
//     only in group 0 of a causal tile (slot x vs key r: x >= r), dS = P (dP - delta); P^T and
//     dS^T rounded to the input type are the A fragments of dV += P^T dO, dK += dS^T Q (B =
//     ldmatrix.trans of the same staged rows). Keys that are padded or past L are not masked
//     in the loop (their rows of the sums are simply never written).
//   * End: each warp's dK / dV fragments -> rows in its own (drained) buffers; after one
//     barrier every thread sums 8-element pieces over warps 0, 1, 2, 3 in that order (fixed:
//     bit-reproducible, no atomics), scales dK, and writes every key < L of the tile as
//     16-byte stores (added to grad_k / grad_v when p.accumulate; zeros for padded keys).
//   * Fast path: 16-bit T, D in {16, 32, 64, 128}, block_size a multiple of 16, 16-byte
//     aligned rows, q_len == kv_len < 2^30, 32-bit in-slice offsets. Whatever it declines
//     keeps the wmma kernel; BLOSSOM_OPS_CUDA_BS_DKDV=old sends every case there (A/B runs);
//     BLOSSOM_OPS_CUDA_SIMPLE=1 and fp32 the generic per-key kernel (block_sparse_dkdv.cu).
//   * scripts/emulate_bs_dkdv_mma.py replays this kernel and the inverse index lane by lane
//     against a dense float64 reference (tails, G in {1, 2, 3, 4, 8}, bs 16 / 32 / 48, padding,
//     +-inf lse, popular blocks; 21 planted bugs are caught).
//
// Counts, B=64 L=4096 Hq=8 Hk=2 (G=4) D=64 bf16, block_size 16, top-n 4, causal (bench_gpu.py
// defaults; select_blocks picks min(4, o) earlier blocks for a query of block o)
//   CTAs B Hk C = 32,768 (131 k warps). Slots per (b, g): 4,096 own + 16,224 bucket; the
//   bucket of block c averages 63 queries (with random data block 0 gets ~323: 88 chunks, 22
//   per warp). Chunks ceil(slots / 16) G per tile: ~22 on average, 0.72 M in all (11.5 M
//   (slot, head) columns, ~10% of them padding of partial groups).
//   SASS (sm_90, nvcc 13, bf16) of the chunk loop: 283 instructions, ~271 executed per
//   chunk (the other side of the position prefetch skipped): issue ~110 (9 LDGSTS, each 16-B
//   piece IMAD + SEL + LEA + LEA.HI.X; 4 SHFL, a VOTE, the prefetch branch with one LDG),
//   compute ~160 (16 LDSM, 32 HMMA, 8 MUFU.EX2, 4 LDS.64, ~100 FFMA / FSEL / F2FP / ...).
//   D=32: 228 (~216), D=16: 190 (~178; 8 HMMA), D=128: 402 (~390; 64 HMMA, 48 LDSM with
//   the K/V fragments). The window kernel's chunks: 259 - 304.
//   -> 0.72 M x 271 = 195 M warp-instructions in chunks, plus ~0.8 k per warp outside the
//   loop (two inlined issues, K/V staging, the reduction and stores): ~105 M; ~0.5 ms of
//   issue at IPC 2.5 per SM. D=16: ~130 M + ~90 M.
//   Tensor: 32 HMMA.16816 per chunk = 23.0 M = 94 GFLOP -> ~0.14 ms at ~660 TFLOP/s.
//   Bytes: L2 -> SM 4.2 KB per chunk (32 rows of 128 B + lse / delta) = 3.04 GB, plus K/V
//   4 KB per CTA (0.13 GB); shared memory 4.2 KB written + 8 KB read per chunk (each row
//   by ldmatrix and ldmatrix.trans) + 32 KB per CTA for the reduction = 9.8 GB -> 0.33 ms at
//   128 B/clk/SM; DRAM compulsory 0.83 GB (q, dO 537 MB, k, v 134 MB, dk, dv 134 MB,
//   lse, delta 17 MB, index 8 MB) -> 0.25 ms.
//   Predicted: 0.65 - 0.85 ms on an H100, bound by the L2 -> SM gather (5 - 6 TB/s, as the
//   window kernel reached) with issue close behind, from 1.95 ms. D=16 (rows 32 B: 0.85 GB):
//   0.35 - 0.45 ms, from 1.12. L=16384 D=64 (2.89 M chunks, 12.2 GB from L2): 2.6 - 3.3 ms,
//   from 7.55.
//   Registers (ptxas, sm_90): 238 / 168 / 128 / 96 at D = 128 / 64 / 32 / 16, no spills
//   (launch bounds 8 / 12 / 16 / 16 warps per SM, bs_mma_min_warps / W CTAs); shared memory
//   per CTA at W = 4 77.5 / 60.0 / 34.0 / 21.0 KB (W = 2: 41.2 / 32.3 / 18.8 / 11.8 KB).
//   (These counts are of the W = 4 kernel; W = 2 does the same chunks with half the per-tile
//   starts and reductions.)
//   Risk: a block that nearly every query selects (an "attention sink") makes one CTA walk
//   ~1,000 chunks (W warps); if it starts late, the kernel gets a tail of ~0.3 ms. The wmma
//   kernel has the same shape; splitting long buckets over several CTAs is the next lever.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common/params.h"
#include "cuda/attn_kernels.cuh"  // attn_bwd_vec_ok, store8_acc
#include "cuda/common.cuh"        // fast_exp2
#include "cuda/cp_async.cuh"      // cp_async16_zfill, cp_async4
#include "cuda/launch_cache.h"   // opt_in_smem
#include "cuda/mma_frag.cuh"
#include "cuda/window_dkdv_tc.cuh"  // win_addr; tile_row_offset / tile_col_offset

namespace blossom {
namespace gpu {
namespace detail {

// Warps per CTA, all on the same 16-key tile. 2 since session 15 (H100, B=64 Hq=8 Hk=2 D=64
// bf16, run s15-2 and its repeat: L=4096 0.718 / 0.714 -> 0.634 / 0.632 ms, L=16384 2.933 /
// 2.932 -> 2.567 / 2.559; every query also picking block 0: 0.867 -> 0.850): each warp walks
// twice the chunks, so the per-warp start (slot list, two issues, K/V fragments) and the
// reduction over the warps are paid half as often per tile, and 6 CTAs per SM are in
// different phases instead of 3. One warp per tile measured slower (0.745 / 2.997: the
// popular early blocks' walks get long). BLOSSOM_OPS_CUDA_BS_WARPS=4 (read once,
// bs_dkdv_old_warps_requested) keeps the previous split for A/B runs.
constexpr int kBsWarps = 2;
constexpr int kBsWarpsOld = 4;

// What every CTA needs to find its tile and walk its chunks (host-computed).
struct BsTilePlan {
  int L = 0;       // q_len == kv_len
  int C = 0;       // blocks: ceil(L / bs)
  int bs = 16;     // block size, a multiple of 16
  int tpb = 1;     // 16-key tiles per block: bs / 16
  int Hq = 0, Hk = 0, G = 1;
  int n = 0;       // top-n (row length of the inverse index's entries per (b, g) is L * n)
  int causal = 1;
  // A warp walks chunks u = w, w + W, ... (W warps per tile) with u = group * G + head;
  // u -> u + W moves the group by dgrp = W / G and the head by dhh = W % G (plus a carry when
  // head >= G).
  int dgrp = 0, dhh = 0;
};

template <int D, int W = kBsWarps>
struct BsCfg {
  // Chunk buffers per warp: 3 (two chunks in flight while one is computed); 2 at D = 128,
  // where 3 would leave room for one CTA per SM only.
  static constexpr int STAGES = D <= 64 ? 3 : 2;
  // K / V fragments held in registers for the whole walk (D <= 64); at D = 128 they would
  // take 64 of the registers the 128 dK / dV accumulators leave, so they are re-read from
  // shared memory by ldmatrix per chunk.
  static constexpr bool KV_REGS = D <= 64;
  static constexpr int NF = D / 16;                        // 16-dim slices of a row
  static constexpr int CPR = D / kFrag;                    // 16-byte pieces per row
  static constexpr int RPS = 32 / CPR;                     // rows per copy step
  static constexpr int RS = D + kFrag;                     // staged row stride (elements)
  static constexpr int ROWS_BYTES = 32 * RS * 2;           // 16 q rows, then 16 dO rows
  static constexpr int STAGE_BYTES = ROWS_BYTES + 32 * 4;  // + lse[16], delta[16]
  static constexpr int WARP_BYTES = STAGES * STAGE_BYTES;
  static constexpr int KV_BYTES = ROWS_BYTES;              // K rows 0..15, V rows 16..31
  static constexpr int CTA_BYTES = KV_BYTES + W * WARP_BYTES;
  static constexpr int OS = D + 4;                         // output staging row (floats)
  static_assert(D % 16 == 0 && D <= 128, "block-sparse dK/dV tiles: D in {16, 32, 64, 128}");
  static_assert(STAGE_BYTES % 16 == 0 && KV_BYTES % 16 == 0, "cp.async needs 16-byte alignment");
  static_assert(2 * 16 * OS * 4 <= WARP_BYTES, "output staging must fit a warp's buffers");
};

// Resident warps per SM the register budget must allow, whatever W (the kernel's bound is
// this / W CTAs): 12 at D = 64 (<= 168 registers: the K/V fragments and dK/dV accumulators
// alone are 96), 16 below, 8 at D = 128 (<= 255: the accumulators alone are 128).
template <int D>
constexpr int bs_mma_min_warps() {
  return D == 128 ? 8 : (D == 64 ? 12 : 16);
}

template <typename T, int D, int W>
__global__ void __launch_bounds__(W * 32, bs_mma_min_warps<D>() / W)
    bs_dkdv_mma_kernel(const AttnBwdParams<T, float> p, const BsTilePlan pl,
                       const int32_t* __restrict__ off, const int32_t* __restrict__ entries,
                       const float* __restrict__ delta) {
  using C = BsCfg<D, W>;
  using E = typename TcElem<T>::type;
  constexpr int NF = C::NF, STAGES = C::STAGES;
  extern __shared__ __align__(128) unsigned char bs_smem[];
  const int lane = threadIdx.x & 31, wib = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3, l16 = lane & 15;
  const int L = pl.L, G = pl.G, bs = pl.bs;
  int u = static_cast<int>(blockIdx.x);  // ((b * Hk + g) * C + c) * tpb + kt
  const int kt = u % pl.tpb;
  u /= pl.tpb;
  const int c = u % pl.C;
  const int bg = u / pl.C;
  const int b = bg / pl.Hk, g = bg - b * pl.Hk;
  const int cb = c * bs;         // first position of block c
  const int j0 = cb + 16 * kt;   // first key of the tile

  E* kv_s = reinterpret_cast<E*>(bs_smem);
  unsigned char* wsm = bs_smem + C::KV_BYTES + wib * C::WARP_BYTES;
  auto rows_of = [&](int buf) { return reinterpret_cast<E*>(wsm + buf * C::STAGE_BYTES); };
  auto meta_of = [&](int buf) {
    return reinterpret_cast<float*>(wsm + buf * C::STAGE_BYTES + C::ROWS_BYTES);
  };
  const bool* vrow = p.valid.ptr != nullptr ? p.valid.ptr + b * p.valid.stride_b : nullptr;

  // Keys of the tile that exist and are valid (the same in every warp).
  const int jl = j0 + l16;
  const uint32_t kmask =
      __ballot_sync(kFullMask, jl < L && (vrow == nullptr || vrow[jl])) & 0xffffu;

  float dk[2 * NF][4], dv[2 * NF][4];
#pragma unroll
  for (int n = 0; n < 2 * NF; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;

  if (kmask != 0) {  // uniform over the CTA: the barrier inside is reached by all or none
    // K and V rows of the tile, spread over the CTA's threads (zeros for missing keys).
    {
      const T* kb = p.k.at(b, 0, g);
      const T* vb = p.v.at(b, 0, g);
      const int ksl = static_cast<int>(p.k.stride_l), vsl = static_cast<int>(p.v.stride_l);
      for (int x = threadIdx.x; x < 32 * C::CPR; x += W * 32) {
        const int r = x / C::CPR, pc = x % C::CPR, kk = r & 15;
        const bool ok = ((kmask >> kk) & 1u) != 0u;
        const bool isk = r < 16;
        const unsigned o =
            ok ? static_cast<unsigned>((j0 + kk) * (isk ? ksl : vsl) + pc * kFrag) : 0u;
        cp_async16_zfill<false>(kv_s + r * C::RS + pc * kFrag, win_addr<2>(isk ? kb : vb, o),
                                ok);
      }
      cp_async_commit();
    }

    // The tile's query list, as slots: the own-block queries own0 .. own0 + n_own - 1 (when
    // causal, those before j0 see none of the tile's keys and are skipped), then the bucket
    // of block c in the inverse index (valid queries only, each at most once, all after the
    // block when causal: block_index_kernel). Chunk u = 16 slots (group u / G) of one head.
    const int s0 = pl.causal ? 16 * kt : 0;
    const int own0 = cb + s0;
    const int n_own = min(bs, L - cb) - s0;  // >= 1: j0 < L because kmask != 0
    const int32_t* ob = off + static_cast<int64_t>(bg) * (pl.C + 1) + c;
    const int o0 = ob[0];
    const int n_slots = n_own + (ob[1] - o0);
    const int32_t* list = entries + static_cast<int64_t>(bg) * L * pl.n + o0;
    const int n_chunks = ((n_slots + 15) >> 4) * G;
    const int my = wib < n_chunks ? (n_chunks - 1 - wib) / W + 1 : 0;

    // Position of slot 16 grp + (lane % 16) and whether it takes part (a valid query).
    auto slot_pos = [&](int grp, int& i, bool& ok) {
      const int slot = 16 * grp + l16;
      if (slot < n_own) {
        i = own0 + slot;
        ok = vrow == nullptr || vrow[i];
      } else if (slot < n_slots) {
        i = list[slot - n_own];
        ok = true;
      } else {
        i = 0;
        ok = false;
      }
    };

    // Chunk (positions i of lanes 0..15, head hh) -> buffer buf: lse (lanes < 16) / delta
    // (lanes >= 16) by 4-byte cp.async (-inf / 0 stored for slots that take no part), and
    // the 16 q and 16 dO rows by 16-byte cp.async, zero-filled (never read) for those slots.
    // Offsets are 32-bit, relative to the (b, first head of the group) bases.
    const int qsl = static_cast<int>(p.q.stride_l), qsh = static_cast<int>(p.q.stride_h);
    const int osl = static_cast<int>(p.grad_out.stride_l);
    const int osh = static_cast<int>(p.grad_out.stride_h);
    const T* qbase = p.q.at(b, 0, g * G);
    const T* obase = p.grad_out.at(b, 0, g * G);
    const float* mbase =
        (lane < 16 ? p.lse : delta) + (static_cast<int64_t>(b) * L * pl.Hq + g * G);
    const int r0 = lane / C::CPR, pc = lane % C::CPR;
    const int dst_lane = r0 * C::RS + pc * kFrag;
    auto issue = [&](int hh, int buf, int i, bool ok) {
      const uint32_t vm = __ballot_sync(kFullMask, ok) & 0xffffu;
      float* meta = meta_of(buf) + lane;
      if (ok) cp_async4(meta, win_addr<4>(mbase, static_cast<unsigned>(i * pl.Hq + hh)));
      else *meta = lane < 16 ? -INFINITY : 0.f;
      E* dst = rows_of(buf) + dst_lane;
      const int qh = hh * qsh + pc * kFrag, oh = hh * osh + pc * kFrag;
#pragma unroll
      for (int k = 0; k < C::CPR / 2; ++k) {
        const int r = r0 + k * C::RPS;  // row (slot in the group) of this piece
        const int ir = __shfl_sync(kFullMask, i, r);
        const bool okr = ((vm >> r) & 1u) != 0u;
        const unsigned oq = okr ? static_cast<unsigned>(ir * qsl + qh) : 0u;
        const unsigned oo = okr ? static_cast<unsigned>(ir * osl + oh) : 0u;
        cp_async16_zfill<false>(dst + k * C::RPS * C::RS, win_addr<2>(qbase, oq), okr);
        cp_async16_zfill<false>(dst + (16 + k * C::RPS) * C::RS, win_addr<2>(obase, oo), okr);
      }
      cp_async_commit();
    };

    // Issue side: next chunk (grp_i, hh_i) into buf_i; its positions are loaded one issue
    // ahead (pi, pok), so the index load overlaps a chunk of compute.
    int grp_i = wib / G, hh_i = wib - (wib / G) * G, buf_i = 0;
    int pi;
    bool pok;
    slot_pos(grp_i, pi, pok);
    auto issue_next = [&]() {
      issue(hh_i, buf_i, pi, pok);
      hh_i += pl.dhh;
      grp_i += pl.dgrp;
      if (hh_i >= G) {
        hh_i -= G;
        ++grp_i;
      }
      buf_i = buf_i + 1 == STAGES ? 0 : buf_i + 1;
      slot_pos(grp_i, pi, pok);
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < my) issue_next();
      else cp_async_commit();  // empty group: the wait counts below stay uniform
    }
    cp_async_wait<STAGES - 1>();  // this thread's K/V pieces
    __syncthreads();              // everyone's
    const int kv_ro = tile_row_offset<C>(lane);  // A fragments of K / V (keys = M)
    constexpr int NKV = C::KV_REGS ? NF : 1;
    uint32_t ka[NKV][4], va[NKV][4];
    if constexpr (C::KV_REGS) {
#pragma unroll
      for (int f = 0; f < NF; ++f) {
        ldmatrix_x4(ka[f], kv_s + 16 * f + kv_ro);
        ldmatrix_x4(va[f], kv_s + 16 * C::RS + 16 * f + kv_ro);
      }
    }

    const float sl2 = static_cast<float>(p.shape.scale) * kLog2e;
    const int q_col = tile_col_offset<C>(lane);  // B fragments of Q / dO (k = dims)
    const int q_row = tile_row_offset<C>(lane);  // B fragments of Q / dO (k = slots), .trans
    const int x0 = 2 * tig - gid;  // column - key of element (t, hr, uu) = x0 + 8 (t - hr) + uu
    int u_c = wib, buf_c = 0;
    for (int k = 0; k < my; ++k) {
      if (k + STAGES - 1 < my) issue_next();
      else cp_async_commit();
      cp_async_wait<STAGES - 1>();
      __syncwarp();  // chunk k's rows, lse and delta are visible to the whole warp

      // Group 0 of a causal tile holds the queries j0 .. j0 + 15: key j0 + r sees column x
      // iff x >= r. Every later slot is after the block (or, for a last block cut by L,
      // only meets keys >= L, whose sums are never written).
      const bool tri = pl.causal && u_c < G;
      const E* rq = rows_of(buf_c);
      const E* ro = rq + 16 * C::RS;
      const float* meta = meta_of(buf_c);
      // S^T = K Q^T, dP^T = V dO^T: 16 keys x 16 slots (two n-tiles of 8).
      float sc[2][4], dp[2][4];
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[t][e] = dp[t][e] = 0.f;
#pragma unroll
      for (int f = 0; f < NF; ++f) {
        uint32_t kf[4], vf[4], bq[4], bo[4];
        if constexpr (C::KV_REGS) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            kf[e] = ka[f][e];
            vf[e] = va[f][e];
          }
        } else {
          ldmatrix_x4(kf, kv_s + 16 * f + kv_ro);
          ldmatrix_x4(vf, kv_s + 16 * C::RS + 16 * f + kv_ro);
        }
        ldmatrix_x4(bq, rq + 16 * f + q_col);
        mma16816<E>(sc[0], kf, bq[0], bq[1]);
        mma16816<E>(sc[1], kf, bq[2], bq[3]);
        ldmatrix_x4(bo, ro + 16 * f + q_col);
        mma16816<E>(dp[0], vf, bo[0], bo[1]);
        mma16816<E>(dp[1], vf, bo[2], bo[3]);
      }
      // P = exp2(S scale log2e - lse log2e), dS = P (dP - delta), rounded to E into the A
      // fragments of P^T / dS^T (register 2 t + hr: keys gid + 8 hr, slots 8 t + 2 tig +
      // {0, 1}). bias = -inf for a slot without lse (no part, or no allowed key: P = 0).
      auto bias_of = [](float lse) { return lse == -INFINITY ? -INFINITY : -lse * kLog2e; };
      float bias[2][2], dlt[2][2];
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const float2 l2 = *reinterpret_cast<const float2*>(meta + 8 * t + 2 * tig);
        const float2 d2 = *reinterpret_cast<const float2*>(meta + 16 + 8 * t + 2 * tig);
        bias[t][0] = bias_of(l2.x);
        bias[t][1] = bias_of(l2.y);
        dlt[t][0] = d2.x;
        dlt[t][1] = d2.y;
      }
      uint32_t pa[4], da[4];
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          float pv[2], sv[2];
#pragma unroll
          for (int uu = 0; uu < 2; ++uu) {
            const bool allowed = !tri || x0 + 8 * (t - hr) + uu >= 0;
            const int e = 2 * hr + uu;
            const float pr = fast_exp2(fmaf(sc[t][e], sl2, bias[t][uu]));
            pv[uu] = allowed ? pr : 0.f;
            sv[uu] = pv[uu] * (dp[t][e] - dlt[t][uu]);
          }
          pa[2 * t + hr] = pack2<E>(pv[0], pv[1]);
          da[2 * t + hr] = pack2<E>(sv[0], sv[1]);
        }
      // dV += P^T dO, dK += dS^T Q: 16 keys x D, k = the 16 slots.
      key_tile_dkdv_mma<E, NF>(dk, dv, pa, da, rq, ro, q_row);
      u_c += W;
      buf_c = buf_c + 1 == STAGES ? 0 : buf_c + 1;
      __syncwarp();  // buffer buf_c is refilled by the next iteration's issue
    }
    cp_async_wait<0>();  // the trailing empty groups; the buffers become the output staging
    __syncwarp();
  }

  // Each warp's partial dK, dV (C layout: keys gid / gid + 8, dims 8 n + 2 tig + {0, 1}) ->
  // rows in its own buffers; then the CTA sums the W warps in warp order (fixed: bit-
  // reproducible, no atomics) and writes every key < L of the tile (zeros for padded keys).
  stage_key_tile_acc<NF, C::OS>(reinterpret_cast<float*>(wsm), dk, dv, gid, tig);
  __syncthreads();
  const float scale = static_cast<float>(p.shape.scale);
  for (int x = threadIdx.x; x < 16 * C::CPR; x += W * 32) {
    const int r = x / C::CPR, pc = x % C::CPR;
    const int j = j0 + r;
    if (j >= L) continue;
    float fk[kFrag], fv[kFrag];
#pragma unroll
    for (int e = 0; e < kFrag; ++e) fk[e] = fv[e] = 0.f;
#pragma unroll
    for (int w = 0; w < W; ++w) {
      const float* sk = reinterpret_cast<const float*>(bs_smem + C::KV_BYTES + w * C::WARP_BYTES) +
                        r * C::OS + pc * kFrag;
      const float* sv = sk + 16 * C::OS;
      const float4 k0 = reinterpret_cast<const float4*>(sk)[0];
      const float4 k1 = reinterpret_cast<const float4*>(sk)[1];
      const float4 v0 = reinterpret_cast<const float4*>(sv)[0];
      const float4 v1 = reinterpret_cast<const float4*>(sv)[1];
      const float ak[kFrag] = {k0.x, k0.y, k0.z, k0.w, k1.x, k1.y, k1.z, k1.w};
      const float av[kFrag] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
      for (int e = 0; e < kFrag; ++e) {
        fk[e] += ak[e];
        fv[e] += av[e];
      }
    }
    const bool ok = ((kmask >> r) & 1u) != 0u;
    store_key_dkdv8(p, b, j, g, pc, fk, fv, ok, scale);
  }
}

// True when BLOSSOM_OPS_CUDA_BS_DKDV=old: the block-sparse dK/dV goes back to the wmma
// kernel (A/B runs). Read once per process, on the host.
inline bool bs_dkdv_old_requested() {
  static const bool old = env_equals("BLOSSOM_OPS_CUDA_BS_DKDV", "old");
  return old;
}

// True when BLOSSOM_OPS_CUDA_BS_WARPS=4: kBsWarpsOld warps per tile instead of kBsWarps (A/B
// runs). Read once per process, on the host.
inline bool bs_dkdv_old_warps_requested() {
  static const bool old = env_equals("BLOSSOM_OPS_CUDA_BS_WARPS", "4");
  return old;
}

template <typename T, int D, int W>
void launch_bs_dkdv_mma_dw(const AttnBwdParams<T, float>& p, BsTilePlan pl, const int32_t* off,
                           const int32_t* entries, const float* delta, int64_t ctas,
                           cudaStream_t stream) {
  constexpr int bytes = BsCfg<D, W>::CTA_BYTES;
  auto kernel = bs_dkdv_mma_kernel<T, D, W>;
  opt_in_smem(kernel, bytes);  // once per kernel and device (cuda/launch_cache.h)
  pl.dgrp = W / pl.G;  // a warp's walk: chunk u -> u + W
  pl.dhh = W % pl.G;
  kernel<<<static_cast<unsigned>(ctas), W * 32, bytes, stream>>>(p, pl, off, entries, delta);
}

template <typename T, int D>
void launch_bs_dkdv_mma_d(const AttnBwdParams<T, float>& p, const BsTilePlan& pl,
                          const int32_t* off, const int32_t* entries, const float* delta,
                          int64_t ctas, cudaStream_t stream) {
  if (bs_dkdv_old_warps_requested())
    launch_bs_dkdv_mma_dw<T, D, kBsWarpsOld>(p, pl, off, entries, delta, ctas, stream);
  else
    launch_bs_dkdv_mma_dw<T, D, kBsWarps>(p, pl, off, entries, delta, ctas, stream);
}

// Launches the mma.sync kernel when it covers this case (reads the inverse index and delta
// written on `stream`); false means "use another kernel" (nothing launched).
template <typename T>
bool launch_bs_dkdv_mma(const AttnBwdParams<T, float>& p, const BlockSparseMask& m, int64_t C,
                        const int32_t* off, const int32_t* entries, const float* delta,
                        cudaStream_t stream) {
  if constexpr (!stage_type_ok<T>()) {
    return false;
  } else {
    const AttnShape& s = p.shape;
    const int64_t D = s.head_dim, bs = m.block_size;
    if (!(D == 16 || D == 32 || D == 64 || D == 128) || bs < 16 || bs % 16 != 0 || s.kv_heads < 1 ||
        s.q_heads % s.kv_heads != 0 || s.kv_len != s.q_len || s.q_len >= (int64_t(1) << 30) ||
        s.q_heads >= (int64_t(1) << 20) || m.n < 0 || s.q_len * m.n >= (int64_t(1) << 31) ||
        !attn_bwd_vec_ok(p))
      return false;
    // In-kernel element offsets are 32-bit: inside one (b, group) slice of q / dO / k / v
    // (positions * stride_l + heads * stride_h) and over lse / delta (B * L * Hq).
    auto slice_ok = [&](int64_t sl, int64_t sh) {
      return sl >= 0 && sh >= 0 && s.q_len * sl + s.q_heads * sh < (int64_t(1) << 31);
    };
    if (!slice_ok(p.q.stride_l, p.q.stride_h) ||
        !slice_ok(p.grad_out.stride_l, p.grad_out.stride_h) ||
        !slice_ok(p.k.stride_l, p.k.stride_h) || !slice_ok(p.v.stride_l, p.v.stride_h) ||
        s.batch * s.q_len * s.q_heads >= (int64_t(1) << 31))
      return false;
    const int64_t ctas = s.batch * s.kv_heads * C * (bs / 16);
    if (ctas >= (int64_t(1) << 31)) return false;
    if (ctas == 0) return true;  // nothing to write
    BsTilePlan pl;
    pl.L = static_cast<int>(s.q_len);
    pl.C = static_cast<int>(C);
    pl.bs = static_cast<int>(bs);
    pl.tpb = static_cast<int>(bs / 16);
    pl.Hq = static_cast<int>(s.q_heads);
    pl.Hk = static_cast<int>(s.kv_heads);
    pl.G = static_cast<int>(s.q_heads / s.kv_heads);
    pl.n = static_cast<int>(m.n);
    pl.causal = m.causal ? 1 : 0;
    switch (D) {
      case 16: launch_bs_dkdv_mma_d<T, 16>(p, pl, off, entries, delta, ctas, stream); break;
      case 32: launch_bs_dkdv_mma_d<T, 32>(p, pl, off, entries, delta, ctas, stream); break;
      case 64: launch_bs_dkdv_mma_d<T, 64>(p, pl, off, entries, delta, ctas, stream); break;
      default: launch_bs_dkdv_mma_d<T, 128>(p, pl, off, entries, delta, ctas, stream); break;
    }
    return true;
  }
}

}  // namespace detail
}  // namespace gpu
}  // namespace blossom
