// Sliding-window dK/dV on tensor cores: one warp per tile of 16 consecutive keys.
//
// Why: the staged per-key kernel (attn_dkdv_staged.cuh) spends ~47 warp-instructions per
// (query, head, key) pair on SIMT dot products, unpacks, shuffles and per-pair staging, and
// Nsight Compute shows it issue-bound (window D=64 L=4096 B=64: 2.33 ms on an H200). Seen
// from a tile of 16 consecutive keys the window mask is regular: the band (distances 0 ..
// window-1) and the small dilated distances form a dense block of queries, and every larger
// dilated distance d gives 16 consecutive queries j0+d .. j0+d+15, one per key (a diagonal).
// Both are products of the 16 K/V rows with a run of 16 consecutive q/dO rows, so they run
// on mma.sync with masking; a diagonal uses 1/16 of its tensor work, which is cheap: 32
// mma.sync per 16 (query, head) columns replace ~750 SIMT instructions.
//
// Work decomposition
//   * Warp = (b, KV head g, key tile j0 = 16 t); a CTA holds kWinWarps = 4 consecutive tiles
//     of one (b, g), no CTA barrier. K and V of the tile are staged once (zeros for keys past
//     L or padded) and kept in registers as A fragments (keys = M).
//   * The queries of the tile are cut into chunks = 16 consecutive positions i0 .. i0+15 of
//     ONE query head h (a column of the products is a (position, head) pair). Per head, the
//     segments are: the dense block (nd chunks starting at j0 + dlo, masked by a 32-bit pattern
//     over the distance i - j, or a plain range for wide bands), then one chunk per dilated
//     distance +2^q (and -2^q when not causal) that the dense block does not cover. Chunks
//     entirely outside [0, L) are not visited. make_win_tile_plan picks the dense width that
//     minimises the chunk count; window 8 dilated causal: distances 0..7, 8, 16 dense
//     (2 chunks), diagonals 32, 64, .. < L.
//     Order: head-major, so the 4 warps of a CTA touch the same rows at about the same time
//     (tile t's second dense chunk is tile t+1's first: L1 hits through cp.async.ca; the
//     diagonals past 64 use .cg and leave L1 to the dense rows).
//   * Stage (3 buffers: chunks c+1, c+2 in flight while c is computed): lane l < 16 checks
//     position i0 + l (range, validity) -> ballot; lse (lanes < 16) and delta (lanes >= 16) by
//     4-byte cp.async, or -inf / 0 stored for invalid positions; the 16 q and 16 dO rows by
//     16-byte cp.async, consecutive lanes on consecutive 16 bytes of a row, 32-bit offsets;
//     rows of invalid positions are zero-filled (src-size 0, source = the tensor base: never
//     read), so NaN padding cannot reach the products.
//   * Compute per chunk: S^T = K Q^T and dP^T = V dO^T (2 n-tiles of 8 columns, D/16 k-steps,
//     B fragments by ldmatrix), then per element (lane: keys gid, gid+8, columns 2tig+{0,1},
//     8+2tig+{0,1}): allowed(i - j) and lse != -inf, P = exp2(S scale log2e - lse log2e),
//     dS = P (dP - delta). A diagonal chunk evaluates only the 2 elements a lane can own
//     (column == key). P^T and dS^T rounded to the input type are already A fragments (the C
//     layout of two n-tiles is the A layout with k = columns): dV += P^T dO and dK += dS^T Q
//     with B = ldmatrix.trans of the same staged rows. (Rounding P / dS to 16 bits before
//     the second products is what FlashAttention-2 and block_sparse_dkdv.cu do; the old
//     kernel kept them in fp32.)
//   * End: dK (times scale) and dV leave through shared memory as 16-byte stores (added to
//     what grad_k / grad_v hold when p.accumulate); every key < L of the tile is written
//     (zeros for padded keys). One warp owns each key's sums and walks its chunks in a fixed
//     order: bit-reproducible, no atomics.
//   * Fast path: 16-bit T, D in {16, 32, 64}, 16-byte aligned rows, q_len == kv_len < 2^30,
//     32-bit in-slice offsets. Everything else (D = 128 included: its K/V fragments and
//     dK/dV accumulators would not fit the registers) and BLOSSOM_OPS_CUDA_WIN_DKDV=old keep
//     the staged per-key kernel; BLOSSOM_OPS_CUDA_SIMPLE=1 the generic one.
//   * scripts/emulate_window_dkdv_mma.py replays this lane by lane against a dense reference.
//
// Counts, B=64 L=4096 Hq=8 Hk=2 (G=4) D=64 bf16, window 8 dilated causal (the brief's case)
//   Tiles 32,768 (8,192 CTAs). Per head and tile: 2.0 dense + 6.0 diagonal chunks (32 .. 2048,
//   trimmed near the end) -> 32.0 chunks per tile, 1.05 M chunks; 33.5 M useful (query, head,
//   key) pairs, 32 per chunk (72 per dense chunk, 16 per diagonal).
//   SASS (sm_90, nvcc 13) of the chunk loop, per chunk as executed: diagonal 259, dense 304
//   warp-instructions (issue ~125: segment, validity + ballot, lse/delta, 8 cp.async of 16 B
//   per lane with one IMAD.WIDE each; compute: 16 LDSM, 32 HMMA, ~45 / ~100 of masking and
//   exp2); D=16: 178 / 223 (8 HMMA). The old staged kernel, per 16 pairs at D=64: stage ~167
//   (a 32-bit division by G alone is 30), copy loop ~172 (8 pieces per lane), compute loop
//   4 x 95, waits ~20: ~760, i.e. 47 per pair; at D=16 ~20 per pair.
//   -> 283 M warp-instructions in chunks (8.4 per pair) + ~40 M tile prologue / epilogue
//   (old: ~1.6 G); at D=16 199 M (5.9 per pair) + ~26 M (old: ~0.67 G);
//   ~0.3 - 0.5 ms of issue on 132 SMs (IPC 4 - 2.5).
//   Tensor: 33.6 M HMMA.16816 = 138 GFLOP (mostly masked away) -> ~0.2 ms at ~660 TFLOP/s.
//   Bytes: rows 16 x 2 x 128 B + lse/delta 128 B = 4.2 KB per chunk -> 4.43 GB L2 -> SM
//   (less the L1 hits between the 4 tiles of a CTA: up to ~25%); shared memory 4 KB written +
//   8 KB read (each row by ldmatrix and ldmatrix.trans) per chunk = 12.9 GB -> 0.39 ms at
//   128 B/clk/SM; DRAM compulsory ~0.8 GB (q, dO, k, v, dk, dv, lse, delta; a (b, g) slice of
//   q/dO is 4 MB and stays in L2 while its tiles run).
//   Predicted: 0.7 - 1.0 ms, bound by the L2 -> SM gather (4 - 6 TB/s) with issue and shared
//   memory close behind, from 2.33 ms (H200). D=16 (rows 32 B: 1.21 GB, 225 M instructions):
//   0.35 - 0.5 ms, from 1.18 ms. L=16384 D=64 (8 diagonals per head, 5.2 M chunks, 22 GB from
//   L2, 1.56 G instructions): 4 - 5 ms, from ~9.5 ms.
//   Registers: 168 / 127 / 95 at D = 64 / 32 / 16 (no spills): 12 / 16 / 20 warps per SM;
//   shared memory 56.8 KB per CTA at D=64 (3 stages x 4 warps x 4.7 KB).
//   Next levers: fewer bytes (more tiles per CTA sharing rows through L1 or shared memory),
//   m16n8k8 for the diagonal dK/dV products (half the tensor work), two heads per issue.
//
// Head-major lse / delta (branch win-dkdv2, 2026-11-27; merged. Measured on an H100, run m:
//   D=64 L=4096 0.751 -> 0.704 ms + 0.014 for the copy, L=16384 3.777 -> 3.394 + 0.053,
//   D=16 L=16384 1.531 -> 1.465 + 0.052; dK/dV bit-identical to tc1. The count below
//   and its prediction were written before that run.)
//   Count first (brief's case, B=64 L=4096 Hq=8 Hk=2 D=64 bf16, window 8 dilated causal):
//   1,049,088 chunks (32.0 per tile). A chunk moves 32 rows x 128 B = 4 KB of q / dO, and its
//   32 lse / delta floats sat 4 Hq = 32 B apart ([B, L, Hq]): 32 sectors of 32 B = 1 KB
//   through L2 -> SM for 128 useful bytes, i.e. 20% of the chunk's 5 KB. L2 -> SM sectors:
//   5.37 GB at L=4096 (0.75 ms measured: 7.2 TB/s), 26.8 GB at L=16384 (40.0 chunks per
//   tile; 3.77 ms: 7.1 TB/s). The same ~7.1-7.2 TB/s at both lengths, about the H100's L2
//   read bandwidth, while issue is ~320 M warp-instructions (~0.33 ms at IPC 4, i.e. IPC ~1.8
//   at 0.75 ms) and the tensor work ~0.2 ms: gather-bound (L2 throughput), not issue-bound.
//   (An estimate from counts, not a profile: ncu's lts__t_sectors / l1tex__m_xbar2l1tex
//   counters are the check; see the report for the command.)
//   Lever: the dK/dV pass reads lse / delta from head-major copies lse_t / delta_t [B, Hq, L]
//   (win_meta_transpose_kernel, into the backward workspace past delta / lse'), so a
//   chunk's 16 positions are 64 contiguous bytes: 2 + 2 sectors = 128 B instead of 1 KB.
//   L2 -> SM: 5.37 -> 4.43 GB (-17.5%) at L=4096, 26.8 -> 22.1 GB at L=16384; the copy kernel
//   moves 4 x 8.4 MB (L=4096; 4 x 33.5 MB at 16384) once. Rows are untouched: chunk order,
//   L1 (.ca) sharing between the CTA's 4 tiles, cp.async pipeline all as before.
//   SASS (sm_90, nvcc 13, bf16 D=64): chunk loop 413 static instructions before and after
//   (the meta offset hh * L + i replaces i * Hq + hh), whole kernel 1480 -> 1464; registers
//   168 / 127 / 95 (D = 64 / 32 / 16), no spills, both variants; the tc1 instance is
//   instruction-for-instruction the previous kernel. Copy kernel: 25 registers, 128
//   instructions.
//   Predicted (H100): L=4096 0.75 -> 0.62-0.70 ms (0.62 if the L2 rate stays at 7.2 TB/s), plus
//   ~0.01 ms of copy; L=16384 3.77 -> 3.1-3.5 ms plus ~0.04. Smaller D gains more: a row is
//   D * 2 bytes, so the 1 KB of lse / delta sectors was a third of a D=32 chunk (3 -> 2.1 KB)
//   and half of a D=16 chunk (2 -> 1.1 KB): D=16 L=4096 0.33 -> ~0.19-0.25 ms if equally
//   gather-bound (its issue share is larger: 199 M instructions). Exactness: the copies are plain
//   float copies, so dK / dV are bit-identical to tc1 (check_window_dkdv_gpu.py compares).
//   BLOSSOM_OPS_CUDA_WIN_DKDV=tc1 keeps the in-place reads (no copy, no extra workspace);
//   =old the staged per-key kernel. Rejected after the count: four heads of a diagonal in one
//   pass (halves the diagonal's S / dP mma, cuts masking) and skipping full-band masks save
//   instructions, but rows stay 4 KB per chunk; with the gather the bound, they would gain
//   little until the rows themselves are shared between tiles.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common/params.h"
#include "cuda/attn_staged_tc.cuh"  // tile_row_offset / tile_col_offset, TcElem, stage_type_ok
#include "cuda/common.cuh"
#include "cuda/cp_async.cuh"
#include "cuda/launch_cache.h"
#include "cuda/mma_frag.cuh"

