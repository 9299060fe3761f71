"""Shared pieces of the operator tests: devices and dtypes, hypothesis strategies, input
builders, the tolerance rule and the worst-element report.

The tolerance rule (one place, used by every numeric test):
  * float64: |actual - ref| <= 1e-10 * (|ref| + max(1, max|ref|)) elementwise.
  * float32: the same with 2e-5 (forward) / 5e-5 (backward): "relative-ish", the absolute
    part scales with the tensor's magnitude because sums of many terms lose absolute, not
    relative, precision.
  * bfloat16 / float16: max|actual - ref64| <= 2x (forward) or 3x (backward) the max error
    of the plain PyTorch reference run in that same precision, plus a rounding floor of one
    eps of the dtype times the tensor's magnitude (the output itself is rounded to it).
The ground truth ref64 is always the reference run in float64 on the *same* rounded
inputs, so input quantisation never counts as kernel error.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence

import torch
from hypothesis import strategies as st

import blossom_ops
from blossom_ops import reference as ref

# --------------------------------------------------------------------------- devices, dtypes
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

LOW_PRECISION = (torch.bfloat16, torch.float16)


def dtypes_for(device: str) -> list:
    """float64 only on CPU (no fast path for it on GPUs), float16 only on CUDA."""
    if device == "cpu":
        return [torch.float64, torch.float32, torch.bfloat16]
    return [torch.float32, torch.bfloat16, torch.float16]


DEVICE_DTYPES = [(d, t) for d in DEVICES for t in dtypes_for(d)]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- strategies
# Lengths that stress the block logic: 1, just below/above a power of two, a prime, and
# a free draw up to ~300.
SPECIAL_LENGTHS = [1, 2, 3, 15, 16, 17, 31, 33, 64, 97, 100, 129, 255, 300]
seq_lens = st.one_of(st.sampled_from(SPECIAL_LENGTHS), st.integers(1, 300))
head_dims = st.sampled_from([8, 24, 40, 64, 16, 13])
group_sizes = st.sampled_from([1, 2, 4])
kv_heads = st.sampled_from([1, 2])
seeds = st.integers(0, 2**31 - 1)
PAD_KINDS = ("none", "lengths", "right", "left", "random")

# Keep B * L small: the reference is dense O(L^2) Python and the CPU suite must stay fast.
MAX_TOKENS = 360


@dataclasses.dataclass
class Case:
    """Sizes and padding of one drawn example; tensors come from `seed`."""
    B: int
    L: int
    Hq: int
    Hk: int
    D: int
    causal: bool
    pad: str           # one of PAD_KINDS
    lens: list         # per-batch number of valid positions (for lengths/right/left)
    seed: int

    @property
    def G(self) -> int:
        return self.Hq // self.Hk

    def validity(self) -> torch.Tensor:
        """bool [B, L] on CPU."""
        pos = torch.arange(self.L)
        n = torch.tensor(self.lens, dtype=torch.long)
        if self.pad in ("none",):
            return torch.ones(self.B, self.L, dtype=torch.bool)
        if self.pad in ("lengths", "right"):
            return pos[None, :] < n[:, None]
        if self.pad == "left":
            return pos[None, :] >= (self.L - n)[:, None]
        g = torch.Generator().manual_seed(self.seed ^ 0x5A5A)
        return torch.rand(self.B, self.L, generator=g) < 0.7

    def padding_kwargs(self, device) -> dict:
        """lengths= or valid= for the operator call (none for no padding)."""
        if self.pad == "none":
            return {}
        if self.pad == "lengths":
            return {"lengths": torch.tensor(self.lens, dtype=torch.int64, device=device)}
        return {"valid": self.validity().to(device)}


@st.composite
def cases(draw, max_tokens: int = MAX_TOKENS, max_len: int = 300, pad_kinds=PAD_KINDS,
          heads=True) -> Case:
    L = min(draw(seq_lens), max_len)
    B = draw(st.integers(1, max(1, min(4, max_tokens // L))))
    Hk = draw(kv_heads) if heads else 1
    G = draw(group_sizes) if heads else 1
    D = draw(head_dims)
    causal = draw(st.booleans())
    pad = draw(st.sampled_from(pad_kinds))
    # lengths include the edge cases 0 and L
    lens = draw(st.lists(st.one_of(st.just(0), st.just(L), st.integers(0, L)),
                         min_size=B, max_size=B))
    return Case(B, L, Hk * G, Hk, D, causal, pad, lens, draw(seeds))


# --------------------------------------------------------------------------- tensor builders
def randn(gen: torch.Generator, shape, dtype, device, scale: float = 1.0) -> torch.Tensor:
    """Normal values drawn on the CPU in float64 (so every device/dtype sees the same
    numbers), rounded to `dtype`."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    return x.to(dtype).to(device)


