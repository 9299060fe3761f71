"""blossom_attention forward + backward on the fused two-branch kernels, for compute-sanitizer.

scripts/sanitize_ops.py stays at L <= 70 (the short path) and G = 2, where the fused kernels
(csrc/cuda/attn_fwd_fused.cuh, attn_dq_fused.cuh: 16-bit, L > 256, G with HPW = 4) never run.
These cases do: D 16 / 32 / 64 / 128, G 4 and 12, padding, odd L, R = 2 and 3, causal or not.
Prints one line per case (every gradient finite) and exits non-zero if one is not.

    compute-sanitizer --tool memcheck python3 benchmarks/memcheck_fused.py
"""
from __future__ import annotations

import sys

import torch

import blossom_ops

CASES = [  # B, L, Hq, Hk, D, dtype, pad, causal, R
    (2, 301, 8, 2, 64, torch.bfloat16, True, True, 2),
    (1, 290, 4, 1, 16, torch.float16, False, True, 2),
    (2, 333, 8, 2, 32, torch.bfloat16, True, True, 3),
    (1, 300, 4, 1, 128, torch.bfloat16, True, True, 2),
    (1, 300, 8, 2, 64, torch.bfloat16, False, False, 2),
    (1, 299, 12, 1, 64, torch.float16, True, True, 3),
]


def main() -> int:
    torch.manual_seed(0)
    bad = 0
    for B, L, Hq, Hk, D, dt, pad, causal, R in CASES:
        ins = [torch.randn(*s, device="cuda", dtype=dt, requires_grad=True)
               for s in ((B, L, Hq, D), (B, L, Hk, D), (B, L, Hk, D), (B, L, Hq, R))]
        ln = torch.tensor([L - 13 * b for b in range(B)], device="cuda") if pad else None
        out = blossom_ops.blossom_attention(*ins, lengths=ln, causal=causal)
        gs = torch.autograd.grad(out, ins, torch.randn_like(out))
        torch.cuda.synchronize()
        finite = [bool(torch.isfinite(g).all()) for g in (out, *gs)]
        bad += not all(finite)
        print(B, L, Hq, Hk, D, dt, pad, causal, R, "finite:", finite)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
