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
