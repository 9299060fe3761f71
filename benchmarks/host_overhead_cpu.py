"""Host (CPU-side) overhead of one blossom_attention training step, measured on the CPU.

With tiny tensors (default B=1, L=4, Hq=8, Hk=2, D=16) and one thread the kernels cost next
to nothing, so the time per call is what the framework spends around them: the Python
wrapper, the dispatcher, the autograd node and its backward. That is the same host work an
eager GPU step pays before its kernels can launch, which is why short sequences on a GPU
are host-bound (benchmarks/host_overhead_gpu.py measures it there). SDPA over the same
shapes is timed in the same run as the peer.

Timed, per call, in microseconds:
  blossom step        forward + torch.autograd.grad of q, k, v, gate_logits
  blossom fwd grad    forward only, inputs requiring grad (autograd node recorded)
  blossom fwd nograd  forward only under torch.no_grad()
  parts step          the same mechanism composed from the single ops, as the layer does with a
                      learnable compressor: block_compress of k and v, select_blocks,
                      block_sparse / sliding_window / compressed attention, gate_fusion (R = 3),
                      forward + grad of q, k, v, gate_logits
  sdpa step           F.scaled_dot_product_attention(is_causal=True) forward + grad of q, k, v

Each case is warmed up, then timed --rounds times over --iters calls; the median round is
reported. --clock cpu counts this process's CPU time instead of wall time: on a machine shared
with other jobs it leaves out the time the process waits to be scheduled. --profile adds the
torch.profiler table of a few steps (self CPU time).

Usage: python3 benchmarks/host_overhead_cpu.py [--shape 1,4,8,2,16] [--iters 500]
           [--rounds 5] [--threads 1] [--clock wall|cpu] [--profile]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import blossom_ops
from blossom_ops.nn import sparse_attention


def make_cases(B: int, L: int, Hq: int, Hk: int, D: int):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    q, k, v, gl = mk(B, L, Hq, D), mk(B, L, Hk, D), mk(B, L, Hk, D), mk(B, L, Hq, 2)
    go = torch.randn(B, L, Hq, D, generator=g)

    def step():
        o = blossom_ops.blossom_attention(q, k, v, gl)
        return torch.autograd.grad(o, (q, k, v, gl), go)

    def fwd_grad():
        return blossom_ops.blossom_attention(q, k, v, gl)

    def fwd_nograd():
        with torch.no_grad():
            return blossom_ops.blossom_attention(q, k, v, gl)

    gl3 = mk(B, L, Hq, 3)

    def parts():
        k_cmp = blossom_ops.block_compress(k, 32, 16)
        v_cmp = blossom_ops.block_compress(v, 32, 16)
        o = sparse_attention(q, k, v, gl3, causal=True, k_cmp=k_cmp, v_cmp=v_cmp)
        return torch.autograd.grad(o, (q, k, v, gl3), go)

    # SDPA takes [B, H, L, D]; its keys are expanded to Hq heads (no GQA argument needed).
    qt, kt, vt = mk(B, Hq, L, D), mk(B, Hq, L, D), mk(B, Hq, L, D)
    go_t = go.transpose(1, 2)

    def sdpa():
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        return torch.autograd.grad(o, (qt, kt, vt), go_t)

    return [("blossom step", step), ("blossom fwd grad", fwd_grad),
            ("blossom fwd nograd", fwd_nograd), ("parts step", parts), ("sdpa step", sdpa)]


def time_us(fn, iters: int, rounds: int, clock, warmup: int = 50) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(rounds):
        t0 = clock()
        for _ in range(iters):
            fn()
        out.append((clock() - t0) / iters * 1e6)
    return out


def print_self_cpu_table(step, steps: int, rows: int) -> None:
    """torch.profiler table (self CPU time, largest first) of `steps` calls of step()."""
    from torch.profiler import profile

    with profile() as p:
        for _ in range(steps):
            step()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1,4,8,2,16", help="B,L,Hq,Hk,D (default 1,4,8,2,16)")
    ap.add_argument("--iters", type=int, default=500, help="calls per timed round")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds; the median is shown")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: time.perf_counter; cpu: time.process_time (this process only)")
    ap.add_argument("--profile", action="store_true",
                    help="also print the torch.profiler table of 20 steps")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    B, L, Hq, Hk, D = (int(s) for s in args.shape.split(","))
    cases = make_cases(B, L, Hq, Hk, D)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"torch {torch.__version__}, {args.threads} thread(s), B={B} L={L} Hq={Hq} Hk={Hk} "
          f"D={D}, {args.rounds} rounds x {args.iters} calls, {args.clock} clock")
    print(f"{'case':<20} {'median us':>10}   rounds")
    for name, fn in cases:
        rs = time_us(fn, args.iters, args.rounds, clock)
        print(f"{name:<20} {statistics.median(rs):10.1f}   "
              + " ".join(f"{r:.1f}" for r in rs))

    if args.profile:
        print_self_cpu_table(cases[0][1], steps=20, rows=25)


if __name__ == "__main__":
    main()
