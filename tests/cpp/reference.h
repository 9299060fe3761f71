// Dense reference and assertion helpers for tests/cpp/test_ops.cpp. The reference is plain
// masked attention with at::matmul / softmax, the C++ twin of
// blossom_ops.reference.dense_masked_attention: obviously correct, not fast.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <functional>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace blossom_test {

inline void expect(bool ok, const std::string& what) {
  if (!ok) throw std::runtime_error(what);
}

// Elementwise |a - b| <= atol + rtol |b|, where equal infinities (lse = -inf of empty rows)
// match and any NaN fails. On failure the message gives the worst element and its index.
inline void expect_close(const std::string& name, const at::Tensor& a, const at::Tensor& b,
                         double atol, double rtol = 1e-6) {
  std::ostringstream os;
  if (a.sizes() != b.sizes()) {
    os << name << ": shape " << a.sizes() << " != expected " << b.sizes();
    throw std::runtime_error(os.str());
  }
  auto x = a.detach().to(at::kDouble), y = b.detach().to(at::kDouble);
  if (x.isnan().any().item<bool>() || y.isnan().any().item<bool>()) {
    os << name << ": NaN in " << (x.isnan().any().item<bool>() ? "result" : "expected");
    throw std::runtime_error(os.str());
  }
  auto same = x.eq(y);  // also true for matching infinities
  auto excess = ((x - y).abs() - rtol * y.abs()).masked_fill(same, 0.0).nan_to_num(
      std::numeric_limits<double>::infinity());
  auto worst = excess.flatten().argmax().item<int64_t>();
  double err = excess.flatten()[worst].item<double>();
  if (err > atol) {
    os << name << ": max error " << err << " > " << atol << " at [";
    int64_t rest = worst;  // row-major unravel of the flat index
    std::vector<int64_t> index(a.dim());
    for (int64_t d = a.dim() - 1; d >= 0; --d) index[d] = rest % a.size(d), rest /= a.size(d);
    for (size_t d = 0; d < index.size(); ++d) os << (d ? ", " : "") << index[d];
    os << "]: got " << x.flatten()[worst].item<double>() << ", expected "
       << y.flatten()[worst].item<double>();
    throw std::runtime_error(os.str());
  }
}

// `fn` must raise c10::Error whose message contains `needle`.
inline void expect_throws(const std::string& what, const std::string& needle,
                          const std::function<void()>& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    std::string msg = e.what_without_backtrace();
    if (msg.find(needle) == std::string::npos)
      throw std::runtime_error(what + ": raised, but the message lacks '" + needle + "': " + msg);
    return;
  }
  throw std::runtime_error(what + ": expected c10::Error, nothing was raised");
}

// bool [B, L]: position j < lengths[b].
inline at::Tensor lengths_to_valid(const at::Tensor& lengths, int64_t L) {
  return at::arange(L, at::kLong).unsqueeze(0).lt(lengths.to(at::kLong).unsqueeze(1));
}

// bool [L, L]: |i - j| < window, or dilated and |i - j| a power of two; j <= i if causal.
inline at::Tensor window_mask(int64_t L, int64_t window, bool dilated, bool causal) {
  auto m = at::zeros({L, L}, at::kBool);
  auto a = m.accessor<bool, 2>();
  for (int64_t i = 0; i < L; ++i)
    for (int64_t j = 0; j < L; ++j) {
      const int64_t d = i > j ? i - j : j - i;
      const bool pow2 = d > 0 && (d & (d - 1)) == 0;
      a[i][j] = (d < window || (dilated && pow2)) && (!causal || j <= i);
    }
  return m;
}

// bool [B, Hq, L, L]: block(j) is i's own block or one of idx[b, i, h / G, :] (-1 ignored);
// j <= i if causal.
inline at::Tensor block_sparse_mask(const at::Tensor& idx, int64_t L, int64_t block_size,
                                    bool causal, int64_t Hq) {
  const int64_t B = idx.size(0), Hk = idx.size(2), n = idx.size(3), G = Hq / Hk;
  auto m = at::zeros({B, Hq, L, L}, at::kBool);
  auto a = m.accessor<bool, 4>();
  auto ix = idx.contiguous();
  auto ia = ix.accessor<int32_t, 4>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i = 0; i < L; ++i)
        for (int64_t j = 0; j < L; ++j) {
          const int64_t c = j / block_size;
          bool sel = c == i / block_size;
          for (int64_t s = 0; s < n; ++s) sel = sel || ia[b][i][h / G][s] == c;
          a[b][h][i][j] = sel && (!causal || j <= i);
        }
  return m;
}

// Dense masked attention. q [B, L, Hq, D], k/v [B, L, Hk, D]; mask bool broadcastable to
// [B, Hq, L, L]; valid bool [B, L] (optional) masks both queries and keys. Rows without an
// allowed key give out = 0, lse = -inf. Returns out [B, L, Hq, D], lse [B, L, Hq].
inline std::tuple<at::Tensor, at::Tensor> dense_attention(const at::Tensor& q,
                                                          const at::Tensor& k,
                                                          const at::Tensor& v,
                                                          const at::Tensor& mask, double scale,
                                                          const at::Tensor& valid = {}) {
  const int64_t B = q.size(0), L = q.size(1), Hq = q.size(2), G = Hq / k.size(2);
  auto kq = k.repeat_interleave(G, 2).permute({0, 2, 3, 1});  // [B, Hq, D, L]
  auto vq = v.repeat_interleave(G, 2).permute({0, 2, 1, 3});  // [B, Hq, L, D]
  auto logits = at::matmul(q.permute({0, 2, 1, 3}), kq) * scale;  // [B, Hq, L, L]
  auto allowed = mask.expand({B, Hq, L, L});
  if (valid.defined())
    allowed = allowed & valid.view({B, 1, L, 1}) & valid.view({B, 1, 1, L});
  const double ninf = -std::numeric_limits<double>::infinity();
  logits = logits.masked_fill(allowed.logical_not(), ninf);
  auto lse = at::logsumexp(logits, -1);  // [B, Hq, L]
  auto empty = allowed.any(-1).logical_not();
  // Empty rows would softmax to NaN; give them any finite logits and zero them after.
  auto probs = at::softmax(logits.masked_fill(empty.unsqueeze(-1), 0.0), -1)
                   .masked_fill(allowed.logical_not(), 0.0);
  auto out = at::matmul(probs, vq).permute({0, 2, 1, 3});
  return {out, lse.transpose(1, 2)};
}

}  // namespace blossom_test
