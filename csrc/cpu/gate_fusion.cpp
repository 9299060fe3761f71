#include "cpu/gate_fusion.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace blossom {
namespace cpu {
namespace {

template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// 1 / (1 + exp(-x)) is safe for every x: exp overflows to inf for x << 0, giving 0.
template <typename Acc>
inline Acc sigmoid(Acc x) {
  return Acc(1) / (Acc(1) + std::exp(-x));
}

inline int64_t grain_for(int64_t work_per_row) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, work_per_row));
}

// Branch r's [rows, D] buffer is br(r): both layouts (stacked, list) share the kernels.
// Chunks of at least ~64k element operations (grain_for): the gate is pure streaming, so
// a small shape gains nothing from a second thread but pays its start-up.
template <typename T, typename Br>
void fwd_impl(const GateParams<T>& p, Br br) {
  using Acc = acc_t<T>;
  const int64_t R = p.branches, rows = p.rows, D = p.head_dim;
  at::parallel_for(0, rows, grain_for(R * D), [&](int64_t begin, int64_t end) {
    std::vector<Acc> acc(D);
    for (int64_t row = begin; row < end; ++row) {
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (int64_t r = 0; r < R; ++r) {
        const Acc s = sigmoid(static_cast<Acc>(p.gate[row * R + r]));
        const T* x = br(r) + row * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += s * static_cast<Acc>(x[d]);
      }
      T* out = p.out + row * D;
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(acc[d]);
    }
  });
}

template <typename T, typename Br, typename GBr>
void bwd_impl(const GateParams<T>& p, Br br, const T* grad_out, GBr gbr, T* grad_gate) {
  using Acc = acc_t<T>;
  const int64_t R = p.branches, rows = p.rows, D = p.head_dim;
  at::parallel_for(0, rows, grain_for(2 * R * D), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* go = grad_out + row * D;
      for (int64_t r = 0; r < R; ++r) {
        const Acc s = sigmoid(static_cast<Acc>(p.gate[row * R + r]));
        const T* x = br(r) + row * D;
        T* gb = gbr(r) + row * D;
        Acc dot = 0;  // <grad_out, branch_r>
        for (int64_t d = 0; d < D; ++d) {
          const Acc g = static_cast<Acc>(go[d]);
          gb[d] = static_cast<T>(s * g);
          dot += g * static_cast<Acc>(x[d]);
        }
        grad_gate[row * R + r] = static_cast<T>(s * (Acc(1) - s) * dot);
      }
    }
  });
}

}  // namespace

template <typename T>
void gate_fusion_fwd(const GateParams<T>& p) {
  const int64_t stride = p.rows * p.head_dim;
  fwd_impl(p, [&](int64_t r) { return p.branch + r * stride; });
}

template <typename T>
void gate_fusion_bwd(const GateParams<T>& p, const T* grad_out, T* grad_branches,
                     T* grad_gate) {
  const int64_t stride = p.rows * p.head_dim;
  bwd_impl(
      p, [&](int64_t r) { return p.branch + r * stride; }, grad_out,
      [&](int64_t r) { return grad_branches + r * stride; }, grad_gate);
}

template <typename T>
void gate_fusion_fwd_list(const GateParams<T>& p, const T* const* branch) {
  fwd_impl(p, [branch](int64_t r) { return branch[r]; });
}

template <typename T>
void gate_fusion_bwd_list(const GateParams<T>& p, const T* const* branch, const T* grad_out,
                          T* const* grad_branch, T* grad_gate) {
  bwd_impl(
      p, [branch](int64_t r) { return branch[r]; }, grad_out,
      [grad_branch](int64_t r) { return grad_branch[r]; }, grad_gate);
}

#define BLOSSOM_INSTANTIATE(T)                                    \
  template void gate_fusion_fwd<T>(const GateParams<T>&);          \
  template void gate_fusion_bwd<T>(const GateParams<T>&, const T*, T*, T*);     \
  template void gate_fusion_fwd_list<T>(const GateParams<T>&, const T* const*);  \
  template void gate_fusion_bwd_list<T>(const GateParams<T>&, const T* const*, const T*, \
                                        T* const*, T*);
BLOSSOM_INSTANTIATE(float)
BLOSSOM_INSTANTIATE(double)
BLOSSOM_INSTANTIATE(c10::BFloat16)
#undef BLOSSOM_INSTANTIATE

}  // namespace cpu
}  // namespace blossom
