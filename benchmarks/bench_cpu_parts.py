"""CPU benchmark: the fused blossom_attention forward + backward, part by part.

Each part is the component op the fused binding (csrc/ops/blossom_attention.cpp) calls,
timed alone on the same inputs, so the parts add up (roughly) to the fused op, which is
timed too, next to dense causal SDPA forward + backward (k / v expanded to Hq heads
beforehand, not timed). Shape: B=32, Hq=8, Hk=2, D=16, float32, DESIGN defaults
(block_len 32, stride 16, block_size 16, top_n 4, window 8, dilated, causal), R=2 gate
branches unless --r3.

Timing: best of --rep runs after one warm-up, as CPU time of the process
(time.process_time: the machine may be shared, and CPU time is what other jobs do not
inflate) and as wall time. With several threads CPU time sums over the threads, so
compare wall times there, on a quiet machine.

Usage: python3 benchmarks/bench_cpu_parts.py [--lengths 200,4000] [--threads 1,2]
       [--rep 3] [--r3] [--batch 32] [--no-sdpa]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import blossom_ops  # noqa: F401  (loads the library)

ops = torch.ops.blossom_ops
CFG = dict(block_len=32, stride=16, block_size=16, top_n=4, window=8, dilated=True, causal=True)


def best_of(fn, rep):
    fn()  # warm-up: first-touch allocations, thread pool start
    cpu, wall = float("inf"), float("inf")
    for _ in range(rep):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu = min(cpu, time.process_time() - c0)
        wall = min(wall, time.perf_counter() - w0)
    return cpu, wall


def parts(B, L, Hq, Hk, D, R, gen):
    c = CFG
    q = torch.randn(B, L, Hq, D, generator=gen)
    k = torch.randn(B, L, Hk, D, generator=gen)
    v = torch.randn(B, L, Hk, D, generator=gen)
    gate = torch.randn(B, L, Hq, R, generator=gen)
    scale = D ** -0.5
    bl, s, bs, tn, w = c["block_len"], c["stride"], c["block_size"], c["top_n"], c["window"]
    dil, causal = c["dilated"], c["causal"]

    k_cmp = ops.block_compress(k, None, None, None, bl, s)[0]
    v_cmp = ops.block_compress(v, None, None, None, bl, s)[0]
    idx = ops.select_blocks(q, k_cmp, None, None, tn, bs, s, bl, causal, scale)
    o_sel, lse_sel = ops.block_sparse_attention(q, k, v, idx, None, None, bs, causal, scale)
    o_win, lse_win = ops.sliding_window_attention(q, k, v, None, None, w, dil, causal, scale)
    outs = [o_sel, o_win]
    if R == 3:
        o_cmp, lse_cmp = ops.compressed_attention(q, k_cmp, v_cmp, None, None, bl, s, causal,
                                                  scale)
        outs.append(o_cmp)
    stacked = torch.stack(outs)
    go = torch.randn(B, L, Hq, D, generator=gen)
    g_br = ops.gate_fusion_backward(go, stacked, gate)[0]

    fwd = {
        "block_compress k": lambda: ops.block_compress(k, None, None, None, bl, s),
        "select_blocks": lambda: ops.select_blocks(q, k_cmp, None, None, tn, bs, s, bl, causal,
                                                   scale),
        "block_sparse_attn": lambda: ops.block_sparse_attention(q, k, v, idx, None, None, bs,
                                                                causal, scale),
        "sliding_window_attn": lambda: ops.sliding_window_attention(q, k, v, None, None, w, dil,
                                                                    causal, scale),
        "stack + gate_fusion": lambda: ops.gate_fusion(torch.stack(outs), gate),
    }
    bwd = {
        "gate_fusion_bwd": lambda: ops.gate_fusion_backward(go, torch.stack(outs), gate),
        "block_sparse_attn_bwd": lambda: ops.block_sparse_attention_backward(
            g_br[0], None, q, k, v, o_sel, lse_sel, idx, None, None, bs, causal, scale),
        "sliding_window_attn_bwd": lambda: ops.sliding_window_attention_backward(
            g_br[1], None, q, k, v, o_win, lse_win, None, None, w, dil, causal, scale),
    }
    if R == 3:
        fwd["block_compress v"] = lambda: ops.block_compress(v, None, None, None, bl, s)
        fwd["compressed_attn"] = lambda: ops.compressed_attention(q, k_cmp, v_cmp, None, None, bl,
                                                                  s, causal, scale)
        g_kcmp = torch.randn_like(k_cmp)
        bwd["compressed_attn_bwd"] = lambda: ops.compressed_attention_backward(
            g_br[2], None, q, k_cmp, v_cmp, o_cmp, lse_cmp, None, None, bl, s, causal, scale)
        bwd["block_compress_bwd (x2)"] = lambda: (
            ops.block_compress_backward(g_kcmp, k, None, None, None, bl, s),
            ops.block_compress_backward(g_kcmp, v, None, None, None, bl, s))

    def fused_fwd():
        return ops.blossom_attention(q, k, v, gate, None, None, None, None, bl, s, bs, tn, w,
                                     dil, causal, scale)

    res = fused_fwd()

    def fused_bwd():
        return ops.blossom_attention_backward(go, q, k, v, gate, None, None, None, None,
                                              *res[1:], bl, s, bs, tn, w, dil, causal, scale)

    whole = {"fused fwd": fused_fwd, "fused bwd": fused_bwd,
             "fused fwd+bwd": lambda: (fused_fwd(), fused_bwd())}
    return fwd, bwd, whole, (q, k, v)


def sdpa_fwd_bwd(q, k, v):
    G = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2).detach().requires_grad_(True)
    kt = k.repeat_interleave(G, dim=2).transpose(1, 2).detach().requires_grad_(True)
    vt = v.repeat_interleave(G, dim=2).transpose(1, 2).detach().requires_grad_(True)
    go = torch.ones_like(qt)

    def run():
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        out.backward(go)
        qt.grad = kt.grad = vt.grad = None
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="200,4000")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rep", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--r3", action="store_true", help="3 gate branches (+ compressed attention)")
    ap.add_argument("--no-sdpa", action="store_true")
    a = ap.parse_args()
    B, Hq, Hk, D, R = a.batch, 8, 2, 16, 3 if a.r3 else 2
    print(f"B={B} Hq={Hq} Hk={Hk} D={D} float32 R={R} {CFG}; best of {a.rep}; ms")
    for L in [int(x) for x in a.lengths.split(",")]:
        gen = torch.Generator().manual_seed(L)
        fwd, bwd, whole, qkv = parts(B, L, Hq, Hk, D, R, gen)
        table = {}
        for nt in [int(x) for x in a.threads.split(",")]:
            torch.set_num_threads(nt)
            for name, fn in [*fwd.items(), *bwd.items(), *whole.items()]:
                table.setdefault(name, {})[nt] = best_of(fn, a.rep)
            if not a.no_sdpa:
                table.setdefault("SDPA fwd+bwd (dense)", {})[nt] = best_of(sdpa_fwd_bwd(*qkv),
                                                                           a.rep)
        ths = [int(x) for x in a.threads.split(",")]
        head = "".join(f" | {t}T cpu   {t}T wall" for t in ths)
        print(f"\nL={L}\n{'part':26s}{head}")
        for name, row in table.items():
            cells = "".join(f" | {row[t][0] * 1e3:7.1f} {row[t][1] * 1e3:8.1f}" for t in ths)
            print(f"{name:26s}{cells}")
        if "SDPA fwd+bwd (dense)" in table:
            for t in ths:
                ratio = table["fused fwd+bwd"][t][0] / table["SDPA fwd+bwd (dense)"][t][0]
                print(f"fused fwd+bwd / SDPA fwd+bwd, {t} thread(s), cpu time: {ratio:.3f}")


if __name__ == "__main__":
    main()
