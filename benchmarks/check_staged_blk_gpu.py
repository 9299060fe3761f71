"""GPU check and timing of the block-chunk staged forward / dQ (attn_staged_tc.cuh,
attn_fwd_kernel_tc_blk / attn_dq_kernel_tc_blk) behind block_sparse_attention.

  check        out / lse / dq / dk / dv against the float64 reference, as a ratio to the error
               of the same-dtype PyTorch reference (the tests' rule: 2x forward, 3x backward,
               plus a rounding floor), bf16 / fp16, D in {16, 32, 64, 128}, G in {1, 2, 4, 8},
               block sizes 16, 32, 64 (block chunks) and 8 (per-slot fallback), causal or not,
               right / left / random padding, odd L, -1 and repeated indices, own-block
               entries; padded K / V rows filled with NaN (must not leak); two runs must be
               bit-identical. Then the same for the per-slot kernels of the other two
               policies: sliding_window_attention (WINDOW_CASES, dilated or not; query pairs)
               and compressed_attention (COMPRESSED_CASES).
  dump FILE    outputs of a fixed set of cases (forward + grads) to FILE, for an A/B against
               BLOSSOM_OPS_CUDA_STAGED=old (the per-slot kernels) in a second process:
  cmp A B      per case and tensor: max |a - b| and the number of elements whose bits differ.
               Expected: 0 differing elements at D = 64 / 128 without padding or with right
               padding (same chunk order and key positions; only probabilities < 2^-126 may
               differ), small rounding differences at D = 16 / 32 and with left / random padding;
               0 for every sliding-window case (LEAN per-slot kernels, same order).
  bench L D [Hk]  per-kernel CUDA time of block_sparse_attention forward + backward at B=64,
               Hq=8, Hk=2 (or the given Hk: 8 is plain multi-head attention, G = 1), bf16,
               block_size 16, top_n 4 (random distinct earlier blocks). The time comes first
               on each line.

Every case of check / dump prints a "start" line before it runs and an "ok" / "FAIL" / "done"
line with its times after (flushed): a kernel that never finishes is the last "start" without
its result. Do not filter the output. SYNC_EACH_STEP=1 synchronises after the forward and
after the backward (names the pass); ONLY=substring runs only the cases whose name contains
it. Run each command under `timeout -k 10` (a process stuck on a hung kernel may need the
KILL; check needs the float64 CPU references: ~140 s on 2 cores, far less on 16):

    timeout -k 10 120 env SYNC_EACH_STEP=1 ONLY="bfloat16 D=64 G=4 L=203" \
        python3 benchmarks/check_staged_blk_gpu.py dump /tmp/blk_one.pt
    timeout -k 10 300 python3 benchmarks/check_staged_blk_gpu.py dump /tmp/blk_new.pt
    timeout -k 10 300 env BLOSSOM_OPS_CUDA_STAGED=old \
        python3 benchmarks/check_staged_blk_gpu.py dump /tmp/blk_old.pt
    timeout -k 10 120 python3 benchmarks/check_staged_blk_gpu.py cmp /tmp/blk_new.pt /tmp/blk_old.pt
    timeout -k 10 400 python3 benchmarks/check_staged_blk_gpu.py check
    timeout -k 10 300 python3 benchmarks/check_staged_blk_gpu.py bench 4096 64
    timeout -k 10 300 env BLOSSOM_OPS_CUDA_STAGED=old \
        python3 benchmarks/check_staged_blk_gpu.py bench 4096 64
"""
from __future__ import annotations

import os
import sys
import time

import torch

import blossom_ops
from blossom_ops import reference as ref
from profile_gpu import kernel_times  # same directory

# A kernel that never finishes shows as the last "start" line without its "done": every case
# is announced before it runs and timed after (flushed at once, so a timeout or a kill keeps
# them). SYNC_EACH_STEP=1 also synchronises after the forward and after the backward, so the
# last line names the pass that hangs. ONLY=substring runs only the matching cases.
SYNC_EACH_STEP = os.environ.get("SYNC_EACH_STEP", "0") == "1"
ONLY = os.environ.get("ONLY", "")
T0 = time.time()


def progress(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f} s] {msg}", flush=True)


def step_sync(what: str) -> None:
    if SYNC_EACH_STEP:
        torch.cuda.synchronize()
        progress(f"  {what} finished on the GPU")


