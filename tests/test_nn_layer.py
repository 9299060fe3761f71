"""BlossomAttention: wiring, padding, patterns, equivalences with the dense reference."""
import math

import pytest
import torch

from blossom_ops import reference
from blossom_ops.nn import BlossomAttention, dense_attention, ops_available
from blossom_ops.rope import apply_rope

BACKENDS = ["reference"] + (["ops"] if ops_available() else [])
DT = torch.float64


def make_layer(backend, **kw):
    torch.manual_seed(kw.pop("seed", 0))
    args = dict(hidden_size=32, num_heads=4, num_kv_heads=2, block_len=8, stride=4,
                block_size=8, top_n=2, window=3, backend=backend)
    args.update(kw)
    return BlossomAttention(**args).to(DT)


def inputs(B=2, L=29, hidden=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, hidden, generator=g, dtype=DT)
    lengths = torch.tensor([L, L - 9][:B])
    return x, lengths


def close(a, b, tol=1e-9):
    err = (a - b).abs().max().item()
    assert err <= tol, f"max abs error {err} > {tol}"


def padded_rows_equal_bias(layer, y, valid):
    expect = layer.out_proj.bias.expand_as(y)
    close(y[~valid], expect[~valid], 1e-12)


# --------------------------------------------------------------------------- construction
def test_parameters_and_gate_init():
    layer = make_layer("reference", compressed_branch=True)
    names = {n for n, _ in layer.named_parameters()}
    assert names == {f"{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "out_proj", "gate")
                     for w in ("weight", "bias")}
    assert layer.q_proj.out_features == 4 * 8 and layer.k_proj.out_features == 2 * 8
    assert layer.gate.out_features == 4 * 3
    assert torch.count_nonzero(layer.gate.weight) == 0 and torch.count_nonzero(layer.gate.bias) == 0
    mlp = make_layer("reference", compressor="mlp", compressed_branch=True)
    assert any(n.startswith("k_compressor.") for n, _ in mlp.named_parameters())
    assert any(n.startswith("v_compressor.") for n, _ in mlp.named_parameters())
    assert "pattern=blossom" in repr(layer)


@pytest.mark.parametrize("kw, msg", [
    (dict(num_heads=3, num_kv_heads=2, head_dim=8), "multiple of num_kv_heads"),
    (dict(num_heads=5), "not a multiple of num_heads"),
    (dict(pattern="sparse"), "pattern must be"),
    (dict(compressor="max"), "compressor must be"),
    (dict(backend="cuda"), "backend must be"),
    (dict(head_dim=7), "even head_dim"),
])
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        make_layer(**dict(dict(backend="reference"), **kw))


