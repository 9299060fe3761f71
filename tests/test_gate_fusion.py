"""gate_fusion (sigmoid-gated sum of branches) against the float64 reference: output and the
gradients of the branches and of the gate logits."""
import torch
from hypothesis import given, strategies as st

import blossom_ops
from blossom_ops import reference as ref

from helpers import cases, check_op_against_reference, nan_embedded, randn


def _inputs(case, dtype, device, R):
    g = torch.Generator().manual_seed(case.seed)
    br = randn(g, (R, case.B, case.L, case.Hq, case.D), dtype, device)
    gl = randn(g, (case.B, case.L, case.Hq, R), dtype, device, 2.0)
    return br, gl


@given(case=cases(pad_kinds=("none",)), R=st.integers(1, 3))
def test_matches_reference(device, dtype, case, R):
    br, gl = _inputs(case, dtype, device, R)
    ctx = f"{case} R={R} dtype={dtype}"
    (out,), _ = check_op_against_reference(
        "gate_fusion", blossom_ops.gate_fusion, ref.gate_fusion,
        dict(branches=br, gate_logits=gl), ["branches", "gate_logits"], case.seed, dtype, ctx)
    assert out.dtype == dtype and out.shape == br.shape[1:]


def test_list_of_branches_equals_stacked(device):
    br, gl = _inputs_small(device)
    assert torch.equal(blossom_ops.gate_fusion(list(br), gl), blossom_ops.gate_fusion(br, gl))


def _inputs_small(device):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 2, 7, 4, 8, generator=g).to(device),
            torch.randn(2, 7, 4, 2, generator=g).to(device))


@given(case=cases(max_tokens=200, pad_kinds=("none",)), R=st.integers(1, 3))
def test_strided_nan_surrounded_inputs(device, case, R):
    """Branches and logits viewed out of NaN-filled buffers give the identical result."""
    br, gl = _inputs(case, torch.float32, device, R)
    out = blossom_ops.gate_fusion(br, gl)
    buf = torch.full((R + 1,) + tuple(br.shape[1:-1]) + (br.shape[-1] + 5,), float("nan"),
                     device=device)
    br2 = buf[:R, ..., :br.shape[-1]]
    br2.copy_(br)
    gl2 = nan_embedded(gl)
    out2 = blossom_ops.gate_fusion(br2, gl2)
    assert not torch.isnan(out2).any()
    assert torch.equal(out2, out)


# blossom_attention's composed path (L > 256) applies the gate in the window forward's
# epilogue on CUDA (csrc/cuda/attn_gate_epilogue.cuh) and claims the same bits as the gate
# kernel on the stored branch outputs: compare with gate_fusion itself, exactly. The shapes
# cover the query-pair kernel (G = 4, 2, 1; odd L: a last pair with one query; D 16 / 32 / 64
# / 128; padding) and its fallbacks (G = 8, D = 24, fp32, non-contiguous gate logits), which
# run the gate kernel and must agree as well. On CPU it checks the composition the same way.
_GATE_SHAPES = [  # (B, L, Hq, Hk, D, R, pad)
    (2, 300, 8, 2, 64, 2, False), (1, 517, 4, 1, 16, 3, True), (2, 301, 2, 1, 32, 2, True),
    (1, 263, 2, 2, 128, 3, False), (1, 280, 8, 1, 64, 2, False), (1, 270, 4, 2, 24, 3, False),
]


def test_blossom_gate_equals_gate_kernel(device, dtype):
    g = torch.Generator().manual_seed(7)
    for B, L, Hq, Hk, D, R, pad in _GATE_SHAPES:
        if device == "cpu" and D == 128:
            continue  # keeps the CPU suite short; the composition is the same at every D
        q = randn(g, (B, L, Hq, D), dtype, device)
        k = randn(g, (B, L, Hk, D), dtype, device)
        v = randn(g, (B, L, Hk, D), dtype, device)
        gl = randn(g, (B, L, Hq, R), dtype, device, 2.0)
        lengths = (torch.tensor([L - 37] + [L] * (B - 1), device=device) if pad else None)
        strided = torch.cat([gl, gl], -1)[..., :R]  # last dim contiguous, rows 2R apart
        assert not strided.is_contiguous()
        for logits in (gl, strided):
            out, parts = blossom_ops.blossom_attention(q, k, v, logits, lengths=lengths,
                                                       return_parts=True)
            br = [parts["o_sel"], parts["o_win"]] + ([parts["o_cmp"]] if R == 3 else [])
            want = blossom_ops.gate_fusion(br, logits)
            ctx = f"B={B} L={L} Hq={Hq} Hk={Hk} D={D} R={R} pad={pad} {dtype} {device}"
            assert out.dtype == dtype and out.shape == want.shape, ctx
            assert torch.equal(out, want), (ctx, (out.float() - want.float()).abs().max().item())
