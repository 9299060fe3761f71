// select_blocks on tensor cores: the LTIS scores of a tile of queries against the compressed
// keys as a small GEMM (nvcuda::wmma, 16x16x16, 16-bit inputs, fp32 accumulation), softmax
// statistics, per-block importance and top-n fused in one CTA. Nothing of size [B, L, H, T]
// and no importance array of size [L, C] ever exists: each thread keeps its own top-n list.
//
// Work decomposition
//   One CTA (4 warps) per (b, kv head g, tile of QT = 64 / G consecutive queries). The CTA's
//   64 score rows are the (query, head) pairs of the tile, row = qi * G + hh (G in
//   {1, 2, 4, 8, 16}). Compressed tokens stream through shared memory in chunks of NB <= 64
//   tokens (NB = a multiple of tpb = block_size / stride, so a selection block never
//   straddles two chunks), double-buffered with cp.async. Causal: only tokens before the
//   own block of the tile's last query are read.
//   Per chunk: S[64 x 64] = Q K^T on tensor cores (warp (wr, wc) owns rows 32wr..+32 and
//   columns 32wc..+32; its Q fragments stay in registers for the whole CTA), stored to shared
//   memory; then thread (qi, part) (TPQ = 2G threads per query) reads TOK = 32 / G columns of
//   each of its query's G rows:
//     pass 1: per (query, head) online base-2 max and sum, thread-local, merged over the TPQ
//             lanes once at the end (lse2);
//     pass 2: p = exp2(s - lse2) summed over the G heads -> mass[qi][col] in shared memory;
//             then thread (qi, part) sums the tpb columns of each of its blocks (fixed
//             order) and offers (importance, block) to its own top-n list (registers).
//   Finally top_n rounds of a TPQ-lane arg-max over the list heads (importance desc, block
//   asc), ascending output by rank, -1 padding. Every sum has a fixed order: deterministic.
//   Scored tokens, candidates and padding follow select_blocks.cu / cpu/select_blocks.cpp:
//   token t is scored for query i when t < T, valid_cmp(b, t), its block c = t / tpb holds a
//   valid key, c != own(i), and c < own(i) when causal; a padded query selects nothing.
//
// Counts, B = 64, Hq = 8, Hk = 2 (G = 4), D = 64, bf16, block_size = stride = 16 (tpb = 1),
// causal. Tiles of 16 queries; the tile ending in block o reads o tokens, padded to whole
// 64-token chunks.
//   L = 4096 (T = 256): 32,768 CTAs. Score columns summed over the 256 tiles of a (b, g):
//     40,704 (avg 159 per tile) -> 128 (b, g) x 40,704 x 64 rows = 0.33 G scores per pass,
//     0.67 G for both (0.53 G of them useful).
//     Tensor FLOPs: 0.67 G x 2 x 64 = 85 GFLOP (0.09 ms at 990 TFLOP/s).
//     exp2: one per score per pass = 0.67 G (0.16 ms at 16/clk/SM x 132 x 1.98 GHz).
//     HBM: q 268 MB read once (0.06 ms at 4.8 TB/s), k_cmp 4.2 MB, out 4.2 MB. k_cmp is
//     re-read from L2 by every tile: 2 x 128 x 40,704 x 128 B = 1.3 GB (~0.15-0.2 ms).
//     Shared memory per 64 x 64 chunk: K 8 KB stored + 16 KB of B-fragment loads (4 warps x
//     32 columns x D), S 16 KB stored + 16 KB read, pass 2 also mass 4 + 4 KB: ~15 B per
//     score at 128 B/clk/SM -> ~8.5 scores/clk/SM, the binding limit (exp2 allows 16).
//     Predicted: 0.67 G / (8.5 x 132 x 1.98 G/s) = 0.30 ms, ~0.4-0.6 ms with the barriers
//     and the q load (today 12.5 ms).
//   L = 16384 (T = 1024): 131,072 CTAs, 556,032 columns per (b, g) (avg 543 per tile):
//     9.1 G scores for both passes; tensor 1.17 TFLOP (1.2 ms at peak, overlapped with the
//     SIMT work of other CTAs), exp2 2.2 ms, L2 2 x 128 x 556,032 x 128 B = 18 GB
//     (~2-2.5 ms), shared memory 9.1 G / 2.2 T/s = 4.1 ms. Predicted 4.5-6 ms (today 193).
#include <mma.h>