def test_bad_inputs():
    layer = make_layer("reference")
    x, lengths = inputs()
    with pytest.raises(ValueError, match="x must have shape"):
        layer(x[..., :16])
    with pytest.raises(ValueError, match="either lengths or valid"):
        layer(x, lengths=lengths, valid=torch.ones(2, 29, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid must have shape"):
        layer(x, valid=torch.ones(2, 28, dtype=torch.bool))
    with pytest.raises(ValueError, match="lengths must have shape"):
        layer(x, lengths=lengths[:1])


# --------------------------------------------------------------------------- dense pattern
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("rope", [True, False])
def test_dense_pattern_matches_reference(causal, rope):
    layer = make_layer("reference", pattern="dense", causal=causal, rope=rope)
    x, lengths = inputs()
    y = layer(x, lengths=lengths)
    q, k, v = layer.project(x)
    ok = reference.validity(2, 29, lengths=lengths)
    L = 29
    mask = ok[:, None, :, None] & ok[:, None, None, :]
    if causal:
        mask = mask & torch.ones(L, L, dtype=torch.bool).tril()
    o, _ = reference.dense_masked_attention(q, k, v, mask)
    expect = layer.out_proj(o.reshape(2, L, -1))
    close(y[ok], expect[ok])
    padded_rows_equal_bias(layer, y, ok)


def test_lengths_and_valid_agree():
    layer = make_layer("reference", pattern="dense")
    x, lengths = inputs()
    valid = torch.arange(29)[None] < lengths[:, None]
    close(layer(x, lengths=lengths), layer(x, valid=valid), 0.0)


def test_rope_makes_left_padding_equivalent_to_right_padding():
    """RoPE is relative: shifting a sequence right (left padding) leaves the dense output on
    its valid rows unchanged."""
    layer = make_layer("reference", pattern="dense", rope=True)
    x, _ = inputs(B=1, L=20)
    shift = 7
    xl = torch.cat([torch.randn(1, shift, 32, dtype=DT), x[:, :20 - shift]], dim=1)
    valid_r = torch.arange(20)[None] < 20 - shift
    valid_l = torch.arange(20)[None] >= shift
    yr = layer(x, valid=valid_r)
    yl = layer(xl, valid=valid_l)
    close(yr[valid_r], yl[valid_l])


def test_rope_rotation_is_relative():
    q = torch.randn(1, 10, 1, 8, dtype=DT)
    k = torch.randn(1, 10, 1, 8, dtype=DT)
    a = (apply_rope(q)[0, 6, 0] * apply_rope(k)[0, 2, 0]).sum()
    pos = torch.arange(10) + 100
    b = (apply_rope(q, positions=pos)[0, 6, 0] * apply_rope(k, positions=pos)[0, 2, 0]).sum()
    close(a, b, 1e-9)
    assert not torch.allclose(apply_rope(q), q)


# --------------------------------------------------------------------------- sparse pattern
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("branch3", [False, True])
def test_sparse_matches_reference_composition(backend, causal, branch3):
    """The layer equals the reference mechanism applied to the layer's own projections."""
    layer = make_layer(backend, causal=causal, compressed_branch=branch3)
    with torch.no_grad():  # a non-trivial gate
        layer.gate.weight.normal_(0, 0.3)
        layer.gate.bias.normal_(0, 0.5)
    x, lengths = inputs()
    y = layer(x, lengths=lengths)
    q, k, v = layer.project(x)
    o = reference.blossom_attention(q, k, v, layer.gate_logits(x), block_len=8, stride=4,
                                    block_size=8, top_n=2, window=3, causal=causal,
                                    lengths=lengths)
    expect = layer.out_proj(o.reshape(2, 29, -1))
    ok = reference.validity(2, 29, lengths=lengths)
    close(y[ok], expect[ok])
    padded_rows_equal_bias(layer, y, ok)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_window_only_gate_equals_dense(backend, causal):
    """window >= L makes the sliding branch dense; a gate that keeps only that branch
    (sigmoid(-1e4) = 0 and sigmoid(1e4) = 1 exactly in float64) makes the sparse layer
    equal the dense layer with the same weights."""
    L = 29
    sparse = make_layer(backend, causal=causal, window=L)
    with torch.no_grad():
        sparse.gate.bias.view(4, 2)[:, 0] = -1e4
        sparse.gate.bias.view(4, 2)[:, 1] = 1e4
    dense = make_layer(backend, causal=causal, pattern="dense")
    dense.load_state_dict(sparse.state_dict())
    x, lengths = inputs(L=L)
    ok = reference.validity(2, L, lengths=lengths)
    close(sparse(x, lengths=lengths)[ok], dense(x, lengths=lengths)[ok])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_full_coverage_with_initial_gate_equals_dense(backend, causal):
    """window >= L and top_n >= number of blocks: both branches are dense attention, and
    the zero-initialised gate gives 0.5 + 0.5 = 1, so the layer is exactly dense."""
    L = 29
    sparse = make_layer(backend, causal=causal, window=L, top_n=math.ceil(L / 8))
    dense = make_layer(backend, causal=causal, pattern="dense")
    dense.load_state_dict(sparse.state_dict())
    x, lengths = inputs(L=L)
    ok = reference.validity(2, L, lengths=lengths)
    close(sparse(x, lengths=lengths)[ok], dense(x, lengths=lengths)[ok])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("branch3", [False, True])
def test_mlp_compressor_composition(backend, branch3):
    layer = make_layer(backend, compressor="mlp", compressed_branch=branch3)
    x, lengths = inputs()
    y = layer(x, lengths=lengths)
    q, k, v = layer.project(x)
    ok = reference.validity(2, 29, lengths=lengths)
    k_cmp = layer.k_compressor(k, ok)
    g = layer.gate_logits(x)
    idx = reference.select_blocks(q, k_cmp, 2, block_size=8, stride=4, block_len=8,
                                  lengths=lengths)
    br = [reference.block_sparse_attention(q, k, v, idx, block_size=8, lengths=lengths),
          reference.sliding_window_attention(q, k, v, 3, lengths=lengths)]
    if branch3:
        v_cmp = layer.v_compressor(v, ok)
        br.append(reference.compressed_attention(q, k_cmp, v_cmp, block_len=8, stride=4,
                                                 lengths=lengths))
    expect = layer.out_proj(reference.gate_fusion(br, g).reshape(2, 29, -1))
    close(y[ok], expect[ok])


def test_mlp_compressor_windows_and_validity():
    """A compressed token whose window holds no valid position is 0; padded positions do
    not leak into the others."""
    from blossom_ops.nn import MLPCompressor
    torch.manual_seed(0)
    comp = MLPCompressor(2, 8, block_len=8, stride=4).to(DT)
    x = torch.randn(1, 20, 2, 8, dtype=DT)
    valid = torch.arange(20)[None] < 9
    out = comp(x, valid)
    assert out.shape == (1, 5, 2, 8)
    # windows end at 4, 8, 12, 16, 20: W_3 = [8, 16) holds position 8, W_4 = [12, 20) none
    assert torch.count_nonzero(out[0, 4]) == 0 and torch.count_nonzero(out[0, 3]) > 0
    x2 = x.clone()
    x2[:, 9:] = float("nan")
    x2[:, 9:] = 1e6
    close(comp(x2, valid), out, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_every_trained_parameter(backend):
    layer = make_layer(backend, compressor="mlp", compressed_branch=True)
    x, lengths = inputs()
    layer(x, lengths=lengths).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


def test_mlp_compressor_without_compressed_branch_gets_no_gradient():
    layer = make_layer("reference", compressor="mlp")
    x, lengths = inputs()
    layer(x, lengths=lengths).sum().backward()
    assert all(p.grad is None for p in layer.k_compressor.parameters())


# --------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("pattern", ["dense", "blossom"])
def test_dropout_only_in_training(pattern):
    layer = make_layer("reference", pattern=pattern, dropout=0.5)
    x, lengths = inputs(L=17)
    layer.eval()
    a, b = layer(x, lengths=lengths), layer(x, lengths=lengths)
    close(a, b, 0.0)
    layer.train()
    torch.manual_seed(3)
    c = layer(x, lengths=lengths)
    assert (c - a).abs().max() > 1e-3


def test_dense_attention_float_bias_and_padded_rows_finite():
    q = torch.randn(2, 6, 2, 4, dtype=DT, requires_grad=True)
    k = torch.randn(2, 6, 2, 4, dtype=DT)
    v = torch.randn(2, 6, 2, 4, dtype=DT)
    valid = torch.tensor([[True] * 6, [False] * 2 + [True] * 4])
    bias = torch.zeros(2, 1, 6, 6, dtype=DT).masked_fill(~valid[:, None, None, :], float("-inf"))
    out = dense_attention(q, k, v, causal=True, valid=valid, attn_bias=bias)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert torch.count_nonzero(out[1, :2]) == 0
