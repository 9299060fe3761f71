"""Bad input raises RuntimeError/ValueError with a message naming the problem; never a crash
and never a silently wrong result. Each case builds otherwise good inputs and breaks one
thing."""
import re

import pytest
import torch

import blossom_ops as bo

B, L, Hk, G, D = 2, 20, 2, 2, 8
Hq = Hk * G


def _qkv(device, dtype=torch.float32, L=L, D=D, Hq=Hq, Hk=Hk, Lk=None):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, L, Hq, D, generator=g, dtype=dtype).to(device)
    k = torch.randn(B, Lk or L, Hk, D, generator=g, dtype=dtype).to(device)
    v = torch.randn(B, Lk or L, Hk, D, generator=g, dtype=dtype).to(device)
    return q, k, v


def expect_error(fn, pattern):
    """fn() must raise RuntimeError or ValueError whose message matches `pattern`
    (case-insensitive) and is a user-facing message, not an internal assertion."""
    with pytest.raises((RuntimeError, ValueError)) as info:
        fn()
    msg = str(info.value)
    assert re.search(pattern, msg, re.IGNORECASE | re.DOTALL), \
        f"message does not mention {pattern!r}: {msg}"
    assert "INTERNAL ASSERT" not in msg, msg


def _idx(device, n=2, C=None, dtype=torch.int32, L=L):
    C = C if C is not None else -(-L // 4)
    return torch.randint(-1, C, (B, L, Hk, n), dtype=dtype,
                         generator=torch.Generator().manual_seed(1)).to(device)


# Each attention operator as fn(q, k, v, **kw) with every other argument valid.
ATTENTION_OPS = {
    "sliding_window_attention": lambda q, k, v, **kw: bo.sliding_window_attention(
        q, k, v, 4, **kw),
    "block_sparse_attention": lambda q, k, v, **kw: bo.block_sparse_attention(
        q, k, v, _idx(q.device, L=q.shape[1]), block_size=4, **kw),
    "blossom_attention": lambda q, k, v, **kw: bo.blossom_attention(
        q, k, v, torch.zeros(*q.shape[:3], 2, dtype=q.dtype, device=q.device), block_len=8,
        stride=4, block_size=4, top_n=2, window=3, **kw),
    "compressed_attention": lambda q, k, v, **kw: bo.compressed_attention(
        q, k[:, :5], v[:, :5], block_len=8, stride=4, **kw),
}
attention_ops = pytest.mark.parametrize("name", list(ATTENTION_OPS))


@attention_ops
def test_good_inputs_pass(device, name):
    q, k, v = _qkv(device)
    out = ATTENTION_OPS[name](q, k, v)
    assert out.shape == q.shape


@attention_ops
def test_wrong_rank(device, name):
    q, k, v = _qkv(device)
    expect_error(lambda: ATTENTION_OPS[name](q[0], k, v), r"q must have shape|q.*shape")
    expect_error(lambda: ATTENTION_OPS[name](q, k[..., None], v), r"k.*shape")


@attention_ops
def test_mismatched_batch_length_and_head_dim(device, name):
    q, k, v = _qkv(device)
    expect_error(lambda: ATTENTION_OPS[name](q, k[:1], v[:1]), r"shape")
    expect_error(lambda: ATTENTION_OPS[name](q[:, :-5], k, v), r"shape|seq|length")
    expect_error(lambda: ATTENTION_OPS[name](q, k[..., :4], v[..., :4]), r"shape|head_dim")
    expect_error(lambda: ATTENTION_OPS[name](q, k, v[:, :, :1]), r"v.*shape|shape")


@attention_ops
def test_query_heads_not_multiple_of_kv_heads(device, name):
    q, k, v = _qkv(device, Hq=3, Hk=2)
    expect_error(lambda: ATTENTION_OPS[name](q, k, v), r"multiple")


@attention_ops
@pytest.mark.parametrize("bad_d", [0, 300])
def test_head_dim_out_of_range(device, name, bad_d):
    q, k, v = _qkv(device, D=bad_d)
    expect_error(lambda: ATTENTION_OPS[name](q, k, v), r"head_dim")


@attention_ops
def test_non_contiguous_last_dim(device, name):
    q, k, v = _qkv(device, D=16)
    expect_error(lambda: ATTENTION_OPS[name](q[..., ::2], k[..., ::2], v[..., ::2]),
                 r"contiguous")
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # right shape, stride(-1) != 1
    expect_error(lambda: ATTENTION_OPS[name](qt, k, v), r"contiguous")


@attention_ops
def test_mixed_dtypes(device, name):
    q, k, v = _qkv(device)
    expect_error(lambda: ATTENTION_OPS[name](q, k.double() if device == "cpu" else k.half(), v),
                 r"dtype")


@attention_ops
def test_unsupported_dtype(device, name):
    q, k, v = (t.to(torch.int32) for t in _qkv(device))
    expect_error(lambda: ATTENTION_OPS[name](q, k, v), r"dtype")


@attention_ops
def test_mixed_devices(device, name):
    if not torch.cuda.is_available():
        pytest.skip("needs a second device (CUDA)")
    q, k, v = _qkv("cuda")
    expect_error(lambda: ATTENTION_OPS[name](q, k.cpu(), v), r"device")


@attention_ops
def test_padding_arguments(device, name):
    q, k, v = _qkv(device)
    lengths = torch.tensor([L, 3], device=device)
    valid = torch.ones(B, L, dtype=torch.bool, device=device)
    expect_error(lambda: ATTENTION_OPS[name](q, k, v, lengths=lengths, valid=valid),
                 r"either lengths or valid")
    expect_error(lambda: ATTENTION_OPS[name](q, k, v, valid=valid[:, :-1]), r"valid.*shape")
    expect_error(lambda: ATTENTION_OPS[name](q, k, v, valid=valid.int()), r"valid.*bool")
    expect_error(lambda: ATTENTION_OPS[name](q, k, v, lengths=lengths[:1]), r"lengths.*shape")
    expect_error(lambda: ATTENTION_OPS[name](q, k, v, lengths=lengths.float()),
                 r"lengths.*integer")


@attention_ops
@pytest.mark.parametrize("bad", [[L + 1, 3], [-1, 3]])
def test_lengths_outside_range(name, bad):
    # CPU only: on CUDA a range check would need a host sync, so lengths are clamped there
    # (csrc/common/checks.h).
    q, k, v = _qkv("cpu")
    expect_error(lambda: ATTENTION_OPS[name](q, k, v, lengths=torch.tensor(bad)), r"lengths")


def test_window_below_one(device):
    q, k, v = _qkv(device)
    expect_error(lambda: bo.sliding_window_attention(q, k, v, 0), r"window")
    gl = torch.zeros(B, L, Hq, 2, device=device)
    expect_error(lambda: bo.blossom_attention(q, k, v, gl, window=0), r"window")


# --------------------------------------------------------------------------- block_compress
def test_block_compress_checks(device):
    x = _qkv(device)[1]
    expect_error(lambda: bo.block_compress(x, 4, 8), r"block_len")          # block_len < stride
    expect_error(lambda: bo.block_compress(x, 4, 0), r"stride")
    expect_error(lambda: bo.block_compress(x[0], 8, 4), r"shape|dim")
    pos = torch.zeros(Hk, 8, D, device=device)
    expect_error(lambda: bo.block_compress(x, 8, 4, pos=pos[:, :5]), r"pos")
    expect_error(lambda: bo.block_compress(x, 8, 4, pos=pos.double()), r"pos|dtype")
    expect_error(lambda: bo.block_compress(x, 8, 4, pos=pos[:1]), r"pos")
    expect_error(lambda: bo.block_compress(x, 8, 4, lengths=torch.tensor([1, 2], device=device),
                                           valid=torch.ones(B, L, dtype=torch.bool,
                                                            device=device)),
                 r"either lengths or valid")
    expect_error(lambda: bo.block_compress(x.to(torch.int64), 8, 4), r"dtype")


# --------------------------------------------------------------------------- select_blocks
def test_select_blocks_checks(device):
    q, k, _ = _qkv(device)
    kc = k[:, :5]  # T = ceil(20 / 4) = 5
    ok = dict(block_size=4, stride=4, block_len=8)
    assert bo.select_blocks(q, kc, 2, **ok).shape == (B, L, Hk, 2)
    expect_error(lambda: bo.select_blocks(q, kc, 0, **ok), r"top_n")
    expect_error(lambda: bo.select_blocks(q, kc, 2, block_size=6, stride=4, block_len=8),
                 r"block_size.*multiple|multiple.*stride")
    expect_error(lambda: bo.select_blocks(q, kc, 2, block_size=4, stride=4, block_len=2),
                 r"block_len")
    expect_error(lambda: bo.select_blocks(q, k[:, :4], 2, **ok), r"k_cmp|shape")
    expect_error(lambda: bo.select_blocks(q, kc[..., :4], 2, **ok), r"k_cmp|shape|head_dim")
    expect_error(lambda: bo.select_blocks(q[..., :3, :], kc, 2, **ok), r"multiple")
    expect_error(lambda: bo.select_blocks(q, kc.double() if device == "cpu" else kc.half(), 2,
                                          **ok), r"dtype")


# --------------------------------------------------------------------------- block_sparse
def test_block_sparse_index_checks(device):
    q, k, v = _qkv(device)
    idx = _idx(device)
    expect_error(lambda: bo.block_sparse_attention(q, k, v, idx.long(), block_size=4),
                 r"block_idx.*int32|int32|dtype")
    expect_error(lambda: bo.block_sparse_attention(q, k, v, idx.float(), block_size=4),
                 r"block_idx.*int32|int32|dtype")
    expect_error(lambda: bo.block_sparse_attention(q, k, v, idx[:, :5], block_size=4),
                 r"block_idx.*shape")
    expect_error(lambda: bo.block_sparse_attention(q, k, v, idx[:, :, :1], block_size=4),
                 r"block_idx.*shape")
    expect_error(lambda: bo.block_sparse_attention(q, k, v, idx[..., 0], block_size=4),
                 r"block_idx.*shape")
    expect_error(lambda: bo.block_sparse_attention(q, k, v, idx, block_size=0), r"block_size")


@pytest.mark.parametrize("bad", [5, 100, -2])
def test_block_sparse_out_of_range_entries(bad):
    # CPU: checked before any work. (On CUDA this would need a host sync.)
    q, k, v = _qkv("cpu")
    idx = _idx("cpu").clone()
    idx[1, 7, 1, 0] = bad  # C = ceil(20 / 4) = 5: valid entries are -1 .. 4
    expect_error(lambda: bo.block_sparse_attention(q, k, v, idx, block_size=4), r"block_idx")


# --------------------------------------------------------------------------- gate_fusion
def test_gate_fusion_checks(device):
    br = torch.randn(2, B, L, Hq, D, device=device)
    gl = torch.randn(B, L, Hq, 2, device=device)
    assert bo.gate_fusion(br, gl).shape == (B, L, Hq, D)
    expect_error(lambda: bo.gate_fusion(br, gl[..., :1]), r"gate_logits")
    expect_error(lambda: bo.gate_fusion(br, gl[:, :3]), r"gate_logits|shape")
    expect_error(lambda: bo.gate_fusion(br[0], gl), r"branches|shape")
    expect_error(lambda: bo.gate_fusion(br, gl.double() if device == "cpu" else gl.half()),
                 r"dtype")
    expect_error(lambda: bo.gate_fusion(br[..., ::2], gl), r"contiguous")


# --------------------------------------------------------------------------- blossom
def test_blossom_config_checks(device):
    q, k, v = _qkv(device)
    gl = torch.zeros(B, L, Hq, 2, device=device)
    cfg = dict(block_len=8, stride=4, block_size=4, top_n=2, window=3)
    assert bo.blossom_attention(q, k, v, gl, **cfg).shape == q.shape
    expect_error(lambda: bo.blossom_attention(q, k, v, gl, **{**cfg, "block_size": 6}),
                 r"block_size.*multiple|multiple.*stride")
    expect_error(lambda: bo.blossom_attention(q, k, v, gl, **{**cfg, "block_len": 2}),
                 r"block_len")
    expect_error(lambda: bo.blossom_attention(q, k, v, gl, **{**cfg, "top_n": 0}), r"top_n")
    expect_error(lambda: bo.blossom_attention(q, k, v, gl, **{**cfg, "window": 0}), r"window")
    expect_error(lambda: bo.blossom_attention(q, k, v, gl, **{**cfg, "stride": 0}), r"stride")
    expect_error(lambda: bo.blossom_attention(q, k, v, torch.zeros(B, L, Hq, 4, device=device),
                                              **cfg), r"gate_logits")
    expect_error(lambda: bo.blossom_attention(q, k, v, gl[:, :4], **cfg), r"gate_logits")
    pos = torch.zeros(Hk, 8, D, device=device)
    expect_error(lambda: bo.blossom_attention(q, k, v, gl, k_pos=pos[:, :3], **cfg), r"k_pos")
    expect_error(lambda: bo.blossom_attention(q, k, v, gl, v_pos=pos[:1], **cfg), r"v_pos")
