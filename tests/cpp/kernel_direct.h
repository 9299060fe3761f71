// The kernels are framework-agnostic (DESIGN.md, Layout): this case drives CPU kernels
// through their parameter structs (csrc/common/params.h) on plain std::vector buffers,
// with no at::Tensor anywhere in the kernel calls, and checks hand-computed results.
#pragma once
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/params.h"
#include "cpu/block_compress.h"
#include "cpu/gate_fusion.h"
#include "cpu/select_blocks.h"
#include "cpu/sliding_window_attention.h"

namespace blossom_test {

inline void direct_expect(bool ok, const std::string& what) {
  if (!ok) throw std::runtime_error("cpu_kernel_direct: " + what);
}

// block_compress_fwd, block_len 4, stride 2, L 7, x[b, j, h, d] = j + 100 h, the second
// sequence with positions {0, 1, 2} valid; written into a strided (non-contiguous) output.
inline void direct_block_compress() {
  const int64_t B = 2, L = 7, H = 2, D = 3, T = 4;
  std::vector<double> x(B * L * H * D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < L; ++j)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d) x[((b * L + j) * H + h) * D + d] = j + 100.0 * h;
  bool valid[B * L];  // not std::vector<bool>: that one is bit-packed
  for (int64_t j = 0; j < L; ++j) valid[j] = true, valid[L + j] = j < 3;
  // out rows padded to 2 * D elements per head: checks the kernel honours the strides
  const int64_t pad_h = 2 * D;
  std::vector<double> out(B * T * H * pad_h, -7.0);
  bool valid_out[B * T];

  blossom::CompressParams<double, double> p;
  p.batch = B, p.seq_len = L, p.heads = H, p.head_dim = D, p.num_tokens = T;
  p.block_len = 4, p.stride = 2;
  p.x = {x.data(), L * H * D, H * D, D};
  p.out = {out.data(), T * H * pad_h, H * pad_h, pad_h};
  p.valid_out = valid_out;
  p.valid.ptr = valid;
  p.valid.stride_b = L;
  blossom::cpu::block_compress_fwd(p);

  const double means[B][T] = {{0.5, 1.5, 3.5, 5.0}, {0.5, 1.0, 2.0, 0.0}};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const bool live = !(b == 1 && t == 3);
      direct_expect(valid_out[b * T + t] == live, "block_compress valid_out");
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < pad_h; ++d) {
          const double got = out[((b * T + t) * H + h) * pad_h + d];
          const double want = d < D ? (live ? means[b][t] + 100.0 * h : 0.0) : -7.0;
          if (std::abs(got - want) > 1e-12)
            throw std::runtime_error("cpu_kernel_direct: block_compress out[" +
                                     std::to_string(b) + ", " + std::to_string(t) + ", " +
                                     std::to_string(h) + ", " + std::to_string(d) + "] = " +
                                     std::to_string(got) + ", expected " + std::to_string(want));
        }
    }
}

// select_blocks_fwd on the hand-made case of test_ops.cpp (block weights 1, 3, 2, 0), causal.
inline void direct_select_blocks() {
  const int64_t B = 1, L = 64, Hq = 2, Hk = 1, D = 8, T = 4, top_n = 2;
  std::vector<float> q(B * L * Hq * D, 0.0f), k_cmp(B * T * Hk * D, 0.0f);
  for (int64_t i = 0; i < L * Hq; ++i) q[i * D] = 4.0f;
  const float w[T] = {1, 3, 2, 0};
  for (int64_t t = 0; t < T; ++t) k_cmp[t * D] = w[t];
  std::vector<int32_t> out(B * L * Hk * top_n, 99);

  blossom::SelectParams<float> p;
  p.shape.batch = B, p.shape.q_len = L, p.shape.kv_len = T;
  p.shape.q_heads = Hq, p.shape.kv_heads = Hk, p.shape.head_dim = D, p.shape.scale = 1.0;
  p.q = {q.data(), L * Hq * D, Hq * D, D};
  p.k_cmp = {k_cmp.data(), T * Hk * D, Hk * D, D};
  p.top_n = top_n, p.block_size = 16, p.stride = 16, p.block_len = 32, p.causal = true;
  p.out = out.data();
  blossom::cpu::select_blocks_fwd(p);

  const int32_t want[4][2] = {{-1, -1}, {0, -1}, {0, 1}, {1, 2}};  // per own block
  for (int64_t i = 0; i < L; ++i)
    for (int64_t s = 0; s < top_n; ++s)
      if (out[i * top_n + s] != want[i / 16][s])
        throw std::runtime_error("cpu_kernel_direct: select_blocks row " + std::to_string(i) +
                                 " slot " + std::to_string(s) + " = " +
                                 std::to_string(out[i * top_n + s]) + ", expected " +
                                 std::to_string(want[i / 16][s]));
}

