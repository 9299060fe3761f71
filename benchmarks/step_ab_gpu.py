"""End-to-end A/B of environment switches: blossom_attention fwd+bwd wall time per variant.

Each variant is a set of BLOSSOM_OPS_CUDA_* assignments (the switches are read once per
process), so every measurement runs in a fresh process; variants alternate, REPS rounds, and
the table gives each variant's per-round medians. Times are bench_gpu.py's (triton do_bench
median of one fwd+bwd step, L2 flushed before each), so unlike profile_gpu.py's kernel sums
they include what overlaps between kernels and the gaps between them.

Usage: python3 benchmarks/step_ab_gpu.py --cases 64x4096,64x16384 --reps 3 \\
           --variant base: --variant ctas8:BLOSSOM_OPS_CUDA_FUSED_FWD_CTAS=8
       (one case in this process: python3 benchmarks/step_ab_gpu.py --one 64x4096)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys


def measure_one(case: str) -> None:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_gpu import bench_ours, make_inputs  # the benchmark's own inputs and timer

    D, L = (int(x) for x in case.split("x"))
    q, k, v, gl = make_inputs(64, L, 8, 2, D)
    fwd_ms, fwdbwd_ms = bench_ours(q, k, v, gl)
    torch.cuda.synchronize()
    print(f"RESULT {case} {fwd_ms:.4f} {fwdbwd_ms:.4f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="64x4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:VAR=VALUE,VAR=VALUE (empty after the colon: no change)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        measure_one(a.one)
        return 0
    variants = []
    for spec in a.variant or ["base:"]:
        name, _, assigns = spec.partition(":")
        env = dict(x.split("=", 1) for x in assigns.split(",") if x)
        variants.append((name, env))
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for rep in range(a.reps):
        for case in a.cases.split(","):
            for name, env in variants:
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", case],
                                     env={**os.environ, **env}, capture_output=True, text=True)
                line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
                if out.returncode != 0 or not line:
                    print(f"{name} {case}: failed\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
                    continue
                _, _, f, fb = line[0].split()
                results.setdefault((case, name), []).append((float(f), float(fb)))
                print(f"round {rep} {case:>9} {name:>12}: fwd {float(f):8.3f} ms  "
                      f"fwd+bwd {float(fb):8.3f} ms", flush=True)
    print("\ncase, variant: fwd ms per round | fwd+bwd ms per round")
    for (case, name), rs in results.items():
        print(f"{case:>9} {name:>12}: " + " ".join(f"{f:.3f}" for f, _ in rs) + " | "
              + " ".join(f"{fb:.3f}" for _, fb in rs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
