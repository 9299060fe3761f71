"""select_blocks (LTIS scoring and top-n), compared tie-aware with the importance computed by
blossom_ops.reference.select_blocks_scores in float64: entries forced by a strict margin
exactly, tied ones as sets, -1 padding exactly."""
import pytest
import torch
from hypothesis import given, strategies as st

import blossom_ops
from blossom_ops import reference as ref

from helpers import (assert_selection_valid, cases, nan_embedded, nan_where_invalid, randn,
                     selection_tolerance)


@st.composite
def select_args(draw):
    stride = draw(st.sampled_from([1, 2, 4, 8, 16]))
    block_size = stride * draw(st.sampled_from([1, 2, 4]))
    block_len = draw(st.one_of(st.just(stride), st.integers(stride, 2 * stride + 2)))
    top_n = draw(st.one_of(st.integers(1, 4), st.sampled_from([8, 64])))
    return block_len, stride, block_size, top_n


def _inputs(case, dtype, device, stride, ties):
    g = torch.Generator().manual_seed(case.seed)
    T = -(-case.L // stride)
    q = randn(g, (case.B, case.L, case.Hq, case.D), dtype, device)
    k_cmp = randn(g, (case.B, T, case.Hk, case.D), dtype, device)
    if ties:
        # exact ties: many identical compressed keys (and some all-zero queries)
        k_cmp[:, ::2] = k_cmp[:, :1].clone()  # clone: source and target overlap
        q[:, ::3] = 0
    return q, k_cmp


def _scores(q, k_cmp, pad, **kw):
    pad64 = {k: v.cpu() for k, v in pad.items()}
    return ref.select_blocks_scores(q.cpu().double(), k_cmp.cpu().double(), **kw, **pad64)


@given(case=cases(), args=select_args(), ties=st.booleans())
def test_matches_reference_tie_aware(device, dtype, case, args, ties):
    block_len, stride, block_size, top_n = args
    q, k_cmp = _inputs(case, dtype, device, stride, ties)
    pad = case.padding_kwargs(device)
    kw = dict(block_size=block_size, stride=stride, block_len=block_len, causal=case.causal)
    idx = blossom_ops.select_blocks(q, k_cmp, top_n, **kw, **pad)
    assert idx.dtype == torch.int32 and idx.device.type == device
    assert idx.shape == (case.B, case.L, case.Hk, top_n)
    importance, cand = _scores(q, k_cmp, pad, **kw)
    ctx = f"{case} block_len={block_len} stride={stride} block_size={block_size} " \
          f"top_n={top_n} ties={ties} dtype={dtype}"
    assert_selection_valid("select_blocks", idx, importance, cand, top_n,
                           selection_tolerance(dtype, case.G, same_keys=True), ctx)
    # a padded query selects nothing
    valid = case.validity()
    assert (idx.cpu()[~valid] == -1).all(), "a padded query selected a block"


def test_exact_reference_without_ties(device):
    """Well separated scores: the result must equal reference.select_blocks exactly."""
    g = torch.Generator().manual_seed(3)
    B, L, Hk, G, D = 2, 37, 2, 2, 16
    q = torch.randn(B, L, Hk * G, D, generator=g, dtype=torch.float64)
    k_cmp = torch.randn(B, -(-L // 4), Hk, D, generator=g, dtype=torch.float64) * 3
    lengths = torch.tensor([37, 20])
    for causal in (True, False):
        kw = dict(block_size=8, stride=4, block_len=8, causal=causal, lengths=lengths)
        want = ref.select_blocks(q, k_cmp, 3, **kw)
        dt = torch.float64 if device == "cpu" else torch.float32
        got = blossom_ops.select_blocks(q.to(device, dt), k_cmp.to(device, dt), 3,
                                        **{**kw, "lengths": lengths.to(device)})
        assert torch.equal(got.cpu(), want), (got.cpu() - want).abs().nonzero()[:5]


@given(case=cases(max_tokens=200, pad_kinds=("lengths", "left", "random")), args=select_args())
def test_nan_padding_is_never_read(device, case, args):
    block_len, stride, block_size, top_n = args
    q, k_cmp = _inputs(case, torch.float32, device, stride, False)
    valid = case.validity()
    cvalid = ref.compressed_validity(valid, block_len, stride)
    kw = dict(block_size=block_size, stride=stride, block_len=block_len, causal=case.causal,
              **case.padding_kwargs(device))
    idx = blossom_ops.select_blocks(q, k_cmp, top_n, **kw)
    q2 = nan_where_invalid(nan_embedded(q), valid)
    k2 = nan_where_invalid(nan_embedded(k_cmp), cvalid)
    idx2 = blossom_ops.select_blocks(q2, k2, top_n, **kw)
    assert torch.equal(idx2, idx), "NaN padding changed the selection"


def test_same_keys_margin_catches_a_near_miss():
    """The tie margin of select_blocks' own tests (same_keys: the reference scores the very
    16-bit values the kernel got) is float32's: a choice that loses 1e-3 of importance against
    the reference's top-n is wrong there, while the margin for compressed keys rounded to
    bf16 (blossom_attention) still counts it as a tie."""
    imp = torch.tensor([0.300, 0.299, 0.100, 0.050], dtype=torch.float64).view(1, 1, 1, 4)
    cand = torch.ones(1, 1, 4, dtype=torch.bool)
    near_miss = torch.tensor([[[[1]]]], dtype=torch.int32)  # block 1 instead of block 0
    tight = selection_tolerance(torch.bfloat16, 1, same_keys=True)
    loose = selection_tolerance(torch.bfloat16, 1)
    assert tight < 1e-3 < loose
    assert_selection_valid("near miss", near_miss, imp, cand, 1, loose)
    with pytest.raises(AssertionError, match="wrong selection"):
        assert_selection_valid("near miss", near_miss, imp, cand, 1, tight)
    assert_selection_valid("best", torch.tensor([[[[0]]]], dtype=torch.int32), imp, cand, 1,
                           tight)
