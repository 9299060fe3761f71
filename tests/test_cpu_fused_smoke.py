"""Smoke test of the fused blossom_attention op (CPU) against
blossom_ops.reference.blossom_attention in float64, forward and backward."""
import pytest
import torch

import blossom_ops
from blossom_ops import reference as ref

F64 = dict(dtype=torch.float64)


def _inputs(B, L, Hq, Hk, D, R, block_len, with_pos, padding, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, Hq, D, generator=gen, **F64)
    k = torch.randn(B, L, Hk, D, generator=gen, **F64)
    v = torch.randn(B, L, Hk, D, generator=gen, **F64)
    gl = torch.randn(B, L, Hq, R, generator=gen, **F64)
    kp = torch.randn(Hk, block_len, D, generator=gen, **F64) if with_pos else None
    vp = torch.randn(Hk, block_len, D, generator=gen, **F64) if with_pos else None
    lengths = valid = None
    if padding == "lengths":
        lengths = torch.randint(1, L + 1, (B,), generator=gen)
    elif padding == "mask":
        valid = torch.rand(B, L, generator=gen) < 0.75
    g = torch.randn(B, L, Hq, D, generator=gen, **F64)
    return (q, k, v, gl, kp, vp), dict(lengths=lengths, valid=valid), g


def _run(fn, leaves, pad, g, cfg):
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in leaves]
    q, k, v, gl, kp, vp = leaves
    out = fn(q, k, v, gl, k_pos=kp, v_pos=vp, **pad, **cfg)
    out.backward(g)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


CONFIGS = [
    # B, L, Hq, Hk, D, block_len, stride, block_size, top_n, window
    (2, 70, 4, 2, 8, 32, 16, 16, 4, 8),
    (1, 53, 3, 1, 5, 8, 4, 8, 2, 3),
    (2, 17, 2, 2, 4, 4, 2, 4, 1, 1),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("R", [2, 3])
@pytest.mark.parametrize("with_pos", [False, True])
@pytest.mark.parametrize("padding", ["none", "lengths", "mask"])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_matches_reference(config, R, with_pos, padding, causal):
    B, L, Hq, Hk, D, block_len, stride, block_size, top_n, window = config
    leaves, pad, g = _inputs(B, L, Hq, Hk, D, R, block_len, with_pos, padding,
                             seed=L * 7 + R + 2 * with_pos)
    cfg = dict(block_len=block_len, stride=stride, block_size=block_size, top_n=top_n,
               window=window, dilated=True, causal=causal)
    out, grads = _run(blossom_ops.blossom_attention, leaves, pad, g, cfg)
    want, want_grads = _run(ref.blossom_attention, leaves, pad, g, cfg)
    ok = ref.validity(B, L, pad["lengths"], pad["valid"])
    rows = ok[:, :, None, None]
    # padded query rows are 0 in both (every branch gives 0 there)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    assert (out.masked_select(~rows) == 0).all()
    names = ["q", "k", "v", "gate_logits", "k_pos", "v_pos"]
    for name, got, exp in zip(names, grads, want_grads):
        if exp is None and got is None:
            continue
        if exp is None:  # k_pos with R = 2 only feeds the (discrete) selection
            assert (got == 0).all(), name
            continue
        assert got is not None, name
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-10, msg=name)


def test_fused_parts_and_placeholders():
    leaves, pad, _ = _inputs(1, 40, 4, 2, 8, 2, 32, False, "none", seed=1)
    q, k, v, gl, _, _ = leaves
    out, parts = blossom_ops.blossom_attention(q, k, v, gl, return_parts=True)
    assert set(parts) == {"block_idx", "o_sel", "lse_sel", "o_win", "lse_win"}
    res = torch.ops.blossom_ops.blossom_attention(q, k, v, gl, None, None, None, None, 32, 16, 16,
                                                  4, 8, True, True, 0.25)
    assert res[5].shape == (0,) and res[5].dtype == q.dtype
    assert res[6].shape == (0,) and res[6].dtype == torch.float64
    want_idx = ref.select_blocks(q, ref.block_compress(k), 4)
    assert torch.equal(parts["block_idx"], want_idx)


def test_fused_rejects_bad_config():
    q = torch.randn(1, 16, 2, 4)
    k = v = torch.randn(1, 16, 1, 4)
    with pytest.raises(RuntimeError, match="2 .* or 3"):
        blossom_ops.blossom_attention(q, k, v, torch.randn(1, 16, 2, 4))
    gl = torch.randn(1, 16, 2, 2)
    with pytest.raises(RuntimeError, match="block_size .* multiple of stride"):
        blossom_ops.blossom_attention(q, k, v, gl, block_size=20)
    with pytest.raises(RuntimeError, match="top_n must be >= 1"):
        blossom_ops.blossom_attention(q, k, v, gl, top_n=0)
    with pytest.raises(RuntimeError, match="window must be >= 1"):
        blossom_ops.blossom_attention(q, k, v, gl, window=0)
    with pytest.raises(RuntimeError, match=r"k_pos must have shape \(kv_heads, block_len, head_dim\)"):
        blossom_ops.blossom_attention(q, k, v, gl, k_pos=torch.randn(1, 16, 4))
