"""Bit-identity of blossom_attention's outputs and gradients under a CUDA A/B switch.

Most BLOSSOM_OPS_CUDA_* switches change only launch bounds, buffer counts or schedules, so
the results must be the same bits. This runs the same cases in two child processes (the
switches are read once per process): one with the environment as given, one with the
assignments on the command line added, and compares every output and gradient bit for bit.
The short path is off in both (BLOSSOM_OPS_CUDA_SHORT_MAX_LEN=0), so the long kernels run.

    python3 benchmarks/check_env_bits_gpu.py BLOSSOM_OPS_CUDA_WIN_DKDV_CTAS=4
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

CASES = [  # B, L, Hq, Hk, D, dtype, pad, causal
    (2, 1000, 8, 2, 64, "bfloat16", True, True),
    (1, 2053, 8, 2, 64, "float16", False, True),
    (2, 777, 4, 4, 64, "bfloat16", True, True),
    (1, 600, 8, 2, 64, "bfloat16", False, False),
    (2, 900, 8, 2, 32, "bfloat16", True, True),
    (1, 4096, 8, 2, 64, "bfloat16", False, True),
]


def child(path: str) -> None:
    import torch

    import blossom_ops

    results = []
    for n, (B, L, Hq, Hk, D, dt, pad, causal) in enumerate(CASES):
        gen = torch.Generator(device="cuda").manual_seed(1234 + n)
        dtype = getattr(torch, dt)
        ins = [torch.randn(*s, device="cuda", dtype=dtype, generator=gen).requires_grad_()
               for s in ((B, L, Hq, D), (B, L, Hk, D), (B, L, Hk, D), (B, L, Hq, 2))]
        ln = torch.tensor([L - 37 * b for b in range(B)], device="cuda") if pad else None
        out = blossom_ops.blossom_attention(*ins, lengths=ln, causal=causal)
        go = torch.randn(out.shape, device="cuda", dtype=dtype, generator=gen)
        grads = torch.autograd.grad(out, ins, go)
        results.append([t.detach().cpu() for t in (out, *grads)])
    torch.save(results, path)


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return 0
    extra = dict(a.split("=", 1) for a in sys.argv[1:])
    base_env = dict(os.environ, BLOSSOM_OPS_CUDA_SHORT_MAX_LEN="0")
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, env in (("base", base_env), ("switch", dict(base_env, **extra))):
            path = os.path.join(tmp, name + ".pt")
            subprocess.run([sys.executable, __file__, "--child", path], env=env, check=True)
            paths.append(path)
        import torch

        a, b = (torch.load(p) for p in paths)
    bad = 0
    names = ("out", "dq", "dk", "dv", "dgate")
    for case, ra, rb in zip(CASES, a, b):
        for name, x, y in zip(names, ra, rb):
            # Every case is 16-bit, so are its gradients: compare the raw bits.
            if not torch.equal(x.view(torch.int16), y.view(torch.int16)):
                bad += 1
                diff = (x.float() - y.float()).abs().max().item()
                print(f"DIFFER {case} {name}: max |a - b| {diff:.3e}")
    print(f"{extra}: {'all bit-identical' if bad == 0 else f'{bad} tensors differ'} "
          f"({len(CASES)} cases x {len(names)} tensors)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
