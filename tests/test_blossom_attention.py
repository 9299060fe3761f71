"""blossom_attention (the fused mechanism) against the float64 reference.

The selection is compared tie-aware (against reference.select_blocks_scores on the float64
compressed keys); the numbers are then compared with the reference composed from the SAME
block indices, so a legitimately different choice among tied blocks is not an error. The
gradients of q, k, v, gate_logits, k_pos and v_pos are compared, plus every per-branch
output and lse that return_parts exposes."""
import torch
from hypothesis import given, strategies as st

import blossom_ops
from blossom_ops import reference as ref

from helpers import (assert_selection_valid, cases, check_op_against_reference, nan_embedded,
                     nan_where_invalid, randn, selection_tolerance)


@st.composite
def configs(draw):
    stride = draw(st.sampled_from([1, 2, 4, 8, 16]))
    return dict(
        stride=stride,
        block_len=draw(st.one_of(st.just(2 * stride), st.integers(stride, 2 * stride + 2))),
        block_size=stride * draw(st.sampled_from([1, 2, 4])),
        top_n=draw(st.integers(1, 5)),
        window=draw(st.one_of(st.integers(1, 10), st.just(8))),
        dilated=draw(st.booleans()),
    )


def _inputs(case, dtype, device, cfg, R, with_pos):
    g = torch.Generator().manual_seed(case.seed)
    shp_q = (case.B, case.L, case.Hq, case.D)
    shp_k = (case.B, case.L, case.Hk, case.D)
    t = dict(q=randn(g, shp_q, dtype, device), k=randn(g, shp_k, dtype, device),
             v=randn(g, shp_k, dtype, device),
             gate_logits=randn(g, (case.B, case.L, case.Hq, R), dtype, device))
    pos_shape = (case.Hk, cfg["block_len"], case.D)
    t["k_pos"] = randn(g, pos_shape, dtype, device, 0.5) if with_pos else None
    t["v_pos"] = randn(g, pos_shape, dtype, device, 0.5) if with_pos else None
    return t


def _op_parts(captured):
    def run(q, k, v, gate_logits, k_pos, v_pos, **kw):
        out, parts = blossom_ops.blossom_attention(q, k, v, gate_logits, k_pos=k_pos,
                                                   v_pos=v_pos, return_parts=True, **kw)
        captured["block_idx"] = parts["block_idx"]
        names = ["o_sel", "lse_sel", "o_win", "lse_win"]
        if gate_logits.shape[-1] == 3:
            names += ["o_cmp", "lse_cmp"]
        return (out,) + tuple(parts[n] for n in names)
    return run


def reference_given_idx(q, k, v, gate_logits, k_pos, v_pos, *, block_idx, block_len, stride,
                        block_size, top_n, window, dilated, causal, lengths=None, valid=None):
    """reference.blossom_attention with the selection replaced by block_idx; the branch
    outputs are returned detached (the operator exposes them without gradient)."""
    ok = ref.validity(q.shape[0], q.shape[1], lengths, valid, q.device)
    o_sel, lse_sel = ref.block_sparse_attention(q, k, v, block_idx.cpu().to(q.device),
                                                block_size=block_size, causal=causal,
                                                valid=ok, return_lse=True)
    o_win, lse_win = ref.sliding_window_attention(q, k, v, window, dilated=dilated,
                                                  causal=causal, valid=ok, return_lse=True)
    branches, parts = [o_sel, o_win], [o_sel, lse_sel, o_win, lse_win]
    if gate_logits.shape[-1] == 3:
        k_cmp = ref.block_compress(k, block_len, stride, pos=k_pos, valid=ok)
        v_cmp = ref.block_compress(v, block_len, stride, pos=v_pos, valid=ok)
        o_cmp, lse_cmp = ref.compressed_attention(q, k_cmp, v_cmp, block_len=block_len,
                                                  stride=stride, causal=causal, valid=ok,
                                                  return_lse=True)
        branches.append(o_cmp)
        parts += [o_cmp, lse_cmp]
    out = ref.gate_fusion(branches, gate_logits)
    return (out,) + tuple(p.detach() for p in parts)


