"""Adapter for torch.nn.MultiheadAttention / TransformerEncoderLayer / TransformerEncoder."""
import copy
import math

import pytest
import torch
from torch import nn

from blossom_ops import reference
from blossom_ops.integrations.torch_mha import patch_torch_mha, unpatch_torch_mha
from blossom_ops.nn import ops_available

BACKEND = "ops" if ops_available() else "reference"
DT = torch.float64
E, H, L, B = 32, 4, 21, 3
LENGTHS = torch.tensor([L, 14, 5])
VALID = torch.arange(L)[None] < LENGTHS[:, None]
# window >= L and top_n >= ceil(L / block_size): both branches are dense attention and the
# fixed gate weights 0.5 + 0.5 add up to exactly dense attention.
FULL = dict(block_len=8, stride=4, block_size=8, top_n=math.ceil(L / 8), window=L,
            backend=BACKEND)
SMALL = dict(block_len=8, stride=4, block_size=8, top_n=1, window=3, backend=BACKEND)


def close(a, b, tol=1e-9):
    err = (a - b).abs().max().item()
    assert err <= tol, f"max abs error {err} > {tol}"


def mha(batch_first=True, **kw):
    torch.manual_seed(0)
    return nn.MultiheadAttention(E, H, batch_first=batch_first, **kw).to(DT).eval()


def x_in(batch_first=True, seed=1):
    x = torch.randn(B, L, E, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return x if batch_first else x.transpose(0, 1)


def rows(y, batch_first=True):
    return (y if batch_first else y.transpose(0, 1))[VALID]


def causal_bool():
    return torch.ones(L, L, dtype=torch.bool).triu(1)


MASKS = {
    "none": lambda: dict(),
    "kpm_bool": lambda: dict(key_padding_mask=~VALID),
    "kpm_float": lambda: dict(key_padding_mask=torch.zeros(B, L, dtype=DT).masked_fill(
        ~VALID, float("-inf"))),
    "causal_bool": lambda: dict(attn_mask=causal_bool(), key_padding_mask=~VALID),
    "causal_float": lambda: dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(
        L, dtype=DT), key_padding_mask=~VALID),
    "causal_flag": lambda: dict(attn_mask=causal_bool(), is_causal=True),
    "causal_3d": lambda: dict(attn_mask=causal_bool()[None].expand(B * H, L, L)),
}


# --------------------------------------------------------------------------- dense == host
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", list(MASKS))
def test_dense_pattern_equals_unpatched(batch_first, mask):
    host = mha(batch_first)
    patched = patch_torch_mha(copy.deepcopy(host), pattern="dense")
    x = x_in(batch_first)
    kw = MASKS[mask]()
    want = host(x, x, x, need_weights=False, **kw)[0]
    got, weights = patched(x, x, x, need_weights=False, **kw)
    assert weights is None
    close(rows(got, batch_first), rows(want, batch_first))


def test_dense_pattern_separate_projection_weights_and_unbatched():
    torch.manual_seed(0)
    host = nn.MultiheadAttention(E, H, kdim=24, vdim=20, batch_first=True).to(DT)
    assert not host._qkv_same_embed_dim
    patched = patch_torch_mha(copy.deepcopy(host), pattern="dense")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, L, d, generator=g, dtype=DT) for d in (E, 24, 20))
    kpm = ~VALID
    close(rows(patched(q, k, v, key_padding_mask=kpm)[0]),
          rows(host(q, k, v, key_padding_mask=kpm)[0]))
    close(patched(q[0], k[0], v[0])[0], host(q[0], k[0], v[0])[0])


def test_arbitrary_mask_dense_only():
    host = mha()
    x = x_in()
    m = torch.rand(L, L, generator=torch.Generator().manual_seed(5)) < 0.3
    m.fill_diagonal_(False)
    dense = patch_torch_mha(copy.deepcopy(host), pattern="dense")
    close(dense(x, x, x, attn_mask=m)[0], host(x, x, x, attn_mask=m)[0])
    sparse = patch_torch_mha(copy.deepcopy(host), **SMALL)
    with pytest.raises(ValueError, match="causal or bidirectional"):
        sparse(x, x, x, attn_mask=m)


