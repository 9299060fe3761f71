"""Gradients when only one output of an attention op is used.

The autograd functions do not materialise zero gradients for unused outputs (a full-size
zero tensor per unused output and step otherwise), so the backward sees None for them. The
gradients must still equal those of the dense reference for each single-output loss."""
import pytest
import torch

import blossom_ops as bo
from blossom_ops import reference as ref

B, L, Hq, Hk, D = 2, 24, 4, 2, 8


def _leaves(seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()
    return mk(B, L, Hq, D), mk(B, L, Hk, D), mk(B, L, Hk, D)


def _block_idx():
    g = torch.Generator().manual_seed(3)
    return torch.randint(-1, L // 4, (B, L, Hk, 2), generator=g, dtype=torch.int32)


OPS = {
    "sliding_window_attention": (
        lambda m, q, k, v: m.sliding_window_attention(q, k, v, 3, return_lse=True)),
    "block_sparse_attention": (
        lambda m, q, k, v: m.block_sparse_attention(q, k, v, _block_idx(), block_size=4,
                                                    return_lse=True)),
}


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("which", ["out", "lse"])
def test_single_output_gradient_matches_reference(name, which):
    grads = []
    for module in (bo, ref):
        q, k, v = _leaves(0)
        out, lse = OPS[name](module, q, k, v)
        used = out if which == "out" else lse
        # lse is -inf on rows without keys (none here: causal rows see at least themselves)
        w = torch.randn(used.shape, generator=torch.Generator().manual_seed(1),
                        dtype=used.dtype)
        (used * w).sum().backward()
        # lse does not depend on v: the reference leaves v.grad None, ours writes zeros
        grads.append([t.grad if t.grad is not None else torch.zeros_like(t) for t in (q, k, v)])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)


def test_blossom_attention_backward_without_parts():
    q, k, v = _leaves(1)
    gl = torch.randn(B, L, Hq, 2, dtype=torch.float64, requires_grad=True)
    out = bo.blossom_attention(q, k, v, gl, block_len=8, stride=4, block_size=4, top_n=2,
                               window=3)
    out.sum().backward()
    for t in (q, k, v, gl):
        assert t.grad is not None and torch.isfinite(t.grad).all()
        assert t.grad.abs().sum() > 0
