"""CPU benchmark: BlossomRec attention vs dense causal attention, forward + backward.

Peers, measured side by side in one run at B=32, Hq=8, Hk=2, D=16, float32, causal:
  * blossom   blossom_ops.blossom_attention (mean compressor, R=2 gates: selected + window),
              DESIGN defaults block_len=32, stride=16, block_size=16, top_n=4, window=8
              dilated. Inputs q [B, L, Hq, D], k/v [B, L, Hk, D], gate_logits [B, L, Hq, 2].
  * blossom_parts  the same mechanism composed from the separate ops (block_compress,
              select_blocks, block_sparse_attention, sliding_window_attention, gate_fusion),
              each with its own autograd: the fused op's baseline, and what is measured when
              the fused op is not built yet.
  * sdpa      torch.nn.functional.scaled_dot_product_attention(is_causal=True). Its q/k/v
              are leaf tensors already laid out [B, Hq, L, D], with k/v expanded to Hq heads
              beforehand, so only the attention kernel itself is timed (the layout change and
              the GQA expansion a model would also pay are left out: the comparison favours
              SDPA). On CPU, torch picks its flash-attention kernel here, which never builds
              the L x L matrix.
  * sdpa_math the same call forced onto the math backend (SDPBackend.MATH), which does build
              the [B, Hq, L, L] matrices: what dense attention costs without a fused kernel.
              Skipped where its estimated footprint exceeds --math-max-gb.
  * reference blossom_ops.reference.blossom_attention, the dense-mask oracle (L x L masks,
              a Python top-n loop over B*L*Hk rows). Skipped above --ref-max-len.
A measurement is one forward and one backward (out.backward(grad) with a fixed random grad);
gradients go to q, k, v and the gate logits.

Timing: every (L, peer) runs in a fresh subprocess (2 warm-up runs, then --repeats timed runs,
the median is reported, min and max kept in the JSON). Threads: torch's default (all cores).

Memory: peak resident memory (RSS) of that subprocess during its FIRST forward + backward,
minus its RSS just before it (inputs and the output gradient already allocated). Linux's
peak counter (VmHWM in /proc/self/status) is reset by writing 5 to /proc/self/clear_refs right
before the run, so the number is exactly the extra memory that one forward + backward needed
(activations saved for backward, outputs, gradients, workspaces). Measuring the first run in a
fresh process keeps freed-but-cached memory from earlier runs out of it; torch's CPU allocator
does not cache. Page granularity (4 KiB) and allocator overhead are included, which is what a
user pays.

FLOPs: counted exactly from the masks (they depend only on L and the config, not the data),
multiply-add = 2 FLOPs. Dense causal attention: 4*D per allowed (i, j) pair per head forward
(QK^T and PV), and 2.5x that backward (dQ, dK, dV, dP plus recomputing the logits), so 3.5x
forward for forward + backward. Blossom: the same per allowed pair of its two branches
(own block + top_n selected blocks; window + power-of-two offsets), plus the selection
scores, 2*D per (query head, scored compressed token), forward only (indices have no
gradient). Each branch computes its own pairs, so a key both branches see counts twice.
The block compression itself (O(B*L*Hk*D)) is negligible and not counted.

    python3 benchmarks/bench_cpu.py            # L in {50, 200, 1000, 4000}, saves results
    python3 benchmarks/bench_cpu.py --quick    # L in {50, 200}, fewer repeats
Results: benchmarks/results/cpu_<date>[_quick].{csv,json} (machine, torch version, date).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

B, HQ, HK, D = 32, 8, 2, 16
CFG = dict(block_len=32, stride=16, block_size=16, top_n=4, window=8, dilated=True, causal=True)
PEERS = ("blossom", "blossom_parts", "sdpa", "sdpa_math", "reference")


# ============================================================================ FLOPs
def _allowed_pairs_dense(L: int) -> int:
    return L * (L + 1) // 2


def _allowed_pairs_blossom(L: int) -> tuple[int, int, int]:
    """(window pairs, selected-branch pairs, scored compressed tokens) summed over queries,
    for one (batch, query head), with every position valid."""
    w, bs, st, n = CFG["window"], CFG["block_size"], CFG["stride"], CFG["top_n"]
    win = sel = scored = 0
    T = -(-L // st)
    for i in range(L):
        # window: j <= i with i - j < w or i - j a power of two
        near = min(i + 1, w)
        far = sum(1 for e in range(64) if (1 << e) >= w and (1 << e) <= i)
        win += near + far
        own = i // bs
        # own block up to i, plus min(top_n, own) earlier full blocks
        sel += (i - own * bs + 1) + min(n, own) * bs
        # scored tokens: compressed tokens whose stride chunk lies in an earlier block
        scored += sum(1 for t in range(T) if (t * st) // bs < own)
    return win, sel, scored


def flops(L: int) -> dict:
    per_pair_fwd = 4 * D
    dense = 3.5 * per_pair_fwd * _allowed_pairs_dense(L) * B * HQ
    win, sel, scored = _allowed_pairs_blossom(L)
    sparse = (3.5 * per_pair_fwd * (win + sel) + 2 * D * scored) * B * HQ
    return {"dense_gflop": dense / 1e9, "blossom_gflop": sparse / 1e9,
            "keys_per_query_dense": _allowed_pairs_dense(L) / L,
            "keys_per_query_blossom": (win + sel) / L,
            "scored_tokens_per_query": scored / L}


# ============================================================================ worker
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _make_step(peer: str, L: int):
    """Returns (inputs, step) where step() runs one forward + backward."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(L)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    G = HQ // HK
    if peer in ("sdpa", "sdpa_math"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q = randn(B, HQ, L, D).requires_grad_()
        k = randn(B, HK, L, D).repeat_interleave(G, dim=1).requires_grad_()
        v = randn(B, HK, L, D).repeat_interleave(G, dim=1).requires_grad_()
        grad = randn(B, HQ, L, D)
        backend = SDPBackend.MATH if peer == "sdpa_math" else SDPBackend.FLASH_ATTENTION

        def step():
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.backward(grad)
            for t in (q, k, v):
                t.grad = None
        return (q, k, v, grad), step

    q = randn(B, L, HQ, D).requires_grad_()
    k = randn(B, L, HK, D).requires_grad_()
    v = randn(B, L, HK, D).requires_grad_()
    gate = randn(B, L, HQ, 2).requires_grad_()
    grad = randn(B, L, HQ, D)
    if peer == "blossom":
        import blossom_ops
        fn = blossom_ops.blossom_attention
    elif peer == "blossom_parts":
        fn = _blossom_from_parts
    else:
        from blossom_ops import reference
        fn = reference.blossom_attention

    def step():
        out = fn(q, k, v, gate, **CFG)
        out.backward(grad)
        for t in (q, k, v, gate):
            t.grad = None
    return (q, k, v, gate, grad), step


def _blossom_from_parts(q, k, v, gate, *, block_len, stride, block_size, top_n, window,
                        dilated, causal):
    import blossom_ops as bo

    k_cmp = bo.block_compress(k.detach(), block_len, stride)  # scores get no gradient
    idx = bo.select_blocks(q.detach(), k_cmp, top_n, block_size=block_size, stride=stride,
                           block_len=block_len, causal=causal)
    o_sel = bo.block_sparse_attention(q, k, v, idx, block_size=block_size, causal=causal)
    o_win = bo.sliding_window_attention(q, k, v, window, dilated=dilated, causal=causal)
    return bo.gate_fusion([o_sel, o_win], gate)


def worker(peer: str, L: int, repeats: int, warmup: int) -> dict:
    import torch

    torch.manual_seed(0)
    inputs, step = _make_step(peer, L)
    # memory: the first forward + backward, from a reset peak
    base = _rss_kib("VmRSS")
    exact = _reset_peak()
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    peak_mib = (_rss_kib("VmHWM") - base) / 1024 if exact else float("nan")
    for _ in range(max(0, warmup - 1)):  # the memory run was the first warm-up
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if not times:
        times = [first]
    return {"peer": peer, "L": L, "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "runs": len(times), "peak_mib": peak_mib,
            "threads": torch.get_num_threads()}


# ============================================================================ driver
def machine_info() -> dict:
    import torch

    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        model = m.group(1).strip() if m else model
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu_model": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "date": _dt.datetime.now().isoformat(timespec="seconds"), "git_commit": commit}


def math_bytes(L: int) -> float:
    """Rough footprint of the math backend: a few [B, Hq, L, L] float32 matrices."""
    return 4 * B * HQ * L * L * 4


def run_one(peer: str, L: int, repeats: int, warmup: int, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", peer, str(L),
           "--repeats", str(repeats), "--warmup", str(warmup)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"peer": peer, "L": L, "skipped": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        lines = (p.stderr or p.stdout).strip().splitlines()
        return {"peer": peer, "L": L, "skipped": "error: " + (lines[-1] if lines else
                                                                f"exit {p.returncode}")}
    return json.loads(p.stdout.strip().splitlines()[-1])


def fmt_time(s) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="L in {50, 200}, 3 repeats")
    ap.add_argument("--lengths", type=int, nargs="*", help="override the sequence lengths")
    ap.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS)
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs per measurement (default 7, 3 when L >= 1000 or --quick)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ref-max-len", type=int, default=200,
                    help="run the reference only up to this L (it builds L x L masks and "
                         "loops over B*L*Hk rows in Python)")
    ap.add_argument("--math-max-gb", type=float, default=6.0,
                    help="skip sdpa_math where its estimated footprint exceeds this")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--worker", nargs=2, metavar=("PEER", "L"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        peer, L = args.worker[0], int(args.worker[1])
        print(json.dumps(worker(peer, L, args.repeats or 3, args.warmup)))
        return 0

    lengths = args.lengths or ([50, 200] if args.quick else [50, 200, 1000, 4000])
    info = machine_info()
    print(f"# {info['cpu_model']}, {info['cores']} cores, torch {info['torch']} "
          f"({info['torch_threads']} threads), {info['date']}")
    print(f"# B={B} Hq={HQ} Hk={HK} D={D} float32, causal, forward + backward; "
          f"blossom config {CFG}")
    rows = []
    for L in lengths:
        fl = flops(L)
        res = {}
        for peer in args.peers:
            repeats = args.repeats or (3 if (args.quick or L >= 1000) else 7)
            if peer == "reference" and L > args.ref_max_len:
                res[peer] = {"skipped": f"skipped: L > {args.ref_max_len} (dense L x L masks, "
                                        "Python top-n loop)"}
            elif peer == "sdpa_math" and math_bytes(L) > args.math_max_gb * 2**30:
                res[peer] = {"skipped": f"skipped: ~{math_bytes(L) / 2**30:.0f} GiB of L x L "
                                        "matrices"}
            elif peer == "reference":
                res[peer] = run_one(peer, L, min(repeats, 3), 1, args.timeout)
            else:
                res[peer] = run_one(peer, L, repeats, args.warmup, args.timeout)
            r = res[peer]
            print(f"  L={L:5d} {peer:13s} "
                  + (r["skipped"] if "skipped" in r else
                     f"{fmt_time(r['median_s'])} (min {fmt_time(r['min_s'])}), "
                     f"peak +{r['peak_mib']:.1f} MiB"), flush=True)
        sd = res.get("sdpa", {})
        for peer, r in res.items():
            row = {"L": L, "peer": peer, "median_s": r.get("median_s"), "min_s": r.get("min_s"),
                   "max_s": r.get("max_s"), "runs": r.get("runs"), "peak_mib": r.get("peak_mib"),
                   "note": r.get("skipped", ""), **fl}
            ok = "median_s" in r and "median_s" in sd
            row["time_vs_sdpa"] = r["median_s"] / sd["median_s"] if ok else None
            row["sdpa_mem_over_this"] = (sd["peak_mib"] / r["peak_mib"]
                                         if ok and r["peak_mib"] > 0 else None)
            gflop = fl["dense_gflop"] if peer.startswith("sdpa") else fl["blossom_gflop"]
            row["gflops_per_s"] = gflop / r["median_s"] if "median_s" in r else None
            rows.append(row)

    print_table(rows)
    if not args.no_save:
        save(rows, info, args.quick)
    return 0


