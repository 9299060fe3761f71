"""Every op's autograd is the C++ one (csrc/autograd/<op>_autograd.cpp).

Checks that the Autograd kernel registered for each op comes from that file (not a Python
registration), and the cases the backwards handle by hand: blossom_attention's gradients of
k_pos / v_pos (each given or not, lengths or valid given or not, so the graph edges shift),
inputs that do not require a gradient, an undefined gradient for an output (out of
blossom_attention, out or lse of compressed_attention, out of block_compress), block_compress
with and without pos, and the no-grad fast path of every op.
Ground truth is the dense reference in float64 (opcheck, gradcheck and torch.compile of the
same ops are in test_opcheck.py, test_gradcheck.py and test_compile.py).
"""
import pytest
import torch

import blossom_ops as bo
from blossom_ops import reference as ref

B, L, Hq, Hk, D = 2, 21, 4, 2, 8
CFG = dict(block_len=4, stride=2, block_size=4, top_n=2, window=3)
NAMES = ("q", "k", "v", "gate_logits", "k_pos", "v_pos")


def _inputs(seed, R, with_k_pos, with_v_pos, requires=NAMES):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    t = {"q": mk(B, L, Hq, D), "k": mk(B, L, Hk, D), "v": mk(B, L, Hk, D),
         "gate_logits": mk(B, L, Hq, R),
         "k_pos": mk(Hk, CFG["block_len"], D) if with_k_pos else None,
         "v_pos": mk(Hk, CFG["block_len"], D) if with_v_pos else None}
    for n in requires:
        if t[n] is not None:
            t[n].requires_grad_()
    return t


def _call(module, t, **kw):
    return module.blossom_attention(t["q"], t["k"], t["v"], t["gate_logits"], k_pos=t["k_pos"],
                                    v_pos=t["v_pos"], **CFG, **kw)


def _grads(module, t, w, **kw):
    out = _call(module, t, **kw)
    leaves = [n for n in NAMES if t[n] is not None and t[n].requires_grad]
    xs = [t[n] for n in leaves]
    # With R = 2 the positions do not reach the output: the reference leaves them unused
    # (None), the op returns zeros.
    gs = torch.autograd.grad((out * w).sum(), xs, allow_unused=True)
    return out, {n: (g if g is not None else torch.zeros_like(x))
                 for n, g, x in zip(leaves, gs, xs)}


AUTOGRAD_OPS = ("sliding_window_attention", "block_sparse_attention", "compressed_attention",
                "block_compress", "gate_fusion", "blossom_attention")


@pytest.mark.parametrize("op", AUTOGRAD_OPS)
def test_autograd_kernel_is_the_cpp_one(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"blossom_ops::{op}", "Autograd")
    dump = torch._C._dispatch_dump(f"blossom_ops::{op}")
    autograd_lines = [ln for ln in dump.splitlines() if ln.startswith("Autograd")]
    assert len(autograd_lines) == 1, dump
    assert f"csrc/autograd/{op}_autograd.cpp" in autograd_lines[0], dump


def test_blossom_attention_node_is_the_cpp_function():
    t = _inputs(0, 2, False, False)
    out = _call(bo, t)
    assert "BlossomAttentionFunction" in out.grad_fn.name()


@pytest.mark.parametrize("R", [2, 3])
@pytest.mark.parametrize("pos", ["none", "k", "v", "both"])
@pytest.mark.parametrize("pad", ["none", "lengths", "valid"])
def test_grads_match_reference(R, pos, pad):
    t = _inputs(1, R, pos in ("k", "both"), pos in ("v", "both"))
    kw = {}
    if pad == "lengths":
        kw["lengths"] = torch.tensor([L, 9])
    elif pad == "valid":
        valid = torch.ones(B, L, dtype=torch.bool)
        valid[1, :4] = False
        kw["valid"] = valid
    w = torch.randn(B, L, Hq, D, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    out, got = _grads(bo, t, w, **kw)
    want_out, want = _grads(ref, t, w, **kw)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    assert got.keys() == want.keys()
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-10, msg=n)
    for n in ("k_pos", "v_pos"):  # only the compressed branch (R = 3) carries them
        if n in got:
            assert (got[n].abs().max() > 0) == (R == 3), n


@pytest.mark.parametrize("requires", [("q",), ("v_pos",), ("k", "gate_logits")])
def test_only_some_inputs_require_grad(requires):
    t = _inputs(3, 3, True, True, requires=requires)
    w = torch.randn(B, L, Hq, D, generator=torch.Generator().manual_seed(4),
                    dtype=torch.float64)
    _, got = _grads(bo, t, w)
    _, want = _grads(ref, t, w)
    assert set(got) == set(requires)
    for n in requires:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-10, msg=n)