def _check_selection(t, idx, cfg, case, dtype, pad, ctx):
    pad64 = {k: v.cpu() for k, v in pad.items()}
    k64 = t["k"].detach().cpu().double()
    kp = None if t["k_pos"] is None else t["k_pos"].detach().cpu().double()
    k_cmp = ref.block_compress(k64, cfg["block_len"], cfg["stride"], pos=kp, **pad64)
    imp, cand = ref.select_blocks_scores(
        t["q"].detach().cpu().double(), k_cmp, block_size=cfg["block_size"],
        stride=cfg["stride"], block_len=cfg["block_len"], causal=case.causal, **pad64)
    # the kernel may score from compressed keys rounded to `dtype`: twice the tie margin
    tol = 2 * selection_tolerance(dtype, case.G)
    assert_selection_valid("blossom_attention block_idx", idx, imp, cand, cfg["top_n"], tol,
                           ctx)


@given(case=cases(), cfg=configs(), R=st.sampled_from([2, 3]), with_pos=st.booleans())
def test_matches_reference(device, dtype, case, cfg, R, with_pos):
    t = _inputs(case, dtype, device, cfg, R, with_pos)
    pad = case.padding_kwargs(device)
    ctx = f"{case} cfg={cfg} R={R} pos={with_pos} dtype={dtype}"
    captured = {}
    grads = ["q", "k", "v", "gate_logits"] + (["k_pos", "v_pos"] if with_pos else [])
    static = dict(causal=case.causal, **cfg, **pad)

    def ref_fn(**kw):
        return reference_given_idx(**kw, block_idx=captured["block_idx"])

    outs, _ = check_op_against_reference("blossom_attention", _op_parts(captured), ref_fn, t,
                                         grads, case.seed, dtype, ctx, static)
    idx = captured["block_idx"]
    assert idx.dtype == torch.int32 and idx.shape == (case.B, case.L, case.Hk, cfg["top_n"])
    _check_selection(t, idx, cfg, case, dtype, pad, ctx)
    assert outs[0].dtype == dtype and outs[0].shape == t["q"].shape
    assert not torch.isnan(outs[0]).any()


def test_matches_plain_reference_end_to_end(device):
    """The unmodified reference.blossom_attention (its own selection) on a tie-free input
    in float64 (float32 on GPU), including the paper's default configuration."""
    g = torch.Generator().manual_seed(11)
    B, L, Hk, G, D = 2, 70, 2, 4, 16
    dt = torch.float64 if device == "cpu" else torch.float32
    q, k, v = (torch.randn(B, L, h, D, generator=g, dtype=torch.float64)
               for h in (Hk * G, Hk, Hk))
    gl = torch.randn(B, L, Hk * G, 3, generator=g, dtype=torch.float64)
    lengths = torch.tensor([70, 45])
    for kw in (dict(), dict(block_len=8, stride=4, block_size=8, top_n=2, window=3,
                            dilated=False, causal=False)):
        want = ref.blossom_attention(q, k, v, gl, lengths=lengths, **kw)
        got = blossom_ops.blossom_attention(q.to(device, dt), k.to(device, dt),
                                            v.to(device, dt), gl.to(device, dt),
                                            lengths=lengths.to(device), **kw)
        tol = 1e-10 if dt == torch.float64 else 2e-5
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol)


@given(case=cases(max_tokens=200, pad_kinds=("lengths", "left", "random")), cfg=configs(),
       R=st.sampled_from([2, 3]))
def test_nan_padding_is_never_read(device, case, cfg, R):
    t = _inputs(case, torch.float32, device, cfg, R, True)
    valid = case.validity().to(device)
    kw = dict(causal=case.causal, **cfg, **case.padding_kwargs(device))
    names = ["q", "k", "v", "gate_logits", "k_pos", "v_pos"]
    clean = {n: t[n].clone().requires_grad_() for n in names}
    out = blossom_ops.blossom_attention(**clean, **kw)
    out.sum().backward()
    dirty = {n: nan_where_invalid(nan_embedded(t[n]), valid).requires_grad_()
             for n in ("q", "k", "v")}
    dirty["gate_logits"] = nan_embedded(t["gate_logits"]).requires_grad_()
    dirty.update({n: t[n].clone().requires_grad_() for n in ("k_pos", "v_pos")})
    out2 = blossom_ops.blossom_attention(**dirty, **kw)
    out2.sum().backward()
    assert not torch.isnan(out2).any(), "NaN leaked into the output"
    assert torch.equal(out2, out)
    for n in names:
        a, b = dirty[n].grad, clean[n].grad
        assert not torch.isnan(a).any(), f"NaN leaked into grad {n}"
        if n in ("q", "k", "v"):
            assert torch.equal(a[valid], b[valid]), f"grad {n} differs"
            assert (a[~valid] == 0).all(), f"grad {n} non-zero at padded positions"
        else:
            assert torch.equal(a, b), f"grad {n} differs"
