"""Where the time of a short-sequence blossom_attention step goes: GPU work or host overhead.

For each shape, one training step (forward + backward of blossom_attention, and of flash SDPA
for comparison) is timed three ways on the same card:
  * eager, back to back: what a training loop sees (host launch cost included when the host
    is slower than the GPU);
  * CUDA-graph replay of the same step: GPU time only (no Python, no dispatcher);
  * host time per step: wall clock of the eager loop with the GPU idle-waiting at the end.
Then the top host-side ops of one eager step (torch.profiler, self CPU time).

Usage: python3 benchmarks/host_overhead_gpu.py [--cases 64x50,64x200,16x200] [--batch 64]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import blossom_ops


def make_step(kind: str, B: int, L: int, D: int, Hq: int = 8, Hk: int = 2):
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)
    go = mk(B, L, Hq, D)
    if kind == "blossom":
        q, k, v, gl = (mk(B, L, Hq, D).requires_grad_(), mk(B, L, Hk, D).requires_grad_(),
                       mk(B, L, Hk, D).requires_grad_(), mk(B, L, Hq, 2).requires_grad_())

        def step():
            o = blossom_ops.blossom_attention(q, k, v, gl)
            return torch.autograd.grad(o, (q, k, v, gl), go)
    else:
        q = mk(B, Hq, L, D).requires_grad_()
        k = mk(B, Hk, L, D).repeat_interleave(Hq // Hk, 1).requires_grad_()
        v = mk(B, Hk, L, D).repeat_interleave(Hq // Hk, 1).requires_grad_()
        go_t = go.transpose(1, 2)

        def step():
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return torch.autograd.grad(o, (q, k, v), go_t)
    return step


def eager_ms(step, iters: int = 50) -> tuple[float, float]:
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    a.record()
    for _ in range(iters):
        step()
    b.record()
    host = (time.perf_counter() - t0) * 1e3 / iters  # host returns before the GPU is done
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters, host


def capture(step, warmup: int = 3):
    """(graph, what step() returned while captured): step run `warmup` times on a side
    stream (allocator and lazy init settle there), then captured once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def graph_ms(step, iters: int = 50) -> float:
    graph, _ = capture(step)
    graph.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        graph.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def top_host_ops(step, n: int = 12) -> None:
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    for e in rows[:n]:
        print(f"    {e.self_cpu_time_total / 5 / 1e3:7.3f} ms self CPU  x{e.count // 5:<3d} {e.key[:80]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="64x50,64x200,16x200", help="comma-separated DxL")
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    print(" kind       D     L | eager ms  graph ms  host ms/step")
    for c in a.cases.split(","):
        D, L = (int(x) for x in c.split("x"))
        for kind in ("blossom", "sdpa"):
            step = make_step(kind, a.batch, L, D)
            e, h = eager_ms(step)
            gr = graph_ms(step)
            print(f" {kind:8s} {D:3d} {L:5d} | {e:8.3f}  {gr:8.3f}  {h:8.3f}")
    for c in a.cases.split(",")[:2]:
        D, L = (int(x) for x in c.split("x"))
        print(f"\n  top host ops of one blossom step, D={D} L={L}:")
        top_host_ops(make_step("blossom", a.batch, L, D))


if __name__ == "__main__":
    main()
