"""How fast can a GPU merely read what the block-sparse forward must read?

The selected-attention forward of one (batch, query, KV group) reads top_n blocks of
block_size K rows and V rows, chosen per query (random ones here, like the benchmark's random
inputs, so neighbouring queries share little). This script times a Triton kernel that only
gathers those rows and sums them (no softmax, no products, one float written per program):
a floor for any kernel that reads K/V per query, to compare with blossom_ops' forward.

Usage: python3 benchmarks/gather_floor_gpu.py [--lengths 4096,16384] [--dims 16,64]
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl


@triton.jit
def gather_sum_kernel(k_ptr, v_ptr, idx_ptr, out_ptr, L, HK: tl.constexpr, D: tl.constexpr,
                      TOP: tl.constexpr, BS: tl.constexpr):
    pid = tl.program_id(0)  # (b, i, g), g fastest
    g = pid % HK
    bi = pid // HK
    b = bi // L
    blocks = tl.load(idx_ptr + pid * TOP + tl.arange(0, TOP))          # [TOP]
    rows = blocks[:, None] * BS + tl.arange(0, BS)[None, :]               # [TOP, BS]
    rows = tl.reshape(rows, (TOP * BS,))
    off = ((b * L + rows) * HK + g)[:, None] * D + tl.arange(0, D)[None, :]
    kk = tl.load(k_ptr + off).to(tl.float32)
    vv = tl.load(v_ptr + off).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(kk + vv))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--dims", default="16,64")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--top-n", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()
    from triton.testing import do_bench
    B, Hk, TOP, BS = args.batch, 2, args.top_n, args.block_size
    print(f"{torch.cuda.get_device_name()}: gather-only floor of the selected-branch forward, "
          f"B={B} Hk={Hk} top_n={TOP} block_size={BS}, random blocks per (query, KV group)")
    for D in map(int, args.dims.split(",")):
        for L in map(int, args.lengths.split(",")):
            k = torch.randn(B, L, Hk, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            idx = torch.randint(0, L // BS, (B, L, Hk, TOP), device="cuda", dtype=torch.int32)
            out = torch.empty(B * L * Hk, device="cuda", dtype=torch.float32)
            grid = (B * L * Hk,)
            fn = lambda: gather_sum_kernel[grid](k, v, idx, out, L, Hk, D, TOP, BS)
            ms = do_bench(fn, warmup=10, rep=100, return_mode="median")
            read = B * L * Hk * TOP * BS * D * 2 * 2  # K and V rows, bf16
            print(f"  D={D:3d} L={L:6d}: {ms:7.3f} ms, {read / 1e9:6.2f} GB of K/V rows read "
                  f"-> {read / ms / 1e9:6.2f} TB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
