"""A/B of the gate fold in blossom_attention's CUDA backward (BLOSSOM_OPS_CUDA_GATE_FOLD).

The switch is read once per process, so each route runs in a child process; the parent
compares the gradients of both routes with a float64 reference on the CPU (same rule as
scripts/sanitize_ops.py: relative Frobenius error at most 3x that of the reference run in the
input dtype on the GPU, plus a floor) and prints the backward time of each route (median of
CUDA-event timings; compare only numbers from one run, one card).
Cases cover the composed path the fold changes: bf16/fp16 with L > 256 (staged kernels),
fp32 and odd head_dim (generic SIMT kernels), R = 3 (compressed branch), padding, and
BLOSSOM_OPS_CUDA_SIMPLE=1 (every kernel generic). A fourth route turns off the fused
block-sparse + window dQ (BLOSSOM_OPS_CUDA_FUSED_DQ=0, csrc/cuda/attn_dq_fused.cuh): its
grad_k, grad_v and grad_gate must equal the default route's bit for bit (only the dQ kernels
differ), grad_q by rounding only (the separate kernels round dQ twice). That route also
turns off the fused forward (BLOSSOM_OPS_CUDA_FUSED_FWD=0, csrc/cuda/attn_fwd_fused.cuh):
out and every branch output and lse must equal the default route's bit for bit. A fifth route issues the fused dQ's second-branch prologue loads late
(BLOSSOM_OPS_CUDA_EARLY_LOADS=0, as before session 13) and a sixth builds the block-sparse
inverse index reading block_idx in place instead of one group of queries ahead
(BLOSSOM_OPS_CUDA_INDEX_AHEAD=0, as before session 17): on both, every output and gradient must
equal the default route's bit for bit.
    python3 benchmarks/check_gate_fold_gpu.py [--quick] [--time 64x4096]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch

CASES = [  # B, L, Hq, Hk, D, R, dtype, pad, causal
    (2, 300, 8, 2, 64, 2, "bfloat16", False, True),
    (2, 300, 8, 2, 64, 3, "bfloat16", True, True),
    (2, 333, 4, 4, 32, 2, "float16", True, False),
    (1, 290, 8, 2, 16, 3, "bfloat16", False, True),
    (2, 120, 4, 2, 24, 2, "float32", True, True),
    (1, 97, 6, 2, 13, 3, "float32", False, False),
    (1, 300, 2, 1, 40, 2, "bfloat16", True, True),
    # The fused dQ's other head dims and group sizes (HPW = 4: G = 4, 12), odd L, padding.
    (2, 301, 8, 2, 128, 2, "float16", True, True),
    (2, 299, 4, 1, 32, 2, "bfloat16", True, True),
    (1, 300, 12, 1, 64, 2, "bfloat16", False, True),
]


def make_inputs(case, seed):
    B, L, Hq, Hk, D, R, dt, pad, causal = case
    g = torch.Generator().manual_seed(seed)
    t = {n: torch.randn(*s, generator=g, dtype=torch.float64) for n, s in
         (("q", (B, L, Hq, D)), ("k", (B, L, Hk, D)), ("v", (B, L, Hk, D)),
          ("gate", (B, L, Hq, R)), ("go", (B, L, Hq, D)))}
    t["gate"] = t["gate"] * 2
    lengths = torch.tensor([L - 7 * b for b in range(B)]) if pad else None
    kw = dict(block_len=32, stride=16, block_size=16, top_n=3, window=8, causal=causal)
    return t, lengths, kw


def child(out_path, quick, time_case):
    import blossom_ops
    res = {}
    for n, case in enumerate(CASES[:3] if quick else CASES):
        t, lengths, kw = make_inputs(case, 100 + n)
        dt = getattr(torch, case[6])
        ins = [t[x].to("cuda", dt).requires_grad_() for x in ("q", "k", "v", "gate")]
        ln = None if lengths is None else lengths.cuda()
        out, parts = blossom_ops.blossom_attention(*ins, lengths=ln, return_parts=True, **kw)
        gs = torch.autograd.grad(out, ins, t["go"].to("cuda", dt))
        # Deterministic: a second backward must be bit-identical.
        out2 = blossom_ops.blossom_attention(*ins, lengths=ln, **kw)
        gs2 = torch.autograd.grad(out2, ins, t["go"].to("cuda", dt))
        same = all(torch.equal(a, b) for a, b in zip(gs, gs2))
        if n == 0:  # which kernels ran: the fused ones must, on the routes that allow them
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                o3 = blossom_ops.blossom_attention(*ins, lengths=ln, **kw)
                torch.autograd.grad(o3, ins, t["go"].to("cuda", dt))
                torch.cuda.synchronize()
            res["kernels"] = sorted({e.key for e in prof.key_averages()})
        fwd = [out] + [parts[x] for x in ("o_sel", "lse_sel", "o_win", "lse_win")]
        res[n] = dict(grads=[x.cpu() for x in gs], idx=parts["block_idx"].cpu(), same=same,
                      fwd=[x.detach().cpu() for x in fwd])
    if time_case:  # the brief's shape: Hq=8, Hk=2, bf16, R=2, defaults
        B, L = map(int, time_case.split("x"))
        for D in (64, 16):
            ins = [torch.randn(*s, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for s in ((B, L, 8, D), (B, L, 2, D), (B, L, 2, D), (B, L, 8, 2))]
            out = blossom_ops.blossom_attention(*ins)
            go = torch.randn_like(out)
            times = []
            for _ in range(12):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                torch.autograd.grad(out, ins, go, retain_graph=True)
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            res[f"time D={D}"] = sorted(times[2:])[len(times[2:]) // 2]
            del ins, out, go
    torch.save(res, out_path)


def reference_grads(case, seed, idx):
    from blossom_ops import reference as ref
    t, lengths, kw = make_inputs(case, seed)
    dt = getattr(torch, case[6])

    def whole(q, k, v, g, dev):
        valid = ref.validity(q.shape[0], q.shape[1],
                             None if lengths is None else lengths.to(dev), None, q.device)
        o_sel = ref.block_sparse_attention(q, k, v, idx.to(dev), block_size=16,
                                           causal=kw["causal"], valid=valid)
        o_win = ref.sliding_window_attention(q, k, v, 8, causal=kw["causal"], valid=valid)
        brs = [o_sel, o_win]
        if g.shape[-1] == 3:
            kc = ref.block_compress(k, 32, 16, valid=valid)
            vc = ref.block_compress(v, 32, 16, valid=valid)
            brs.append(ref.compressed_attention(q, kc, vc, block_len=32, stride=16,
                                                causal=kw["causal"], valid=valid))
        return ref.gate_fusion(brs, g)

    rounded = [t[x].to(dt) for x in ("q", "k", "v", "gate")]
    go = t["go"].to(dt)
    i64 = [x.double().requires_grad_() for x in rounded]
    g64 = torch.autograd.grad(whole(*i64, "cpu"), i64, go.double())
    il = [x.cuda().requires_grad_() for x in rounded]
    gl = torch.autograd.grad(whole(*il, "cuda"), il, go.cuda())
    return g64, [x.cpu() for x in gl]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / max(b.norm().item(), 1e-30)).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--time", default="", help="BxL of a timing case, e.g. 64x4096")
    ap.add_argument("--child", default="")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.quick, args.time)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, env in (("fold", {"BLOSSOM_OPS_CUDA_GATE_FOLD": "1"}),
                          ("old", {"BLOSSOM_OPS_CUDA_GATE_FOLD": "0"}),
                          ("fold+simple", {"BLOSSOM_OPS_CUDA_GATE_FOLD": "1",
                                           "BLOSSOM_OPS_CUDA_SIMPLE": "1"}),
                          ("fold-unfused", {"BLOSSOM_OPS_CUDA_GATE_FOLD": "1",
                                            "BLOSSOM_OPS_CUDA_FUSED_DQ": "0",
                                            "BLOSSOM_OPS_CUDA_FUSED_FWD": "0"}),
                          ("fold-late", {"BLOSSOM_OPS_CUDA_GATE_FOLD": "1",
                                         "BLOSSOM_OPS_CUDA_EARLY_LOADS": "0"}),
                          ("index-in-place", {"BLOSSOM_OPS_CUDA_GATE_FOLD": "1",
                                              "BLOSSOM_OPS_CUDA_INDEX_AHEAD": "0"})):
            path = os.path.join(tmp, name + ".pt")
            cmd = [sys.executable, __file__, "--child", path] + (["--quick"] if args.quick else [])
            if args.time and name != "fold+simple":
                cmd += ["--time", args.time]
            subprocess.run(cmd, check=True, env={**os.environ, **env})
            runs[name] = torch.load(path)
    fails = 0
    floor = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
    for n, case in enumerate(CASES[:3] if args.quick else CASES):
        for name, res in runs.items():
            r = res[n]
            g64, glow = reference_grads(case, 100 + n, r["idx"])
            for w, (a, b, c) in enumerate(zip(r["grads"], g64, glow)):
                err, bound = rel(a, b), 3 * rel(c, b) + floor[case[6]]
                ok = err <= bound and torch.isfinite(a).all().item()
                fails += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {name:12s} case {n} {case} grad "
                      f"{'qkvg'[w]}: err {err:.2e} bound {bound:.2e}")
            if not r["same"]:
                fails += 1
                print(f"FAIL {name} case {n}: two backward runs differ")
        d = max(rel(a, b) for a, b in zip(runs["fold"][n]["grads"], runs["old"][n]["grads"]))
        print(f"     fold vs old, case {n}: max relative difference {d:.2e}")
        same_fwd = all(torch.equal(a, b) for a, b in zip(runs["fold"][n]["fwd"],
                                                         runs["fold-unfused"][n]["fwd"]))
        fails += not same_fwd
        print(f"{'ok  ' if same_fwd else 'FAIL'} fused vs unfused forward, case {n}: out, "
              f"o_sel, lse_sel, o_win, lse_win {'bit-identical' if same_fwd else 'DIFFER'}")
        for name, what in (("fold-late", "early vs late loads"),
                           ("index-in-place", "index rows ahead vs in place")):
            other = runs[name][n]
            same = all(torch.equal(a, b) for a, b in
                       zip(runs["fold"][n]["fwd"] + runs["fold"][n]["grads"],
                           other["fwd"] + other["grads"]))
            fails += not same
            print(f"{'ok  ' if same else 'FAIL'} {what}, case {n}: outputs and gradients "
                  f"{'bit-identical' if same else 'DIFFER'}")
        fu, un = runs["fold"][n]["grads"], runs["fold-unfused"][n]["grads"]
        same_kvg = all(torch.equal(a, b) for a, b in zip(fu[1:], un[1:]))
        fails += not same_kvg
        print(f"{'ok  ' if same_kvg else 'FAIL'} fused vs unfused dQ, case {n}: grad k, v, gate "
              f"{'bit-identical' if same_kvg else 'DIFFER'}; grad q relative difference "
              f"{rel(fu[0], un[0]):.2e}")
    for name, want in (("fold", True), ("old", True), ("fold-unfused", False),
                       ("fold-late", True), ("index-in-place", True)):
        ks = runs[name]["kernels"]
        for kern in ("attn_fwd_fused_kernel", "attn_dq_fused_kernel"):
            ran = any(kern in k for k in ks)
            # the fused dQ belongs to the gate fold: the "old" route has no fused dQ
            expect = want and not (name == "old" and kern == "attn_dq_fused_kernel")
            ok = ran == expect
            fails += not ok
            print(f"{'ok  ' if ok else 'FAIL'} route {name}, case 0: {kern} "
                  f"{'ran' if ran else 'did not run'} (expected {'to run' if expect else 'not'})")
    for key in [k for k in runs["fold"] if isinstance(k, str) and k.startswith("time")]:
        print(f"backward {key} (B x L = {args.time}, bf16): fold {runs['fold'][key]:.3f} ms, "
              f"fold without the fused kernels {runs['fold-unfused'][key]:.3f} ms, "
              f"old {runs['old'][key]:.3f} ms")
    print("all ok" if fails == 0 else f"{fails} FAILED")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
