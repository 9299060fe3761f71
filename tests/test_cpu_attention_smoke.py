"""Fast smoke test of the CPU attention kernels (sliding window, block sparse, compressed)
against the dense-mask reference in float64: forward (out, lse) and backward (q, k, v,
including the gradient that flows through lse), padding by lengths and by a validity mask,
causal and bidirectional, GQA group sizes 1, 2, 4 and odd lengths. The full property suite
lives elsewhere; this file is meant to run in seconds.
"""
import itertools

import pytest
import torch

import blossom_ops
from blossom_ops import reference as ref

OPS = ("sliding", "block_sparse", "compressed")
BLOCK_SIZE, N_SEL = 4, 3
BLOCK_LEN, STRIDE = 8, 4


def _padding(kind, B, L, gen):
    if kind == "lengths":
        lengths = torch.randint(0, L + 1, (B,), generator=gen)
        lengths[0] = L  # one full row, one possibly short
        return {"lengths": lengths}
    if kind == "valid":
        valid = torch.rand(B, L, generator=gen) < 0.7
        valid[:, :1] = False  # leading padding too
        return {"valid": valid}
    return {}


def _inputs(op, B, L, Hq, Hk, D, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, Hq, D, generator=gen, dtype=torch.float64)
    kv_len = -(-L // STRIDE) if op == "compressed" else L
    k = torch.randn(B, kv_len, Hk, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, kv_len, Hk, D, generator=gen, dtype=torch.float64)
    extra = {}
    if op == "block_sparse":
        C = -(-L // BLOCK_SIZE)
        extra["block_idx"] = torch.randint(-1, C, (B, L, Hk, N_SEL), generator=gen,
                                           dtype=torch.int32)
    return [t.to(dtype) for t in (q, k, v)], extra, gen


def _call(mod, op, q, k, v, extra, causal, pad, window=3, dilated=True):
    if op == "sliding":
        return mod.sliding_window_attention(q, k, v, window, dilated=dilated, causal=causal,
                                            return_lse=True, **pad)
    if op == "block_sparse":
        return mod.block_sparse_attention(q, k, v, extra["block_idx"], block_size=BLOCK_SIZE,
                                          causal=causal, return_lse=True, **pad)
    return mod.compressed_attention(q, k, v, block_len=BLOCK_LEN, stride=STRIDE, causal=causal,
                                    return_lse=True, **pad)


def _fwd_bwd(mod, op, inputs, extra, causal, pad, go, gl, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out, lse = _call(mod, op, *leaves, extra, causal, pad, **kw)
    # lse is -inf on rows with no allowed key; those rows get no lse gradient
    lse_used = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    loss = (out * go).sum() + (lse_used * gl.to(lse.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    return out.detach(), lse.detach(), grads


def _close(name, got, want, atol, rtol):
    assert not torch.isnan(got).any(), f"{name}: NaN in result"
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)), f"{name}: -inf pattern differs"
    err = (got[finite] - want[finite]).abs()
    if err.numel():
        bound = atol + rtol * want[finite].abs()
        worst = int((err - bound).argmax())
        assert (err <= bound).all(), (f"{name}: worst |err| {err[worst]:.3e} at flat index "
                                      f"{worst} (got {got[finite][worst]}, want "
                                      f"{want[finite][worst]})")
    assert torch.equal(got[~finite], want[~finite]), f"{name}: infinite entries differ"


def _check(op, B, L, Hq, Hk, D, causal, pad_kind, seed, dtype=torch.float64, atol=1e-10,
           rtol=1e-9, **kw):
    inputs, extra, gen = _inputs(op, B, L, Hq, Hk, D, seed, dtype)
    pad = _padding(pad_kind, B, L, gen)
    go = torch.randn(B, L, Hq, D, generator=gen, dtype=torch.float64)
    gl = torch.randn(B, L, Hq, generator=gen, dtype=torch.float64)
    o, lse, grads = _fwd_bwd(blossom_ops, op, inputs, extra, causal, pad, go.to(dtype), gl, **kw)
    ref_inputs = [t.to(torch.float64) for t in inputs]
    o_r, lse_r, grads_r = _fwd_bwd(ref, op, ref_inputs, extra, causal, pad, go, gl, **kw)
    _close("out", o.double(), o_r, atol, rtol)
    _close("lse", lse.double(), lse_r, atol, rtol)
    for name, g, g_r in zip(("grad_q", "grad_k", "grad_v"), grads, grads_r):
        _close(name, g.double(), g_r, atol, rtol)


CASES = list(itertools.product(OPS, (1, 17, 97), ((2, 2), (4, 2), (4, 1)), (True, False),
                               (None, "lengths", "valid")))


@pytest.mark.parametrize("op,L,heads,causal,pad", CASES)
def test_float64_matches_reference(op, L, heads, causal, pad):
    Hq, Hk = heads
    _check(op, 2, L, Hq, Hk, 8, causal, pad, seed=L * 7 + Hq)


@pytest.mark.parametrize("window,dilated", [(1, True), (1, False), (8, True), (200, False)])
@pytest.mark.parametrize("causal", [True, False])
def test_sliding_windows(window, dilated, causal):
    _check("sliding", 2, 97, 4, 2, 16, causal, "valid", seed=window, window=window,
           dilated=dilated)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("D", [16, 32, 64, 24])
def test_specialised_head_dims(op, D):
    _check(op, 2, 33, 4, 2, D, True, "lengths", seed=D)


@pytest.mark.parametrize("op", OPS)
def test_float32_and_bfloat16(op):
    _check(op, 2, 45, 8, 2, 16, True, "lengths", seed=3, dtype=torch.float32, atol=2e-5,
           rtol=2e-5)
    _check(op, 2, 45, 8, 2, 16, True, "lengths", seed=3, dtype=torch.bfloat16, atol=5e-2,
           rtol=5e-2)


def _backward_op(op):
    return {"sliding": torch.ops.blossom_ops.sliding_window_attention_backward,
            "block_sparse": torch.ops.blossom_ops.block_sparse_attention_backward,
            "compressed": torch.ops.blossom_ops.compressed_attention_backward}[op]


def _backward_args(op, extra, valid):
    if op == "sliding":
        return (None, valid, 3, True, True, 0.3)
    if op == "block_sparse":
        return (extra["block_idx"], None, valid, BLOCK_SIZE, True, 0.3)
    return (None, valid, BLOCK_LEN, STRIDE, True, 0.3)


@pytest.mark.parametrize("op", OPS)
def test_strided_grad_out_and_determinism(op):
    B, L, Hq, Hk, D = 2, 50, 4, 2, 16
    (q, k, v), extra, gen = _inputs(op, B, L, Hq, Hk, D, seed=11, dtype=torch.float32)
    valid = torch.rand(B, L, generator=gen) < 0.8
    pad = {"valid": valid}
    if op == "sliding":
        out, lse = blossom_ops.sliding_window_attention(q, k, v, 3, scale=0.3, return_lse=True,
                                                        **pad)
    elif op == "block_sparse":
        out, lse = blossom_ops.block_sparse_attention(q, k, v, extra["block_idx"],
                                                      block_size=BLOCK_SIZE, scale=0.3,
                                                      return_lse=True, **pad)
    else:
        out, lse = blossom_ops.compressed_attention(q, k, v, block_len=BLOCK_LEN, stride=STRIDE,
                                                    scale=0.3, return_lse=True, **pad)
    wide = torch.randn(B, L, Hq, 2 * D, generator=gen)
    strided = wide[..., :D]  # last dim contiguous, other strides not
    transposed = strided.clone().transpose(1, 2).contiguous().transpose(1, 2)
    last_dim_strided = wide[..., ::2]  # last dim not contiguous: copied by the binding
    bwd = _backward_op(op)
    args = _backward_args(op, extra, valid)

    def call(grad_out):
        return bwd(grad_out, None, q, k, v, out, lse, *args)

    want = call(strided.contiguous())
    for got, exp in zip(call(strided), want):
        assert torch.equal(got, exp)
    for got, exp in zip(call(transposed), want):
        assert torch.equal(got, exp)
    for got, exp in zip(call(last_dim_strided), call(last_dim_strided.contiguous())):
        assert torch.equal(got, exp)
    # bit-identical reruns: each (batch, kv head) has a single writer
    for got, exp in zip(call(strided), call(strided)):
        assert torch.equal(got, exp)


def test_bad_arguments_raise():
    (q, k, v), extra, _ = _inputs("block_sparse", 1, 17, 2, 1, 8, seed=0)
    with pytest.raises(RuntimeError, match="window must be >= 1"):
        blossom_ops.sliding_window_attention(q, k, v, 0)
    bad = extra["block_idx"].clone()
    bad[0, 3, 0, 1] = 5  # ceil(17 / 4) = 5 blocks: index 5 is out of range
    with pytest.raises(RuntimeError, match=r"block_idx entries must lie in \[-1, 5\)"):
        blossom_ops.block_sparse_attention(q, k, v, bad, block_size=BLOCK_SIZE)
    with pytest.raises(RuntimeError, match="block_idx must be int32"):
        blossom_ops.block_sparse_attention(q, k, v, bad.long(), block_size=BLOCK_SIZE)
    with pytest.raises(RuntimeError, match="block_size must be >= 1"):
        blossom_ops.block_sparse_attention(q, k, v, extra["block_idx"], block_size=0)
    kc = torch.randn(1, 5, 1, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="block_len .* must be >= stride"):
        blossom_ops.compressed_attention(q, kc, kc, block_len=2, stride=4)
    with pytest.raises(RuntimeError, match="k_cmp must have shape"):
        blossom_ops.compressed_attention(q, kc[:, :4], kc[:, :4], block_len=8, stride=4)
