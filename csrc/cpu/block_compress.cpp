#include "cpu/block_compress.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <vector>

namespace blossom {
namespace cpu {
namespace {

// Clipped bounds [s, e) of W_t; its origin (possibly negative) indexes pos.
struct Window {
  int64_t origin, s, e;
};

inline Window window(int64_t t, int64_t block_len, int64_t stride, int64_t L) {
  const int64_t origin = window_origin(t, block_len, stride);
  return {origin, std::max<int64_t>(origin, 0), std::min<int64_t>((t + 1) * stride, L)};
}

// Items per parallel_for chunk so that each chunk does at least ~16k element operations:
// below that the fork/join cost dominates.
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, work_per_item));
}

// 1 / (number of valid positions of W_t), or 0 for an empty (invalid) window; [B, T].
template <typename T, typename Acc>
std::vector<Acc> inverse_counts(const CompressParams<T, Acc>& p) {
  const int64_t B = p.batch, L = p.seq_len, NT = p.num_tokens;
  std::vector<Acc> inv(B * NT, Acc(0));
  at::parallel_for(0, B, grain_for(L), [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> prefix(L + 1);
    for (int64_t b = b0; b < b1; ++b) {
      prefix[0] = 0;
      for (int64_t j = 0; j < L; ++j) prefix[j + 1] = prefix[j] + (p.valid(b, j) ? 1 : 0);
      for (int64_t t = 0; t < NT; ++t) {
        const Window w = window(t, p.block_len, p.stride, L);
        const int64_t count = w.e > w.s ? prefix[w.e] - prefix[w.s] : 0;
        inv[b * NT + t] = count > 0 ? Acc(1) / Acc(count) : Acc(0);
      }
    }
  });
  return inv;
}

}  // namespace

template <typename T, typename Acc>
void block_compress_fwd(const CompressParams<T, Acc>& p) {
  const int64_t B = p.batch, L = p.seq_len, H = p.heads, D = p.head_dim, NT = p.num_tokens;
  const int64_t work = H * D * p.block_len;
  at::parallel_for(0, B * NT, grain_for(work), [&](int64_t begin, int64_t end) {
    std::vector<Acc> acc(D);
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / NT, t = bt % NT;
      const Window w = window(t, p.block_len, p.stride, L);
      int64_t count = 0;
      for (int64_t j = w.s; j < w.e; ++j) count += p.valid(b, j) ? 1 : 0;
      if (p.valid_out != nullptr) p.valid_out[b * NT + t] = count > 0;
      for (int64_t h = 0; h < H; ++h) {
        T* out = p.out.at(b, t, h);
        if (count == 0) {  // an invalid token is 0 (and is never attended or scored)
          for (int64_t d = 0; d < D; ++d) out[d] = T(0);
          continue;
        }
        std::fill(acc.begin(), acc.end(), Acc(0));
        for (int64_t j = w.s; j < w.e; ++j) {
          // skipped, not multiplied by 0: padding may hold anything, NaN included
          if (!p.valid(b, j)) continue;
          const T* x = p.x.at(b, j, h);
          for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<Acc>(x[d]);
          if (p.pos != nullptr) {
            const T* pos = p.pos + (h * p.block_len + (j - w.origin)) * D;
            for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<Acc>(pos[d]);
          }
        }
        const Acc n = static_cast<Acc>(count);
        for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(acc[d] / n);
      }
    }
  });
}

template <typename T, typename Acc>
void block_compress_bwd(const CompressParams<T, Acc>& p, const T* grad_out, T* grad_x,
                        T* grad_pos) {
  const int64_t B = p.batch, L = p.seq_len, H = p.heads, D = p.head_dim, NT = p.num_tokens;
  const int64_t BL = p.block_len, S = p.stride;
  const std::vector<Acc> inv = inverse_counts(p);
  // grad_out [B, T, H, D] contiguous
  auto gout = [&](int64_t b, int64_t t, int64_t h) { return grad_out + ((b * NT + t) * H + h) * D; };

  // grad_x[b, j, h] gathers the windows that contain j: t from j / S while
  // (t + 1) * S - BL <= j, i.e. t <= (j + BL) / S - 1. One writer per row.
  at::parallel_for(0, B * L, grain_for(H * D * (BL / S + 1)), [&](int64_t begin, int64_t end) {
    std::vector<Acc> acc(D);
    for (int64_t bj = begin; bj < end; ++bj) {
      const int64_t b = bj / L, j = bj % L;
      T* gx_row = grad_x + bj * H * D;
      if (!p.valid(b, j)) {
        for (int64_t e = 0; e < H * D; ++e) gx_row[e] = T(0);
        continue;
      }
      const int64_t t0 = j / S, t1 = std::min<int64_t>(NT - 1, (j + BL) / S - 1);
      for (int64_t h = 0; h < H; ++h) {
        std::fill(acc.begin(), acc.end(), Acc(0));
        for (int64_t t = t0; t <= t1; ++t) {
          const Acc w = inv[b * NT + t];  // > 0: W_t holds the valid j
          const T* g = gout(b, t, h);
          for (int64_t d = 0; d < D; ++d) acc[d] += w * static_cast<Acc>(g[d]);
        }
        T* gx = gx_row + h * D;
        for (int64_t d = 0; d < D; ++d) gx[d] = static_cast<T>(acc[d]);
      }
    }
  });

  if (grad_pos == nullptr) return;
  // grad_pos[h, r] sums over every (b, t) whose window position r is a valid j. Parallel
  // over the H * block_len output rows, each summed in a fixed order: deterministic.
  at::parallel_for(0, H * BL, grain_for(B * NT * D), [&](int64_t begin, int64_t end) {
    std::vector<Acc> acc(D);
    for (int64_t hr = begin; hr < end; ++hr) {
      const int64_t h = hr / BL, r = hr % BL;
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t t = 0; t < NT; ++t) {
          const int64_t j = window_origin(t, BL, S) + r;  // always < (t + 1) * S
          if (j < 0 || j >= L || !p.valid(b, j)) continue;
          const Acc w = inv[b * NT + t];
          const T* g = gout(b, t, h);
          for (int64_t d = 0; d < D; ++d) acc[d] += w * static_cast<Acc>(g[d]);
        }
      }
      T* gp = grad_pos + hr * D;
      for (int64_t d = 0; d < D; ++d) gp[d] = static_cast<T>(acc[d]);
    }
  });
}

#define BLOSSOM_INSTANTIATE(T, Acc)                                                      \
  template void block_compress_fwd<T, Acc>(const CompressParams<T, Acc>&);              \
  template void block_compress_bwd<T, Acc>(const CompressParams<T, Acc>&, const T*, T*, \
                                           T*);
BLOSSOM_INSTANTIATE(float, float)
BLOSSOM_INSTANTIATE(double, double)
BLOSSOM_INSTANTIATE(c10::BFloat16, float)
#undef BLOSSOM_INSTANTIATE

}  // namespace cpu
}  // namespace blossom