def as_ref64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Exact float64 copy of a (possibly rounded) input, on the CPU, as a fresh leaf."""
    if t is None:
        return None
    if t.is_floating_point():
        return t.detach().to("cpu", torch.float64).requires_grad_(t.requires_grad)
    return t.detach().cpu()


def as_lowp_ref(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Same values, same dtype, for the reference run in low precision (a fresh leaf)."""
    if t is None:
        return None
    if t.is_floating_point():
        return t.detach().clone().requires_grad_(t.requires_grad)
    return t.detach().clone()


# --------------------------------------------------------------------------- runs with grads
def finite_or_zero(t: torch.Tensor) -> torch.Tensor:
    """lse is -inf on rows with no key; such rows take no part in the loss (and the
    torch.where keeps their gradient exactly 0)."""
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def cotangent(seed: int, r: int, shape, dtype) -> torch.Tensor:
    """Random upstream gradient for output r, rounded to the run's input dtype so that the
    float64 and low-precision runs see exactly the same values."""
    g = torch.Generator().manual_seed(seed * 16 + r + 7)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(torch.float64)


def forward_backward(fn: Callable, inputs: Dict[str, torch.Tensor], grad_names: Sequence[str],
                     cot_seed: int, cot_dtype: torch.dtype):
    """Runs fn(**inputs) -> tensor or tuple of float outputs, backpropagates
    sum_r sum(out_r * cot_r) and returns (outputs detached, {name: grad}) for the inputs
    named in grad_names."""
    outs = _as_tuple(fn(**inputs))
    loss = 0
    for r, o in enumerate(outs):
        c = cotangent(cot_seed, r, o.shape, cot_dtype).to(o.device, o.dtype)
        loss = loss + (finite_or_zero(o) * c).sum()
    leaves = [inputs[n] for n in grad_names]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if leaves else ()
    return tuple(o.detach() for o in outs), dict(zip(grad_names, grads))


def _as_tuple(x):
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


# --------------------------------------------------------------------------- comparison
_ELEMENTWISE = {  # dtype -> (forward rtol, backward rtol)
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 5e-5),
}


def _fmt_index(flat: int, shape) -> tuple:
    idx = []
    for s in reversed(list(shape)):
        idx.append(flat % s if s else 0)
        flat = flat // s if s else 0
    return tuple(reversed(idx))


def _report(name: str, actual: torch.Tensor, expected: torch.Tensor, err: torch.Tensor,
            bound_desc: str, lowp: Optional[torch.Tensor] = None, context: str = "") -> str:
    flat = int(torch.argmax(torch.nan_to_num(err, nan=float("inf"))).item())
    idx = _fmt_index(flat, actual.shape)
    a = actual.reshape(-1)[flat].item()
    e = expected.reshape(-1)[flat].item()
    msg = (f"{name}: mismatch {bound_desc}\n  worst element at index {idx}: actual={a!r} "
           f"reference(float64)={e!r} |diff|={abs(a - e) if a == a else 'nan'}")
    if lowp is not None:
        msg += f" reference(low precision)={lowp.reshape(-1)[flat].item()!r}"
    n_bad = int((err > 0).sum().item()) if bound_desc.startswith("(elementwise") else None
    if n_bad is not None:
        msg += f"\n  {n_bad} of {actual.numel()} elements out of tolerance"
    if context:
        msg += f"\n  case: {context}"
    return msg


