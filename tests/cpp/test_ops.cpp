// C++ tests of libblossom_ops, run by ctest (see CMakeLists.txt): each case calls the
// operators the way a libtorch user would, through the dispatcher, and compares them with
// a small dense reference written here with at:: ops (the Python oracle,
// blossom_ops/reference.py, is not reachable from C++). One case drives a CPU kernel
// directly through its parameter struct, with no at::Tensor in the kernel call.
//
//   test_ops               run every case
//   test_ops <case>        run one case (ctest registers one entry per case)
//   test_ops --list        print the case names
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "kernel_direct.h"
#include "reference.h"

namespace {

using at::Tensor;
using Opt = std::optional<at::Tensor>;
using T2 = std::tuple<Tensor, Tensor>;
using T3 = std::tuple<Tensor, Tensor, Tensor>;
using namespace blossom_test;

// ---- the ops, typed exactly as their schemas in csrc/schema.cpp ------------------------
template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

T2 swa(const Tensor& q, const Tensor& k, const Tensor& v, const Opt& lengths, const Opt& valid,
       int64_t window, bool dilated, bool causal, double scale) {
  static auto h = op<T2(const Tensor&, const Tensor&, const Tensor&, const Opt&, const Opt&,
                        int64_t, bool, bool, double)>("blossom_ops::sliding_window_attention");
  return h.call(q, k, v, lengths, valid, window, dilated, causal, scale);
}

T3 swa_backward(const Tensor& go, const Opt& glse, const Tensor& q, const Tensor& k,
                const Tensor& v, const Tensor& out, const Tensor& lse, int64_t window,
                bool dilated, bool causal, double scale) {
  static auto h = op<T3(const Tensor&, const Opt&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, const Tensor&, const Opt&, const Opt&, int64_t, bool, bool,
                        double)>("blossom_ops::sliding_window_attention_backward");
  return h.call(go, glse, q, k, v, out, lse, std::nullopt, std::nullopt, window, dilated, causal,
                scale);
}

T2 block_compress(const Tensor& x, const Opt& pos, const Opt& lengths, int64_t block_len,
                  int64_t stride) {
  static auto h = op<T2(const Tensor&, const Opt&, const Opt&, const Opt&, int64_t, int64_t)>(
      "blossom_ops::block_compress");
  return h.call(x, pos, lengths, std::nullopt, block_len, stride);
}

Tensor select_blocks(const Tensor& q, const Tensor& k_cmp, const Opt& lengths, int64_t top_n,
                     int64_t block_size, int64_t stride, int64_t block_len, bool causal,
                     double scale) {
  static auto h = op<Tensor(const Tensor&, const Tensor&, const Opt&, const Opt&, int64_t,
                            int64_t, int64_t, int64_t, bool, double)>("blossom_ops::select_blocks");
  return h.call(q, k_cmp, lengths, std::nullopt, top_n, block_size, stride, block_len, causal,
                scale);
}

T2 block_sparse(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& idx,
                const Opt& lengths, int64_t block_size, bool causal, double scale) {
  static auto h = op<T2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Opt&,
                        const Opt&, int64_t, bool, double)>("blossom_ops::block_sparse_attention");
  return h.call(q, k, v, idx, lengths, std::nullopt, block_size, causal, scale);
}

Tensor gate_fusion(const Tensor& branches, const Tensor& gate) {
  static auto h = op<Tensor(const Tensor&, const Tensor&)>("blossom_ops::gate_fusion");
  return h.call(branches, gate);
}

using T8 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
T8 blossom(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& gate,
           const Opt& lengths, int64_t block_len, int64_t stride, int64_t block_size,
           int64_t top_n, int64_t window, bool dilated, bool causal, double scale) {
  static auto h = op<T8(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Opt&,
                        const Opt&, const Opt&, const Opt&, int64_t, int64_t, int64_t, int64_t,
                        int64_t, bool, bool, double)>("blossom_ops::blossom_attention");
  return h.call(q, k, v, gate, std::nullopt, std::nullopt, lengths, std::nullopt, block_len,
                stride, block_size, top_n, window, dilated, causal, scale);
}

// ---- inputs ---------------------------------------------------------------------------
struct Qkv {
  Tensor q, k, v;
  double scale;
};

Qkv make_qkv(int64_t B, int64_t L, int64_t Hq, int64_t Hk, int64_t D, at::ScalarType dtype,
             uint64_t seed) {
  at::manual_seed(seed);
  auto o = at::TensorOptions().dtype(dtype);
  return {at::randn({B, L, Hq, D}, o), at::randn({B, L, Hk, D}, o), at::randn({B, L, Hk, D}, o),
          1.0 / std::sqrt(static_cast<double>(D))};
}