#include <cstdlib>
#include <limits>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/cp_async.cuh"
#include "cuda/select_blocks_tc.h"

namespace blossom {
namespace gpu {
namespace {

using namespace detail;
namespace wmma = nvcuda::wmma;

constexpr int kThreads = 128;  // 4 warps
constexpr int kRows = 64;      // (query, head) score rows per CTA
constexpr int kCols = 64;      // token columns per chunk
constexpr int kLdS = kCols + 4;  // floats per score row (+4: fewer bank conflicts on store)
constexpr int kMaxTop = 8;     // top_n capacity of the per-thread lists

// Shared memory layout (byte offsets); the Q tile is staged in the score buffer, which is
// free until the first chunk's scores are stored.
template <int DP, int G>
struct TcLayout {
  static constexpr int kQt = kRows / G;
  static constexpr int kLdK = DP + 8;  // 16-bit elements per staged row (+8: bank spread)
  static constexpr int kK = 0;                                     // [2][kCols][kLdK]
  static constexpr int kS = kK + 2 * kCols * kLdK * 2;             // [kRows][kLdS] float
  static constexpr int kMass = kS + kRows * kLdS * 4;              // [kQt][kCols] float
  static constexpr int kChosen = kMass + kQt * kCols * 4;          // [kQt][kMaxTop] int
  static constexpr int kTokOk = kChosen + kQt * kMaxTop * 4;       // [2][kCols] byte
  static constexpr int kBlockValid = kTokOk + 2 * kCols;           // [C] byte
  static_assert(kRows * kLdK * 2 <= kRows * kLdS * 4, "Q tile must fit the score buffer");
  static int64_t bytes(int64_t C) { return kBlockValid + ((C + 15) / 16) * 16; }
};

__device__ __forceinline__ float fast_exp2(float x) {  // 2^x, -inf -> 0; ~2 ulp
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}


// (key desc, block asc); block < 0 is an empty slot and loses to everything.
__device__ __forceinline__ bool better(float ka, int ca, float kb, int cb) {
  return ca >= 0 && (cb < 0 || ka > kb || (ka == kb && ca < cb));
}

template <typename T, int DP, int G>
__global__ void __launch_bounds__(kThreads)
    select_tc_kernel(const SelectParams<T> p, const int64_t C, const int nb) {
  using E = typename TcElem<T>::type;
  using Lay = TcLayout<DP, G>;
  constexpr int QT = Lay::kQt;
  constexpr int LDK = Lay::kLdK;
  constexpr int DK = DP / 16;
  constexpr int TPQ = kThreads / QT;  // threads per query (2G)
  constexpr int TOK = kCols / TPQ;    // columns per thread per row (32 / G)
  constexpr int VW = TOK < 4 ? TOK : 4;
  constexpr int NV = TOK / VW;
  static_assert(TPQ <= 32 && TOK >= 2, "a query's threads must sit in one warp");

  extern __shared__ __align__(128) unsigned char smem[];
  E* kbuf = reinterpret_cast<E*>(smem + Lay::kK);
  float* S = reinterpret_cast<float*>(smem + Lay::kS);
  E* qs = reinterpret_cast<E*>(smem + Lay::kS);
  float* mass = reinterpret_cast<float*>(smem + Lay::kMass);
  int* chosen = reinterpret_cast<int*>(smem + Lay::kChosen);
  unsigned char* tokok = smem + Lay::kTokOk;
  unsigned char* blockvalid = smem + Lay::kBlockValid;

  const AttnShape& s = p.shape;
  const int64_t L = s.q_len, Tn = s.kv_len, Hk = s.kv_heads;
  const int D = static_cast<int>(s.head_dim);
  const int64_t tiles = (L + QT - 1) / QT;
  const int64_t tile = blockIdx.x % tiles, bg = blockIdx.x / tiles;
  const int64_t b = bg / Hk, g = bg % Hk;
  const int64_t i0 = tile * QT;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t bs = p.block_size, tpb = p.block_size / p.stride;
  const int top_n = static_cast<int>(p.top_n);

  // Token range of the tile and the blocks whose validity it needs.
  const int64_t own_last = (std::min(L, i0 + QT) - 1) / bs;
  const int64_t c_hi = p.causal ? own_last : C;
  const int64_t t_end = p.causal ? std::min(Tn, own_last * tpb) : Tn;
  const int nch = static_cast<int>((t_end + nb - 1) / nb);

  // blockvalid[c]: block c holds a valid key (coalesced byte reads; equal-value writes).
  for (int64_t c = tid; c < c_hi; c += kThreads) blockvalid[c] = p.valid.ptr == nullptr;
  __syncthreads();
  if (p.valid.ptr != nullptr) {
    const int64_t j_end = std::min(L, c_hi * bs);
    for (int64_t j = tid; j < j_end; j += kThreads)
      if (p.valid(b, j)) blockvalid[j / bs] = 1;
  }

  // Q tile -> shared memory (zeros for padded / out-of-range queries and columns >= D).
  for (int idx = tid; idx < kRows * (DP / 8); idx += kThreads) {
    const int r = idx / (DP / 8), d8 = (idx % (DP / 8)) * 8;
    const int64_t i = i0 + r / G;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (d8 < D && i < L && p.valid(b, i))
      v = __ldg(reinterpret_cast<const uint4*>(p.q.at(b, i, g * G + r % G) + d8));
    *reinterpret_cast<uint4*>(qs + r * LDK + d8) = v;
  }
  __syncthreads();

  const int wr = warp >> 1, wc = warp & 1;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> afr[2][DK];
#pragma unroll
  for (int rt = 0; rt < 2; ++rt)
#pragma unroll
    for (int kk = 0; kk < DK; ++kk)
      wmma::load_matrix_sync(afr[rt][kk], qs + (32 * wr + 16 * rt) * LDK + 16 * kk, LDK);

  // Chunk loader: rows of unscored tokens are zero (their k_cmp may hold NaN).
  auto load_chunk = [&](int ch, int buf) {
    const int64_t n0 = static_cast<int64_t>(ch) * nb;
    E* kb = kbuf + buf * kCols * LDK;
    for (int idx = tid; idx < kCols * (DP / 8); idx += kThreads) {
      const int j = idx / (DP / 8), d8 = (idx % (DP / 8)) * 8;
      const int64_t t = n0 + j;
      const bool ok = j < nb && t < t_end && p.valid_cmp(b, t) && blockvalid[t / tpb];
      if (ok && d8 < D) detail::cp_async16<false>(kb + j * LDK + d8, p.k_cmp.at(b, t, g) + d8);
      else *reinterpret_cast<uint4*>(kb + j * LDK + d8) = make_uint4(0, 0, 0, 0);
      if (d8 == 0) tokok[buf * kCols + j] = ok;
    }
    detail::cp_async_commit();
  };

  // This thread's query and columns.
  const int qi = tid / TPQ, part = tid % TPQ;
  const int64_t i = i0 + qi;
  const bool qok = i < L && p.valid(b, i);
  const int64_t own = (i < L ? i : L - 1) / bs;
  const int64_t ex0 = own * tpb;  // excluded tokens [ex0, ex1): own block (and later, causal)
  const int64_t ex1 = p.causal ? std::numeric_limits<int64_t>::max() : (own + 1) * tpb;
  const float sc = static_cast<float>(s.scale) * kLog2e;
  auto col_of = [&](int v, int e) { return part * VW + v * TPQ * VW + e; };

  float m[G], l[G], lse2[G];
#pragma unroll
  for (int hh = 0; hh < G; ++hh) {
    m[hh] = -INFINITY;
    l[hh] = 0.f;
  }
  float lv[kMaxTop];  // this thread's best blocks, best first (registers: constant indices)
  int lc[kMaxTop];
#pragma unroll
  for (int k = 0; k < kMaxTop; ++k) {
    lv[k] = -INFINITY;
    lc[k] = -1;
  }

  for (int pass = 0; pass < 2; ++pass) {
    __syncthreads();  // the previous pass's readers of tokok / kbuf are done
    if (nch > 0) load_chunk(0, 0);
    for (int ch = 0; ch < nch; ++ch) {
      const int buf = ch & 1;
      detail::cp_async_wait<0>();
      __syncthreads();  // chunk ch visible; every thread is done with chunk ch - 1
      if (ch + 1 < nch) load_chunk(ch + 1, buf ^ 1);

      // S = Q K^T for this warp's 32 x 32 quarter.
      {
        const E* kb = kbuf + buf * kCols * LDK;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
        for (int rt = 0; rt < 2; ++rt)
#pragma unroll
          for (int ct = 0; ct < 2; ++ct) wmma::fill_fragment(acc[rt][ct], 0.f);
#pragma unroll
        for (int kk = 0; kk < DK; ++kk) {
#pragma unroll
          for (int ct = 0; ct < 2; ++ct) {
            // K is stored [token][d]: as the (d x token) B operand that is column-major.
            wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> bfr;
            wmma::load_matrix_sync(bfr, kb + (32 * wc + 16 * ct) * LDK + 16 * kk, LDK);
#pragma unroll
            for (int rt = 0; rt < 2; ++rt) wmma::mma_sync(acc[rt][ct], afr[rt][kk], bfr, acc[rt][ct]);
          }
        }
#pragma unroll
        for (int rt = 0; rt < 2; ++rt)
#pragma unroll
          for (int ct = 0; ct < 2; ++ct)
            wmma::store_matrix_sync(S + (32 * wr + 16 * rt) * kLdS + 32 * wc + 16 * ct,
                                    acc[rt][ct], kLdS, wmma::mem_row_major);
      }
      __syncthreads();

      // Per-column bias: 0 when the token is scored for this query, -inf otherwise.
      const int64_t n0 = static_cast<int64_t>(ch) * nb;
      float bias[NV][VW];
#pragma unroll
      for (int v = 0; v < NV; ++v)
#pragma unroll
        for (int e = 0; e < VW; ++e) {
          const int col = col_of(v, e);
          const int64_t t = n0 + col;
          const bool ok = tokok[buf * kCols + col] && (t < ex0 || t >= ex1);
          bias[v][e] = ok ? 0.f : -INFINITY;
        }

      if (pass == 0) {
#pragma unroll
        for (int hh = 0; hh < G; ++hh) {
          const float* row = S + (qi * G + hh) * kLdS;
          float x[NV][VW];
          float cmax = -INFINITY;
#pragma unroll
          for (int v = 0; v < NV; ++v) {
            if constexpr (VW == 4) {
              const float4 f = *reinterpret_cast<const float4*>(row + col_of(v, 0));
              x[v][0] = f.x; x[v][1] = f.y; x[v][2] = f.z; x[v][3] = f.w;
            } else {
              const float2 f = *reinterpret_cast<const float2*>(row + col_of(v, 0));
              x[v][0] = f.x; x[v][1] = f.y;
            }
#pragma unroll
            for (int e = 0; e < VW; ++e) {
              x[v][e] += bias[v][e];
              cmax = fmaxf(cmax, x[v][e]);
            }
          }
          const float mn = fmaxf(m[hh], cmax * sc);
          if (mn != -INFINITY) {  // else nothing scored yet (and -inf - -inf is NaN)
            float sum = 0.f;
#pragma unroll
            for (int v = 0; v < NV; ++v)
#pragma unroll
              for (int e = 0; e < VW; ++e) sum += fast_exp2(fmaf(x[v][e], sc, -mn));
            l[hh] = l[hh] * fast_exp2(m[hh] - mn) + sum;
            m[hh] = mn;
          }
        }
      } else {
        float ms[NV][VW];
#pragma unroll
        for (int v = 0; v < NV; ++v)
#pragma unroll
          for (int e = 0; e < VW; ++e) ms[v][e] = 0.f;
#pragma unroll
        for (int hh = 0; hh < G; ++hh) {  // heads in a fixed order
          const float* row = S + (qi * G + hh) * kLdS;
#pragma unroll
          for (int v = 0; v < NV; ++v) {
            float x[VW];
            if constexpr (VW == 4) {
              const float4 f = *reinterpret_cast<const float4*>(row + col_of(v, 0));
              x[0] = f.x; x[1] = f.y; x[2] = f.z; x[3] = f.w;
            } else {
              const float2 f = *reinterpret_cast<const float2*>(row + col_of(v, 0));
              x[0] = f.x; x[1] = f.y;
            }
#pragma unroll
            for (int e = 0; e < VW; ++e)
              ms[v][e] += fast_exp2(fmaf(x[e] + bias[v][e], sc, -lse2[hh]));
          }
        }
        float* mrow = mass + qi * kCols;
#pragma unroll
        for (int v = 0; v < NV; ++v) {
          if constexpr (VW == 4)
            *reinterpret_cast<float4*>(mrow + col_of(v, 0)) =
                make_float4(ms[v][0], ms[v][1], ms[v][2], ms[v][3]);
          else
            *reinterpret_cast<float2*>(mrow + col_of(v, 0)) = make_float2(ms[v][0], ms[v][1]);
        }
        __syncthreads();
        // Blocks of this chunk: importance = sum of its tpb columns (in order), offered to
        // this thread's list when the block is a candidate of the query.
        const int64_t cb0 = n0 / tpb;
        const int nbl = static_cast<int>(std::min<int64_t>(nb / tpb, (t_end - n0 + tpb - 1) / tpb));
        for (int cl = part; cl < nbl; cl += TPQ) {
          const int64_t c = cb0 + cl;
          const bool cand = qok && (p.causal ? c < own : (c != own && c < C)) && blockvalid[c];
          if (!cand) continue;
          float imp = 0.f;
          for (int j = 0; j < tpb; ++j) imp += mrow[cl * tpb + j];
          const float key = isnan(imp) ? -INFINITY : imp;  // NaN ranks last, as on the CPU
          const int ci = static_cast<int>(c);
          // The list always keeps this thread's best kMaxTop (>= top_n) blocks: a bound
          // that depends on top_n made the compiler index the list dynamically (local memory).
          if (lc[kMaxTop - 1] >= 0 && !better(key, ci, lv[kMaxTop - 1], lc[kMaxTop - 1]))
            continue;
          float kv = key;
          int kc = ci;
#pragma unroll
          for (int k = 0; k < kMaxTop; ++k) {
            if (better(kv, kc, lv[k], lc[k])) {
              const float tv = lv[k];
              const int tc = lc[k];
              lv[k] = kv;
              lc[k] = kc;
              kv = tv;
              kc = tc;
            }
          }
        }
      }
    }

    if (pass == 0) {
      // Merge the per-thread softmax statistics over the query's TPQ lanes (a butterfly:
      // every lane ends with the same bits).
#pragma unroll
      for (int hh = 0; hh < G; ++hh) {
#pragma unroll
        for (int o = 1; o < TPQ; o <<= 1) {
          const float m2 = __shfl_xor_sync(kFullMask, m[hh], o);
          const float l2 = __shfl_xor_sync(kFullMask, l[hh], o);
          const float mn = fmaxf(m[hh], m2);
          if (mn != -INFINITY) {
            l[hh] = l[hh] * fast_exp2(m[hh] - mn) + l2 * fast_exp2(m2 - mn);
            m[hh] = mn;
          }
        }
        lse2[hh] = l[hh] > 0.f ? m[hh] + log2f(l[hh]) : INFINITY;  // +inf: every p is 0
      }
    }
  }

  // top_n rounds of arg-max over the heads of the TPQ lists of a query.
  for (int r = 0; r < top_n; ++r) {
    float bv = lv[0];
    int bc = lc[0];
#pragma unroll
    for (int o = 1; o < TPQ; o <<= 1) {
      const float v2 = __shfl_xor_sync(kFullMask, bv, o);
      const int c2 = __shfl_xor_sync(kFullMask, bc, o);
      if (better(v2, c2, bv, bc)) {
        bv = v2;
        bc = c2;
      }
    }
    if (bc >= 0 && lc[0] == bc) {  // the owner (blocks are split among lanes) pops its head
#pragma unroll
      for (int k = 0; k + 1 < kMaxTop; ++k) {
        lv[k] = lv[k + 1];
        lc[k] = lc[k + 1];
      }
      lv[kMaxTop - 1] = -INFINITY;
      lc[kMaxTop - 1] = -1;
    }
    if (part == 0) chosen[qi * kMaxTop + r] = bc;  // -1 once the candidates run out
  }
  __syncwarp();
  if (i < L) {
    // chosen[] is best-first with the -1s at its end; write it ascending by rank.
    int32_t* out = p.out + ((b * L + i) * Hk + g) * p.top_n;
    const int* ch = chosen + qi * kMaxTop;
    for (int k = part; k < top_n; k += TPQ) {
      const int e = ch[k];
      if (e < 0) {
        out[k] = -1;
        continue;
      }
      int rank = 0;
      for (int y = 0; y < top_n; ++y) rank += (ch[y] >= 0 && ch[y] < e);
      out[rank] = e;
    }
  }
}

template <int DP, int G, typename T>
bool launch_tc(const SelectParams<T>& p, int64_t C, int nb, cudaStream_t stream) {
  using Lay = TcLayout<DP, G>;
  const int64_t bytes = Lay::bytes(C);
  int dev = 0, max_smem = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (bytes > max_smem) return false;
  const AttnShape& s = p.shape;
  const int64_t ctas = s.batch * s.kv_heads * ceil_div(s.q_len, Lay::kQt);
  if (ctas >= (int64_t(1) << 31)) return false;
  auto kernel = select_tc_kernel<T, DP, G>;
  if (bytes > 48 * 1024)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(bytes));
  kernel<<<static_cast<unsigned>(ctas), kThreads, static_cast<size_t>(bytes), stream>>>(p, C, nb);
  check_launch("select_blocks_fwd (tensor cores)");
  return true;
}

template <int DP, typename T>
bool dispatch_group(const SelectParams<T>& p, int64_t C, int nb, cudaStream_t stream) {
  switch (p.shape.group()) {
    case 1: return launch_tc<DP, 1>(p, C, nb, stream);
    case 2: return launch_tc<DP, 2>(p, C, nb, stream);
    case 4: return launch_tc<DP, 4>(p, C, nb, stream);
    case 8: return launch_tc<DP, 8>(p, C, nb, stream);
    case 16: return launch_tc<DP, 16>(p, C, nb, stream);
    default: return false;
  }
}

}  // namespace

template <typename T>
bool select_blocks_tc_fwd(const SelectParams<T>& p, cudaStream_t stream) {
  if constexpr (std::is_same<T, float>::value) {
    return false;  // fp32 inputs keep the SIMT kernel (tensor cores would round them)
  } else {
    const AttnShape& s = p.shape;
    const int64_t D = s.head_dim, tpb = p.block_size / p.stride;
    if (D < 1 || D > 128 || D % 8 != 0) return false;
    if (!vec_ok<T>(p.q.ptr, D, p.q.stride_b, p.q.stride_l, p.q.stride_h) ||
        !vec_ok<T>(p.k_cmp.ptr, D, p.k_cmp.stride_b, p.k_cmp.stride_l, p.k_cmp.stride_h))
      return false;
    if (tpb < 1 || tpb > kCols || p.top_n < 1 || p.top_n > kMaxTop) return false;
    if (s.kv_heads < 1 || s.q_heads % s.kv_heads != 0) return false;
    const int64_t C = ceil_div(s.q_len, p.block_size);
    if (C > (int64_t(1) << 30) || s.kv_len > (int64_t(1) << 30)) return false;
    const int nb = static_cast<int>((kCols / tpb) * tpb);  // whole blocks per chunk
    if (D <= 16) return dispatch_group<16>(p, C, nb, stream);
    if (D <= 32) return dispatch_group<32>(p, C, nb, stream);
    if (D <= 64) return dispatch_group<64>(p, C, nb, stream);
    return dispatch_group<128>(p, C, nb, stream);
  }
}

template bool select_blocks_tc_fwd<float>(const SelectParams<float>&, cudaStream_t);
template bool select_blocks_tc_fwd<c10::Half>(const SelectParams<c10::Half>&, cudaStream_t);
template bool select_blocks_tc_fwd<c10::BFloat16>(const SelectParams<c10::BFloat16>&,
                                                  cudaStream_t);

}  // namespace gpu
}  // namespace blossom
