"""How many selected-block rows a CTA would stage if its query pairs shared them (CPU, counts only).

The fused forward / dQ give each warp one query pair (2 queries x the 4 heads of a KV group)
and stage the union of the pair's selected blocks plus their own block, 16 keys per block,
into that warp's shared memory. Nsight (session 20, H200) puts both kernels at ~87% of the
L1/TEX data-pipe wavefronts, and per 16-key chunk a warp spends 32 wavefronts writing K / V
by cp.async and 32 (forward) or 48 (dQ: K read twice) reading them by ldmatrix. A CTA of P
pairs that stages the union of its pairs' blocks once would cut the cp.async half only.

This script runs the real selection (block_compress + select_blocks on the CPU) on the
benchmark's kind of inputs (standard normal q, k; B=64 Hq=8 Hk=2 D=64 in bench_gpu.py, fewer
sequences here: the counts are per query) and reports, per CTA size P (1 = today), the
staged blocks per query and the predicted change in the chunk loops' wavefronts:

    python3 benchmarks/union_rows.py --lens 4096,16384 --batch 2

Defaults follow the paper's configuration (block_len 32, stride 16, block_size 16, top_n 4).
"""
from __future__ import annotations

import argparse

import torch

import blossom_ops

BLOCK_LEN, STRIDE, BLOCK, TOP_N = 32, 16, 16, 4
LDSM_PER_CHUNK = {"forward": 32, "dQ": 48}  # ldmatrix wavefronts per warp and 16-key chunk
CP_ASYNC_PER_CHUNK = 32  # cp.async shared-memory wavefronts per staged 16-key block


def selections(batch: int, L: int, hq: int, hk: int, d: int, seed: int) -> torch.Tensor:
    """block_idx [B, L, Hk, TOP_N] for standard-normal q, k (as the GPU benchmark draws)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, L, hq, d, generator=g)
    k = torch.randn(batch, L, hk, d, generator=g)
    k_cmp = blossom_ops.block_compress(k, BLOCK_LEN, STRIDE)
    return blossom_ops.select_blocks(q, k_cmp, TOP_N, block_size=BLOCK, stride=STRIDE,
                                     block_len=BLOCK_LEN, causal=True)


def staged_blocks(idx: torch.Tensor, pairs_per_cta: int) -> tuple[int, int]:
    """(blocks staged per CTA summed over CTAs, blocks that warps read) for one (b, g).

    idx: int32 [L, TOP_N]. A warp takes queries 2p, 2p + 1 and reads the union of their
    selected blocks and their own block; a CTA of pairs_per_cta consecutive pairs stages the
    union of its warps' blocks once (16 x pairs_per_cta <= 16 keeps one own block per CTA).
    """
    L = idx.shape[0]
    own = torch.arange(L) // BLOCK
    staged = read = 0
    q_per_cta = 2 * pairs_per_cta
    for c0 in range(0, L, q_per_cta):
        cta: set[int] = set()
        for p0 in range(c0, min(c0 + q_per_cta, L), 2):
            warp = {int(own[i]) for i in range(p0, min(p0 + 2, L))}
            warp.update(int(x) for x in idx[p0:p0 + 2].flatten().tolist() if x >= 0)
            read += len(warp)
            cta |= warp
        staged += len(cta)
    return staged, read


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lens", default="4096,16384")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--ctas", default="1,2,4,8", help="query pairs per CTA (1 = today)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    ctas = [int(x) for x in a.ctas.split(",")]
    if ctas[0] != 1:
        ctas = [1] + ctas
    for L in (int(x) for x in a.lens.split(",")):
        idx = selections(a.batch, L, 8, 2, 64, a.seed)
        queries = a.batch * 2 * L  # (b, g) query rows; each is a warp's half
        print(f"== L={L}: B={a.batch} Hk=2, blocks per query (staged / read by the warps)")
        base = None
        for P in ctas:
            staged = read = 0
            for b in range(idx.shape[0]):
                for g in range(idx.shape[2]):
                    s, r = staged_blocks(idx[b, :, g], P)
                    staged += s
                    read += r
            if base is None:
                base = (staged, read)
            line = f"  P={P}: staged {staged / queries:.3f}, read {read / queries:.3f}"
            line += f", staged rows {100 * (staged / base[0] - 1):+.1f}%"
            for kernel, ldsm in LDSM_PER_CHUNK.items():
                now = base[0] * CP_ASYNC_PER_CHUNK + base[1] * ldsm
                new = staged * CP_ASYNC_PER_CHUNK + read * ldsm
                line += f"; {kernel} chunk wavefronts {100 * (new / now - 1):+.1f}%"
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