def make_idx(B, L, Hk, n, bs, causal, g, odd=True):
    """Random block indices, with -1, repeats and own-block entries mixed in."""
    C = -(-L // bs)
    i = torch.arange(L, device="cuda").view(1, L, 1, 1)
    hi = (i // bs + 1) if causal else torch.full_like(i, C)
    r = torch.rand(B, L, Hk, n, device="cuda", generator=g)
    idx = (r * hi.float()).long().clamp(max=C - 1)
    if odd:
        u = torch.rand(B, L, Hk, n, device="cuda", generator=g)
        idx = torch.where(u < 0.1, torch.full_like(idx, -1), idx)
        if n > 1:
            idx[..., -1] = torch.where(u[..., -1] > 0.8, idx[..., 0], idx[..., -1])
        idx = torch.where(u > 0.95, (i // bs).expand_as(idx), idx)
    return idx.int()


def make_valid(B, L, pad, g):
    if pad == "none":
        return None
    j = torch.arange(L, device="cuda")
    if pad == "right":
        return (j[None] < torch.tensor([L, max(1, L - 13)], device="cuda")[:B, None])
    if pad == "left":
        return (j[None] >= torch.tensor([0, min(L - 1, 7)], device="cuda")[:B, None])
    v = torch.rand(B, L, device="cuda", generator=g) < 0.7
    v[:, 0] = True
    return v


def run_call(call, mod, q, k, v, go, extra):
    """[out, lse, dq, dk, dv] of call(mod, q, k, v, *extra) -> (out, lse), mod = blossom_ops or
    the reference; extra holds the op's other tensors (indices, validity) on q's device."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = call(mod, *leaves, *extra)
    step_sync("forward")
    out.backward(go)
    step_sync("backward")
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]


def block_call(bs, causal):
    return lambda m, q, k, v, idx, valid: m.block_sparse_attention(
        q, k, v, idx, block_size=bs, causal=causal, valid=valid, return_lse=True)


def window_call(window, dilated, causal):
    return lambda m, q, k, v, valid: m.sliding_window_attention(
        q, k, v, window=window, dilated=dilated, causal=causal, valid=valid, return_lse=True)


def compressed_call(block_len, stride, causal):
    return lambda m, q, k, v, valid: m.compressed_attention(
        q, k, v, block_len=block_len, stride=stride, causal=causal, valid=valid,
        return_lse=True)


def run(q, k, v, go, idx, bs, causal, valid):
    return run_call(block_call(bs, causal), blossom_ops, q, k, v, go, (idx, valid))


CASES = [  # G, L, bs, n, causal, pad
    (4, 203, 16, 4, True, "none"), (4, 203, 16, 4, False, "right"), (1, 97, 16, 3, True, "left"),
    (2, 150, 32, 4, True, "random"), (8, 64, 16, 2, False, "none"), (4, 257, 64, 2, True, "right"),
    (4, 77, 8, 4, True, "none"), (3, 40, 16, 7, True, "random"), (4, 1100, 16, 4, True, "none"),
    (2, 17, 16, 1, False, "left"), (4, 33, 32, 31, True, "none"),
]


WINDOW_CASES = [  # G, L, window, causal, pad (dilated; check also runs them undilated)
    (4, 203, 8, True, "none"), (4, 300, 8, False, "right"), (1, 97, 3, True, "left"),
    (2, 1100, 8, True, "random"), (8, 40, 33, True, "none"),
]

COMPRESSED_CASES = [  # G, L, block_len, stride, causal, pad
    (4, 203, 32, 16, True, "none"), (4, 300, 32, 16, False, "right"),
    (1, 97, 16, 8, True, "left"), (2, 1100, 32, 16, True, "random"), (8, 40, 8, 8, True, "none"),
]


def case_key(dtype, D, G, L, bs, n, causal, pad) -> str:
    return f"{str(dtype)[6:]} D={D} G={G} L={L} bs={bs} n={n} causal={causal} pad={pad}"


def inputs(dtype, D, G, L, bs, n, causal, pad, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    B, Hk = 2, 2
    Hq = Hk * G
    mk = lambda h: torch.randn(B, L, h, D, device="cuda", generator=g).to(dtype)  # noqa: E731
    q, k, v, go = mk(Hq), mk(Hk), mk(Hk), mk(Hq)
    valid = make_valid(B, L, pad, g)
    if valid is not None:  # padded rows of K / V as NaN: nothing may leak
        k = torch.where(valid[..., None, None], k, torch.full_like(k, float("nan")))
        v = torch.where(valid[..., None, None], v, torch.full_like(v, float("nan")))
    idx = make_idx(B, L, Hk, n, bs, causal, g)
    return q, k, v, go, idx, valid


def block_cases():
    """The block-sparse cases ONLY selects, each announced by a "start" line: yields (key,
    inputs, bs, causal) with inputs = (q, k, v, go, idx, valid)."""
    for dtype in (torch.bfloat16, torch.float16):
        for D in (16, 32, 64, 128):
            for ci, (G, L, bs, n, causal, pad) in enumerate(CASES):
                key = case_key(dtype, D, G, L, bs, n, causal, pad)
                if ONLY and ONLY not in key:
                    continue
                progress(f"start {key}")
                yield key, inputs(dtype, D, G, L, bs, n, causal, pad, 100 + ci), bs, causal


def compare(key, call, q, k, v, go, extra, kv_valid) -> tuple[bool, float]:
    """Runs call twice on the GPU (bit-identical?) and compares with the float64 and the
    same-dtype references; kv_valid [B, rows of k] (or None) marks the key rows whose
    gradient exists and whose K / V may hold NaN (the references see zeros there)."""
    dtype = q.dtype
    names = ["out", "lse", "dq", "dk", "dv"]
    t_gpu = time.time()
    r1 = run_call(call, blossom_ops, q, k, v, go, extra)
    r2 = run_call(call, blossom_ops, q, k, v, go, extra)
    det = all(torch.equal(a, b) for a, b in zip(r1, r2))  # synchronises
    t_gpu = time.time() - t_gpu
    t_ref = time.time()
    c64 = lambda t: t.double().cpu()  # noqa: E731
    z = lambda t: t if kv_valid is None else torch.where(  # noqa: E731
        kv_valid[..., None, None], t, torch.zeros_like(t))
    cpu_extra = tuple(None if t is None else t.cpu() for t in extra)
    r64 = run_call(call, ref, c64(q), c64(z(k)), c64(z(v)), c64(go), cpu_extra)
    rlp = run_call(call, ref, q, z(k), z(v), go, extra)
    kvv = None if kv_valid is None else kv_valid.cpu()
    ok, msg, worst = det, [], 0.0
    for nm, a, r, lp in zip(names, r1, r64, rlp):
        a64, lp64 = a.double().cpu(), lp.double().cpu()
        fin = torch.isfinite(r)
        if nm in ("dk", "dv") and kvv is not None:  # padded keys: no gradient
            keep = kvv[..., None, None].expand_as(r)
            a64, lp64, r = a64[keep], lp64[keep], r[keep]
            fin = torch.isfinite(r)
        same_inf = torch.equal(torch.isinf(a64) & ~fin, ~fin) if nm == "lse" else True
        a64, lp64, r = a64[fin], lp64[fin], r[fin]
        e = (a64 - r).norm().item() / max(r.norm().item(), 1e-30)
        elp = (lp64 - r).norm().item() / max(r.norm().item(), 1e-30)
        nan = torch.isnan(a64).any().item()
        lim = (2 if nm in ("out", "lse") else 3) * elp + \
            (1e-2 if dtype == torch.bfloat16 else 2e-3)
        ok = ok and (not nan) and same_inf and e <= lim
        worst = max(worst, e / max(elp, 1e-30))
        msg.append(f"{nm} {e:.1e}/{elp:.1e}{' NaN' if nan else ''}")
    t_ref = time.time() - t_ref
    progress(f"{'ok  ' if ok else 'FAIL'} {key} det={det} | " + " | ".join(msg) +
             f" | gpu {t_gpu:.2f} s, references {t_ref:.2f} s")
    return ok, worst


def window_cases():
    """(key, inputs, window, causal) of the window cases ONLY selects (dump: dilated only)."""
    for dtype in (torch.bfloat16, torch.float16):
        for D in (16, 32, 64, 128):
            for ci, (G, L, window, causal, pad) in enumerate(WINDOW_CASES):
                key = (f"window {str(dtype)[6:]} D={D} G={G} L={L} w={window} causal={causal} "
                       f"pad={pad}")
                if ONLY and ONLY not in key:
                    continue
                progress(f"start {key}")
                yield key, inputs(dtype, D, G, L, 16, 1, causal, pad, 200 + ci), window, causal


def compressed_inputs(dtype, D, G, L, block_len, stride, causal, pad, seed):
    """q, k_cmp, v_cmp, go, valid: T = ceil(L / stride) compressed tokens (random, no NaN: the
    compressed validity is derived from valid, and invalid tokens are zeros in real use)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    B, Hk = 2, 2
    T = -(-L // stride)
    mk = lambda n, h: torch.randn(B, n, h, D, device="cuda", generator=g).to(dtype)  # noqa: E731
    return (mk(L, Hk * G), mk(T, Hk), mk(T, Hk), mk(L, Hk * G), make_valid(B, L, pad, g))


def check() -> int:
    worst, bad = 0.0, 0
    for key, (q, k, v, go, idx, valid), bs, causal in block_cases():
        ok, w = compare(key, block_call(bs, causal), q, k, v, go, (idx, valid), valid)
        bad, worst = bad + (0 if ok else 1), max(worst, w)
    for key, (q, k, v, go, _, valid), window, causal in window_cases():
        for dilated in (True, False):
            ok, w = compare(f"{key} dilated={dilated}", window_call(window, dilated, causal),
                            q, k, v, go, (valid,), valid)
            bad, worst = bad + (0 if ok else 1), max(worst, w)
    for dtype in (torch.bfloat16, torch.float16):
        for D in (16, 32, 64, 128):
            for ci, (G, L, bl, st, causal, pad) in enumerate(COMPRESSED_CASES):
                key = (f"compressed {str(dtype)[6:]} D={D} G={G} L={L} block_len={bl} "
                       f"stride={st} causal={causal} pad={pad}")
                if ONLY and ONLY not in key:
                    continue
                progress(f"start {key}")
                q, k, v, go, valid = compressed_inputs(dtype, D, G, L, bl, st, causal, pad,
                                                       300 + ci)
                ok, w = compare(key, compressed_call(bl, st, causal), q, k, v, go, (valid,), None)
                bad, worst = bad + (0 if ok else 1), max(worst, w)
    progress(f"worst error ratio {worst:.2f}; {bad} failing")
    return 1 if bad else 0


def dump(path: str) -> int:
    res = {}
    t0 = time.time()
    for key, (q, k, v, go, idx, valid), bs, causal in block_cases():
        res[key] = [t.cpu() for t in run(q, k, v, go, idx, bs, causal, valid)]
        progress(f"done  {key} ({time.time() - t0:.2f} s)")
        t0 = time.time()
    # The window's per-slot kernels (LEAN by default): against BLOSSOM_OPS_CUDA_STAGED=old,
    # same keys, same order, so 0 differing elements (probabilities below 2^-126 aside);
    # against SLOT_PAIRS=0 rounding-level (the second query of a pair sums in another order).
    for key, (q, k, v, go, _, valid), window, causal in window_cases():
        t0 = time.time()
        res[key] = [t.cpu() for t in run_call(window_call(window, True, causal), blossom_ops,
                                              q, k, v, go, (valid,))]
        progress(f"done  {key} ({time.time() - t0:.2f} s)")
    torch.save(res, path)
    progress(f"{len(res)} cases -> {path}")
    return 0


def cmp(pa: str, pb: str) -> int:
    a, b = torch.load(pa), torch.load(pb)
    for key in a:
        parts = []
        for nm, x, y in zip(["out", "lse", "dq", "dk", "dv"], a[key], b[key]):
            xi = x.view(torch.int16) if x.element_size() == 2 else x.view(torch.int32)
            yi = y.view(torch.int16) if y.element_size() == 2 else y.view(torch.int32)
            nd = (xi != yi).sum().item()
            fin = torch.isfinite(x) & torch.isfinite(y)
            md = (x.float()[fin] - y.float()[fin]).abs().max().item() if fin.any() else 0.0
            parts.append(f"{nm} {nd} ({md:.1e})")
        print(f"{key:60s} " + " | ".join(parts))
    return 0


def bench(L: int, D: int, Hk: int = 2) -> int:
    B, Hq, bs, n = 64, 8, 16, 4
    if Hq % Hk != 0:
        raise SystemExit(f"bench: Hk = {Hk} must divide Hq = {Hq}")
    g = torch.Generator(device="cuda").manual_seed(1)
    mk = lambda h: torch.randn(B, L, h, D, device="cuda", dtype=torch.bfloat16,  # noqa: E731
                               generator=g).requires_grad_()
    q, k, v = mk(Hq), mk(Hk), mk(Hk)
    # n distinct earlier blocks per (query, kv head), as select_blocks returns (-1 where fewer).
    C = -(-L // bs)
    own = (torch.arange(L, device="cuda") // bs).view(1, L, 1, 1)
    scores = torch.rand(B, L, Hk, C, device="cuda", generator=g)
    scores = scores.masked_fill(torch.arange(C, device="cuda").view(1, 1, 1, C) >= own, -1.0)
    top = scores.topk(n, dim=-1)
    idx = torch.where(top.values >= 0, top.indices, torch.full_like(top.indices, -1))
    idx = idx.sort(dim=-1).values.int()
    out = blossom_ops.block_sparse_attention(q, k, v, idx, block_size=bs, causal=True)
    go = torch.randn_like(out)

    def step():
        o = blossom_ops.block_sparse_attention(q, k, v, idx, block_size=bs, causal=True)
        torch.autograd.grad(o, (q, k, v), go)
    for ms, cnt, key in kernel_times(step, 5, warmup=2):
        print(f"{ms:8.3f} ms per step (x{cnt})  L={L} D={D} Hk={Hk}  {key[:90]}", flush=True)
    return 0


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "check"
    if cmd == "bench":
        sys.exit(bench(*(int(x) for x in sys.argv[2:5])))
    if cmd == "dump":
        sys.exit(dump(sys.argv[2]))
    if cmd == "cmp":
        sys.exit(cmp(sys.argv[2], sys.argv[3]))
    sys.exit(check())
