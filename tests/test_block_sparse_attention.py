"""block_sparse_attention (LTIS selected attention) against the float64 dense reference, fed
arbitrary index tensors: duplicates, -1 entries, unsorted, the own block, every block."""
import torch
from hypothesis import given, strategies as st

import blossom_ops
from blossom_ops import reference as ref

from helpers import (assert_empty_rows, cases, check_op_against_reference, nan_embedded,
                     nan_where_invalid, randn)

block_sizes = st.one_of(st.sampled_from([1, 4, 16, 32]), st.integers(1, 40))


def _block_idx(case, block_size, n, style, device):
    """int32 [B, L, Hk, n] with entries in [-1, C): random (with duplicates and -1),
    sorted, all -1, or every block."""
    C = -(-case.L // block_size)
    g = torch.Generator().manual_seed(case.seed ^ 0x1234)
    shape = (case.B, case.L, case.Hk, n)
    if style == "none":
        idx = torch.full(shape, -1, dtype=torch.int32)
    elif style == "all":
        idx = torch.arange(C, dtype=torch.int32).expand(case.B, case.L, case.Hk, C).contiguous()
    else:
        idx = torch.randint(-1, C, shape, generator=g, dtype=torch.int32)
        if style == "sorted":
            idx = idx.sort(dim=-1).values
    return idx.to(device)


def _inputs(case, dtype, device):
    g = torch.Generator().manual_seed(case.seed)
    q = randn(g, (case.B, case.L, case.Hq, case.D), dtype, device)
    k = randn(g, (case.B, case.L, case.Hk, case.D), dtype, device)
    v = randn(g, (case.B, case.L, case.Hk, case.D), dtype, device)
    return q, k, v


def _op(q, k, v, **kw):
    return blossom_ops.block_sparse_attention(q, k, v, return_lse=True, **kw)


def _ref(q, k, v, **kw):
    return ref.block_sparse_attention(q, k, v, return_lse=True, **kw)


@given(case=cases(), block_size=block_sizes, n=st.integers(1, 6),
       style=st.sampled_from(["random", "random", "sorted", "none", "all"]))
def test_matches_reference(device, dtype, case, block_size, n, style):
    q, k, v = _inputs(case, dtype, device)
    idx = _block_idx(case, block_size, n, style, device)
    static = dict(block_idx=idx, block_size=block_size, causal=case.causal,
                  **case.padding_kwargs(device))
    ctx = f"{case} block_size={block_size} n={idx.shape[-1]} style={style} dtype={dtype}"
    (out, lse), (_, lse64) = check_op_against_reference(
        "block_sparse_attention", _op, _ref, dict(q=q, k=k, v=v), ["q", "k", "v"],
        case.seed, dtype, ctx, static)
    assert out.dtype == dtype and out.shape == q.shape
    assert_empty_rows("block_sparse_attention", out, lse, lse64)


def test_non_contiguous_index_tensor(device):
    """A strided index tensor (last dim contiguous, like every input) means the same as its
    contiguous copy."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 30, 2, 8, generator=g).to(device)
    k = torch.randn(2, 30, 1, 8, generator=g).to(device)
    v = torch.randn(2, 30, 1, 8, generator=g).to(device)
    big = torch.randint(-1, 4, (2, 31, 3, 3), generator=g, dtype=torch.int32).to(device)
    strided = big[:, 1:, 1:2]
    assert not strided.is_contiguous()
    a = blossom_ops.block_sparse_attention(q, k, v, strided, block_size=8)
    b = blossom_ops.block_sparse_attention(q, k, v, strided.contiguous(), block_size=8)
    assert torch.equal(a, b)


@given(case=cases(max_tokens=200, pad_kinds=("lengths", "left", "random")),
       block_size=block_sizes, n=st.integers(1, 4))
def test_nan_padding_is_never_read(device, case, block_size, n):
    q, k, v = _inputs(case, torch.float32, device)
    idx = _block_idx(case, block_size, n, "random", device)
    valid = case.validity().to(device)
    kw = dict(block_size=block_size, causal=case.causal, **case.padding_kwargs(device))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = _op(*leaves, block_idx=idx, **kw)
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    dirty = [nan_where_invalid(nan_embedded(t), valid).requires_grad_() for t in (q, k, v)]
    out_n, lse_n = _op(*dirty, block_idx=idx, **kw)
    (out_n.sum() + torch.where(torch.isfinite(lse_n), lse_n, 0).sum()).backward()
    assert not torch.isnan(out_n).any(), "NaN leaked into the output"
    assert torch.equal(out_n[valid], out[valid]) and torch.equal(lse_n[valid], lse[valid])
    assert (out_n[~valid] == 0).all() and torch.isneginf(lse_n[~valid]).all()
    for name, a, b in zip("qkv", dirty, leaves):
        assert not torch.isnan(a.grad).any(), f"NaN leaked into grad {name}"
        assert torch.equal(a.grad[valid], b.grad[valid]), f"grad {name} differs"
        assert (a.grad[~valid] == 0).all(), f"grad {name} non-zero at padded positions"
