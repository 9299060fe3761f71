"""GPU benchmark: blossom_attention vs dense causal SDPA (flash) and FlexAttention.

All in one run on one card, bf16, B=64, Hq=8, Hk=2 (--q-heads / --kv-heads: e.g. 8 / 8 for
plain multi-head attention), D in {16, 64}, L in {50, 200, 1024, 4096, 16384}; forward and forward+backward; median time of
triton.testing.do_bench. Peers:
  * SDPA: torch.nn.functional.scaled_dot_product_attention, causal, flash backend, with
    k / v expanded to Hq heads beforehand (the expansion is not timed: favours SDPA);
  * Flex: torch.nn.attention.flex_attention (torch.compile'd) with a BlockMask built from
    the same sparse pattern: our selected block indices, the own block and the window with
    power-of-two offsets (one softmax over the union; the indices are given, not computed).
    Block-mask construction is not timed.
Ours includes everything: compression, selection, both branches and the gate.
Up to --graph-max-len (1024) the fwd+bwd step of ours and of SDPA is also captured in a CUDA
graph and replayed ("graph" rows): GPU time alone, since short eager steps are bound by the
host, whose speed differs between machines.
"GB/s" is the ideal traffic (each input read once, each output written once) over the
time, and "%bw" compares it to a measured device-to-device copy bandwidth.

Usage: python3 benchmarks/bench_gpu.py [--out DIR] [--lengths 50,200] [--dims 16,64]
       [--no-flex] [--flex-min-len 1024] [--breakdown] [--graph-max-len 1024]
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import sys
import traceback

import torch
import torch.nn.functional as F

import blossom_ops

CFG = dict(block_len=32, stride=16, block_size=16, top_n=4, window=8, dilated=True, causal=True)


def do_bench(fn, warmup=10, rep=60):
    from triton.testing import do_bench as tb
    return tb(fn, warmup=warmup, rep=rep, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes read + written per second of a large device-to-device copy."""
    n = 1 << 28  # 1 GiB of float32... as 2^28 elements
    a = torch.empty(n, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    a.normal_()
    ms = do_bench(lambda: b.copy_(a))
    return 2 * a.numel() * 4 / (ms * 1e-3)


def ideal_bytes(B, L, Hq, Hk, D, R, backward: bool) -> int:
    e = 2  # bf16
    q = B * L * Hq * D * e
    kv = 2 * B * L * Hk * D * e
    gate = B * L * Hq * R * e
    out = q
    fwd = q + kv + gate + out
    if not backward:
        return fwd
    # backward: re-read q, k, v, gate and grad_out; write dq, dk, dv, dgate.
    return fwd + (q + kv + gate + out) + (q + kv + gate)


def make_inputs(B, L, Hq, Hk, D, R=2):
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = mk(B, L, Hq, D), mk(B, L, Hk, D), mk(B, L, Hk, D)
    gl = mk(B, L, Hq, R)
    return [t.requires_grad_() for t in (q, k, v, gl)]


def bench_ours(q, k, v, gl):
    fwd = lambda: blossom_ops.blossom_attention(q, k, v, gl, **CFG)
    out = fwd()
    go = torch.randn_like(out)

    def fwd_bwd():
        o = blossom_ops.blossom_attention(q, k, v, gl, **CFG)
        torch.autograd.grad(o, (q, k, v, gl), go)
    with torch.no_grad():
        t_f = do_bench(fwd)
    return t_f, do_bench(fwd_bwd)


def bench_sdpa(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    G = q.shape[2] // k.shape[2]
    qt = q.detach().transpose(1, 2).contiguous().requires_grad_()
    kt = k.detach().repeat_interleave(G, dim=2).transpose(1, 2).contiguous().requires_grad_()
    vt = v.detach().repeat_interleave(G, dim=2).transpose(1, 2).contiguous().requires_grad_()
    go = torch.randn_like(qt)

    def fwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    def fwd_bwd():
        torch.autograd.grad(fwd(), (qt, kt, vt), go)
    with torch.no_grad():
        t_f = do_bench(fwd)
    return t_f, do_bench(fwd_bwd)


def bench_graphed(q, k, v, gl):
    """CUDA-graph replay of one fwd+bwd step of ours and of SDPA (same inputs as the eager
    timings): GPU time only. At short L an eager step is bound by the host (Python, dispatch,
    launches), whose speed differs between machines; the replay shows the kernels alone."""
    from host_overhead_gpu import graph_ms  # same directory; the one capture-and-replay timer
    from torch.nn.attention import SDPBackend, sdpa_kernel
    go = torch.randn_like(q)

    def ours():
        o = blossom_ops.blossom_attention(q, k, v, gl, **CFG)
        return torch.autograd.grad(o, (q, k, v, gl), go)
    G = q.shape[2] // k.shape[2]
    qt = q.detach().transpose(1, 2).contiguous().requires_grad_()
    kt = k.detach().repeat_interleave(G, dim=2).transpose(1, 2).contiguous().requires_grad_()
    vt = v.detach().repeat_interleave(G, dim=2).transpose(1, 2).contiguous().requires_grad_()
    go_t = go.transpose(1, 2).contiguous()

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        return torch.autograd.grad(o, (qt, kt, vt), go_t)
    return graph_ms(ours), graph_ms(sdpa)


def flex_block_mask(block_idx, B, L, Hq, Hk, tile=128):
    """BlockMask of the union of own block, selected blocks and window (+ powers of two).

    The tile-level structure is built directly from the indices (evaluating mask_mod over
    B * Hq * L * L points would take minutes at L = 16k); mask_mod makes it exact inside
    the tiles.
    """
    from torch.nn.attention.flex_attention import BlockMask
    G = Hq // Hk
    bs, window, n = CFG["block_size"], CFG["window"], CFG["top_n"]
    dev = block_idx.device
    idx = block_idx.long()  # [B, L, Hk, n]
    QT = KT = -(-L // tile)
    # selected blocks -> kv tiles, per (b, g, query tile)
    bb = torch.arange(B, device=dev)[:, None, None, None]
    gg = torch.arange(Hk, device=dev)[None, None, :, None]
    qt = (torch.arange(L, device=dev) // tile)[None, :, None, None]
    kt = (idx.clamp(min=0) * bs) // tile
    flat = (((bb * Hk + gg) * QT + qt) * KT + kt)[idx >= 0]
    tiles = torch.zeros(B * Hk * QT * KT, dtype=torch.bool, device=dev)
    tiles[flat] = True
    tiles = tiles.view(B, Hk, QT, KT)
    # window, power-of-two offsets and the own block (distances < block_size), same for all
    dists = list(range(max(window, bs))) + [1 << p for p in range(64) if (1 << p) < L]
    i = torch.arange(L, device=dev)[:, None]
    d = torch.tensor(sorted(set(dists)), device=dev)[None, :]
    j = i - d
    ok = j >= 0
    local = torch.zeros(QT * KT, dtype=torch.bool, device=dev)
    local[((i // tile) * KT + j.clamp(min=0) // tile)[ok]] = True
    tiles = tiles | local.view(1, 1, QT, KT)
    tiles = tiles.repeat_interleave(G, dim=1)  # [B, Hq, QT, KT]
    kv_num = tiles.sum(-1, dtype=torch.int32)
    kv_idx = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True).to(torch.int32)

    def mask_mod(b, h, qi, kv):
        dd = qi - kv
        g = h // G
        blk = kv // bs
        sel = idx[b, qi, g, 0] == blk
        for s_ in range(1, n):
            sel = sel | (idx[b, qi, g, s_] == blk)
        win = (dd < window) | ((dd > 0) & ((dd & (dd - 1)) == 0))
        return (kv <= qi) & (win | (qi // bs == blk) | sel)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=tile, mask_mod=mask_mod,
                                    seq_lengths=(L, L))


_flex = None


def bench_flex(q, k, v, block_idx):
    global _flex
    from torch.nn.attention.flex_attention import flex_attention
    # A fresh compile per shape: each (shape, grad mode) is a recompile, and past dynamo's
    # recompile limit flex_attention silently falls back to an eager path that builds the
    # whole L x L score matrix (which is what ran out of memory in the first GPU run).
    torch._dynamo.reset()
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    _flex = torch.compile(flex_attention, dynamic=False)
    B, L, Hq, _ = q.shape
    Hk = k.shape[2]
    bm = flex_block_mask(block_idx, B, L, Hq, Hk)
    qt = q.detach().transpose(1, 2).contiguous().requires_grad_()
    kt = k.detach().transpose(1, 2).contiguous().requires_grad_()
    vt = v.detach().transpose(1, 2).contiguous().requires_grad_()
    go = torch.randn_like(qt)
    fwd = lambda: _flex(qt, kt, vt, block_mask=bm, enable_gqa=True)

    def fwd_bwd():
        torch.autograd.grad(fwd(), (qt, kt, vt), go)
    with torch.no_grad():
        t_f = do_bench(fwd)
    return t_f, do_bench(fwd_bwd)


def bench_breakdown(q, k, v, gl):
    """Forward time of each stage alone (ms), to see where ours spends its time."""
    s = {}
    c = CFG
    with torch.no_grad():
        k_cmp = blossom_ops.block_compress(k, c["block_len"], c["stride"])
        idx = blossom_ops.select_blocks(q, k_cmp, c["top_n"], block_size=c["block_size"],
                                        stride=c["stride"], block_len=c["block_len"])
        s["compress"] = do_bench(lambda: blossom_ops.block_compress(k, c["block_len"], c["stride"]))
        s["select"] = do_bench(lambda: blossom_ops.select_blocks(
            q, k_cmp, c["top_n"], block_size=c["block_size"], stride=c["stride"],
            block_len=c["block_len"]))
        s["sel_attn"] = do_bench(lambda: blossom_ops.block_sparse_attention(
            q, k, v, idx, block_size=c["block_size"]))
        s["win_attn"] = do_bench(lambda: blossom_ops.sliding_window_attention(q, k, v, c["window"]))
        o = blossom_ops.sliding_window_attention(q, k, v, c["window"])
        s["gate"] = do_bench(lambda: blossom_ops.gate_fusion([o, o], gl))
    return s


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--lengths", default="50,200,1024,4096,16384")
    ap.add_argument("--dims", default="16,64")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--q-heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2,
                    help="KV heads (8 with --q-heads 8: plain multi-head attention, G = 1)")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--flex-min-len", type=int, default=0,
                    help="run FlexAttention only from this L on (each shape costs a compile)")
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--graph-max-len", type=int, default=1024,
                    help="also time CUDA-graph replays of fwd+bwd (GPU time only) up to this L")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True

    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    meta = dict(device=dev, torch=torch.__version__, cuda=torch.version.cuda,
                python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                copy_bandwidth_GBps=bw / 1e9, config=CFG, batch=args.batch, q_heads=args.q_heads,
                kv_heads=args.kv_heads)
    print(f"# {dev}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"measured copy bandwidth {bw / 1e9:.0f} GB/s")
    rows = []
    B, Hq, Hk = args.batch, args.q_heads, args.kv_heads
    if Hq % Hk != 0:
        raise SystemExit("--q-heads must be a multiple of --kv-heads")
    for D in [int(x) for x in args.dims.split(",")]:
        for L in [int(x) for x in args.lengths.split(",")]:
            row = dict(B=B, Hq=Hq, Hk=Hk, D=D, L=L)
            try:
                q, k, v, gl = make_inputs(B, L, Hq, Hk, D)
            except torch.cuda.OutOfMemoryError as e:
                row["error"] = f"OOM allocating inputs: {e}".splitlines()[0]
                rows.append(row)
                print(f"D={D} L={L}: {row['error']}")
                continue
            for name, fn in [("ours", lambda: bench_ours(q, k, v, gl)),
                             ("sdpa", lambda: bench_sdpa(q, k, v)),
                             ("flex", None if args.no_flex or L < args.flex_min_len
                              else lambda: bench_flex(
                                 q, k, v, blossom_ops.blossom_attention(
                                     q.detach(), k.detach(), v.detach(), gl.detach(),
                                     return_parts=True, **CFG)[1]["block_idx"]))]:
                if fn is None:
                    continue
                try:
                    row[f"{name}_fwd_ms"], row[f"{name}_fwdbwd_ms"] = fn()
                except torch.cuda.OutOfMemoryError as e:
                    row[f"{name}_error"] = "OOM: " + str(e).splitlines()[0][:120]
                except Exception as e:  # report and keep going: one peer failing is a result
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    traceback.print_exc()
                torch.cuda.empty_cache()
            if L <= args.graph_max_len and "ours_fwd_ms" in row:
                try:
                    row["ours_graph_fwdbwd_ms"], row["sdpa_graph_fwdbwd_ms"] = bench_graphed(
                        q, k, v, gl)
                    row["speedup_vs_sdpa_graph_fwdbwd"] = (row["sdpa_graph_fwdbwd_ms"]
                                                           / row["ours_graph_fwdbwd_ms"])
                except Exception as e:
                    row["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    traceback.print_exc()
            if args.breakdown and "ours_fwd_ms" in row:
                try:
                    row.update({f"stage_{k_}_ms": t for k_, t in bench_breakdown(q, k, v, gl).items()})
                except Exception as e:
                    row["breakdown_error"] = str(e).splitlines()[0][:160]
            for mode, bwd in (("fwd", False), ("fwdbwd", True)):
                t = row.get(f"ours_{mode}_ms")
                if t:
                    gbs = ideal_bytes(B, L, Hq, Hk, D, 2, bwd) / (t * 1e-3)
                    row[f"ours_{mode}_GBps"] = gbs / 1e9
                    row[f"ours_{mode}_pct_bw"] = 100 * gbs / bw
                    for peer in ("sdpa", "flex"):
                        tp = row.get(f"{peer}_{mode}_ms")
                        if tp:
                            row[f"speedup_vs_{peer}_{mode}"] = tp / t
            rows.append(row)
            print_row(row)
            save_json(args.out, meta, rows)  # after every shape: a cut-off run keeps its rows
            del q, k, v, gl
            torch.cuda.empty_cache()

    print_table(rows)
    save_json(args.out, meta, rows)
    keys = sorted({k_ for r in rows for k_ in r}, key=lambda s: (s not in ("D", "L"), s))
    with open(os.path.join(args.out, "bench_gpu.csv"), "w", newline="") as f:
        f.write("# " + json.dumps(meta) + "\n")
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return 0


def save_json(out, meta, rows):
    with open(os.path.join(out, "bench_gpu.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def print_row(r):
    errs = {k: v for k, v in r.items() if k.endswith("error")}
    print(f"D={r['D']} L={r['L']}: " + ", ".join(
        f"{k}={fmt(v)}" for k, v in r.items() if k.endswith("_ms")) + (f" {errs}" if errs else ""))


def print_table(rows):
    hdr = (f"{'D':>3} {'L':>6} | {'mode':6} | {'ours ms':>8} {'sdpa ms':>8} {'flex ms':>8} | "
           f"{'x sdpa':>7} {'x flex':>7} | {'GB/s':>6} {'%bw':>5}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in rows:
        for mode in ("fwd", "fwdbwd"):
            print(f"{r['D']:>3} {r['L']:>6} | {mode:6} | "
                  f"{fmt(r.get(f'ours_{mode}_ms')):>8} {fmt(r.get(f'sdpa_{mode}_ms')):>8} "
                  f"{fmt(r.get(f'flex_{mode}_ms')):>8} | "
                  f"{fmt(r.get(f'speedup_vs_sdpa_{mode}'), '.2f'):>7} "
                  f"{fmt(r.get(f'speedup_vs_flex_{mode}'), '.2f'):>7} | "
                  f"{fmt(r.get(f'ours_{mode}_GBps'), '.0f'):>6} "
                  f"{fmt(r.get(f'ours_{mode}_pct_bw'), '.1f'):>5}")
        if r.get("ours_graph_fwdbwd_ms"):
            print(f"{r['D']:>3} {r['L']:>6} | graph  | {fmt(r['ours_graph_fwdbwd_ms']):>8} "
                  f"{fmt(r['sdpa_graph_fwdbwd_ms']):>8} {'-':>8} | "
                  f"{fmt(r['speedup_vs_sdpa_graph_fwdbwd'], '.2f'):>7} {'-':>7} |")
    errs = [(r["D"], r["L"], k, v) for r in rows for k, v in r.items() if k.endswith("error")]
    for e in errs:
        print("  skipped:", *e)


if __name__ == "__main__":
    sys.exit(main())