// ---- cases ----------------------------------------------------------------------------

// A window as long as the sequence (no dilation) is plain dense attention: causal and
// bidirectional, float64 and float32, GQA with G = 2, a head dim that is not a power of 2.
void swa_full_window_is_dense_causal() {
  const int64_t B = 2, L = 37, Hq = 4, Hk = 2, D = 24;
  for (auto dtype : {at::kDouble, at::kFloat}) {
    const double tol = dtype == at::kDouble ? 1e-10 : 2e-5;
    auto in = make_qkv(B, L, Hq, Hk, D, dtype, 1);
    for (bool causal : {true, false}) {
      auto [out, lse] = swa(in.q, in.k, in.v, std::nullopt, std::nullopt, L, false, causal,
                            in.scale);
      auto mask = causal ? at::ones({L, L}, at::kBool).tril() : at::ones({L, L}, at::kBool);
      auto [ref_out, ref_lse] = dense_attention(in.q, in.k, in.v, mask, in.scale);
      expect_close("swa out (full window)", out, ref_out, tol);
      expect_close("swa lse (full window)", lse, ref_lse, tol);
    }
  }
}

// Dilated window with padding (lengths): the mask |i-j| < w or |i-j| a power of two, j <= i,
// both positions valid; padded query rows must give out = 0 and lse = -inf.
void swa_dilated_matches_mask() {
  const int64_t B = 3, L = 70, Hq = 2, Hk = 1, D = 8, window = 5;
  auto in = make_qkv(B, L, Hq, Hk, D, at::kDouble, 2);
  auto lengths = at::tensor(std::vector<int64_t>{L, 33, 0});
  for (bool causal : {true, false}) {
    auto [out, lse] = swa(in.q, in.k, in.v, lengths, std::nullopt, window, true, causal,
                          in.scale);
    auto mask = window_mask(L, window, true, causal);
    auto valid = lengths_to_valid(lengths, L);
    auto [ref_out, ref_lse] = dense_attention(in.q, in.k, in.v, mask, in.scale, valid);
    expect_close("swa out (dilated)", out, ref_out, 1e-10);
    expect_close("swa lse (dilated)", lse, ref_lse, 1e-10);
    expect(out.index({1, at::indexing::Slice(33)}).eq(0).all().item<bool>(),
           "padded rows of swa out must be exactly 0");
    expect(at::isneginf(lse.index({2})).all().item<bool>(),
           "rows of an empty sequence must have lse = -inf");
  }
}

// The backward op against libtorch autograd through the dense reference, with a gradient
// flowing into lse as well.
void swa_backward_matches_autograd() {
  const int64_t B = 2, L = 41, Hq = 4, Hk = 1, D = 16, window = 6;
  auto in = make_qkv(B, L, Hq, Hk, D, at::kDouble, 3);
  auto go = at::randn({B, L, Hq, D}, at::kDouble);
  auto glse = at::randn({B, L, Hq}, at::kDouble);
  auto [out, lse] = swa(in.q, in.k, in.v, std::nullopt, std::nullopt, window, true, true,
                        in.scale);
  auto [gq, gk, gv] = swa_backward(go, glse, in.q, in.k, in.v, out, lse, window, true, true,
                                   in.scale);

  auto q = in.q.clone().requires_grad_(true);
  auto k = in.k.clone().requires_grad_(true);
  auto v = in.v.clone().requires_grad_(true);
  auto [ref_out, ref_lse] = dense_attention(q, k, v, window_mask(L, window, true, true),
                                            in.scale);
  auto grads = torch::autograd::grad({ref_out, ref_lse}, {q, k, v}, {go, glse});
  expect_close("swa grad_q", gq, grads[0], 1e-9);
  expect_close("swa grad_k", gk, grads[1], 1e-9);
  expect_close("swa grad_v", gv, grads[2], 1e-9);
}

