"""Per-kernel CUDA time of blossom_attention forward+backward (torch.profiler).

Shows where the fused op spends its time, kernel by kernel, at the benchmark's shapes
(bf16, B=64, Hq=8, Hk=2, default BlossomRec configuration).

Usage: python3 benchmarks/profile_gpu.py [--cases 64x4096,16x200] [--batch 64] [--steps 5]
                                         [--q-heads 8 --kv-heads 2]
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import blossom_ops

CFG = dict(block_len=32, stride=16, block_size=16, top_n=4, window=8, dilated=True, causal=True)


def kernel_times(step, steps: int, warmup: int = 3):
    """Runs step() warmup times, then steps times under torch.profiler; returns
    [(ms per step, calls per step, kernel name)] of every event with device time, largest
    first. The one kernel timer of the benchmarks' per-kernel reports."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((t / steps / 1e3, e.count // steps, e.key))
    rows.sort(reverse=True)
    return rows


def profile_case(B: int, L: int, D: int, steps: int, Hq: int = 8, Hk: int = 2) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16,
                                generator=g).requires_grad_()
    q, k, v, gl = mk(B, L, Hq, D), mk(B, L, Hk, D), mk(B, L, Hk, D), mk(B, L, Hq, 2)
    go = torch.randn(B, L, Hq, D, device="cuda", dtype=torch.bfloat16)

    def step():
        o = blossom_ops.blossom_attention(q, k, v, gl, **CFG)
        torch.autograd.grad(o, (q, k, v, gl), go)
    rows = kernel_times(step, steps)
    total = sum(r[0] for r in rows)
    print(f"\n== B={B} L={L} D={D} Hq={Hq} Hk={Hk} bf16: {total:.3f} ms of kernels per fwd+bwd")
    for ms, n, key in rows[:14]:
        print(f"  {ms:9.3f} ms {100 * ms / total:5.1f}%  x{n:<3d} {key[:100]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="16x200,64x200,64x1024,16x4096,64x4096,64x16384",
                    help="comma-separated DxL")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--q-heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2,
                    help="KV heads (8 with --q-heads 8: plain multi-head attention, G = 1)")
    a = ap.parse_args()
    if a.q_heads % a.kv_heads != 0:
        ap.error("--q-heads must be a multiple of --kv-heads")
    print(torch.cuda.get_device_name(), torch.__version__)
    for c in a.cases.split(","):
        D, L = (int(x) for x in c.split("x"))
        profile_case(a.batch, L, D, a.steps, a.q_heads, a.kv_heads)


if __name__ == "__main__":
    main()
