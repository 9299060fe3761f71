// Every operator schema of blossom_ops, written once. Backends only m.impl() them
// (csrc/ops/<op>.cpp for CPU and CUDA, csrc/autograd/<op>_autograd.cpp for Autograd); fake
// kernels live in blossom_ops/ops.py. What each operator computes is defined in DESIGN.md.
//
// Conventions shared by all schemas:
//   * q: [B, L, Hq, D], k/v: [B, L, Hk, D], last dim contiguous, any other strides.
//   * lengths (int [B], right padding) and valid (bool [B, L], any padding) are two
//     ways to say which positions are real; pass at most one. None means all valid.
//   * scale is passed explicitly (the Python wrappers default it to 1/sqrt(D)).
//   * lse is [B, L, Hq], float32 (float64 for float64 inputs).
//   * every backward takes grad_lse as optional so that lse is differentiable too.
#include <torch/library.h>

TORCH_LIBRARY(blossom_ops, m) {
  // STIS: sliding window plus power-of-two offsets.
  m.def(
      "sliding_window_attention(Tensor q, Tensor k, Tensor v, Tensor? lengths, Tensor? valid, "
      "int window, bool dilated, bool causal, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "sliding_window_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, "
      "Tensor v, Tensor out, Tensor lse, Tensor? lengths, Tensor? valid, int window, bool dilated, "
      "bool causal, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");

  // Mean pooling over compression windows; pos is [H, block_len, D] or None.
  // valid_cmp is bool [B, T], T = ceil(L / stride).
  m.def(
      "block_compress(Tensor x, Tensor? pos, Tensor? lengths, Tensor? valid, int block_len, "
      "int stride) -> (Tensor out, Tensor valid_cmp)");
  // grad_pos is an empty tensor when pos is None.
  m.def(
      "block_compress_backward(Tensor grad_out, Tensor x, Tensor? pos, Tensor? lengths, "
      "Tensor? valid, int block_len, int stride) -> (Tensor grad_x, Tensor grad_pos)");

  // LTIS scoring and top-n: int32 [B, L, Hk, top_n], ascending, -1 padded.
  m.def(
      "select_blocks(Tensor q, Tensor k_cmp, Tensor? lengths, Tensor? valid, int top_n, "
      "int block_size, int stride, int block_len, bool causal, float scale) -> Tensor");

  // LTIS attention over the own block plus the selected blocks (block_idx int32
  // [B, L, Hk, n], entries in [-1, ceil(L / block_size))).
  m.def(
      "block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor block_idx, Tensor? lengths, "
      "Tensor? valid, int block_size, bool causal, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "block_sparse_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, "
      "Tensor v, Tensor out, Tensor lse, Tensor block_idx, Tensor? lengths, Tensor? valid, "
      "int block_size, bool causal, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");

  // NSA's compressed branch: q attends to the compressed keys/values k_cmp, v_cmp
  // [B, T, Hk, D]; validity of token t comes from the key validity and block_len.
  m.def(
      "compressed_attention(Tensor q, Tensor k_cmp, Tensor v_cmp, Tensor? lengths, Tensor? valid, "
      "int block_len, int stride, bool causal, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "compressed_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k_cmp, "
      "Tensor v_cmp, Tensor out, Tensor lse, Tensor? lengths, Tensor? valid, int block_len, "
      "int stride, bool causal, float scale) -> (Tensor grad_q, Tensor grad_k_cmp, "
      "Tensor grad_v_cmp)");

  // out = sum_r sigmoid(gate_logits[..., r]) * branches[r];
  // branches [R, B, L, Hq, D], gate_logits [B, L, Hq, R].
  m.def("gate_fusion(Tensor branches, Tensor gate_logits) -> Tensor");
  m.def(
      "gate_fusion_backward(Tensor grad_out, Tensor branches, Tensor gate_logits) -> "
      "(Tensor grad_branches, Tensor grad_gate_logits)");

  // The whole mechanism with the mean compressor. gate_logits [B, L, Hq, R]: R = 2 mixes
  // (selected, window), R = 3 adds the compressed branch. Besides out it returns what the
  // backward needs: each branch's output and lse (o_cmp/lse_cmp are empty when R = 2)
  // and the selected block indices.
  m.def(
      "blossom_attention(Tensor q, Tensor k, Tensor v, Tensor gate_logits, Tensor? k_pos, "
      "Tensor? v_pos, Tensor? lengths, Tensor? valid, int block_len, int stride, int block_size, "
      "int top_n, int window, bool dilated, bool causal, float scale) -> (Tensor out, "
      "Tensor o_sel, Tensor lse_sel, Tensor o_win, Tensor lse_win, Tensor o_cmp, Tensor lse_cmp, "
      "Tensor block_idx)");
  // grad_k_pos / grad_v_pos are empty tensors when the position embedding is None.
  m.def(
      "blossom_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor gate_logits, Tensor? k_pos, Tensor? v_pos, Tensor? lengths, Tensor? valid, "
      "Tensor o_sel, Tensor lse_sel, Tensor o_win, Tensor lse_win, Tensor o_cmp, Tensor lse_cmp, "
      "Tensor block_idx, int block_len, int stride, int block_size, int top_n, int window, "
      "bool dilated, bool causal, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, "
      "Tensor grad_gate_logits, Tensor grad_k_pos, Tensor grad_v_pos)");
}
