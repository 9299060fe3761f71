"""CPU timings of the three sparse attention kernels against dense SDPA.

Each kernel alone (sliding window, block sparse, compressed), forward and forward+backward,
next to torch's scaled_dot_product_attention (causal, k/v expanded to the query heads) in
the same process. Reports the median wall time and the median CPU time of the process over
several repeats; CPU time is the steadier number on a shared machine. Run with
``--threads 1`` for the single-thread figures the budgets are written in.

    PYTHONPATH=. python3 benchmarks/bench_cpu_attention.py --lengths 200 4000 --threads 1

Block-sparse queries get their own block plus ``top_n`` distinct random earlier blocks drawn
per query (no sharing between neighbouring queries: the least favourable case).
"""
import argparse
import datetime
import itertools
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import blossom_ops


def _block_idx(B, L, Hk, top_n, block_size, gen):
    """Random distinct earlier blocks per (b, i, kv head), ascending, -1 padded."""
    C = -(-L // block_size)
    own = torch.arange(L) // block_size
    out = torch.empty(B, L, Hk, top_n, dtype=torch.int32)
    for b in range(B):  # one batch row at a time keeps the [L, Hk, C] scores small
        scores = torch.rand(L, Hk, C, generator=gen)
        scores.masked_fill_(torch.arange(C)[None, None, :] >= own[:, None, None], -1.0)
        val, idx = scores.topk(min(top_n, C), dim=-1)
        idx = torch.where(val >= 0, idx, torch.full_like(idx, C)).sort(dim=-1).values
        idx[idx == C] = -1
        if idx.shape[-1] < top_n:
            idx = F.pad(idx, (0, top_n - idx.shape[-1]), value=-1)
        out[b] = idx.to(torch.int32)
    return out


def _cases(args, L, gen):
    B, Hq, Hk, D = args.batch, args.q_heads, args.kv_heads, args.head_dim
    dt = getattr(torch, args.dtype)
    q = torch.randn(B, L, Hq, D, generator=gen).to(dt)
    k = torch.randn(B, L, Hk, D, generator=gen).to(dt)
    v = torch.randn(B, L, Hk, D, generator=gen).to(dt)
    T = -(-L // args.stride)
    kc = torch.randn(B, T, Hk, D, generator=gen).to(dt)
    vc = torch.randn(B, T, Hk, D, generator=gen).to(dt)
    idx = _block_idx(B, L, Hk, args.top_n, args.block_size, gen)
    G = Hq // Hk

    def sdpa(q, k, v):
        # [B, H, L, D] layout, k/v expanded to the query heads
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        kt, vt = (t.repeat_interleave(G, dim=1) for t in (kt, vt))
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)

    return {
        "sliding": (lambda q, k, v: blossom_ops.sliding_window_attention(
            q, k, v, args.window, dilated=True, causal=True), (q, k, v)),
        "block_sparse": (lambda q, k, v: blossom_ops.block_sparse_attention(
            q, k, v, idx, block_size=args.block_size, causal=True), (q, k, v)),
        "compressed": (lambda q, k, v: blossom_ops.compressed_attention(
            q, k, v, block_len=args.block_len, stride=args.stride, causal=True), (q, kc, vc)),
        "sdpa": (sdpa, (q, k, v)),
    }


def _time(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def _runners(fn, inputs):
    def fwd():
        with torch.no_grad():
            fn(*inputs)

    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]

    def fwd_bwd():
        out = fn(*leaves)
        grad = torch.ones_like(out)
        torch.autograd.grad(out, leaves, grad)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[200, 4000])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--q-heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--top-n", type=int, default=4)
    ap.add_argument("--block-len", type=int, default=32)
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sdpa-repeats", type=int, default=None,
                    help="repeats for dense SDPA (slow at long L); default --repeats")
    ap.add_argument("--kernels", nargs="+",
                    default=["sliding", "block_sparse", "compressed", "sdpa"])
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)

    rows = []
    print(f"{'L':>6} {'kernel':>13} {'pass':>8} {'wall ms':>10} {'cpu ms':>10} {'vs sdpa':>8}")
    for L in args.lengths:
        cases = _cases(args, L, gen)
        res = {}
        for name, mode in itertools.product(args.kernels, ("fwd", "fwd+bwd")):
            fn, inputs = cases[name]
            reps = args.sdpa_repeats if (name == "sdpa" and args.sdpa_repeats) else args.repeats
            res[name, mode] = _time(_runners(fn, inputs)[mode], reps,
                                    warmup=0 if reps == 1 and name == "sdpa" else 1)
        for (name, mode), (wall, cpu) in res.items():
            ref = res.get(("sdpa", mode))
            ratio = f"{cpu / ref[1]:.3f}" if ref and ref[1] > 0 else "-"
            print(f"{L:>6} {name:>13} {mode:>8} {wall * 1e3:>10.1f} {cpu * 1e3:>10.1f} "
                  f"{ratio:>8}")
            rows.append(dict(L=L, kernel=name, mode=mode, wall_s=wall, cpu_s=cpu))
    if args.json:
        meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                    torch=torch.__version__, machine=platform.processor() or platform.machine(),
                    threads=args.threads, args=vars(args))
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=1)


if __name__ == "__main__":
    main()
