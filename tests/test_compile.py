"""torch.compile(fullgraph=True): blossom_attention forward and backward, and one component
op (sliding_window_attention with its lse), traced without graph breaks and matching eager."""
import pytest
import torch

import blossom_ops as bo


def _inputs(device, R=3, L=37):
    g = torch.Generator().manual_seed(0)
    B, Hk, G, D = 2, 2, 2, 16
    t = [torch.randn(*s, generator=g) for s in
         [(B, L, Hk * G, D), (B, L, Hk, D), (B, L, Hk, D), (B, L, Hk * G, R), (Hk, 8, D),
          (Hk, 8, D)]]
    return [x.to(device).requires_grad_() for x in t]


def _grads(fn, inputs, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves, **kw)
    out = out if isinstance(out, tuple) else (out,)
    loss = sum((torch.where(torch.isfinite(o), o, 0) * (i + 1)).sum() for i, o in enumerate(out))
    loss.backward()
    return [o.detach() for o in out], [x.grad for x in leaves]


def blossom(q, k, v, gl, kp, vp, lengths):
    # a little surrounding arithmetic so inductor has something to fuse around the op
    out = bo.blossom_attention(q * 1.0, k, v, gl, block_len=8, stride=4, block_size=8, top_n=2,
                               window=3, k_pos=kp, v_pos=vp, lengths=lengths)
    return out * 2.0


@pytest.mark.parametrize("R", [2, 3])
def test_blossom_attention_compiles_fullgraph(device, R):
    torch._dynamo.reset()
    inputs = _inputs(device, R)
    lengths = torch.tensor([37, 20], device=device)
    compiled = torch.compile(blossom, fullgraph=True)
    out_e, grads_e = _grads(blossom, inputs, lengths=lengths)
    out_c, grads_c = _grads(compiled, inputs, lengths=lengths)
    for a, b in zip(out_c + grads_c, out_e + grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a second length recompiles (or reuses a dynamic graph) without breaking
    inputs2 = _inputs(device, R, L=20)
    out_e2, _ = _grads(blossom, inputs2, lengths=torch.tensor([20, 3], device=device))
    out_c2, _ = _grads(compiled, inputs2, lengths=torch.tensor([20, 3], device=device))
    torch.testing.assert_close(out_c2[0], out_e2[0], rtol=1e-5, atol=1e-6)


def test_component_op_compiles_fullgraph(device):
    torch._dynamo.reset()
    q, k, v = _inputs(device)[:3]

    def swa(q, k, v):
        return bo.sliding_window_attention(q, k, v, 4, dilated=True, causal=False,
                                           return_lse=True)
    compiled = torch.compile(swa, fullgraph=True)
    out_e, grads_e = _grads(swa, [q, k, v])
    out_c, grads_c = _grads(compiled, [q, k, v])
    for a, b in zip(out_c + grads_c, out_e + grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
