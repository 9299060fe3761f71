"""Fast smoke test of the CPU kernels of block_compress, select_blocks and gate_fusion
against blossom_ops.reference in float64 (the full property suite lives elsewhere)."""
import pytest
import torch

import blossom_ops
from blossom_ops import reference as ref

F64 = dict(dtype=torch.float64)


def _padding(kind, B, L, gen):
    """(lengths, valid) for the padding kind: none, right (lengths) or any (mask)."""
    if kind == "none":
        return None, None
    if kind == "lengths":
        return torch.randint(0, L + 1, (B,), generator=gen), None
    valid = torch.rand(B, L, generator=gen) < 0.7
    return None, valid


def _nan_padding(x, lengths, valid):
    """A copy of x [B, L, H, D] whose padded positions hold NaN (catches stray reads)."""
    B, L = x.shape[:2]
    ok = ref.validity(B, L, lengths, valid)
    return x.masked_fill(~ok[:, :, None, None], float("nan"))


# --------------------------------------------------------------------------- block_compress
@pytest.mark.parametrize("B,L,H,D,block_len,stride", [
    (2, 37, 3, 8, 32, 16), (1, 1, 1, 4, 4, 4), (2, 17, 2, 5, 8, 2), (3, 50, 1, 16, 6, 3)])
@pytest.mark.parametrize("with_pos", [False, True])
@pytest.mark.parametrize("padding", ["none", "lengths", "mask"])
def test_block_compress_forward_backward(B, L, H, D, block_len, stride, with_pos, padding):
    gen = torch.Generator().manual_seed(B * 1000 + L * 10 + D)
    x = torch.randn(B, L, H, D, generator=gen, **F64)
    pos = torch.randn(H, block_len, D, generator=gen, **F64) if with_pos else None
    lengths, valid = _padding(padding, B, L, gen)
    xn = _nan_padding(x, lengths, valid).requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    posn = pos.clone().requires_grad_(True) if with_pos else None
    posr = pos.clone().requires_grad_(True) if with_pos else None

    out, vc = blossom_ops.block_compress(xn, block_len, stride, pos=posn, lengths=lengths,
                                         valid=valid, return_valid=True)
    want, want_vc = ref.block_compress(xr, block_len, stride, pos=posr, lengths=lengths,
                                       valid=valid, return_valid=True)
    assert out.shape == want.shape and out.dtype == torch.float64
    assert torch.equal(vc, want_vc)
    assert not out.isnan().any()
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)

    g = torch.randn(out.shape, generator=gen, **F64)
    out.backward(g)
    want.backward(g)
    ok = ref.validity(B, L, lengths, valid)
    gx = xn.grad
    assert not gx.isnan().any()
    assert (gx[~ok] == 0).all()
    torch.testing.assert_close(gx, xr.grad.masked_fill(~ok[:, :, None, None], 0.0),
                               rtol=1e-12, atol=1e-12)
    if with_pos:
        torch.testing.assert_close(posn.grad, posr.grad, rtol=1e-12, atol=1e-12)


def test_block_compress_strided_and_bfloat16():
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(2, 40, 6, 8, generator=gen, **F64)
    x = base[:, :, ::2]  # non-contiguous heads, contiguous last dim
    torch.testing.assert_close(blossom_ops.block_compress(x, 8, 4),
                               ref.block_compress(x, 8, 4), rtol=1e-12, atol=1e-12)
    xb = x.to(torch.bfloat16)
    got = blossom_ops.block_compress(xb, 8, 4).double()
    torch.testing.assert_close(got, ref.block_compress(xb.double(), 8, 4), rtol=1e-2, atol=1e-2)


