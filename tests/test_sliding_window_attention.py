"""sliding_window_attention (STIS) against the float64 dense reference: forward, lse and
the gradients of q, k, v (through out and lse), on every device and dtype."""
import torch
from hypothesis import given, strategies as st

import blossom_ops
from blossom_ops import reference as ref

from helpers import (assert_empty_rows, cases, check_op_against_reference, nan_embedded,
                     nan_where_invalid, randn)

windows = st.one_of(st.integers(1, 12), st.sampled_from([1, 2, 8, 16, 33, 1000]))


def _inputs(case, dtype, device):
    g = torch.Generator().manual_seed(case.seed)
    q = randn(g, (case.B, case.L, case.Hq, case.D), dtype, device)
    k = randn(g, (case.B, case.L, case.Hk, case.D), dtype, device)
    v = randn(g, (case.B, case.L, case.Hk, case.D), dtype, device)
    return q, k, v


def _op(q, k, v, **kw):
    return blossom_ops.sliding_window_attention(q, k, v, return_lse=True, **kw)


def _ref(q, k, v, **kw):
    return ref.sliding_window_attention(q, k, v, return_lse=True, **kw)


@given(case=cases(), window=windows, dilated=st.booleans())
def test_matches_reference(device, dtype, case, window, dilated):
    q, k, v = _inputs(case, dtype, device)
    static = dict(window=window, dilated=dilated, causal=case.causal,
                  **case.padding_kwargs(device))
    ctx = f"{case} window={window} dilated={dilated} dtype={dtype}"
    (out, lse), (_, lse64) = check_op_against_reference(
        "sliding_window_attention", _op, _ref, dict(q=q, k=k, v=v), ["q", "k", "v"],
        case.seed, dtype, ctx, static)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.shape == q.shape[:3]
    assert_empty_rows("sliding_window_attention", out, lse, lse64)


@given(case=cases(max_tokens=200, pad_kinds=("lengths", "left", "random")),
       window=windows, dilated=st.booleans())
def test_nan_padding_is_never_read(device, case, window, dilated):
    """Inputs viewed out of NaN-filled buffers (NaN past L, H, D) and NaN at padded
    positions: identical, NaN-free result and gradients on valid rows."""
    dtype = torch.float32
    q, k, v = _inputs(case, dtype, device)
    pad = case.padding_kwargs(device)
    kw = dict(window=window, dilated=dilated, causal=case.causal, **pad)
    valid = case.validity().to(device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = _op(*leaves, **kw)
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    dirty = [nan_where_invalid(nan_embedded(t), valid).requires_grad_() for t in (q, k, v)]
    out_n, lse_n = _op(*dirty, **kw)
    (out_n.sum() + torch.where(torch.isfinite(lse_n), lse_n, 0).sum()).backward()
    assert not torch.isnan(out_n).any(), "NaN leaked into the output"
    assert torch.equal(out_n[valid], out[valid]) and torch.equal(lse_n[valid], lse[valid])
    assert (out_n[~valid] == 0).all() and torch.isneginf(lse_n[~valid]).all()
    for name, a, b in zip("qkv", dirty, leaves):
        assert not torch.isnan(a.grad).any(), f"NaN leaked into grad {name}"
        assert torch.equal(a.grad[valid], b.grad[valid]), f"grad {name} differs"
        assert (a.grad[~valid] == 0).all(), f"grad {name} non-zero at padded positions"