def assert_close(name: str, actual: Optional[torch.Tensor], expected: Optional[torch.Tensor],
                 dtype: torch.dtype, *, backward: bool = False,
                 lowp: Optional[torch.Tensor] = None, context: str = "") -> None:
    """Checks `actual` (the operator, any device, run in `dtype`) against `expected`
    (the reference in float64) with the tolerance rule above. `lowp` is the reference run
    in `dtype`, required for bfloat16/float16. Non-finite values must match exactly
    (e.g. lse = -inf on empty rows); a NaN anywhere fails."""
    if expected is None:
        assert actual is None or not torch.count_nonzero(actual).item(), \
            f"{name}: expected no gradient, got a non-zero one"
        return
    assert actual is not None, f"{name}: operator returned no gradient"
    assert tuple(actual.shape) == tuple(expected.shape), \
        f"{name}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
    assert not torch.isnan(expected).any(), f"{name}: the reference itself produced NaN"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if torch.isnan(a).any():
        err = torch.isnan(a).to(torch.float64)
        raise AssertionError(_report(name, a, e, err, "(NaN in the output)", context=context))
    fin = torch.isfinite(e)
    bad_inf = (~fin & (a != e)) | (fin & ~torch.isfinite(a))
    if bad_inf.any():
        raise AssertionError(_report(name, a, e, bad_inf.to(torch.float64),
                                     "(non-finite values differ)", context=context))
    a = torch.where(fin, a, torch.zeros_like(a))
    e = torch.where(fin, e, torch.zeros_like(e))
    diff = (a - e).abs()
    mag = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    if dtype in _ELEMENTWISE:
        rtol = _ELEMENTWISE[dtype][1 if backward else 0]
        over = diff - rtol * (e.abs() + mag)
        if (over > 0).any():
            raise AssertionError(_report(name, a, e, over.clamp(min=0),
                                         f"(elementwise rtol={rtol:g}, atol={rtol * mag:g})",
                                         context=context))
        return
    assert lowp is not None, f"{name}: low-precision check needs the reference run in {dtype}"
    lp = lowp.detach().to("cpu", torch.float64)
    lp = torch.where(fin, lp, torch.zeros_like(lp))
    ref_err = (lp - e).abs().max().item() if e.numel() else 0.0
    factor = 3.0 if backward else 2.0
    floor = torch.finfo(dtype).eps * mag
    bound = factor * ref_err + floor
    worst = diff.max().item() if diff.numel() else 0.0
    if worst > bound:
        raise AssertionError(_report(
            name, a, e, diff,
            f"(max error {worst:.3g} > {factor:g} x reference-in-{dtype_id(dtype)} error "
            f"{ref_err:.3g} + floor {floor:.3g})", lowp=lp, context=context))


def assert_empty_rows(name: str, out: torch.Tensor, lse: torch.Tensor,
                      ref_lse: torch.Tensor) -> None:
    """Rows whose reference lse is -inf (no allowed key) must be exactly 0 with lse -inf,
    and nothing may be NaN."""
    assert not torch.isnan(out).any(), f"{name}: NaN in the output"
    assert not torch.isnan(lse).any(), f"{name}: NaN in lse"
    empty = torch.isneginf(ref_lse.detach().cpu())
    if empty.any():
        o = out.detach().cpu()[empty]
        assert (o == 0).all(), f"{name}: rows with no allowed key must be 0, got max |o| = " \
                               f"{o.abs().max().item()}"
        assert torch.isneginf(lse.detach().cpu()[empty]).all(), \
            f"{name}: rows with no allowed key must have lse = -inf"


def _leaf(v, grad: bool):
    if v is None or not isinstance(v, torch.Tensor) or not v.is_floating_point():
        return v
    return v.detach().clone().requires_grad_(grad)