def print_table(rows: list) -> None:
    print()
    hdr = (f"{'L':>5} {'peer':13} {'fwd+bwd':>10} {'x SDPA':>7} {'peak MiB':>9} "
           f"{'SDPA mem/this':>13} {'GFLOP':>8} {'GFLOP/s':>8}  note")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        g = r["dense_gflop"] if r["peer"].startswith("sdpa") else r["blossom_gflop"]
        ratio = f"{r['time_vs_sdpa']:.2f}" if r["time_vs_sdpa"] is not None else "-"
        mem = f"{r['peak_mib']:.1f}" if r["peak_mib"] is not None else "-"
        memr = f"{r['sdpa_mem_over_this']:.2f}" if r["sdpa_mem_over_this"] is not None else "-"
        gps = f"{r['gflops_per_s']:.1f}" if r["gflops_per_s"] is not None else "-"
        print(f"{r['L']:>5} {r['peer']:13} {fmt_time(r['median_s']):>10} {ratio:>7} {mem:>9} "
              f"{memr:>13} {g:>8.2f} {gps:>8}  {r['note']}")
    print("\nx SDPA: median time / SDPA's (lower is faster). SDPA mem/this: SDPA's peak extra "
          "memory / this peer's (higher = this peer needs less).")
    seen = set()
    for r in rows:
        if r["L"] in seen:
            continue
        seen.add(r["L"])
        print(f"L={r['L']}: keys per query dense {r['keys_per_query_dense']:.1f}, blossom "
              f"{r['keys_per_query_blossom']:.1f} (+{r['scored_tokens_per_query']:.1f} scored "
              f"compressed tokens); FLOPs dense {r['dense_gflop']:.2f} G vs blossom "
              f"{r['blossom_gflop']:.2f} G ({r['dense_gflop'] / r['blossom_gflop']:.1f}x)")


def save(rows: list, info: dict, quick: bool) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, f"cpu_{info['date'][:10]}" + ("_quick" if quick else ""))
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    with open(stem + ".json", "w") as f:
        json.dump({"machine": info, "shape": {"B": B, "Hq": HQ, "Hk": HK, "D": D,
                                              "dtype": "float32"},
                   "config": CFG, "rows": rows}, f, indent=1)
    print(f"\nsaved {stem}.csv and {stem}.json")


if __name__ == "__main__":
    sys.exit(main())
