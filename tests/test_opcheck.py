"""torch.library.opcheck on every operator and every backward operator: schema, fake
kernel, autograd registration and AOT dispatch (dynamic shapes), on small samples with and
without requires_grad, without padding, with lengths and with a validity mask."""
import pytest
import torch

import blossom_ops  # noqa: F401  (registers the ops)

ops = torch.ops.blossom_ops
B, L, Hk, G, D = 2, 11, 2, 2, 8
Hq = Hk * G
BLOCK_LEN, STRIDE, BLOCK_SIZE, TOP_N, WINDOW = 4, 2, 4, 2, 3
T = -(-L // STRIDE)
C = -(-L // BLOCK_SIZE)
SCALE = D ** -0.5


def _t(g, *shape, device, grad=False):
    return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)


def _padding(device):
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    return {"none": (None, None),
            "lengths": (torch.tensor([L, 6], device=device), None),
            "valid": (None, valid.to(device))}


def forward_samples(device, grad):
    """(op name, args) for every forward op, under every padding."""
    g = torch.Generator().manual_seed(0)
    out = []
    for pad_name, (lengths, valid) in _padding(device).items():
        q = _t(g, B, L, Hq, D, device=device, grad=grad)
        k = _t(g, B, L, Hk, D, device=device, grad=grad)
        v = _t(g, B, L, Hk, D, device=device, grad=grad)
        kc = _t(g, B, T, Hk, D, device=device, grad=grad)
        vc = _t(g, B, T, Hk, D, device=device, grad=grad)
        pos = _t(g, Hk, BLOCK_LEN, D, device=device, grad=grad)
        idx = torch.randint(-1, C, (B, L, Hk, 3), generator=g, dtype=torch.int32).to(device)
        for causal in (True, False):
            out += [
                ("sliding_window_attention",
                 (q, k, v, lengths, valid, WINDOW, True, causal, SCALE)),
                ("block_sparse_attention",
                 (q, k, v, idx, lengths, valid, BLOCK_SIZE, causal, SCALE)),
                ("compressed_attention",
                 (q, kc, vc, lengths, valid, BLOCK_LEN, STRIDE, causal, SCALE)),
                ("select_blocks",
                 (q.detach(), kc.detach(), lengths, valid, TOP_N, BLOCK_SIZE, STRIDE, BLOCK_LEN,
                  causal, SCALE)),
            ]
            for R in (2, 3):
                gl = _t(g, B, L, Hq, R, device=device, grad=grad)
                out.append(("blossom_attention",
                            (q, k, v, gl, pos if R == 3 else None, pos, lengths, valid,
                             BLOCK_LEN, STRIDE, BLOCK_SIZE, TOP_N, WINDOW, False, causal,
                             SCALE)))
        out.append(("block_compress", (k, pos, lengths, valid, BLOCK_LEN, STRIDE)))
        out.append(("block_compress", (k, None, lengths, valid, BLOCK_LEN, STRIDE)))
    br = _t(g, 3, B, L, Hq, D, device=device, grad=grad)
    out.append(("gate_fusion", (br, _t(g, B, L, Hq, 3, device=device, grad=grad))))
    return [(f"{name}-{i}", name, args) for i, (name, args) in enumerate(out)]


def _ids(samples):
    return [s[0] for s in samples]


_CPU_FWD = forward_samples("cpu", False)


@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("sample", range(len(_CPU_FWD)), ids=_ids(_CPU_FWD))
def test_opcheck_forward(device, grad, sample):
    _, name, args = forward_samples(device, grad)[sample]
    torch.library.opcheck(getattr(ops, name).default, args)


def backward_samples(device):
    """Backward ops, fed with a real forward's outputs."""
    g = torch.Generator().manual_seed(1)
    q = _t(g, B, L, Hq, D, device=device)
    k = _t(g, B, L, Hk, D, device=device)
    v = _t(g, B, L, Hk, D, device=device)
    kc = _t(g, B, T, Hk, D, device=device)
    vc = _t(g, B, T, Hk, D, device=device)
    pos = _t(g, Hk, BLOCK_LEN, D, device=device)
    idx = torch.randint(-1, C, (B, L, Hk, 3), generator=g, dtype=torch.int32).to(device)
    lengths = torch.tensor([L, 6], device=device)
    go = _t(g, B, L, Hq, D, device=device)
    glse = _t(g, B, L, Hq, device=device)
    out = []
    for gl_arg in (glse, None):
        o, lse = ops.sliding_window_attention(q, k, v, lengths, None, WINDOW, True, True, SCALE)
        out.append(("sliding_window_attention_backward",
                    (go, gl_arg, q, k, v, o, lse, lengths, None, WINDOW, True, True, SCALE)))
        o, lse = ops.block_sparse_attention(q, k, v, idx, lengths, None, BLOCK_SIZE, True, SCALE)
        out.append(("block_sparse_attention_backward",
                    (go, gl_arg, q, k, v, o, lse, idx, lengths, None, BLOCK_SIZE, True, SCALE)))
        o, lse = ops.compressed_attention(q, kc, vc, lengths, None, BLOCK_LEN, STRIDE, True,
                                          SCALE)
        out.append(("compressed_attention_backward",
                    (go, gl_arg, q, kc, vc, o, lse, lengths, None, BLOCK_LEN, STRIDE, True,
                     SCALE)))
    gc = _t(g, B, T, Hk, D, device=device)
    out.append(("block_compress_backward", (gc, k, pos, lengths, None, BLOCK_LEN, STRIDE)))
    out.append(("block_compress_backward", (gc, k, None, lengths, None, BLOCK_LEN, STRIDE)))
    br = _t(g, 3, B, L, Hq, D, device=device)
    out.append(("gate_fusion_backward", (go, br, _t(g, B, L, Hq, 3, device=device))))
    for R in (2, 3):
        gate = _t(g, B, L, Hq, R, device=device)
        res = ops.blossom_attention(q, k, v, gate, pos, pos, lengths, None, BLOCK_LEN, STRIDE,
                                    BLOCK_SIZE, TOP_N, WINDOW, True, True, SCALE)
        out.append(("blossom_attention_backward",
                    (go, q, k, v, gate, pos, pos, lengths, None) + tuple(res[1:]) +
                    (BLOCK_LEN, STRIDE, BLOCK_SIZE, TOP_N, WINDOW, True, True, SCALE)))
    return [(f"{name}-{i}", name, args) for i, (name, args) in enumerate(out)]


_BWD_NAMES = ["sliding_window_attention_backward", "block_sparse_attention_backward",
              "compressed_attention_backward"] * 2 + [
    "block_compress_backward", "block_compress_backward", "gate_fusion_backward",
    "blossom_attention_backward", "blossom_attention_backward"]


@pytest.mark.parametrize("sample", range(len(_BWD_NAMES)),
                         ids=[f"{n}-{i}" for i, n in enumerate(_BWD_NAMES)])
def test_opcheck_backward(device, sample):
    _, name, args = backward_samples(device)[sample]
    assert name == _BWD_NAMES[sample]
    # backward ops have no autograd formula of their own (no double backward)
    torch.library.opcheck(getattr(ops, name).default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


def test_every_op_is_covered():
    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("blossom_ops::")}
    covered = {s[1] for s in _CPU_FWD} | set(_BWD_NAMES)
    assert len(registered) >= 13, sorted(registered)
    assert registered <= covered, f"ops without opcheck coverage: {sorted(registered - covered)}"