namespace blossom {
namespace gpu {
namespace detail {

constexpr int kWinWarps = 4;   // warps (= consecutive key tiles of one (b, g)) per CTA
constexpr int kWinStages = 3;  // chunk buffers per warp (two chunks in flight)

// The window mask seen from a 16-key tile (host-computed, the same for every tile).
// Pair (query i, key j) of a dense chunk is allowed iff x = (i - j) - dlo lies in [0, xlen)
// and bit x % 32 of `bits` is set; a diagonal chunk of distance d allows i - j == d only.
struct WinTilePlan {
  int L = 0;
  int causal = 1;
  int nd = 0;         // dense chunks per head (before trimming to [0, L))
  int dlo = 0;        // distance of x = 0; also the first dense position minus j0
  int xlen = 0;       // number of distances the dense pattern spans
  uint32_t bits = 0;  // allowed distances (all ones when xlen > 32: a plain band)
  int q0 = 0;         // exponent of the smallest distance handled as a diagonal
  int n_pow = 0;      // diagonal exponents q0 .. q0 + n_pow - 1 (+2^q, and -2^q if not causal)
};

// band: distances 0 .. band-1 allowed; dilated distances 2^(p0 + k), k < n_pow (all >= band,
// <= L - 1), as in SlidingPolicy. Picks how many of the small dilated distances the dense
// block absorbs (m): a dense chunk costs as much as a diagonal chunk, so m minimises
// dense chunks + diagonal chunks, as long as the pattern fits 32 distances.
inline WinTilePlan make_win_tile_plan(int64_t L, int64_t band, int p0, int64_t n_pow,
                                      bool causal) {
  WinTilePlan pl;
  pl.L = static_cast<int>(L);
  pl.causal = causal ? 1 : 0;
  auto reach = [&](int64_t m) -> int64_t {  // dense distances are |d| < reach(m)
    return m == 0 ? band : (int64_t(1) << (p0 + m - 1)) + 1;
  };
  auto span = [&](int64_t e) -> int64_t { return e == 0 ? 0 : (causal ? e : 2 * e - 1); };
  auto chunks = [&](int64_t e) -> int64_t { return e == 0 ? 0 : (15 + span(e) + 15) / 16; };
  int64_t best_m = 0, best_cost = -1;
  for (int64_t m = 0; m <= n_pow; ++m) {
    const int64_t e = reach(m);
    if (m > 0 && span(e) > 32) break;  // the pattern must fit one 32-bit word
    const int64_t cost = chunks(e) + (n_pow - m) * (causal ? 1 : 2);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best_m = m;
    }
  }
  const int64_t e = reach(best_m);
  pl.nd = static_cast<int>(chunks(e));
  pl.dlo = causal ? 0 : static_cast<int>(1 - e);
  if (best_m == 0) {
    pl.xlen = static_cast<int>(span(e));
    pl.bits = ~0u;
  } else {
    pl.xlen = 32;
    pl.bits = 0;
    for (int x = 0; x < 32; ++x) {
      const int64_t d = pl.dlo + x;
      const int64_t ad = d < 0 ? -d : d;
      bool ok = ad < band;
      for (int64_t k = 0; k < best_m; ++k) ok = ok || ad == (int64_t(1) << (p0 + k));
      if (ok && (!causal || d >= 0)) pl.bits |= 1u << x;
    }
  }
  pl.q0 = static_cast<int>(p0 + best_m);
  pl.n_pow = static_cast<int>(n_pow - best_m);
  return pl;
}

template <int D>
struct WinCfg {
  static constexpr int NF = D / 16;                       // 16-dim slices of a row
  static constexpr int CPR = D / kFrag;                   // 16-byte pieces per row
  static constexpr int RS = D + kFrag;                    // staged row stride (elements)
  static constexpr int ROWS_BYTES = 32 * RS * 2;          // 16 q rows, then 16 dO rows
  static constexpr int STAGE_BYTES = ROWS_BYTES + 32 * 4;  // + lse[16], delta[16]
  static constexpr int WARP_BYTES = kWinStages * STAGE_BYTES;
  static constexpr int CTA_BYTES = kWinWarps * WARP_BYTES;
  static constexpr int OS = D + 4;                        // output staging row (floats)
  static_assert(D % 16 == 0 && D <= 64, "window dK/dV tiles: D in {16, 32, 64}");
  static_assert(STAGE_BYTES % 16 == 0, "cp.async needs 16-byte aligned buffers");
  static_assert(2 * 16 * OS * 4 <= WARP_BYTES, "output staging must fit the chunk buffers");
};

// Resident CTAs per SM the register budget must allow: 3 at D = 64 (<= 168 registers; the
// K/V fragments and dK/dV accumulators alone are 96), 4 below.
template <int D>
constexpr int win_min_ctas() {
  return D == 64 ? 3 : 4;
}

// dV += P^T dO and dK += dS^T Q for one 16-key tile over 16 columns (query rows): pa / da are
// the A fragments (keys x columns) of P^T and dS^T, rq / ro the staged Q / dO rows of the
// columns, q_row the lane's ldmatrix.trans row offset. Shared with block_sparse_dkdv_mma.cuh.
template <typename E, int NF>
__device__ __forceinline__ void key_tile_dkdv_mma(float (&dk)[2 * NF][4], float (&dv)[2 * NF][4],
                                                  const uint32_t (&pa)[4], const uint32_t (&da)[4],
                                                  const E* rq, const E* ro, int q_row) {
#pragma unroll
  for (int f = 0; f < NF; ++f) {
    uint32_t bt[4];
    ldmatrix_x4_trans(bt, ro + 16 * f + q_row);
    mma16816<E>(dv[2 * f], pa, bt[0], bt[1]);
    mma16816<E>(dv[2 * f + 1], pa, bt[2], bt[3]);
    ldmatrix_x4_trans(bt, rq + 16 * f + q_row);
    mma16816<E>(dk[2 * f], da, bt[0], bt[1]);
    mma16816<E>(dk[2 * f + 1], da, bt[2], bt[3]);
  }
}

// A warp's dK, dV accumulators (C layout: keys gid / gid + 8, dims 8 n + 2 tig + {0, 1}) as
// fp32 rows of stride OS in shared memory: dK at ok_s, dV at ok_s + 16 OS.
template <int NF, int OS>
__device__ __forceinline__ void stage_key_tile_acc(float* ok_s, const float (&dk)[2 * NF][4],
                                                   const float (&dv)[2 * NF][4], int gid,
                                                   int tig) {
  float* ov_s = ok_s + 16 * OS;
#pragma unroll
  for (int n = 0; n < 2 * NF; ++n) {
    const int o0 = gid * OS + 8 * n + 2 * tig, o1 = o0 + 8 * OS;
    *reinterpret_cast<float2*>(ok_s + o0) = make_float2(dk[n][0], dk[n][1]);
    *reinterpret_cast<float2*>(ok_s + o1) = make_float2(dk[n][2], dk[n][3]);
    *reinterpret_cast<float2*>(ov_s + o0) = make_float2(dv[n][0], dv[n][1]);
    *reinterpret_cast<float2*>(ov_s + o1) = make_float2(dv[n][2], dv[n][3]);
  }
}

// Dims [8 pc, 8 pc + 8) of key j's dK (times scale) and dV to grad_k / grad_v (added to
// them when p.accumulate); zeros for a padded key (ok false). Shared with
// block_sparse_dkdv_mma.cuh.
template <typename T>
__device__ __forceinline__ void store_key_dkdv8(const AttnBwdParams<T, float>& p, int64_t b,
                                                int64_t j, int64_t g, int pc, float (&fk)[kFrag],
                                                float (&fv)[kFrag], bool ok, float scale) {
#pragma unroll
  for (int e = 0; e < kFrag; ++e) {
    fk[e] = ok ? fk[e] * scale : 0.f;
    fv[e] = ok ? fv[e] : 0.f;
  }
  store8_acc(p.grad_k.at(b, j, g) + pc * kFrag, fk, p.accumulate);
  store8_acc(p.grad_v.at(b, j, g) + pc * kFrag, fv, p.accumulate);
}

// base + kBytes * off as one IMAD.WIDE.U32 (the compiler otherwise re-adds the 64-bit element
// offset of the base and shifts: 4 instructions per row address).
template <int kBytes>
__device__ __forceinline__ const void* win_addr(const void* base, unsigned off) {
  uint64_t r;
  asm("mad.wide.u32 %0, %1, %2, %3;\n"
      : "=l"(r)
      : "r"(off), "n"(kBytes), "l"(reinterpret_cast<uint64_t>(base)));
  return reinterpret_cast<const void*>(r);
}

// Where one lane's cp.async pieces of a chunk come from: rows r = r0 + k * 32 / CPR of the
// chunk (k < CPR / 2 from `a`, the rest the same positions of `b`), piece pc of each. Offsets
// are in elements, 32-bit, relative to the (b, first head of the group) base of each tensor
// (the launcher checks that L * stride_l + Hq * stride_h fits).
template <class C, typename T>
struct WinRows {
  static constexpr int RPS = 32 / C::CPR;  // rows per step
  const T* a;
  const T* b;
  int a_lane, b_lane;  // (r0 % 16) * stride_l + pc * 8
  int a_step, b_step;  // RPS * stride_l
  int dst_lane;        // element offset of (row r0, piece pc) in a chunk buffer
  int r0;

