// CPU kernels of gate_fusion (DESIGN.md op 5): out = sum_r sigmoid(gate[., r]) * branch[r].
// Instantiated for float, double and c10::BFloat16 (bfloat16 accumulates in float).
#pragma once
#include "common/params.h"

namespace blossom {
namespace cpu {

template <typename T>
void gate_fusion_fwd(const GateParams<T>& p);

// grad_out [rows, D] contiguous in; grad_branches [R, rows, D] and grad_gate [rows, R]
// (both contiguous) are written in full.
template <typename T>
void gate_fusion_bwd(const GateParams<T>& p, const T* grad_out, T* grad_branches,
                     T* grad_gate);

// The same two kernels with branch r (and its gradient) a separate contiguous [rows, D]
// buffer, branch[r] / grad_branch[r]; p.branch is ignored. blossom_attention uses them so
// that it need not stack its branch outputs (a copy of R full-size tensors) first.
template <typename T>
void gate_fusion_fwd_list(const GateParams<T>& p, const T* const* branch);
template <typename T>
void gate_fusion_bwd_list(const GateParams<T>& p, const T* const* branch, const T* grad_out,
                          T* const* grad_branch, T* grad_gate);

}  // namespace cpu
}  // namespace blossom