// block_compress on an input whose values are their own positions, so every mean can be
// written down by hand. block_len 4, stride 2, L 7: windows W_t = [2t - 2, 2t + 2) ∩ [0, 7).
void block_compress_hand_made() {
  const int64_t B = 2, L = 7, H = 2, D = 3;
  // x[b, j, h, d] = j + 100 h
  auto j = at::arange(L, at::kDouble).view({1, L, 1, 1});
  auto h = at::arange(H, at::kDouble).view({1, 1, H, 1}) * 100;
  auto x = (j + h).expand({B, L, H, D}).contiguous();
  auto lengths = at::tensor(std::vector<int64_t>{7, 3});

  auto [out, valid_cmp] = block_compress(x, std::nullopt, lengths, 4, 2);
  expect(out.sizes() == at::IntArrayRef({B, 4, H, D}), "block_compress: out must be [B, T, H, D]");
  // batch 0, all valid: W_0 = {0,1}, W_1 = {0..3}, W_2 = {2..5}, W_3 = {4,5,6}
  // batch 1, valid {0,1,2}: W_0 = {0,1}, W_1 = {0,1,2}, W_2 = {2}, W_3 = {} (invalid -> 0)
  auto means = at::tensor(std::vector<double>{0.5, 1.5, 3.5, 5.0, 0.5, 1.0, 2.0, 0.0})
                   .view({B, 4, 1, 1});
  auto heads = at::arange(H, at::kDouble).view({1, 1, H, 1}) * 100;
  auto live = at::tensor(std::vector<int64_t>{1, 1, 1, 1, 1, 1, 1, 0}).to(at::kBool)
                  .view({B, 4});
  auto expected = ((means + heads) * live.view({B, 4, 1, 1})).expand({B, 4, H, D});
  expect_close("block_compress out", out, expected, 1e-12);
  expect(valid_cmp.equal(live), "block_compress: valid_cmp must be [[1,1,1,1],[1,1,1,0]]");

  // With pos[h, r, d] = 10 r, indexed from the window origin 2t - 2: W_0 covers r = 2, 3
  // (+25), the full windows r = 0..3 (+15), W_3 = {4,5,6} is r = 0..2 (+10).
  auto pos = (at::arange(4, at::kDouble) * 10).view({1, 4, 1}).expand({H, 4, D}).contiguous();
  auto [out_pos, unused] = block_compress(x.narrow(0, 0, 1), pos, std::nullopt, 4, 2);
  auto shift = at::tensor(std::vector<double>{25, 15, 15, 10}).view({1, 4, 1, 1});
  expect_close("block_compress out with pos", out_pos,
               (means.narrow(0, 0, 1) + heads + shift).expand({1, 4, H, D}), 1e-12);
}

// select_blocks on keys built so the block order is known: compressed token t (one per
// block, stride = block_size = 16) scores s_t = 4 * q0 . e0 * w_t with w = (1, 3, 2, 0).
void select_blocks_hand_made() {
  const int64_t B = 1, L = 64, Hq = 2, Hk = 1, D = 8, T = 4;
  auto q = at::zeros({B, L, Hq, D}, at::kFloat);
  q.select(3, 0).fill_(4.0);
  auto k_cmp = at::zeros({B, T, Hk, D}, at::kFloat);
  const float w[T] = {1, 3, 2, 0};
  for (int64_t t = 0; t < T; ++t) k_cmp.index_put_({0, t, 0, 0}, w[t]);

  auto row = [](const Tensor& idx, int64_t i) {
    auto r = idx.index({0, i, 0}).contiguous();
    return std::vector<int32_t>(r.data_ptr<int32_t>(), r.data_ptr<int32_t>() + r.numel());
  };
  using V = std::vector<int32_t>;
  // causal: candidates are the earlier blocks
  auto idx = select_blocks(q, k_cmp, std::nullopt, 2, 16, 16, 32, true, 1.0);
  expect(idx.scalar_type() == at::kInt && idx.sizes() == at::IntArrayRef({B, L, Hk, 2}),
         "select_blocks: int32 [B, L, Hk, top_n]");
  expect(row(idx, 5) == V({-1, -1}), "causal, block 0: nothing to select");
  expect(row(idx, 20) == V({0, -1}), "causal, block 1: only block 0, padded with -1");
  expect(row(idx, 40) == V({0, 1}), "causal, block 2: both earlier blocks, ascending");
  expect(row(idx, 63) == V({1, 2}), "causal, block 3: the two heaviest of {0, 1, 2}");
  // bidirectional: every other block
  auto idx_bi = select_blocks(q, k_cmp, std::nullopt, 2, 16, 16, 32, false, 1.0);
  expect(row(idx_bi, 0) == V({1, 2}), "bidirectional, block 0: heaviest of {1, 2, 3}");
  expect(row(idx_bi, 16) == V({0, 2}), "bidirectional, block 1: heaviest of {0, 2, 3}");
  expect(row(idx_bi, 50) == V({1, 2}), "bidirectional, block 3: heaviest of {0, 1, 2}");
  // padded queries select nothing
  auto idx_pad = select_blocks(q, k_cmp, at::tensor(std::vector<int64_t>{40}), 2, 16, 16, 32,
                               true, 1.0);
  expect(row(idx_pad, 50) == V({-1, -1}), "a padded query selects nothing");
  expect(row(idx_pad, 39) == V({0, 1}), "a valid query keeps its selection under padding");
}