def check_op_against_reference(name: str, op: Callable, ref_fn: Callable,
                               inputs: Dict[str, torch.Tensor], grad_names: Sequence[str],
                               seed: int, dtype: torch.dtype, context: str = "",
                               static: Optional[dict] = None):
    """The whole numeric comparison of one example: `op` on the inputs' device and dtype,
    the reference in float64 (ground truth) and, for low precision, the reference in
    `dtype`. Compares every output and the gradient of every input in grad_names.
    `inputs` are the tensors (floating ones get fresh leaves per run); `static` holds
    everything passed unchanged (ints, flags, index and padding tensors).
    Returns (op outputs, float64 reference outputs)."""
    static = static or {}
    op_in = {k: _leaf(v, k in grad_names) for k, v in inputs.items()}
    outs, grads = forward_backward(lambda **kw: op(**kw, **static), op_in, grad_names,
                                   seed, dtype)
    static64 = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in static.items()}
    r64_in = {k: as_ref64(v) for k, v in op_in.items()}
    r64_outs, r64_grads = forward_backward(lambda **kw: ref_fn(**kw, **static64), r64_in,
                                           grad_names, seed, dtype)
    lp_outs, lp_grads = None, {}
    if dtype in LOW_PRECISION:
        lp_in = {k: as_lowp_ref(v) for k, v in op_in.items()}
        lp_outs, lp_grads = forward_backward(lambda **kw: ref_fn(**kw, **static), lp_in,
                                             grad_names, seed, dtype)
    assert len(outs) == len(r64_outs), f"{name}: {len(outs)} outputs, reference {len(r64_outs)}"
    for r, (o, e) in enumerate(zip(outs, r64_outs)):
        assert_close(f"{name} output {r}", o, e, dtype,
                     lowp=None if lp_outs is None else lp_outs[r], context=context)
    for g in grad_names:
        assert_close(f"{name} grad {g}", grads[g], r64_grads[g], dtype, backward=True,
                     lowp=lp_grads.get(g), context=context)
    return outs, r64_outs


# --------------------------------------------------------------------------- NaN padding
def nan_embedded(x: torch.Tensor, extra_len: int = 5, extra_heads: int = 1,
                 extra_dim: int = 8) -> torch.Tensor:
    """The same values as x [B, L, H, D], viewed out of a larger NaN-filled buffer: longer
    sequence, more heads and a wider last dim, so the view is strided (last dim still
    contiguous) and everything past L, H and D in memory is NaN.

    extra_dim is 8 so rows keep the 16-byte alignment of the contiguous tensor: the CUDA
    kernels pick their vector path by alignment, and the two paths round differently. This
    test is about out-of-range reads (results must stay bit-identical), not about layout."""
    B, L, H, D = x.shape
    buf = torch.full((B, L + extra_len, H + extra_heads, D + extra_dim), float("nan"),
                     dtype=x.dtype, device=x.device)
    view = buf[:, :L, :H, :D]
    view.copy_(x)
    return view


