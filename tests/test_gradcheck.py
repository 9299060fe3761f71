"""torch.autograd.gradcheck in float64 (CPU) for every differentiable operator: gradients of
out AND lse, with respect to q, k, v, pos and gate_logits, with padding (so rows with no key
and lse = -inf are inside the check: their lse is mapped to 0, keeping the function finite).
"""
import pytest
import torch
from torch.autograd import gradcheck

import blossom_ops as bo

f64 = torch.float64
# small: gradcheck perturbs every input element
B, L, Hk, G, D = 2, 8, 1, 2, 4
Hq = Hk * G


def _leaves(seed, *shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=f64).requires_grad_() for s in shapes]


def _fin(t):
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


PADDINGS = {"none": {}, "lengths": {"lengths": torch.tensor([L, 4])},
            "left": {"valid": torch.arange(L)[None].expand(B, L) >= torch.tensor([[0], [3]])}}
# every padding with both causal and bidirectional, dilation alternating
SWA_CASES = [("none", True, True), ("none", False, False), ("lengths", True, False),
             ("lengths", False, True), ("left", True, True), ("left", False, False)]
paddings = pytest.mark.parametrize("pad", list(PADDINGS))
causals = pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])


@pytest.mark.parametrize("pad,causal,dilated", SWA_CASES)
def test_sliding_window_attention(pad, causal, dilated):
    q, k, v = _leaves(0, (B, L, Hq, D), (B, L, Hk, D), (B, L, Hk, D))

    def fn(q, k, v):
        out, lse = bo.sliding_window_attention(q, k, v, 2, dilated=dilated, causal=causal,
                                               return_lse=True, **PADDINGS[pad])
        return out, _fin(lse)
    assert gradcheck(fn, (q, k, v))


@paddings
@causals
def test_block_sparse_attention(pad, causal):
    q, k, v = _leaves(1, (B, L, Hq, D), (B, L, Hk, D), (B, L, Hk, D))
    idx = torch.randint(-1, 3, (B, L, Hk, 3), generator=torch.Generator().manual_seed(2),
                        dtype=torch.int32)

    def fn(q, k, v):
        out, lse = bo.block_sparse_attention(q, k, v, idx, block_size=3, causal=causal,
                                             return_lse=True, **PADDINGS[pad])
        return out, _fin(lse)
    assert gradcheck(fn, (q, k, v))


@paddings
@causals
def test_compressed_attention(pad, causal):
    T = -(-L // 3)
    q, kc, vc = _leaves(3, (B, L, Hq, D), (B, T, Hk, D), (B, T, Hk, D))

    def fn(q, kc, vc):
        out, lse = bo.compressed_attention(q, kc, vc, block_len=5, stride=3, causal=causal,
                                           return_lse=True, **PADDINGS[pad])
        return out, _fin(lse)
    assert gradcheck(fn, (q, kc, vc))


@paddings
def test_block_compress(pad):
    x, pos = _leaves(4, (B, L, Hk, D), (Hk, 5, D))

    def fn(x, pos):
        return bo.block_compress(x, 5, 3, pos=pos, **PADDINGS[pad])
    assert gradcheck(fn, (x, pos))
    assert gradcheck(lambda x: bo.block_compress(x, 3, 3, **PADDINGS[pad]), (x,))


def test_gate_fusion():
    br, gl = _leaves(5, (3, B, L, Hq, D), (B, L, Hq, 3))
    assert gradcheck(bo.gate_fusion, (br, gl))
    br2, gl2 = _leaves(6, (2, 1, 3, Hq, D), (1, 3, Hq, 2))
    assert gradcheck(lambda a, b, g: bo.gate_fusion([a, b], g), (br2[0], br2[1], gl2))


@paddings
@causals
@pytest.mark.parametrize("R", [2, 3])
def test_blossom_attention(pad, causal, R):
    q, k, v, gl, kp, vp = _leaves(7, (B, L, Hq, D), (B, L, Hk, D), (B, L, Hk, D),
                                  (B, L, Hq, R), (Hk, 4, D), (Hk, 4, D))

    def fn(q, k, v, gl, kp, vp):
        return bo.blossom_attention(q, k, v, gl, block_len=4, stride=2, block_size=2, top_n=2,
                                    window=2, causal=causal, k_pos=kp, v_pos=vp,
                                    **PADDINGS[pad])
    # the block selection depends on q and k but is piecewise constant: the finite
    # differences (eps 1e-6) do not flip it for these well-separated random inputs
    assert gradcheck(fn, (q, k, v, gl, kp, vp))