  __device__ __forceinline__ void init(const T* a_, int a_sl, const T* b_, int b_sl, int lane) {
    const int pc = lane % C::CPR;
    r0 = lane / C::CPR;
    a = a_;
    b = b_;
    a_lane = r0 * a_sl + pc * kFrag;
    b_lane = r0 * b_sl + pc * kFrag;
    a_step = RPS * a_sl;
    b_step = RPS * b_sl;
    dst_lane = r0 * C::RS + pc * kFrag;
  }

  // Rows of positions p0 .. p0 + 15: a_off / b_off = element offsets of position p0 (may be
  // out of range: negative or past L); rows whose bit in vm is clear are zero-filled and not
  // read (their source is the tensor base, a valid address). Valid offsets are >= 0, so the
  // address is one unsigned multiply-add.
  template <bool kL1, typename E>
  __device__ __forceinline__ void copy(E* dst, int a_off, int b_off, uint32_t vm) const {
    const uint32_t vl = vm >> r0;
    const int oa0 = a_off + a_lane, ob0 = b_off + b_lane;
#pragma unroll
    for (int k = 0; k < C::CPR / 2; ++k) {
      const bool ok = (vl & (1u << (k * RPS))) != 0u;
      const unsigned oa = ok ? static_cast<unsigned>(oa0 + k * a_step) : 0u;
      const unsigned ob = ok ? static_cast<unsigned>(ob0 + k * b_step) : 0u;
      E* d = dst + dst_lane + k * RPS * C::RS;
      cp_async16_zfill<kL1>(d, win_addr<2>(a, oa), ok);
      cp_async16_zfill<kL1>(d + 16 * C::RS, win_addr<2>(b, ob), ok);
    }
  }
};

// Where the issue step finds a chunk: first position i0 = j0 + rel.
struct WinSeg {
  int rel;
  bool far;  // a diagonal too far for the CTA's other tiles to share its rows (skip L1)
};

// kMetaT: lse / delta come from head-major copies lse_t / delta_t [B, Hq, L] (written by
// win_meta_transpose_kernel), so the 16 positions of a chunk are 64 contiguous bytes (2
// sectors) instead of 16 x 4 bytes 4 * Hq bytes apart (16 sectors of 32 bytes, 1/8 used);
// otherwise (BLOSSOM_OPS_CUDA_WIN_DKDV=tc1) from p.lse / delta [B, L, Hq] as before.
template <typename T, int D, bool kMetaT>
__global__ void __launch_bounds__(kWinWarps * 32, win_min_ctas<D>())
    window_dkdv_tc_kernel(const AttnBwdParams<T, float> p, const WinTilePlan plan,
                          const float* __restrict__ delta, const float* __restrict__ lse_t,
                          const float* __restrict__ delta_t) {
  using C = WinCfg<D>;
  using E = typename TcElem<T>::type;
  constexpr int NF = C::NF;
  extern __shared__ __align__(128) unsigned char win_smem[];
  const int lane = threadIdx.x & 31, wib = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const AttnShape& s = p.shape;
  const int L = plan.L;
  const int Hq = static_cast<int>(s.q_heads), Hk = static_cast<int>(s.kv_heads);
  const int G = Hq / Hk;
  const int n_tiles = (L + 15) >> 4;
  const int tgroups = (n_tiles + kWinWarps - 1) / kWinWarps;
  const int bg = static_cast<int>(blockIdx.x) / tgroups;
  const int tile = (static_cast<int>(blockIdx.x) - bg * tgroups) * kWinWarps + wib;
  if (tile >= n_tiles) return;  // uniform per warp; no CTA-wide barrier below
  const int b = bg / Hk, g = bg - b * Hk;
  const int j0 = tile * 16;

  unsigned char* wsm = win_smem + wib * C::WARP_BYTES;
  auto rows_of = [&](int buf) { return reinterpret_cast<E*>(wsm + buf * C::STAGE_BYTES); };
  auto meta_of = [&](int buf) {
    return reinterpret_cast<float*>(wsm + buf * C::STAGE_BYTES + C::ROWS_BYTES);
  };
  const bool* vrow = p.valid.ptr != nullptr ? p.valid.ptr + b * p.valid.stride_b : nullptr;
  auto pos_ok = [&](int i) {
    return static_cast<unsigned>(i) < static_cast<unsigned>(L) && (vrow == nullptr || vrow[i]);
  };

  // Keys of the tile that exist and are valid.
  const uint32_t kmask = __ballot_sync(kFullMask, pos_ok(j0 + (lane & 15))) & 0xffffu;

  float dk[2 * NF][4], dv[2 * NF][4];
#pragma unroll
  for (int n = 0; n < 2 * NF; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;

  if (kmask != 0) {
    // K and V rows into the last buffer (first refilled by the main loop's first issue).
    {
      WinRows<C, T> kv;
      kv.init(p.k.at(b, 0, g), static_cast<int>(p.k.stride_l), p.v.at(b, 0, g),
              static_cast<int>(p.v.stride_l), lane);
      kv.template copy<true>(rows_of(kWinStages - 1), j0 * static_cast<int>(p.k.stride_l),
                             j0 * static_cast<int>(p.v.stride_l), kmask);
      cp_async_commit();
    }

    // Segments of this tile: dense chunks [s_lo, s_hi) (those overlapping [0, L)), then np_t
    // diagonals +2^(q0 + k) and nn_t diagonals -2^(q0 + k) whose positions reach [0, L).
    const int a0 = j0 + plan.dlo;
    const int s_lo = a0 + 15 >= 0 ? 0 : (-(a0 + 15) + 15) / 16;
    const int s_hi = min(plan.nd, (L - 1 - a0) / 16 + 1);
    const int nds = s_hi > s_lo ? s_hi - s_lo : 0;
    int np_t = 0, nn_t = 0;
    while (np_t < plan.n_pow && j0 + (1 << (plan.q0 + np_t)) <= L - 1) ++np_t;
    if (!plan.causal)
      while (nn_t < plan.n_pow && (1 << (plan.q0 + nn_t)) <= j0 + 15) ++nn_t;
    const int NC = nds + np_t + nn_t;
    const int n_chunks = NC * G;

    auto seg = [&](int u) -> WinSeg {
      WinSeg r;
      if (u < nds) {
        r.rel = plan.dlo + 16 * (s_lo + u);
        r.far = false;
      } else {
        int k = u - nds;
        const bool neg = k >= np_t;
        if (neg) k -= np_t;
        const int d = 1 << (plan.q0 + k);
        r.rel = neg ? -d : d;
        r.far = d > 16 * kWinWarps;
      }
      return r;
    };

    // Chunk (segment u, head hh) -> buffer buf: lse / delta and the 32 rows.
    const int qsl = static_cast<int>(p.q.stride_l), qsh = static_cast<int>(p.q.stride_h);
    const int osl = static_cast<int>(p.grad_out.stride_l);
    const int osh = static_cast<int>(p.grad_out.stride_h);
    WinRows<C, T> qo;
    qo.init(p.q.at(b, 0, g * G), qsl, p.grad_out.at(b, 0, g * G), osl, lane);
    // lse (lanes < 16) or delta (lanes >= 16) of position 0, head g * G.
    const float* mbase =
        kMetaT ? (lane < 16 ? lse_t : delta_t) + (static_cast<int64_t>(b) * Hq + g * G) * L
               : (lane < 16 ? p.lse : delta) + (static_cast<int64_t>(b) * L * Hq + g * G);
    auto issue = [&](int u, int hh, int buf) {
      const WinSeg sg = seg(u);
      const int i0 = j0 + sg.rel;
      const int i = i0 + (lane & 15);
      const bool ok = pos_ok(i);
      const uint32_t vm = __ballot_sync(kFullMask, ok) & 0xffffu;
      float* meta = meta_of(buf) + lane;
      const unsigned mo = static_cast<unsigned>(kMetaT ? hh * L + i : i * Hq + hh);
      if (ok) cp_async4(meta, win_addr<4>(mbase, mo));
      else *meta = lane < 16 ? -INFINITY : 0.f;
      const int a_off = i0 * qsl + hh * qsh, b_off = i0 * osl + hh * osh;
      if (sg.far) qo.template copy<false>(rows_of(buf), a_off, b_off, vm);
      else qo.template copy<true>(rows_of(buf), a_off, b_off, vm);
      cp_async_commit();
    };

    int u_i = 0, hh_i = 0, buf_i = 0;  // next chunk to issue (head-major order)
    auto issue_next = [&]() {
      issue(u_i, hh_i, buf_i);
      if (++u_i == NC) {
        u_i = 0;
        ++hh_i;
      }
      buf_i = buf_i + 1 == kWinStages ? 0 : buf_i + 1;
    };
#pragma unroll
    for (int c = 0; c < kWinStages - 1; ++c) {
      if (c < n_chunks) issue_next();
      else cp_async_commit();  // empty group: the wait counts below stay uniform
    }
    cp_async_wait<kWinStages - 1>();  // the K/V group
    __syncwarp();
    uint32_t ka[NF][4], va[NF][4];
    {
      const E* kv = rows_of(kWinStages - 1);
      const int ro = tile_row_offset<C>(lane);
#pragma unroll
      for (int f = 0; f < NF; ++f) {
        ldmatrix_x4(ka[f], kv + 16 * f + ro);
        ldmatrix_x4(va[f], kv + 16 * C::RS + 16 * f + ro);
      }
    }
    __syncwarp();  // the K/V buffer is refilled by the first issue below

    const float sl2 = static_cast<float>(s.scale) * kLog2e;
    const int q_col = tile_col_offset<C>(lane);  // B fragments of Q / dO (k = dims)
    const int q_row = tile_row_offset<C>(lane);  // B fragments of Q / dO (k = columns), .trans
    // Diagonal chunks: lane's only candidates are keys gid and gid + 8 with columns
    // 2 tig + dj and 8 + 2 tig + dj, dj = gid & 1, when gid / 2 == tig.
    const int dj = gid & 1;
    const bool don = (gid >> 1) == tig;
    const int x0 = 2 * tig - gid;  // column - key of element (t, hr, uu) = x0 + 8 (t - hr) + uu
    int u_c = 0, buf_c = 0;
    for (int c = 0; c < n_chunks; ++c) {
      if (c + kWinStages - 1 < n_chunks) issue_next();
      else cp_async_commit();
      cp_async_wait<kWinStages - 1>();
      __syncwarp();  // chunk c's rows, lse and delta are visible to the whole warp

      // Dense chunk s: x = (i - j) - dlo = 16 s + column - key (it starts at j0 + dlo + 16 s).
      const bool diag = u_c >= nds;
      const int bx = 16 * (s_lo + u_c);
      const E* rq = rows_of(buf_c);
      const E* ro = rq + 16 * C::RS;
      const float* meta = meta_of(buf_c);
      // S^T = K Q^T, dP^T = V dO^T: 16 keys x 16 columns (two n-tiles of 8).
      float sc[2][4], dp[2][4];
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[t][e] = dp[t][e] = 0.f;
#pragma unroll
      for (int f = 0; f < NF; ++f) {
        uint32_t bq[4], bo[4];
        ldmatrix_x4(bq, rq + 16 * f + q_col);
        mma16816<E>(sc[0], ka[f], bq[0], bq[1]);
        mma16816<E>(sc[1], ka[f], bq[2], bq[3]);
        ldmatrix_x4(bo, ro + 16 * f + q_col);
        mma16816<E>(dp[0], va[f], bo[0], bo[1]);
        mma16816<E>(dp[1], va[f], bo[2], bo[3]);
      }
      // P = exp2(S scale log2e - lse log2e) where allowed, dS = P (dP - delta); rounded to E
      // into the A fragments of P^T / dS^T (register 2 t + hr: keys gid + 8 hr, columns
      // 8 t + 2 tig + {0, 1}). Per column, bias = -lse log2e, or -inf for a column that takes
      // no part (invalid position: lse staged as -inf; or lse = -inf: no allowed key), so
      // that P = 0 there.
      auto bias_of = [](float lse) { return lse == -INFINITY ? -INFINITY : -lse * kLog2e; };
      uint32_t pa[4], da[4];
      if (diag) {
        // Columns 2 tig + dj (keys gid) and 8 + 2 tig + dj (keys gid + 8), when gid / 2 == tig.
        const int cj = 2 * tig + dj;
        const float s0 = dj ? sc[0][1] : sc[0][0], s1 = dj ? sc[1][3] : sc[1][2];
        const float q0 = dj ? dp[0][1] : dp[0][0], q1 = dj ? dp[1][3] : dp[1][2];
        // Lanes off the diagonal get bias -inf, so P = exp2(-inf) = 0 without a branch.
        const float b0 = bias_of(meta[cj]), b1 = bias_of(meta[8 + cj]);
        const float p0 = fast_exp2(fmaf(s0, sl2, don ? b0 : -INFINITY));
        const float p1 = fast_exp2(fmaf(s1, sl2, don ? b1 : -INFINITY));
        const float e0 = p0 * (q0 - meta[16 + cj]);
        const float e1 = p1 * (q1 - meta[24 + cj]);
        pa[0] = dj ? pack2<E>(0.f, p0) : pack2<E>(p0, 0.f);
        pa[3] = dj ? pack2<E>(0.f, p1) : pack2<E>(p1, 0.f);
        da[0] = dj ? pack2<E>(0.f, e0) : pack2<E>(e0, 0.f);
        da[3] = dj ? pack2<E>(0.f, e1) : pack2<E>(e1, 0.f);
        pa[1] = pa[2] = da[1] = da[2] = 0u;
      } else {
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
        const int xb = bx + x0;
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            float pv[2], sv[2];
#pragma unroll
            for (int uu = 0; uu < 2; ++uu) {
              const int x = xb + 8 * (t - hr) + uu;
              const bool allowed = static_cast<unsigned>(x) < static_cast<unsigned>(plan.xlen) &&
                                   ((plan.bits >> (x & 31)) & 1u) != 0u;
              const int e = 2 * hr + uu;
              const float pr = fast_exp2(fmaf(sc[t][e], sl2, bias[t][uu]));
              pv[uu] = allowed ? pr : 0.f;
              sv[uu] = pv[uu] * (dp[t][e] - dlt[t][uu]);
            }
            pa[2 * t + hr] = pack2<E>(pv[0], pv[1]);
            da[2 * t + hr] = pack2<E>(sv[0], sv[1]);
          }
      }
      // dV += P^T dO, dK += dS^T Q: 16 keys x D, k = the 16 columns.
      key_tile_dkdv_mma<E, NF>(dk, dv, pa, da, rq, ro, q_row);
      if (++u_c == NC) u_c = 0;
      buf_c = buf_c + 1 == kWinStages ? 0 : buf_c + 1;
      __syncwarp();  // buffer buf_c is refilled by the next iteration's issue
    }
    cp_async_wait<0>();  // the trailing empty groups; the buffers become the output staging
    __syncwarp();
  }

  // dK, dV (C layout: keys gid / gid + 8, dims 8 n + 2 tig + {0, 1}) -> rows in shared memory.
  float* ok_s = reinterpret_cast<float*>(wsm);
  float* ov_s = ok_s + 16 * C::OS;
  stage_key_tile_acc<NF, C::OS>(ok_s, dk, dv, gid, tig);
  __syncwarp();
  const float scale = static_cast<float>(s.scale);
  for (int t = lane; t < 16 * C::CPR; t += 32) {
    const int r = t / C::CPR, pc = t % C::CPR;
    const int j = j0 + r;
    if (j >= L) continue;
    const bool ok = (kmask >> r) & 1u;
    const float4* sk = reinterpret_cast<const float4*>(ok_s + r * C::OS + pc * kFrag);
    const float4* sv = reinterpret_cast<const float4*>(ov_s + r * C::OS + pc * kFrag);
    const float4 k0 = sk[0], k1 = sk[1], v0 = sv[0], v1 = sv[1];
    float fk[kFrag] = {k0.x, k0.y, k0.z, k0.w, k1.x, k1.y, k1.z, k1.w};
    float fv[kFrag] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
    store_key_dkdv8(p, b, j, g, pc, fk, fv, ok, scale);
  }
}

// BLOSSOM_OPS_CUDA_WIN_DKDV (A/B runs; read once per process, on the host): "old" sends the
// window's dK/dV back to the staged per-key kernel, "tc1" runs the tile kernel reading lse /
// delta in place ([B, L, Hq], as before the head-major copies); anything else the tile kernel
// on the head-major copies.
enum class WinDkdvMode { kOld, kTc1, kMetaT };
inline WinDkdvMode win_dkdv_mode() {
  static const WinDkdvMode m = env_equals("BLOSSOM_OPS_CUDA_WIN_DKDV", "old")   ? WinDkdvMode::kOld
                               : env_equals("BLOSSOM_OPS_CUDA_WIN_DKDV", "tc1") ? WinDkdvMode::kTc1
                                                                                : WinDkdvMode::kMetaT;
  return m;
}
inline bool win_dkdv_old_requested() { return win_dkdv_mode() == WinDkdvMode::kOld; }

// Head-major copies of lse and delta for the tile kernel: CTA = (b, 32 positions); it reads
// the 32 Hq contiguous floats of each array once (coalesced) and writes Hq runs of 32
// positions. Plain copies: the tile kernel sees the same values bit for bit. (A template
// only so that every translation unit including this header may define it: the block-sparse
// dK/dV includes it too.)
constexpr int kWinMetaTP = 32;         // positions per CTA
constexpr int kWinMetaMaxHeads = 128;  // shared memory 2 * 32 * Hq floats <= 32 KB
template <int TP>
__global__ void __launch_bounds__(256)
    win_meta_transpose_kernel(const float* __restrict__ lse, const float* __restrict__ delta,
                              float* __restrict__ lse_t, float* __restrict__ delta_t, int L,
                              int Hq, int tiles) {
  extern __shared__ float wmt_smem[];  // lse rows, then delta rows: [TP][Hq] each
  const int64_t b = blockIdx.x / tiles;
  const int i0 = (static_cast<int>(blockIdx.x) - static_cast<int>(b) * tiles) * TP;
  const int np = min(TP, L - i0);
  const int64_t src = (b * L + i0) * Hq;
  float* sd = wmt_smem + TP * Hq;
  for (int e = threadIdx.x; e < np * Hq; e += blockDim.x) {
    wmt_smem[e] = lse[src + e];
    sd[e] = delta[src + e];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < TP * Hq; e += blockDim.x) {
    const int h = e / TP, ii = e % TP;
    if (ii >= np) continue;
    const int64_t dst = (b * Hq + h) * L + i0 + ii;
    lse_t[dst] = wmt_smem[ii * Hq + h];
    delta_t[dst] = sd[ii * Hq + h];
  }
}

// Workspace the tile kernel wants after delta (and lse' when gated) for the head-major copies
// of lse and delta: 0 when it will not use them (then it reads lse / delta in place).
inline size_t win_meta_t_bytes(const AttnShape& s) {
  if (win_dkdv_mode() != WinDkdvMode::kMetaT || simple_kernels_requested()) return 0;
  const int64_t D = s.head_dim;
  if (!(D == 16 || D == 32 || D == 64) || s.q_heads > kWinMetaMaxHeads || s.q_heads < 1 ||
      s.kv_len != s.q_len)
    return 0;
  return 2 * align_up(static_cast<size_t>(attn_rows(s)) * sizeof(float));
}

template <typename T, int D, bool kMetaT>
void launch_window_dkdv_tc_d(const AttnBwdParams<T, float>& p, const WinTilePlan& plan,
                             const float* delta, const float* lse_t, const float* delta_t,
                             int64_t ctas, cudaStream_t stream) {
  constexpr int bytes = WinCfg<D>::CTA_BYTES;
  auto kernel = window_dkdv_tc_kernel<T, D, kMetaT>;
  opt_in_smem(kernel, bytes);  // once per kernel and device (cuda/launch_cache.h)
  kernel<<<static_cast<unsigned>(ctas), kWinWarps * 32, bytes, stream>>>(p, plan, delta, lse_t,
                                                                        delta_t);
}

template <typename T, bool kMetaT>
void launch_window_dkdv_tc_m(const AttnBwdParams<T, float>& p, const WinTilePlan& plan,
                             const float* delta, const float* lse_t, const float* delta_t,
                             int64_t ctas, cudaStream_t stream) {
  switch (p.shape.head_dim) {
    case 16: launch_window_dkdv_tc_d<T, 16, kMetaT>(p, plan, delta, lse_t, delta_t, ctas, stream); break;
    case 32: launch_window_dkdv_tc_d<T, 32, kMetaT>(p, plan, delta, lse_t, delta_t, ctas, stream); break;
    default: launch_window_dkdv_tc_d<T, 64, kMetaT>(p, plan, delta, lse_t, delta_t, ctas, stream); break;
  }
}

// Launches the tile kernel when it covers this case (reads delta written by the dQ pass on
// `stream`); false means "use the staged per-key kernel". meta_ws / meta_bytes: the workspace
// past delta (and lse'); with at least win_meta_t_bytes(shape) there, lse / delta are first
// copied head-major into it (win_meta_transpose_kernel, same stream).
template <typename T>
bool launch_window_dkdv_tc(const AttnBwdParams<T, float>& p, const WinTilePlan& plan,
                           const float* delta, void* meta_ws, size_t meta_bytes,
                           cudaStream_t stream) {
  if constexpr (!stage_type_ok<T>()) {
    return false;
  } else {
    const AttnShape& s = p.shape;
    const int64_t D = s.head_dim;
    if (win_dkdv_old_requested() || simple_kernels_requested()) return false;
    if (!(D == 16 || D == 32 || D == 64) || s.kv_heads < 1 || s.q_heads % s.kv_heads != 0 ||
        s.kv_len != s.q_len || s.q_len >= (int64_t(1) << 30) || s.q_heads >= (int64_t(1) << 20) ||
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
    const int64_t tgroups = ceil_div(ceil_div(s.q_len, 16), kWinWarps);
    const int64_t ctas = s.batch * s.kv_heads * tgroups;
    if (ctas >= (int64_t(1) << 31)) return false;
    if (ctas == 0) return true;  // nothing to write
    const size_t need = win_meta_t_bytes(s);
    const int64_t mtiles = ceil_div(s.q_len, kWinMetaTP);
    if (need > 0 && meta_ws != nullptr && meta_bytes >= need && s.batch * mtiles < (int64_t(1) << 31)) {
      float* lse_t = static_cast<float*>(meta_ws);
      float* delta_t = lse_t + need / 2 / sizeof(float);
      const int Hq = static_cast<int>(s.q_heads);
      win_meta_transpose_kernel<kWinMetaTP><<<static_cast<unsigned>(s.batch * mtiles), 256,
                                  2 * kWinMetaTP * Hq * sizeof(float), stream>>>(
          p.lse, delta, lse_t, delta_t, static_cast<int>(s.q_len), Hq, static_cast<int>(mtiles));
      launch_window_dkdv_tc_m<T, true>(p, plan, delta, lse_t, delta_t, ctas, stream);
    } else {
      launch_window_dkdv_tc_m<T, false>(p, plan, delta, nullptr, nullptr, ctas, stream);
    }
    return true;
  }
}

}  // namespace detail
}  // namespace gpu
}  // namespace blossom