def nan_where_invalid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x with NaN at the sequence positions the semantics ignore (valid[b, j] False);
    keeps the strided view."""
    with torch.no_grad():
        x[~valid.to(x.device)] = float("nan")
    return x


# --------------------------------------------------------------------------- select_blocks
def selection_tolerance(dtype: torch.dtype, G: int, same_keys: bool = False) -> float:
    """How close two block importances (sums of up to G probabilities) may be and still
    count as tied, given the precision the kernel scores in.

    same_keys: the reference scores exactly the 16-bit q and compressed keys the kernel got
    (select_blocks itself), so the only difference is the kernel's float32 arithmetic and a
    16-bit input gets float32's margin. Otherwise (blossom_attention, the fused short path)
    the kernel may score compressed keys rounded to `dtype` that the reference computes in
    float64, and the margin covers that rounding of the logits."""
    if same_keys and dtype in (torch.bfloat16, torch.float16):
        dtype = torch.float32
    base = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 3e-2,
            torch.float16: 5e-3}[dtype]
    return base * max(1, G)


def assert_selection_valid(name: str, idx: torch.Tensor, importance: torch.Tensor,
                           cand: torch.Tensor, top_n: int, tol: float, context: str = "") -> None:
    """Tie-aware check of a top-n block selection.

    idx [B, L, Hk, n] int32 (the operator), importance [B, L, Hk, C] float64 and cand
    [B, L, C] bool (reference.select_blocks_scores). Rules:
      * ascending, no duplicates, -1 only as trailing padding, exactly min(n, #candidates)
        entries, each a candidate;
      * forced entries (importance above the n-th best by more than tol) must be chosen,
        entries below it by more than tol must not: forced entries compared exactly;
      * the remaining (tied within tol) entries are free: any of them may fill the rest,
        so they are compared as sets via the count.
    On a mismatch the message shows the chosen and expected blocks with their scores.
    """
    idx = idx.detach().cpu().long()
    assert idx.dtype == torch.long and idx.dim() == 4 and idx.shape[-1] == top_n, \
        f"{name}: shape {tuple(idx.shape)}"
    B, L, Hk, n = idx.shape
    C = importance.shape[-1]
    cand_h = cand[:, :, None, :].expand(B, L, Hk, C)
    n_cand = cand_h.sum(-1)
    want = n_cand.clamp(max=top_n)
    is_pad = idx == -1
    # structure: entries in [-1, C), -1 only trailing, strictly ascending among real ones
    assert ((idx >= -1) & (idx < C)).all(), f"{name}: entry outside [-1, {C})"
    n_real = (~is_pad).sum(-1)
    pos = torch.arange(n)
    trailing_ok = (is_pad == (pos >= n_real[..., None])).all(-1)
    asc_ok = torch.ones(B, L, Hk, dtype=torch.bool)
    if n > 1:
        nxt_real = ~is_pad[..., 1:]
        asc_ok = (~nxt_real | (idx[..., 1:] > idx[..., :-1])).all(-1)
    chosen = torch.zeros(B, L, Hk, C + 1, dtype=torch.bool)
    chosen.scatter_(3, torch.where(is_pad, C, idx), True)
    chosen = chosen[..., :C]
    in_cand = (~chosen | cand_h).all(-1)
    # tie-aware membership
    imp = importance.detach().cpu().to(torch.float64).masked_fill(~cand_h, float("-inf"))
    kth = torch.full((B, L, Hk), float("-inf"), dtype=torch.float64)
    if C >= top_n:
        kth = imp.topk(top_n, dim=-1).values[..., -1]
    kth = torch.where(n_cand > top_n, kth, torch.full_like(kth, float("-inf")))
    forced_in = cand_h & (imp > kth[..., None] + tol)
    forced_out = cand_h & (imp < kth[..., None] - tol)
    membership_ok = (~forced_in | chosen).all(-1) & (~forced_out | ~chosen).all(-1)
    ok = trailing_ok & asc_ok & in_cand & (n_real == want) & membership_ok
    if ok.all():
        return
    b, i, g = [int(x) for x in (~ok).nonzero()[0]]
    cands = cand_h[b, i, g].nonzero().flatten().tolist()
    scores = {c: round(imp[b, i, g, c].item(), 12) for c in cands}
    ranked = sorted(cands, key=lambda c: (-imp[b, i, g, c].item(), c))[:top_n]
    raise AssertionError(
        f"{name}: wrong selection at (b={b}, i={i}, kv_head={g}) "
        f"[{int((~ok).sum())} of {ok.numel()} rows wrong]\n"
        f"  operator chose {idx[b, i, g].tolist()} with scores "
        f"{[scores.get(c) for c in idx[b, i, g].tolist() if c >= 0]}\n"
        f"  reference top-{top_n}: {sorted(ranked)} with scores "
        f"{[scores[c] for c in sorted(ranked)]}\n"
        f"  checks: structure={bool(trailing_ok[b, i, g] and asc_ok[b, i, g])} "
        f"candidates={bool(in_cand[b, i, g])} count={int(n_real[b, i, g])}/{int(want[b, i, g])} "
        f"forced={bool(membership_ok[b, i, g])} (tie tol {tol:g})\n"
        f"  all candidate scores: {scores}\n  case: {context}")