def test_block_compress_errors():
    x = torch.randn(1, 8, 2, 4)
    with pytest.raises(RuntimeError, match="block_len .* must be >= stride"):
        blossom_ops.block_compress(x, 4, 8)
    with pytest.raises(RuntimeError, match="stride must be >= 1"):
        blossom_ops.block_compress(x, 4, 0)
    with pytest.raises(RuntimeError, match=r"pos must have shape \(heads, block_len, head_dim\)"):
        blossom_ops.block_compress(x, 4, 2, pos=torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        blossom_ops.block_compress(torch.randn(1, 8, 4, 2).transpose(2, 3), 4, 2)


# --------------------------------------------------------------------------- select_blocks
def _assert_selection_matches(got, q, k_cmp, top_n, kw):
    """Exact match, or (for near-ties) the same importance multiset of chosen blocks."""
    want = ref.select_blocks(q, k_cmp, top_n, **kw)
    assert got.dtype == torch.int32 and got.shape == want.shape
    if torch.equal(got, want):
        return
    imp, cand = ref.select_blocks_scores(q, k_cmp, **kw)
    bad = (got != want).any(dim=-1).nonzero().tolist()
    for b, i, g in bad:
        gi, wi = got[b, i, g], want[b, i, g]
        assert ((gi >= 0) == (wi >= 0)).all(), f"count differs at {(b, i, g)}: {gi} vs {wi}"
        gs = imp[b, i, g, gi[gi >= 0].long()].sort().values
        ws = imp[b, i, g, wi[wi >= 0].long()].sort().values
        torch.testing.assert_close(gs, ws, rtol=1e-10, atol=1e-12,
                                   msg=f"selection at {(b, i, g)}: {gi.tolist()} vs {wi.tolist()}")


@pytest.mark.parametrize("B,L,Hq,Hk,D,block_len,stride,block_size,top_n", [
    (2, 70, 4, 2, 8, 32, 16, 16, 4), (1, 97, 3, 1, 5, 8, 4, 8, 3), (2, 15, 2, 2, 4, 4, 2, 2, 6),
    (1, 1, 2, 1, 4, 32, 16, 16, 4), (2, 64, 4, 1, 16, 16, 8, 32, 1)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padding", ["none", "lengths", "mask"])
def test_select_blocks(B, L, Hq, Hk, D, block_len, stride, block_size, top_n, causal, padding):
    gen = torch.Generator().manual_seed(L * 31 + Hq + top_n)
    q = torch.randn(B, L, Hq, D, generator=gen, **F64)
    k = torch.randn(B, L, Hk, D, generator=gen, **F64)
    lengths, valid = _padding(padding, B, L, gen)
    k_cmp = ref.block_compress(k, block_len, stride, lengths=lengths, valid=valid)
    kw = dict(block_size=block_size, stride=stride, block_len=block_len, causal=causal,
              lengths=lengths, valid=valid)
    got = blossom_ops.select_blocks(_nan_padding(q, lengths, valid), k_cmp, top_n, **kw)
    _assert_selection_matches(got, q, k_cmp, top_n, kw)
    ok = ref.validity(B, L, lengths, valid)
    assert (got[~ok] == -1).all()


def test_select_blocks_ties_go_to_lower_block():
    # q = 0 gives equal logits, so blocks holding equally many tokens tie exactly.
    B, L, Hq, Hk, D = 1, 96, 2, 1, 4
    q = torch.zeros(B, L, Hq, D, **F64)
    k_cmp = torch.randn(B, L // 16, Hk, D, **F64)
    got = blossom_ops.select_blocks(q, k_cmp, 2, block_len=16, stride=16, block_size=16)
    assert got[0, 95, 0].tolist() == [0, 1]
    assert got[0, 20, 0].tolist() == [0, -1]
    assert got[0, 5, 0].tolist() == [-1, -1]


def test_select_blocks_errors():
    q = torch.randn(1, 32, 2, 4)
    k_cmp = torch.randn(1, 2, 1, 4)
    with pytest.raises(RuntimeError, match="block_size .* must be a positive multiple of stride"):
        blossom_ops.select_blocks(q, k_cmp, 2, block_size=24, stride=16)
    with pytest.raises(RuntimeError, match="top_n must be >= 1"):
        blossom_ops.select_blocks(q, k_cmp, 0)
    with pytest.raises(RuntimeError, match="k_cmp must have shape"):
        blossom_ops.select_blocks(q, torch.randn(1, 3, 1, 4), 2)


# --------------------------------------------------------------------------- gate_fusion
@pytest.mark.parametrize("R", [1, 2, 3])
def test_gate_fusion_forward_backward(R):
    gen = torch.Generator().manual_seed(R)
    br = torch.randn(R, 2, 9, 3, 7, generator=gen, **F64)
    gl = (3 * torch.randn(2, 9, 3, R, generator=gen, **F64))
    br1, gl1 = br.clone().requires_grad_(True), gl.clone().requires_grad_(True)
    br2, gl2 = br.clone().requires_grad_(True), gl.clone().requires_grad_(True)
    out = blossom_ops.gate_fusion(br1, gl1)
    want = ref.gate_fusion(br2, gl2)
    torch.testing.assert_close(out, want, rtol=1e-13, atol=1e-13)
    g = torch.randn(out.shape, generator=gen, **F64)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(br1.grad, br2.grad, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(gl1.grad, gl2.grad, rtol=1e-12, atol=1e-13)


def test_gate_fusion_list_noncontiguous_bfloat16_gradcheck():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, 5, 2, 6, generator=gen, **F64)[..., :3]
    b = torch.randn(2, 5, 2, 3, generator=gen, **F64)
    gl = torch.randn(2, 5, 2, 2, generator=gen, **F64)
    torch.testing.assert_close(blossom_ops.gate_fusion([a, b], gl), ref.gate_fusion([a, b], gl))
    got = blossom_ops.gate_fusion([a.bfloat16(), b.bfloat16()], gl.bfloat16()).double()
    torch.testing.assert_close(got, ref.gate_fusion([a, b], gl), rtol=2e-2, atol=2e-2)
    br = torch.randn(2, 1, 3, 2, 4, generator=gen, **F64, requires_grad=True)
    g = torch.randn(1, 3, 2, 2, generator=gen, **F64, requires_grad=True)
    assert torch.autograd.gradcheck(blossom_ops.gate_fusion, (br, g))


def test_gate_fusion_errors():
    br = torch.randn(2, 1, 3, 2, 4)
    with pytest.raises(RuntimeError, match=r"gate_logits must have shape \(batch, seq, q_heads, R\)"):
        blossom_ops.gate_fusion(br, torch.randn(1, 3, 2, 3))
    with pytest.raises(RuntimeError, match="R >= 1"):
        blossom_ops.gate_fusion(br[:0], torch.randn(1, 3, 2, 0))
    with pytest.raises(RuntimeError, match="same dtype"):
        blossom_ops.gate_fusion(br, torch.randn(1, 3, 2, 2, **F64))
