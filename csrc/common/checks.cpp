#include "checks.h"

#include <string>

namespace blossom {
namespace {

bool dtype_supported(const at::Tensor& t) {
  auto d = t.scalar_type();
  if (d == at::kFloat || d == at::kBFloat16) return true;
  if (d == at::kDouble) return t.is_cpu();
  if (d == at::kHalf) return t.is_cuda();
  return false;
}

}  // namespace

void check_positive(const char* op, const char* name, int64_t value) {
  BLOSSOM_CHECK(value >= 1, op, ": ", name, " must be >= 1, got ", value);
}

void check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, int64_t kv_len, const char* k_name,
                            const char* v_name) {
  // 1. device
  BLOSSOM_CHECK(q.device() == k.device() && q.device() == v.device(), op,
               ": q, ", k_name, " and ", v_name, " must be on the same device, got ", q.device(),
               ", ", k.device(), ", ", v.device());
  // 2. dtype
  BLOSSOM_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
               ": q, ", k_name, " and ", v_name, " must have the same dtype, got ",
               q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  BLOSSOM_CHECK(dtype_supported(q), op, ": unsupported dtype ", q.scalar_type(), " on ",
               q.device(), " (float32 and bfloat16 everywhere, float64 on CPU, float16 on CUDA)");
  // 3. rank and last-dim contiguity
  BLOSSOM_CHECK(q.dim() == 4, op, ": q must have shape (batch, seq, q_heads, head_dim), got ",
               q.sizes());
  BLOSSOM_CHECK(k.dim() == 4, op, ": ", k_name,
               " must have shape (batch, seq, kv_heads, head_dim), got ", k.sizes());
  BLOSSOM_CHECK(v.dim() == 4, op, ": ", v_name,
               " must have shape (batch, seq, kv_heads, head_dim), got ", v.sizes());
  BLOSSOM_CHECK(q.stride(-1) == 1 || q.size(-1) == 1, op,
                ": q must have a contiguous last dimension");
  BLOSSOM_CHECK(k.stride(-1) == 1 || k.size(-1) == 1, op, ": ", k_name,
               " must have a contiguous last dimension");
  BLOSSOM_CHECK(v.stride(-1) == 1 || v.size(-1) == 1, op, ": ", v_name,
               " must have a contiguous last dimension");
  // 4. shapes
  const int64_t B = q.size(0), Hq = q.size(2), D = q.size(3);
  const int64_t Lk = kv_len < 0 ? q.size(1) : kv_len;
  const int64_t Hk = k.size(2);
  std::vector<int64_t> kv_shape{B, Lk, Hk, D};
  BLOSSOM_CHECK(k.sizes() == at::IntArrayRef(kv_shape), op, ": ", k_name,
               " must have shape (batch, ", kv_len < 0 ? "seq" : "num_compressed",
               ", kv_heads, head_dim) = ", at::IntArrayRef(kv_shape), ", got ", k.sizes());
  BLOSSOM_CHECK(v.sizes() == k.sizes(), op, ": ", v_name, " must have the shape of ", k_name, " ",
               k.sizes(), ", got ", v.sizes());
  // 5. ranges
  BLOSSOM_CHECK(Hk >= 1 && Hq % Hk == 0, op, ": query heads (", Hq,
               ") must be a multiple of key heads (", Hk, ")");
  BLOSSOM_CHECK(D >= 1 && D <= 256, op, ": head_dim must be in [1, 256], got ", D);
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                at::IntArrayRef shape, const char* shape_desc) {
  BLOSSOM_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(),
               ", got ", t.device());
  BLOSSOM_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ",
               like.scalar_type(), ", got ", t.scalar_type());
  BLOSSOM_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape_desc, " = ",
               shape, ", got ", t.sizes());
}

at::Tensor resolve_validity(const char* op, const OptTensor& lengths, const OptTensor& valid,
                            int64_t batch, int64_t seq_len, const at::Tensor& like) {
  const bool has_len = lengths.has_value() && lengths->defined();
  const bool has_valid = valid.has_value() && valid->defined();
  BLOSSOM_CHECK(!(has_len && has_valid), op, ": pass either lengths or valid, not both");
  if (has_valid) {
    const at::Tensor& m = *valid;
    BLOSSOM_CHECK(m.device() == like.device(), op, ": valid must be on ", like.device(), ", got ",
                 m.device());
    BLOSSOM_CHECK(m.scalar_type() == at::kBool, op, ": valid must be a bool tensor, got ",
                 m.scalar_type());
    BLOSSOM_CHECK(m.dim() == 2 && m.size(0) == batch && m.size(1) == seq_len, op,
                 ": valid must have shape (batch, seq) = (", batch, ", ", seq_len, "), got ",
                 m.sizes());
    return m.contiguous();
  }
  if (has_len) {
    const at::Tensor& n = *lengths;
    BLOSSOM_CHECK(n.device() == like.device(), op, ": lengths must be on ", like.device(),
                 ", got ", n.device());
    BLOSSOM_CHECK(!at::isFloatingType(n.scalar_type()) && !at::isComplexType(n.scalar_type()) &&
                    n.scalar_type() != at::kBool,
                 op, ": lengths must be an integer tensor, got ", n.scalar_type());
    BLOSSOM_CHECK(n.dim() == 1 && n.size(0) == batch, op, ": lengths must have shape (batch,) = (",
                 batch, ",), got ", n.sizes());
    if (n.is_cpu() && batch > 0) {
      auto lo = n.min().item<int64_t>(), hi = n.max().item<int64_t>();
      BLOSSOM_CHECK(lo >= 0 && hi <= seq_len, op, ": lengths must lie in [0, ", seq_len,
                   "], got values in [", lo, ", ", hi, "]");
    }
    auto pos = at::arange(seq_len, n.options().dtype(at::kLong));
    return pos.unsqueeze(0).lt(n.to(at::kLong).unsqueeze(1)).contiguous();
  }
  return at::Tensor();
}

at::Tensor compressed_validity(const at::Tensor& valid, int64_t seq_len, int64_t block_len,
                               int64_t stride) {
  if (!valid.defined()) return at::Tensor();
  const int64_t T = num_compressed(seq_len, stride);
  // prefix counts of valid positions: window [s, e) holds a valid one iff cnt[e] > cnt[s]
  auto counts = at::zeros({valid.size(0), seq_len + 1}, valid.options().dtype(at::kInt));
  counts.narrow(1, 1, seq_len).copy_(valid.to(at::kInt).cumsum(1));
  auto t = at::arange(T, valid.options().dtype(at::kLong));
  auto end = ((t + 1) * stride).clamp_max(seq_len);
  auto start = ((t + 1) * stride - block_len).clamp_min(0);
  return counts.index_select(1, end).gt(counts.index_select(1, start)).contiguous();
}

}  // namespace blossom