// block_sparse_attention with an arbitrary index tensor (duplicates, -1, unsorted) against
// the dense reference over the mask own-block OR selected-block, causal.
void block_sparse_attention_matches_mask() {
  const int64_t B = 2, L = 45, Hq = 4, Hk = 2, D = 8, bs = 8, n = 3;
  const int64_t C = (L + bs - 1) / bs;
  auto in = make_qkv(B, L, Hq, Hk, D, at::kDouble, 5);
  auto idx = at::randint(-1, C, {B, L, Hk, n}, at::kInt);
  idx.index_put_({at::indexing::Ellipsis, 1}, idx.index({at::indexing::Ellipsis, 0}));
  auto lengths = at::tensor(std::vector<int64_t>{L, 30});
  for (bool causal : {true, false}) {
    auto [out, lse] = block_sparse(in.q, in.k, in.v, idx, lengths, bs, causal, in.scale);
    auto mask = block_sparse_mask(idx, L, bs, causal, Hq);
    auto [ref_out, ref_lse] =
        dense_attention(in.q, in.k, in.v, mask, in.scale, lengths_to_valid(lengths, L));
    expect_close("block_sparse out", out, ref_out, 1e-10);
    expect_close("block_sparse lse", lse, ref_lse, 1e-10);
  }
}

void gate_fusion_matches_formula() {
  at::manual_seed(6);
  auto branches = at::randn({3, 2, 9, 4, 16}, at::kDouble);
  auto gate = at::randn({2, 9, 4, 3}, at::kDouble);
  auto out = gate_fusion(branches, gate);
  auto ref = (at::sigmoid(gate).permute({3, 0, 1, 2}).unsqueeze(-1) * branches).sum(0);
  expect_close("gate_fusion out", out, ref, 1e-12);
}

// The fused op equals its parts composed through the dispatcher: compress k, select,
// selected attention, window attention, gate (R = 2), at the paper's defaults.
void blossom_attention_matches_parts() {
  const int64_t B = 2, L = 150, Hq = 8, Hk = 2, D = 16;
  auto in = make_qkv(B, L, Hq, Hk, D, at::kDouble, 7);
  auto gate = at::randn({B, L, Hq, 2}, at::kDouble);
  auto lengths = at::tensor(std::vector<int64_t>{L, 101});
  auto res = blossom(in.q, in.k, in.v, gate, lengths, 32, 16, 16, 4, 8, true, true, in.scale);
  auto& out = std::get<0>(res);
  auto& idx = std::get<7>(res);

  auto [k_cmp, valid_cmp] = block_compress(in.k, std::nullopt, lengths, 32, 16);
  auto ref_idx = select_blocks(in.q, k_cmp, lengths, 4, 16, 16, 32, true, in.scale);
  expect(idx.equal(ref_idx), "blossom_attention block_idx must equal select_blocks(q, compress(k))");
  auto o_sel = std::get<0>(block_sparse(in.q, in.k, in.v, ref_idx, lengths, 16, true, in.scale));
  auto o_win = std::get<0>(swa(in.q, in.k, in.v, lengths, std::nullopt, 8, true, true, in.scale));
  auto ref = gate_fusion(at::stack({o_sel, o_win}), gate);
  expect_close("blossom_attention out", out, ref, 1e-10);
  expect_close("blossom_attention o_sel", std::get<1>(res), o_sel, 1e-10);
  expect_close("blossom_attention o_win", std::get<3>(res), o_win, 1e-10);
}

