"""GPU check and timing of the fused short-sequence path of blossom_attention
(csrc/cuda/blossom_short.cu, taken for R == 2, half/bfloat16, D in {16, 32, 64}, L <= 256).

1. Correctness: blossom_ops.blossom_attention (out, the parts o_sel / lse_sel / o_win /
   lse_win, and the gradients of q, k, v, gate_logits) against the float64 reference
   composed from the SAME block indices (tests/test_blossom_attention.reference_given_idx),
   with the tests' tolerance rule (tests/helpers.py: 2x / 3x the error of the reference run
   in the same precision). Grid: bf16 and fp16, D in {16, 32, 64}, G in {1, 2, 4},
   L in {1, 7, 16, 50, 200, 256}, causal and not, plus padding (lengths / random valid)
   and strided (embedded) q/k/v cases, a bitwise determinism check of the backward, and a
   CUDA-graph capture replayed on new inputs (bit-identical to eager).
2. Timing: B=64, Hq=8, Hk=2, bf16, D in {16, 64}, L in {50, 200}, defaults (block_len 32,
   stride 16, block_size 16, top_n 4, window 8, dilated, causal), fwd and fwd+bwd, median
   of 20 CUDA-event timings after warmup, against SDPA (flash, is_causal=True, GQA).

Run it twice to A/B: as is (fused path) and with BLOSSOM_OPS_CUDA_SIMPLE=1 (old path).
Usage: python3 benchmarks/check_short_gpu.py [--quick] [--no-check] [--no-time]
Exits non-zero when a check fails.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import traceback

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

import blossom_ops  # noqa: E402
from helpers import Case, check_op_against_reference, nan_embedded  # noqa: E402
from test_blossom_attention import _inputs, _op_parts, reference_given_idx  # noqa: E402
from host_overhead_gpu import capture  # noqa: E402 (same directory)

CFG = dict(block_len=32, stride=16, block_size=16, top_n=4, window=8, dilated=True)


def run_case(case: Case, dtype, cfg, embed=False) -> None:
    t = _inputs(case, dtype, "cuda", cfg, 2, False)
    pad = case.padding_kwargs("cuda")
    captured = {}
    op = _op_parts(captured)
    if embed:  # q/k/v as strided views inside larger NaN-filled buffers (grads flow back)
        inner = op

        def op(q, k, v, **kw):
            return inner(nan_embedded(q), nan_embedded(k), nan_embedded(v), **kw)
    static = dict(causal=case.causal, **cfg, **pad)

    def ref_fn(**kw):
        return reference_given_idx(**kw, block_idx=captured["block_idx"])

    ctx = f"{case} cfg={cfg} dtype={dtype} embed={embed}"
    outs, _ = check_op_against_reference("blossom_attention", op, ref_fn, t,
                                         ["q", "k", "v", "gate_logits"], case.seed, dtype, ctx,
                                         static)
    assert not torch.isnan(outs[0]).any(), f"NaN in out: {ctx}"


def check_all(quick: bool) -> int:
    fails, total = 0, 0
    dtypes = [torch.bfloat16, torch.float16]
    dims = [16, 64] if quick else [16, 32, 64]
    groups = [1, 4] if quick else [1, 2, 4]
    lens = [1, 7, 50, 200] if quick else [1, 7, 16, 50, 200, 256]
    seed = 100
    cases = []
    for dtype, D, G, L, causal in itertools.product(dtypes, dims, groups, lens, (True, False)):
        seed += 1
        B = 1 if L >= 200 else 2
        cases.append((Case(B, L, 2 * G, 2, D, causal, "none", [L] * B, seed), dtype, CFG, False))
    # padding, odd configurations, strided inputs
    for dtype in dtypes:
        for causal in (True, False):
            seed += 1
            cases.append((Case(3, 50, 8, 2, 64, causal, "lengths", [50, 17, 0], seed), dtype,
                          CFG, False))
            seed += 1
            cases.append((Case(2, 200, 8, 2, 16, causal, "random", [200, 200], seed), dtype,
                          CFG, False))
            seed += 1
            cases.append((Case(2, 77, 6, 2, 32, causal, "left", [77, 30], seed), dtype,
                          dict(block_len=8, stride=4, block_size=8, top_n=3, window=3,
                               dilated=False), False))
            seed += 1
            cases.append((Case(2, 130, 16, 1, 64, causal, "lengths", [130, 64], seed), dtype,
                          dict(block_len=4, stride=2, block_size=2, top_n=5, window=1,
                               dilated=True), True))
    for case, dtype, cfg, embed in cases:
        total += 1
        try:
            run_case(case, dtype, cfg, embed)
        except Exception as e:  # report every failure, keep going
            fails += 1
            print(f"FAIL {case} {dtype} cfg={cfg} embed={embed}\n  {type(e).__name__}: "
                  f"{str(e)[:1500]}", flush=True)
    # bitwise determinism of forward and backward
    total += 1
    try:
        g = torch.Generator().manual_seed(5)
        B, L, Hq, Hk, D = 4, 200, 8, 2, 64
        q, k, v = (torch.randn(B, L, h, D, generator=g).to("cuda", torch.bfloat16)
                   for h in (Hq, Hk, Hk))
        gl = torch.randn(B, L, Hq, 2, generator=g).to("cuda", torch.bfloat16)
        go = torch.randn(B, L, Hq, D, generator=g).to("cuda", torch.bfloat16)
        res = []
        for _ in range(2):
            leaves = [x.clone().requires_grad_() for x in (q, k, v, gl)]
            out = blossom_ops.blossom_attention(*leaves)
            out.backward(go)
            res.append([out.detach()] + [x.grad for x in leaves])
        for a, b in zip(*res):
            assert torch.equal(a, b), "two runs differ"
    except Exception as e:
        fails += 1
        print(f"FAIL determinism: {type(e).__name__}: {e}", flush=True)
    total += 1
    try:
        check_graph_replay()
    except Exception as e:
        fails += 1
        print(f"FAIL graph replay: {type(e).__name__}: {e}", flush=True)
    print(f"check: {total - fails}/{total} passed "
          f"(BLOSSOM_OPS_CUDA_SIMPLE={os.environ.get('BLOSSOM_OPS_CUDA_SIMPLE', '')!r}, "
          f"BLOSSOM_OPS_CUDA_SHORT_MAX_LEN="
          f"{os.environ.get('BLOSSOM_OPS_CUDA_SHORT_MAX_LEN', '')!r})", flush=True)
    return fails


def check_graph_replay() -> None:
    """fwd+bwd of the short path captured in a CUDA graph, replayed on NEW inputs, equal bit
    for bit to eager on those inputs (sanitize_ops' graph test runs float32, which never
    takes the short path; new inputs catch state a replay would leave stale)."""
    B, L, Hq, Hk, D = 64, 200, 8, 2, 64
    g = torch.Generator().manual_seed(11)

    def fresh():
        return [torch.randn(B, L, h, w, generator=g).to("cuda", torch.bfloat16)
                for h, w in ((Hq, D), (Hk, D), (Hk, D), (Hq, 2), (Hq, D))]
    static = fresh()
    leaves = [x.requires_grad_() for x in static[:4]]

    def step():
        out = blossom_ops.blossom_attention(*leaves, **CFG)
        return (out,) + torch.autograd.grad(out, leaves, static[4])
    graph, captured = capture(step, warmup=2)
    for _ in range(2):
        new = fresh()
        with torch.no_grad():
            for dst, src in zip(static, new):
                dst.copy_(src)
        graph.replay()
        eager = step()
        torch.cuda.synchronize()
        for name, a, b in zip(("out", "dq", "dk", "dv", "dgate"), captured, eager):
            assert torch.equal(a, b), f"graph replay differs from eager in {name}"


def cuda_time(fn, warmup=10, reps=20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def sdpa_fn(q, k, v, gqa: bool):
    # [B, L, H, D] -> [B, H, L, D], flash backend. Without native GQA, k / v come expanded
    # to Hq heads by the caller (outside the timed region, which favours SDPA).
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        if gqa:
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)


def sdpa_inputs(q, k, v):
    """(k, v, gqa): native GQA when flash takes it, else k / v expanded to Hq heads."""
    try:
        sdpa_fn(q, k, v, True)
        return k, v, True
    except (TypeError, RuntimeError):
        G = q.shape[2] // k.shape[2]
        return (k.detach().repeat_interleave(G, 2).requires_grad_(),
                v.detach().repeat_interleave(G, 2).requires_grad_(), False)


def time_all() -> None:
    B, Hq, Hk = 64, 8, 2
    print(f"timing on {torch.cuda.get_device_name()}, bf16, B={B} Hq={Hq} Hk={Hk}, ms "
          f"(median of 20; SDPA flash, causal, GQA native or pre-expanded)")
    print(f"{'D':>3} {'L':>4} | {'ours fwd':>9} {'sdpa fwd':>9} {'ratio':>6} | "
          f"{'ours f+b':>9} {'sdpa f+b':>9} {'ratio':>6}")
    for D, L in itertools.product((16, 64), (50, 200)):
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(B, L, h, D, generator=g).to("cuda", torch.bfloat16)
                   .requires_grad_() for h in (Hq, Hk, Hk))
        gl = torch.randn(B, L, Hq, 2, generator=g).to("cuda", torch.bfloat16).requires_grad_()
        go = torch.randn(B, L, Hq, D, generator=g).to("cuda", torch.bfloat16)
        go_t = go.transpose(1, 2)

        def ours_f():
            with torch.no_grad():
                blossom_ops.blossom_attention(q, k, v, gl)

        def ours_fb():
            out = blossom_ops.blossom_attention(q, k, v, gl)
            torch.autograd.grad(out, (q, k, v, gl), go)

        ks, vs, gqa = sdpa_inputs(q, k, v)

        def sdpa_f():
            with torch.no_grad():
                sdpa_fn(q, ks, vs, gqa)

        def sdpa_fb():
            out = sdpa_fn(q, ks, vs, gqa)
            torch.autograd.grad(out, (q, ks, vs), go_t)

        of, sf = cuda_time(ours_f), cuda_time(sdpa_f)
        ofb, sfb = cuda_time(ours_fb), cuda_time(sdpa_fb)
        print(f"{D:>3} {L:>4} | {of:9.3f} {sf:9.3f} {of / sf:6.2f} | {ofb:9.3f} {sfb:9.3f} "
              f"{ofb / sfb:6.2f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller correctness grid")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-time", action="store_true")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    fails = 0
    if not args.no_check:
        fails = check_all(args.quick)
    if not args.no_time:
        try:
            time_all()
        except Exception:
            traceback.print_exc()
            fails += 1
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
