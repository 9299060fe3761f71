// Input checks and tensor -> parameter-struct views, used by every binding
// (csrc/ops/*.cpp). Checks run in a fixed order before any work: device, dtype,
// contiguity of the last dim, shapes, ranges. Every failure is a BLOSSOM_CHECK
// (common/message.h), so Python sees a RuntimeError with a message naming the argument and
// the expected shape.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "message.h"
#include "params.h"

namespace blossom {

using OptTensor = c10::optional<at::Tensor>;

// q [B, L, Hq, D], k and v [B, Lk, Hk, D]: same device and dtype (float32/float64 on CPU,
// plus float16/bfloat16 on CUDA), last dim contiguous, Hq % Hk == 0, 1 <= D <= 256.
// kv_len < 0 means "same as q" (Lk = L); otherwise Lk must equal kv_len.
void check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, int64_t kv_len = -1,
                            const char* k_name = "k", const char* v_name = "v");

// A tensor that must match `like` in device and dtype, with the given shape.
void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                at::IntArrayRef shape, const char* shape_desc);

// Turns lengths (int [B], values in [0, L]) or valid (bool [B, L]) into a contiguous bool
// [B, L] on the device of `like`; returns an undefined tensor when both are None
// (meaning every position is valid). Passing both is an error. On CPU the lengths are
// range-checked; on CUDA that would need a host sync, so lengths are clamped to [0, L].
at::Tensor resolve_validity(const char* op, const OptTensor& lengths, const OptTensor& valid,
                            int64_t batch, int64_t seq_len, const at::Tensor& like);

// bool [B, T]: compressed token t is valid when W_t holds a valid position. Undefined
// when `valid` is undefined and every window is non-empty (always true for T tokens).
at::Tensor compressed_validity(const at::Tensor& valid, int64_t seq_len, int64_t block_len,
                               int64_t stride);

inline Validity validity_view(const at::Tensor& valid) {
  Validity v;
  if (valid.defined()) {
    v.ptr = valid.data_ptr<bool>();
    v.stride_b = valid.stride(0);
  }
  return v;
}

template <typename T>
Bshd<T> bshd_view(const at::Tensor& t) {
  Bshd<T> view;
  view.ptr = static_cast<T*>(t.data_ptr());
  view.stride_b = t.stride(0);
  view.stride_l = t.stride(1);
  view.stride_h = t.stride(2);
  return view;
}

// float64 accumulates in float64; every other dtype in float32.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_positive(const char* op, const char* name, int64_t value);

}  // namespace blossom
