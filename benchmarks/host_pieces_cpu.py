"""Host time of one blossom_attention training step on the CPU, split into its pieces.

Tiny shape (default B=1, L=16, Hq=2, Hk=1, D=16, float32, 1 thread) so the kernels cost next to
nothing and what is timed is the host path a GPU step shares with the CPU one: the Python
wrapper, argument parsing, the dispatcher, the C++ autograd node, the bindings' checks,
validity resolution and allocations (benchmarks/host_overhead_cpu.py times whole steps
against SDPA; this script splits them).

Rows, microseconds per call (median of --rounds rounds of --iters calls, cases interleaved
round by round so that the shared machine's drift hits them alike):
  step wrapper      blossom_ops.blossom_attention + torch.autograd.grad of q, k, v, gate
  step op           the same through torch.ops.blossom_ops.blossom_attention directly
  fwd wrapper       forward only, inputs requiring grad (node recorded)
  fwd op            the same through the op directly
  fwd op nograd     the op under no_grad (no node): dispatcher + binding + kernels
  bwd graph         torch.autograd.grad over one retained graph: engine + node + backward op
  bwd op            torch.ops.blossom_ops.blossom_attention_backward directly
--profile prints the torch.profiler table (self CPU) of 200 steps.

Usage: python3 benchmarks/host_pieces_cpu.py [--shape 1,16,2,1,16] [--iters 2000] [--rounds 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import blossom_ops
from host_overhead_cpu import print_self_cpu_table, time_us  # same directory


def cases(B: int, L: int, Hq: int, Hk: int, D: int):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    q, k, v, gl = mk(B, L, Hq, D), mk(B, L, Hk, D), mk(B, L, Hk, D), mk(B, L, Hq, 2)
    go = torch.randn(B, L, Hq, D, generator=g)
    op = torch.ops.blossom_ops.blossom_attention
    bop = torch.ops.blossom_ops.blossom_attention_backward
    scale = D ** -0.5
    args = (None, None, None, None, 32, 16, 16, 4, 8, True, True, scale)
    inputs = (q, k, v, gl)

    def step_wrapper():
        o = blossom_ops.blossom_attention(q, k, v, gl)
        return torch.autograd.grad(o, inputs, go)

    def step_op():
        o = op(q, k, v, gl, *args)[0]
        return torch.autograd.grad(o, inputs, go)

    def fwd_wrapper():
        return blossom_ops.blossom_attention(q, k, v, gl)

    def fwd_op():
        return op(q, k, v, gl, *args)

    def fwd_op_nograd():
        with torch.no_grad():
            return op(q, k, v, gl, *args)

    o_kept = blossom_ops.blossom_attention(q, k, v, gl)

    def bwd_graph():
        return torch.autograd.grad(o_kept, inputs, go, retain_graph=True)

    with torch.no_grad():
        res = op(q, k, v, gl, *args)
    _, o_sel, lse_sel, o_win, lse_win, o_cmp, lse_cmp, idx = res
    qd, kd, vd, gd = (t.detach() for t in inputs)

    def bwd_op():
        return bop(go, qd, kd, vd, gd, None, None, None, None, o_sel, lse_sel, o_win, lse_win,
                   o_cmp, lse_cmp, idx, 32, 16, 16, 4, 8, True, True, scale)

    return [("step wrapper", step_wrapper), ("step op", step_op), ("fwd wrapper", fwd_wrapper),
            ("fwd op", fwd_op), ("fwd op nograd", fwd_op_nograd), ("bwd graph", bwd_graph),
            ("bwd op", bwd_op)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1,16,2,1,16", help="B,L,Hq,Hk,D")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    B, L, Hq, Hk, D = (int(s) for s in args.shape.split(","))
    cs = cases(B, L, Hq, Hk, D)
    for _, fn in cs:  # warm-up
        for _ in range(200):
            fn()
    times = {name: [] for name, _ in cs}
    for _ in range(args.rounds):  # cases interleaved per round: drift hits them alike
        for name, fn in cs:
            times[name] += time_us(fn, args.iters, 1, time.perf_counter, warmup=0)
    print(f"torch {torch.__version__}, 1 thread, B={B} L={L} Hq={Hq} Hk={Hk} D={D} float32, "
          f"{args.rounds} rounds x {args.iters} calls, wall clock")
    print(f"{'case':<16} {'median us':>10}  {'min us':>8}   rounds")
    for name, rs in times.items():
        print(f"{name:<16} {statistics.median(rs):10.2f}  {min(rs):8.2f}   "
              + " ".join(f"{r:.1f}" for r in rs))
    if args.profile:
        print_self_cpu_table(cs[0][1], steps=200, rows=30)


if __name__ == "__main__":
    main()
