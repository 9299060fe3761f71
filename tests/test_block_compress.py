"""block_compress (mean pooling over compression windows, optional intra-block position
embedding) against the float64 reference: output, validity of the compressed tokens and the
gradients of x and pos."""
import torch
from hypothesis import given, strategies as st

import blossom_ops
from blossom_ops import reference as ref

from helpers import cases, check_op_against_reference, nan_embedded, nan_where_invalid, randn


@st.composite
def compress_args(draw):
    stride = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16, 32]))
    block_len = draw(st.one_of(st.just(stride), st.just(2 * stride),
                               st.integers(stride, 3 * stride + 3)))
    return block_len, stride


def _inputs(case, dtype, device, block_len, with_pos):
    g = torch.Generator().manual_seed(case.seed)
    x = randn(g, (case.B, case.L, case.Hk, case.D), dtype, device)
    pos = randn(g, (case.Hk, block_len, case.D), dtype, device, 0.5) if with_pos else None
    return x, pos


def _op(x, pos, **kw):
    return blossom_ops.block_compress(x, pos=pos, return_valid=True, **kw)


def _ref(x, pos, **kw):
    out, valid = ref.block_compress(x, pos=pos, return_valid=True, **kw)
    # the reference averages NaN-free inputs only; its validity is compared exactly below
    return out, valid


@given(case=cases(), args=compress_args(), with_pos=st.booleans())
def test_matches_reference(device, dtype, case, args, with_pos):
    block_len, stride = args
    x, pos = _inputs(case, dtype, device, block_len, with_pos)
    pad = case.padding_kwargs(device)
    static = dict(block_len=block_len, stride=stride, **pad)
    grads = ["x"] + (["pos"] if with_pos else [])
    ctx = f"{case} block_len={block_len} stride={stride} pos={with_pos} dtype={dtype}"
    # the bool validity output is compared exactly, the float output numerically
    out, cvalid = _op(x, pos, **static)
    _, cvalid_ref = _ref(x.cpu().double(), None if pos is None else pos.cpu().double(),
                         **{k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                            for k, v in static.items()})
    assert cvalid.dtype == torch.bool and torch.equal(cvalid.cpu(), cvalid_ref), ctx
    T = -(-case.L // stride)
    assert out.shape == (case.B, T, case.Hk, case.D) and out.dtype == dtype
    # invalid compressed tokens are exactly 0
    assert (out[~cvalid] == 0).all(), "an invalid compressed token is not 0"
    check_op_against_reference(
        "block_compress", lambda **kw: _op(**kw)[0], lambda **kw: _ref(**kw)[0],
        dict(x=x, pos=pos), grads, case.seed, dtype, ctx, static)


@given(case=cases(max_tokens=200, pad_kinds=("lengths", "left", "random")),
       args=compress_args(), with_pos=st.booleans())
def test_nan_padding_is_never_read(device, case, args, with_pos):
    block_len, stride = args
    x, pos = _inputs(case, torch.float32, device, block_len, with_pos)
    valid = case.validity().to(device)
    kw = dict(block_len=block_len, stride=stride, **case.padding_kwargs(device))
    x1 = x.clone().requires_grad_()
    p1 = pos.clone().requires_grad_() if with_pos else None
    out, cv = _op(x1, p1, **kw)
    out.sum().backward()
    x2 = nan_where_invalid(nan_embedded(x), valid).requires_grad_()
    p2 = pos.clone().requires_grad_() if with_pos else None
    out2, cv2 = _op(x2, p2, **kw)
    out2.sum().backward()
    assert not torch.isnan(out2).any(), "NaN leaked into the output"
    assert torch.equal(out2, out) and torch.equal(cv2, cv)
    assert not torch.isnan(x2.grad).any()
    assert torch.equal(x2.grad[valid], x1.grad[valid])
    assert (x2.grad[~valid] == 0).all(), "grad x non-zero at padded positions"
    if with_pos:
        assert torch.equal(p2.grad, p1.grad)