// gate_fusion_fwd: out = sigmoid(0) * 2 + sigmoid(log 3) * 4 = 1 + 3 = 4 everywhere.
inline void direct_gate_fusion() {
  const int64_t R = 2, rows = 5, D = 4;
  std::vector<float> branch(R * rows * D), gate(rows * R), out(rows * D, 0.0f);
  for (int64_t i = 0; i < rows * D; ++i) branch[i] = 2.0f, branch[rows * D + i] = 4.0f;
  for (int64_t r = 0; r < rows; ++r) gate[r * R] = 0.0f, gate[r * R + 1] = std::log(3.0f);
  blossom::GateParams<float> p;
  p.branches = R, p.rows = rows, p.head_dim = D;
  p.branch = branch.data(), p.gate = gate.data(), p.out = out.data();
  blossom::cpu::gate_fusion_fwd(p);
  for (float o : out) direct_expect(std::abs(o - 4.0f) < 1e-5f, "gate_fusion out != 4");
}

// sliding_window_attention_fwd with q = 0: every allowed key gets the same weight, so
// out_i = mean of v_j over the allowed j and lse_i = log(count). window 2, dilated, causal:
// allowed j = i - d for d in {0, 1, 2, 4, 8, ...}, d <= i. The second sequence has 6 valid
// positions; its padded rows must be 0 with lse = -inf.
inline void direct_sliding_window() {
  const int64_t B = 2, L = 11, Hq = 2, Hk = 1, D = 4;
  std::vector<float> q(B * L * Hq * D, 0.0f), k(B * L * Hk * D), v(B * L * Hk * D);
  for (int64_t i = 0; i < B * L * D; ++i) k[i] = 0.5f * static_cast<float>(i % 7);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < L; ++j)
      for (int64_t d = 0; d < D; ++d) v[(b * L + j) * D + d] = static_cast<float>(j + 10 * d);
  bool valid[B * L];
  for (int64_t j = 0; j < L; ++j) valid[j] = true, valid[L + j] = j < 6;
  std::vector<float> out(B * L * Hq * D, -7.0f), lse(B * L * Hq, -7.0f);

  blossom::AttnFwdParams<float, float> p;
  p.shape.batch = B, p.shape.q_len = L, p.shape.kv_len = L;
  p.shape.q_heads = Hq, p.shape.kv_heads = Hk, p.shape.head_dim = D, p.shape.scale = 0.5;
  p.q = {q.data(), L * Hq * D, Hq * D, D};
  p.k = {k.data(), L * Hk * D, Hk * D, D};
  p.v = {v.data(), L * Hk * D, Hk * D, D};
  p.out = {out.data(), L * Hq * D, Hq * D, D};
  p.lse = lse.data();
  p.valid.ptr = valid;
  p.valid.stride_b = L;
  blossom::SlidingWindowMask m;
  m.window = 2, m.dilated = true, m.causal = true;
  blossom::cpu::sliding_window_attention_fwd(p, m);

  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < L; ++i) {
      const int64_t n_valid = b == 0 ? L : 6;
      double sum = 0;
      int count = 0;
      for (int64_t d : {0, 1, 2, 4, 8})
        if (d <= i && i < n_valid) sum += static_cast<double>(i - d), ++count;
      for (int64_t h = 0; h < Hq; ++h) {
        const float got_lse = lse[(b * L + i) * Hq + h];
        if (count == 0) {
          direct_expect(std::isinf(got_lse) && got_lse < 0, "swa: padded row lse must be -inf");
        } else {
          direct_expect(std::abs(got_lse - std::log(static_cast<float>(count))) < 1e-5f,
                        "swa: lse must be log(number of allowed keys) at row " +
                            std::to_string(i));
        }
        for (int64_t d = 0; d < D; ++d) {
          const float want = count ? static_cast<float>(sum / count + 10.0 * d) : 0.0f;
          const float got = out[((b * L + i) * Hq + h) * D + d];
          if (std::abs(got - want) > 1e-4f)
            throw std::runtime_error("cpu_kernel_direct: swa out[" + std::to_string(b) + ", " +
                                     std::to_string(i) + ", " + std::to_string(h) + ", " +
                                     std::to_string(d) + "] = " + std::to_string(got) +
                                     ", expected " + std::to_string(want));
        }
      }
    }
}

inline void cpu_kernel_direct() {
  direct_block_compress();
  direct_select_blocks();
  direct_gate_fusion();
  direct_sliding_window();
}

}  // namespace blossom_test