def test_refuses_cross_attention_of_other_length():
    patched = patch_torch_mha(mha(), **SMALL)
    x = x_in()
    with pytest.raises(ValueError, match="same length"):
        patched(x, x[:, :5], x[:, :5])


# --------------------------------------------------------------------------- sparse
@pytest.mark.parametrize("mask", ["kpm_bool", "causal_bool", "causal_float"])
def test_sparse_full_coverage_equals_unpatched(mask):
    host = mha()
    patched = patch_torch_mha(copy.deepcopy(host), **FULL)
    x = x_in()
    kw = MASKS[mask]()
    close(rows(patched(x, x, x, **kw)[0]), rows(host(x, x, x, need_weights=False, **kw)[0]))


@pytest.mark.parametrize("causal", [True, False])
def test_sparse_equals_reference_mechanism(causal):
    """Sparse pattern (window covering the sequence, one selected block) equals the
    dense-mask reference of the mechanism applied to the module's own projections."""
    host = mha()
    cfg = dict(SMALL, window=L)
    patched = patch_torch_mha(copy.deepcopy(host), **cfg)
    x = x_in()
    kw = dict(key_padding_mask=~VALID)
    if causal:
        kw["attn_mask"] = causal_bool()
    y = patched(x, x, x, **kw)[0]
    w = host.in_proj_weight.chunk(3)
    b = host.in_proj_bias.chunk(3)
    q, k, v = (torch.nn.functional.linear(x, wi, bi).view(B, L, H, E // H)
               for wi, bi in zip(w, b))
    o = reference.blossom_attention(q, k, v, torch.zeros(B, L, H, 2, dtype=DT), block_len=8,
                                    stride=4, block_size=8, top_n=1, window=L, causal=causal,
                                    valid=VALID)
    close(y[VALID], host.out_proj(o.reshape(B, L, E))[VALID])


# --------------------------------------------------------------------------- encoder layer
def encoder(batch_first=True, norm_first=False):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=48, dropout=0.0,
                                       batch_first=batch_first, norm_first=norm_first)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).to(DT).eval()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_fast_path_is_bypassed(batch_first, norm_first):
    host = encoder(batch_first, norm_first)
    patched = patch_torch_mha(copy.deepcopy(host), pattern="dense")
    calls = []
    for m in patched.modules():
        if isinstance(m, nn.MultiheadAttention):
            m.register_forward_hook(lambda *a: calls.append(1))
    x = x_in(batch_first)
    with torch.no_grad():  # inference: the host takes its fused fast path
        want = host(x, src_key_padding_mask=~VALID)
        got = patched(x, src_key_padding_mask=~VALID)
        got_causal = patched(x, mask=causal_bool(), src_key_padding_mask=~VALID, is_causal=True)
        want_causal = host(x, mask=causal_bool(), src_key_padding_mask=~VALID, is_causal=True)
    assert len(calls) == 4, "the patched attention modules were not called"
    close(rows(got, batch_first), rows(want, batch_first))
    close(rows(got_causal, batch_first), rows(want_causal, batch_first))
    assert patched.use_nested_tensor is False


def test_encoder_sparse_full_coverage_equals_unpatched():
    host = encoder()
    patched = patch_torch_mha(copy.deepcopy(host), **FULL)
    x = x_in()
    with torch.no_grad():
        close(rows(patched(x, mask=causal_bool(), src_key_padding_mask=~VALID)),
              rows(host(x, mask=causal_bool(), src_key_padding_mask=~VALID)))


