"""Where an eager short-sequence step loses time: the GPU timeline of one fwd+bwd step.

bench_gpu.py times an eager step the way triton's do_bench does (L2 flushed before every call,
one event pair per call), and at L = 200, D = 64 that eager time is ~0.08 ms above the CUDA-graph
replay of the same step, while SDPA's is not. This script profiles a few such calls (flush, then
the step) with CPU and CUDA activities and prints, per call, each kernel's duration and the
idle gap before it (GPU waiting for the host), so the gap can be attributed to a launch.

Usage: python3 benchmarks/eager_timeline_gpu.py [--cases 64x200,16x200] [--batch 64]
"""
from __future__ import annotations

import argparse

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from host_overhead_gpu import make_step  # same directory


def kernel_events(prof):
    """CUDA kernel / memset events of the profile, sorted by GPU start time (microseconds)."""
    evs = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    return sorted(evs, key=lambda e: e.time_range.start)


def timeline(step, calls: int = 3) -> None:
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush.zero_()
            step()
        torch.cuda.synchronize()
    evs = kernel_events(prof)
    # Calls are separated by the flush: the fill of an int8 tensor (no op of ours fills int8).
    starts = [i for i, e in enumerate(evs) if "FillFunctor<signed char>" in e.name]
    for n, s in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(evs)
        seq = evs[s:end]
        flush_end = seq[0].time_range.end
        busy = sum(e.time_range.elapsed_us() for e in seq[1:])
        span = seq[-1].time_range.end - flush_end
        print(f"  call {n}: span after flush {span:7.1f} us, kernels {busy:7.1f} us, "
              f"idle {span - busy:7.1f} us")
        prev = flush_end
        for e in seq[1:]:
            gap = e.time_range.start - prev
            print(f"      gap {gap:6.1f}  run {e.time_range.elapsed_us():6.1f}  {e.name[:90]}")
            prev = e.time_range.end


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="64x200,16x200", help="comma-separated DxL")
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    for c in a.cases.split(","):
        D, L = (int(x) for x in c.split("x"))
        for kind in ("blossom", "sdpa"):
            print(f"\n== {kind} D={D} L={L} B={a.batch}")
            timeline(make_step(kind, a.batch, L, D))


if __name__ == "__main__":
    main()
