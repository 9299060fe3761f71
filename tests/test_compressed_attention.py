"""compressed_attention (NSA's compressed branch: queries over compressed keys/values)
against the float64 dense reference: out, lse and the gradients of q, k_cmp, v_cmp."""
import torch
from hypothesis import given, strategies as st

import blossom_ops
from blossom_ops import reference as ref

from helpers import (assert_empty_rows, cases, check_op_against_reference, nan_embedded,
                     nan_where_invalid, randn)


@st.composite
def cmp_args(draw):
    stride = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
    block_len = draw(st.one_of(st.just(stride), st.just(2 * stride),
                               st.integers(stride, 3 * stride + 1)))
    return block_len, stride


def _inputs(case, dtype, device, stride):
    g = torch.Generator().manual_seed(case.seed)
    T = -(-case.L // stride)
    q = randn(g, (case.B, case.L, case.Hq, case.D), dtype, device)
    kc = randn(g, (case.B, T, case.Hk, case.D), dtype, device)
    vc = randn(g, (case.B, T, case.Hk, case.D), dtype, device)
    return q, kc, vc


def _op(q, k_cmp, v_cmp, **kw):
    return blossom_ops.compressed_attention(q, k_cmp, v_cmp, return_lse=True, **kw)


def _ref(q, k_cmp, v_cmp, **kw):
    return ref.compressed_attention(q, k_cmp, v_cmp, return_lse=True, **kw)


@given(case=cases(), args=cmp_args())
def test_matches_reference(device, dtype, case, args):
    block_len, stride = args
    q, kc, vc = _inputs(case, dtype, device, stride)
    static = dict(block_len=block_len, stride=stride, causal=case.causal,
                  **case.padding_kwargs(device))
    ctx = f"{case} block_len={block_len} stride={stride} dtype={dtype}"
    (out, lse), (_, lse64) = check_op_against_reference(
        "compressed_attention", _op, _ref, dict(q=q, k_cmp=kc, v_cmp=vc),
        ["q", "k_cmp", "v_cmp"], case.seed, dtype, ctx, static)
    assert out.dtype == dtype and out.shape == q.shape
    assert_empty_rows("compressed_attention", out, lse, lse64)


@given(case=cases(max_tokens=200, pad_kinds=("lengths", "left", "random")), args=cmp_args())
def test_nan_padding_is_never_read(device, case, args):
    """NaN past the views and at padded queries / invalid compressed tokens."""
    block_len, stride = args
    q, kc, vc = _inputs(case, torch.float32, device, stride)
    valid = case.validity()
    cvalid = ref.compressed_validity(valid, block_len, stride).to(device)
    valid = valid.to(device)
    kw = dict(block_len=block_len, stride=stride, causal=case.causal,
              **case.padding_kwargs(device))
    leaves = [t.clone().requires_grad_() for t in (q, kc, vc)]
    out, lse = _op(*leaves, **kw)
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    dirty = [nan_where_invalid(nan_embedded(q), valid).requires_grad_()] + \
        [nan_where_invalid(nan_embedded(t), cvalid).requires_grad_() for t in (kc, vc)]
    out_n, lse_n = _op(*dirty, **kw)
    (out_n.sum() + torch.where(torch.isfinite(lse_n), lse_n, 0).sum()).backward()
    assert not torch.isnan(out_n).any(), "NaN leaked into the output"
    assert torch.equal(out_n[valid], out[valid]) and torch.equal(lse_n[valid], lse[valid])
    assert (out_n[~valid] == 0).all() and torch.isneginf(lse_n[~valid]).all()
    for name, a, b, m in zip(["q", "k_cmp", "v_cmp"], dirty, leaves, [valid, cvalid, cvalid]):
        assert not torch.isnan(a.grad).any(), f"NaN leaked into grad {name}"
        assert torch.equal(a.grad[m], b.grad[m]), f"grad {name} differs"
        assert (a.grad[~m] == 0).all(), f"grad {name} non-zero at ignored positions"
