"""The oracle checked against independent computations.

Every other numeric test trusts blossom_ops.reference, so here it is compared with things
computed another way: torch's scaled_dot_product_attention, hand-computed windows and
block choices, explicit Python loops over the mask definitions of DESIGN.md.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from blossom_ops import reference as ref

f64 = torch.float64


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=f64)


def _sdpa(q, k, v, causal, attn_mask=None):
    """torch SDPA in [B, L, H, D] layout with GQA done by repeating kv heads."""
    G = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(G, dim=2)
    v = v.repeat_interleave(G, dim=2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=attn_mask, is_causal=causal)
    return o.transpose(1, 2)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("L,G", [(1, 1), (17, 2), (40, 4)])
def test_full_window_is_sdpa(causal, L, G):
    q, k, v = _rand(2, L, 2 * G, 8, seed=1), _rand(2, L, 2, 8, seed=2), _rand(2, L, 2, 8, seed=3)
    for dilated in (False, True):
        out = ref.sliding_window_attention(q, k, v, window=L, dilated=dilated, causal=causal)
        torch.testing.assert_close(out, _sdpa(q, k, v, causal), rtol=1e-12, atol=1e-12)


def test_window_mask_matches_definition():
    L = 37
    valid = torch.ones(1, L, dtype=torch.bool)
    valid[0, 30:] = False
    for window, dilated, causal in [(1, True, True), (3, False, False), (5, True, False)]:
        m = ref.sliding_window_attention_mask(L, window, dilated, causal, valid)[0, 0]
        for i in range(L):
            for j in range(L):
                d = abs(i - j)
                pow2 = d > 0 and (d & (d - 1)) == 0
                want = (d < window or (dilated and pow2)) and (j <= i or not causal) \
                    and i < 30 and j < 30
                assert bool(m[i, j]) == want, (window, dilated, causal, i, j)


def test_padding_matches_sdpa_with_mask():
    B, L = 3, 21
    q, k, v = _rand(B, L, 2, 16, seed=4), _rand(B, L, 1, 16, seed=5), _rand(B, L, 1, 16, seed=6)
    lengths = torch.tensor([21, 9, 1])
    out = ref.sliding_window_attention(q, k, v, window=L, dilated=False, causal=True,
                                       lengths=lengths)
    for b in range(B):
        n = int(lengths[b])
        want = _sdpa(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], True)
        torch.testing.assert_close(out[b:b + 1, :n], want, rtol=1e-12, atol=1e-12)
        assert (out[b, n:] == 0).all()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("L,bs", [(1, 4), (33, 4), (50, 16)])
def test_all_blocks_selected_is_dense(causal, L, bs):
    B, Hk, G = 2, 2, 2
    q, k, v = _rand(B, L, Hk * G, 24, seed=7), _rand(B, L, Hk, 24, seed=8), _rand(B, L, Hk, 24, seed=9)
    C = -(-L // bs)
    idx = torch.arange(C, dtype=torch.int32).expand(B, L, Hk, C).contiguous()
    out, lse = ref.block_sparse_attention(q, k, v, idx, block_size=bs, causal=causal,
                                          return_lse=True)
    torch.testing.assert_close(out, _sdpa(q, k, v, causal), rtol=1e-12, atol=1e-12)
    # lse against an explicit logsumexp
    logits = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(G, 2)) / math.sqrt(24)
    if causal:
        logits = logits.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, logits.logsumexp(-1).transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_block_sparse_ignores_duplicates_and_minus_one():
    L, bs = 20, 4
    q, k, v = _rand(1, L, 2, 8, seed=10), _rand(1, L, 1, 8, seed=11), _rand(1, L, 1, 8, seed=12)
    messy = torch.tensor([3, -1, 0, 3, -1], dtype=torch.int32).expand(1, L, 1, 5)
    clean = torch.tensor([0, 3, -1, -1, -1], dtype=torch.int32).expand(1, L, 1, 5)
    for causal in (True, False):
        a = ref.block_sparse_attention(q, k, v, messy, block_size=bs, causal=causal)
        b = ref.block_sparse_attention(q, k, v, clean, block_size=bs, causal=causal)
        assert torch.equal(a, b)
    # own block only: query 6 (block 1) sees keys 4..6 when causal
    own = torch.full((1, L, 1, 1), -1, dtype=torch.int32)
    m = ref.block_sparse_attention_mask(own, L, bs, True, torch.ones(1, L, dtype=torch.bool), 2)
    assert m[0, 0, 6].nonzero().flatten().tolist() == [4, 5, 6]
    with pytest.raises(ValueError):
        ref.block_sparse_attention(q, k, v, torch.full((1, L, 1, 1), 5, dtype=torch.int32),
                                   block_size=bs)


def test_block_compress_hand_computed():
    # L=5, stride 2, block_len 3: T=3, windows W_0=[0,2), W_1=[1,4), W_2=[3,5)
    x = torch.tensor([1., 2., 4., 8., 16.], dtype=f64).reshape(1, 5, 1, 1)
    out, cvalid = ref.block_compress(x, 3, 2, return_valid=True)
    assert out.flatten().tolist() == [1.5, 14 / 3, 12.0]
    assert cvalid.tolist() == [[True, True, True]]
    # position embedding indexed from the (possibly negative) window start:
    # W_0 starts at -1, so x_0 gets pos[1] and x_1 gets pos[2]
    pos = torch.tensor([100., 200., 300.], dtype=f64).reshape(1, 3, 1)
    out = ref.block_compress(x, 3, 2, pos=pos)
    assert out.flatten().tolist() == [(1 + 200 + 2 + 300) / 2, (2 + 100 + 4 + 200 + 8 + 300) / 3,
                                      (8 + 100 + 16 + 200) / 2]
    # padding: only valid positions are averaged; a window without one is invalid and 0
    valid = torch.tensor([[False, False, True, False, False]])
    out, cvalid = ref.block_compress(x, 3, 2, valid=valid, return_valid=True)
    assert out.flatten().tolist() == [0.0, 4.0, 0.0]
    assert cvalid.tolist() == [[False, True, False]]


def test_select_blocks_hand_made_ties():
    # L=8, block_size=stride=2: 4 blocks, one compressed token per block. q = 0 makes all
    # scores equal, so every candidate block has the same importance: ties go to the
    # lower block index.
    L, Hk, G, D = 8, 1, 2, 4
    q = torch.zeros(1, L, Hk * G, D, dtype=f64)
    kc = _rand(1, 4, Hk, D, seed=13)
    idx = ref.select_blocks(q, kc, 2, block_size=2, stride=2, block_len=2, causal=True)
    assert idx[0, 7, 0].tolist() == [0, 1]      # own block 3; candidates 0, 1, 2 tie
    assert idx[0, 3, 0].tolist() == [0, -1]     # own block 1; one candidate
    assert idx[0, 1, 0].tolist() == [-1, -1]    # first block: nothing earlier
    imp, cand = ref.select_blocks_scores(q, kc, block_size=2, stride=2, block_len=2)
    # each query head gives p = 1/3 to each of the 3 candidates; summed over G = 2 heads
    torch.testing.assert_close(imp[0, 7, 0, :3], torch.full((3,), 2 / 3, dtype=f64))
    assert cand[0, 7].tolist() == [True, True, True, False]
    # bidirectional: every other block is a candidate
    idx = ref.select_blocks(q, kc, 2, block_size=2, stride=2, block_len=2, causal=False)
    assert idx[0, 0, 0].tolist() == [1, 2]


def test_select_blocks_hand_made_scores():
    # Token 2 is made far more important, then token 0: top-2 = {0, 2}, sorted ascending.
    L, D = 8, 4
    q = torch.zeros(1, L, 1, D, dtype=f64)
    q[..., 0] = 1.0
    kc = torch.zeros(1, 4, 1, D, dtype=f64)
    kc[0, 2, 0, 0] = 10.0
    kc[0, 0, 0, 0] = 5.0
    kc[0, 1, 0, 0] = -5.0
    idx = ref.select_blocks(q, kc, 2, block_size=2, stride=2, block_len=2, scale=1.0)
    assert idx[0, 7, 0].tolist() == [0, 2]
    # with block_size = 2 * stride, block c holds tokens 2c and 2c+1; importances add up
    q16 = torch.zeros(1, 16, 1, D, dtype=f64)
    q16[..., 0] = 1.0
    kc8 = torch.zeros(1, 8, 1, D, dtype=f64)
    kc8[0, [0, 1], 0, 0] = 1.0  # block 0: two good tokens
    kc8[0, 2, 0, 0] = 1.5       # block 1: one better token, one neutral
    imp, _ = ref.select_blocks_scores(q16, kc8, block_size=4, stride=2, block_len=2, scale=1.0)
    e = torch.exp(torch.tensor([1.0, 1.0, 1.5, 0.0, 0.0, 0.0], dtype=f64))
    p = e / e.sum()  # query 15 (own block 3) scores tokens 0..5 (blocks 0..2)
    torch.testing.assert_close(imp[0, 15, 0, :3], torch.stack([p[0] + p[1], p[2] + p[3],
                                                               p[4] + p[5]]))


def test_compressed_attention_visibility():
    L, stride, block_len = 10, 3, 4
    valid = torch.ones(1, L, dtype=torch.bool)
    m = ref.compressed_attention_mask(L, block_len, stride, True, valid)[0, 0]
    # token t visible once its window has ended: (t+1)*3 - 1 <= i
    for i in range(L):
        assert m[i].nonzero().flatten().tolist() == [t for t in range(4) if (t + 1) * 3 - 1 <= i]
    assert ref.compressed_attention_mask(L, block_len, stride, False, valid).all()


def test_gate_fusion_formula():
    br = _rand(3, 2, 5, 4, 8, seed=14)
    gl = _rand(2, 5, 4, 3, seed=15)
    want = sum(1 / (1 + torch.exp(-gl[..., r:r + 1])) * br[r] for r in range(3))
    torch.testing.assert_close(ref.gate_fusion(br, gl), want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(ref.gate_fusion(list(br), gl), want, rtol=1e-14, atol=1e-14)


def test_empty_rows_are_zero_without_nan_and_have_clean_gradients():
    q = _rand(2, 9, 2, 8, seed=16).requires_grad_()
    k = _rand(2, 9, 1, 8, seed=17).requires_grad_()
    v = _rand(2, 9, 1, 8, seed=18).requires_grad_()
    lengths = torch.tensor([0, 4])
    out, lse = ref.sliding_window_attention(q, k, v, 2, lengths=lengths, return_lse=True)
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()
    assert (out[1, 4:] == 0).all() and torch.isneginf(lse[1, 4:]).all()
    loss = out.sum() + torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).sum()
    loss.backward()
    for t in (q, k, v):
        assert not torch.isnan(t.grad).any()
        assert (t.grad[0] == 0).all() and (t.grad[1, 4:] == 0).all()


def test_blossom_reference_composition():
    # With top_n covering every block and a window covering everything, both branches are
    # dense attention, so the gated output is (sigmoid(g0) + sigmoid(g1)) * SDPA.
    B, L, Hk, G, D = 2, 24, 1, 2, 8
    q, k, v = _rand(B, L, Hk * G, D, seed=19), _rand(B, L, Hk, D, seed=20), _rand(B, L, Hk, D, seed=21)
    gl = _rand(B, L, Hk * G, 2, seed=22)
    out = ref.blossom_attention(q, k, v, gl, block_len=8, stride=4, block_size=4, top_n=6,
                                window=L, causal=True)
    s = torch.sigmoid(gl)
    torch.testing.assert_close(out, (s[..., :1] + s[..., 1:]) * _sdpa(q, k, v, True),
                               rtol=1e-12, atol=1e-12)