// Bad input raises c10::Error with a message naming the problem (never a crash). A good
// call runs first, so a missing kernel cannot pass for a rejected input.
void bad_inputs_throw() {
  auto in = make_qkv(1, 16, 4, 2, 8, at::kFloat, 8);
  swa(in.q, in.k, in.v, std::nullopt, std::nullopt, 4, true, true, in.scale);

  expect_throws("Hq not a multiple of Hk", "multiple", [&] {
    auto k3 = at::randn({1, 16, 3, 8});
    swa(in.q, k3, k3, std::nullopt, std::nullopt, 4, true, true, 1.0);
  });
  expect_throws("mixed dtypes", "dtype", [&] {
    swa(in.q, in.k.to(at::kDouble), in.v, std::nullopt, std::nullopt, 4, true, true, 1.0);
  });
  expect_throws("wrong rank", "shape", [&] {
    swa(in.q.flatten(2), in.k, in.v, std::nullopt, std::nullopt, 4, true, true, 1.0);
  });
  expect_throws("window < 1", "window", [&] {
    swa(in.q, in.k, in.v, std::nullopt, std::nullopt, 0, true, true, 1.0);
  });
  expect_throws("lengths > L", "lengths", [&] {
    swa(in.q, in.k, in.v, at::tensor(std::vector<int64_t>{17}), std::nullopt, 4, true, true, 1.0);
  });
  expect_throws("block_idx out of range", "block_idx", [&] {
    auto idx = at::full({1, 16, 2, 1}, 2, at::kInt);  // C = ceil(16 / 8) = 2
    block_sparse(in.q, in.k, in.v, idx, std::nullopt, 8, true, 1.0);
  });
  expect_throws("block_idx wrong dtype", "block_idx", [&] {
    auto idx = at::zeros({1, 16, 2, 1}, at::kLong);
    block_sparse(in.q, in.k, in.v, idx, std::nullopt, 8, true, 1.0);
  });
  expect_throws("block_len < stride", "block_len", [&] {
    block_compress(in.k, std::nullopt, std::nullopt, 4, 8);
  });
  expect_throws("block_size not a multiple of stride", "multiple", [&] {
    auto k_cmp = at::randn({1, 2, 2, 8});
    select_blocks(in.q, k_cmp, std::nullopt, 2, 12, 8, 16, true, 1.0);
  });
  expect_throws("top_n < 1", "top_n", [&] {
    auto k_cmp = at::randn({1, 1, 2, 8});
    select_blocks(in.q, k_cmp, std::nullopt, 0, 16, 16, 32, true, 1.0);
  });
  expect_throws("gate_logits with the wrong R", "gate_logits", [&] {
    gate_fusion(at::randn({2, 1, 16, 4, 8}), at::randn({1, 16, 4, 3}));
  });
}

struct Case {
  const char* name;
  std::function<void()> fn;
};

const std::vector<Case>& cases() {
  static const std::vector<Case> all = {
      {"swa_full_window_is_dense_causal", swa_full_window_is_dense_causal},
      {"swa_dilated_matches_mask", swa_dilated_matches_mask},
      {"swa_backward_matches_autograd", swa_backward_matches_autograd},
      {"block_compress_hand_made", block_compress_hand_made},
      {"select_blocks_hand_made", select_blocks_hand_made},
      {"block_sparse_attention_matches_mask", block_sparse_attention_matches_mask},
      {"gate_fusion_matches_formula", gate_fusion_matches_formula},
      {"blossom_attention_matches_parts", blossom_attention_matches_parts},
      {"bad_inputs_throw", bad_inputs_throw},
      {"cpu_kernel_direct", cpu_kernel_direct},
  };
  return all;
}

bool run_case(const Case& c) {
  try {
    c.fn();
    std::printf("PASS %s\n", c.name);
    return true;
  } catch (const c10::Error& e) {
    // an unexpected error from an op: its message, without the C++ backtrace
    std::printf("FAIL %s\n  c10::Error: %s\n", c.name, e.what_without_backtrace());
    return false;
  } catch (const std::exception& e) {
    std::printf("FAIL %s\n  %s\n", c.name, e.what());
    return false;
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (!args.empty() && args[0] == "--list") {
    for (const auto& c : cases()) std::printf("%s\n", c.name);
    return 0;
  }
  if (!args.empty() && args[0] == "--check-list") {
    // CMakeLists.txt registers one ctest per name; a case missing there would never run.
    std::set<std::string> listed(args.begin() + 1, args.end()), compiled;
    for (const auto& c : cases()) compiled.insert(c.name);
    if (listed == compiled) return 0;
    std::printf("FAIL: the cases in CMakeLists.txt and in test_ops.cpp differ\n");
    return 1;
  }
  int failures = 0, ran = 0;
  for (const auto& c : cases()) {
    if (!args.empty() && std::find(args.begin(), args.end(), c.name) == args.end()) continue;
    ++ran;
    failures += run_case(c) ? 0 : 1;
  }
  if (ran == 0) {
    std::printf("FAIL: no case named");
    for (const auto& a : args) std::printf(" %s", a.c_str());
    std::printf(" (see --list)\n");
    return 1;
  }
  std::printf("%d of %d cases passed\n", ran - failures, ran);
  return failures == 0 ? 0 : 1;
}