class _DropGrad(torch.autograd.Function):
    """Identity whose backward returns None: the op's `out` then receives no gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return None


def test_undefined_out_grad_counts_as_zero():
    t = _inputs(5, 3, True, True)
    out = _call(bo, t)
    loss = _DropGrad.apply(out).sum() + t["q"].sum() + t["k_pos"].sum()
    gq, gk, gkp = torch.autograd.grad(loss, (t["q"], t["k"], t["k_pos"]), allow_unused=True)
    torch.testing.assert_close(gq, torch.ones_like(gq))  # only the q.sum() term
    torch.testing.assert_close(gkp, torch.ones_like(gkp))
    assert gk is None or not gk.any()


def test_parts_are_not_differentiable():
    t = _inputs(6, 3, False, False)
    _, parts = _call(bo, t, return_parts=True)
    for name, p in parts.items():
        assert not p.requires_grad and p.grad_fn is None, name


def test_no_grad_fast_path_matches():
    t = _inputs(7, 3, True, True)
    with_graph = _call(bo, t)
    with torch.no_grad():
        without = _call(bo, t)
    assert with_graph.grad_fn is not None and without.grad_fn is None
    torch.testing.assert_close(without, with_graph.detach(), rtol=0, atol=0)
    detached = {n: (x.detach() if x is not None else None) for n, x in t.items()}
    plain = _call(bo, detached)
    assert plain.grad_fn is None and not plain.requires_grad
    torch.testing.assert_close(plain, without, rtol=0, atol=0)


# ----------------------------------------------------------------------- the single ops
def _leaf(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize("used", ["out", "lse", "both"])
def test_compressed_attention_single_output_grads(used):
    g = torch.Generator().manual_seed(8)
    T = -(-L // CFG["stride"])
    q, kc, vc = _leaf(g, B, L, Hq, D), _leaf(g, B, T, Hk, D), _leaf(g, B, T, Hk, D)
    w_out = torch.randn(B, L, Hq, D, generator=g, dtype=torch.float64)
    w_lse = torch.randn(B, L, Hq, generator=g, dtype=torch.float64)
    lengths = torch.tensor([L, 9])
    grads = []
    for module in (bo, ref):
        out, lse = module.compressed_attention(q, kc, vc, block_len=CFG["block_len"],
                                               stride=CFG["stride"], lengths=lengths,
                                               return_lse=True)
        # rows without keys have lse = -inf: weight only the finite ones
        loss = 0
        if used in ("out", "both"):
            loss = loss + (out * w_out).sum()
        if used in ("lse", "both"):
            loss = loss + torch.where(torch.isfinite(lse), lse * w_lse, 0).sum()
        gs = torch.autograd.grad(loss, (q, kc, vc), allow_unused=True)
        grads.append([x if x is not None else torch.zeros_like(y) for x, y in zip(gs, (q, kc, vc))])
    for name, ours, theirs in zip(("q", "k_cmp", "v_cmp"), *grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10, msg=name)


# pos absent, a leaf, or a constant; x a leaf or a constant (not both constant: no graph)
@pytest.mark.parametrize(("pos", "x_grad"), [(None, True), ("leaf", True), ("constant", True),
                                             ("leaf", False)])
def test_block_compress_grads(pos, x_grad):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(B, L, Hk, D, generator=g, dtype=torch.float64).requires_grad_(x_grad)
    p = None if pos is None else torch.randn(Hk, CFG["block_len"], D, generator=g,
                                             dtype=torch.float64).requires_grad_(pos == "leaf")
    w = torch.randn(B, -(-L // CFG["stride"]), Hk, D, generator=g, dtype=torch.float64)
    wanted = [t for t in (x, p) if t is not None and t.requires_grad]
    grads = []
    for module in (bo, ref):
        out = module.block_compress(x, CFG["block_len"], CFG["stride"], pos=p,
                                    lengths=torch.tensor([L, 6]))
        grads.append(torch.autograd.grad((out * w).sum(), wanted))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)


def test_block_compress_valid_cmp_not_differentiable_and_unused_out():
    g = torch.Generator().manual_seed(10)
    x = _leaf(g, B, L, Hk, D)
    out, valid_cmp = bo.block_compress(x, CFG["block_len"], CFG["stride"], return_valid=True)
    assert out.requires_grad and not valid_cmp.requires_grad and valid_cmp.grad_fn is None
    loss = _DropGrad.apply(out).sum() + x.sum()
    (gx,) = torch.autograd.grad(loss, (x,))
    torch.testing.assert_close(gx, torch.ones_like(gx))  # only the x.sum() term


def _single_op_calls(g, requires_grad):
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(  # noqa
        requires_grad)
    T = -(-L // CFG["stride"])
    q, k, v = mk(B, L, Hq, D), mk(B, L, Hk, D), mk(B, L, Hk, D)
    kc, vc, pos = mk(B, T, Hk, D), mk(B, T, Hk, D), mk(Hk, CFG["block_len"], D)
    idx = torch.randint(-1, -(-L // CFG["block_size"]), (B, L, Hk, 2), generator=g,
                        dtype=torch.int32)
    br, gl = mk(3, B, L, Hq, D), mk(B, L, Hq, 3)
    return {
        "sliding_window_attention": lambda: bo.sliding_window_attention(
            q, k, v, CFG["window"], return_lse=True),
        "block_sparse_attention": lambda: bo.block_sparse_attention(
            q, k, v, idx, block_size=CFG["block_size"], return_lse=True),
        "compressed_attention": lambda: bo.compressed_attention(
            q, kc, vc, block_len=CFG["block_len"], stride=CFG["stride"], return_lse=True),
        "block_compress": lambda: bo.block_compress(
            k, CFG["block_len"], CFG["stride"], pos=pos, return_valid=True),
        "gate_fusion": lambda: (bo.gate_fusion(br, gl),),
    }


@pytest.mark.parametrize("op", AUTOGRAD_OPS[:-1])
def test_single_op_no_grad_fast_path(op):
    with_graph = _single_op_calls(torch.Generator().manual_seed(12), True)[op]()
    plain = _single_op_calls(torch.Generator().manual_seed(12), False)[op]()
    with torch.no_grad():
        no_grad = _single_op_calls(torch.Generator().manual_seed(12), True)[op]()
    assert with_graph[0].grad_fn is not None
    for a, b, c in zip(with_graph, plain, no_grad):
        assert b.grad_fn is None and c.grad_fn is None
        torch.testing.assert_close(b, a.detach(), rtol=0, atol=0)
        torch.testing.assert_close(c, a.detach(), rtol=0, atol=0)