# --------------------------------------------------------------------------- patch mechanics
def test_print_idempotence_and_unpatch():
    model = encoder()
    before = repr(model)
    patch_torch_mha(model, **SMALL)
    text = repr(model)
    assert "BlossomMultiheadAttention" in text and "BlossomTransformerEncoderLayer" in text
    assert "window=3" in text
    cls = type(model.layers[0].self_attn)
    patch_torch_mha(model, **dict(SMALL, window=5))
    assert type(model.layers[0].self_attn) is cls, "patching twice must not stack classes"
    assert model.layers[0].self_attn.blossom.window == 5
    unpatch_torch_mha(model)
    unpatch_torch_mha(model)
    assert type(model.layers[0].self_attn) is nn.MultiheadAttention
    assert type(model.layers[0]) is nn.TransformerEncoderLayer
    assert repr(model) == before and model.use_nested_tensor is True


def test_state_dict_round_trip():
    model = encoder()
    keys = set(model.state_dict())
    patch_torch_mha(model, **SMALL)
    sd = copy.deepcopy(model.state_dict())
    assert set(sd) == keys
    unpatch_torch_mha(model)
    res = model.load_state_dict(sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    fresh = patch_torch_mha(encoder(), **SMALL)
    res = fresh.load_state_dict(sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys


def test_learned_gate_adds_and_removes_parameters():
    model = patch_torch_mha(encoder(), **dict(SMALL, learned_gate=True))
    gate_keys = {k for k in model.state_dict() if "blossom_gate" in k}
    assert len(gate_keys) == 4  # weight and bias in each of 2 layers
    x = x_in()
    model.train()
    model(x, src_key_padding_mask=~VALID).sum().backward()
    assert all(model.layers[i].self_attn.blossom_gate.weight.grad.abs().sum() > 0
               for i in range(2))
    unpatch_torch_mha(model)
    assert not any("blossom_gate" in k for k in model.state_dict())


def test_class_patching():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H, batch_first=True)

    patch_torch_mha(Tiny, **SMALL)
    try:
        assert type(Tiny().attn).__name__ == "BlossomMultiheadAttention"
        patch_torch_mha(Tiny, **SMALL)  # idempotent
        assert type(Tiny().attn).__name__ == "BlossomMultiheadAttention"
    finally:
        unpatch_torch_mha(Tiny)
    assert type(Tiny().attn) is nn.MultiheadAttention

    patch_torch_mha(nn.MultiheadAttention, **SMALL)
    try:
        enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, batch_first=True), 1,
                                    enable_nested_tensor=False)
        assert "BlossomMultiheadAttention" in repr(enc)
        assert "BlossomTransformerEncoderLayer" in repr(enc)
    finally:
        unpatch_torch_mha(nn.MultiheadAttention)
    assert type(nn.MultiheadAttention(E, H)) is nn.MultiheadAttention


# --------------------------------------------------------------------------- convergence
class SeqModel(nn.Module):
    """Causal encoder predicting the previous token (inside the sliding window)."""

    def __init__(self, vocab=12):
        super().__init__()
        self.emb = nn.Embedding(vocab, E)
        self.pos = nn.Parameter(torch.randn(32, E))
        layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.0,
                                           batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(E, vocab)

    def forward(self, tokens):
        n = tokens.shape[1]
        x = self.emb(tokens) + self.pos[:n]
        return self.head(self.enc(x, mask=torch.ones(n, n, dtype=torch.bool).triu(1),
                                  is_causal=True))


def train(model, steps=40):
    g = torch.Generator().manual_seed(7)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        tok = torch.randint(0, 12, (8, 16), generator=g)
        logits = model(tok)[:, 1:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, 12), tok[:, :-1].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_convergence_patched_vs_unpatched():
    torch.manual_seed(0)
    host = SeqModel()
    patched = patch_torch_mha(copy.deepcopy(host), **SMALL)
    a, b = train(host), train(patched)
    # mean of the last 5 steps: single minibatch losses are noisy
    a_end, b_end = sum(a[-5:]) / 5, sum(b[-5:]) / 5
    assert a_end < 0.5 * a[0] and b_end < 0.5 * b[0], (a[0], a_end, b[0], b_end)
    # close: the patched model trains no worse than the host (better is allowed: a local
    # window suits this task)
    assert b_end < a_end + 0.1 * a[0], (a_end, b_end)
