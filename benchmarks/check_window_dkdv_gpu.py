"""GPU check and timing of the sliding-window dK/dV on tensor cores (window_dkdv_tc.cuh).

  check        grad_k / grad_v against the float64 reference, as a ratio to the error of the
               same-dtype PyTorch reference (the tests' rule allows 3), for bf16 / fp16,
               D in {16, 32, 64, 128 (fallback kernel)}, causal or not, dilated or not, windows
               1 .. 1000, padding, odd L; two runs must be bit-identical, grads finite.
  bench L D    per-kernel CUDA time of sliding_window_attention's backward at B=64, Hq=8,
               Hk=2, bf16, window 8 dilated causal.
  dump PATH    grad_k / grad_v of the check's bf16 / fp16 cases (D <= 64) saved to PATH.
  same A B     whether two dumps are bit-identical (the switch below changes where lse /
               delta are read from, not the arithmetic, so tc1 and the default must agree).
Run each once plain and once with BLOSSOM_OPS_CUDA_WIN_DKDV=old (the staged per-key kernel)
or =tc1 (the tile kernel reading lse / delta in place, before the head-major copies) for an
A/B on the same card:
  python3 benchmarks/check_window_dkdv_gpu.py check
  python3 benchmarks/check_window_dkdv_gpu.py bench 4096 64
  BLOSSOM_OPS_CUDA_WIN_DKDV=old python3 benchmarks/check_window_dkdv_gpu.py bench 4096 64
  BLOSSOM_OPS_CUDA_WIN_DKDV=tc1 python3 benchmarks/check_window_dkdv_gpu.py bench 4096 64
  python3 benchmarks/check_window_dkdv_gpu.py dump /tmp/a.pt
  BLOSSOM_OPS_CUDA_WIN_DKDV=tc1 python3 benchmarks/check_window_dkdv_gpu.py dump /tmp/b.pt
  python3 benchmarks/check_window_dkdv_gpu.py same /tmp/a.pt /tmp/b.pt
"""
from __future__ import annotations

import sys

import torch

import blossom_ops
from blossom_ops import reference as ref
from profile_gpu import kernel_times  # same directory


def grads(fn, q, k, v, go, **kw):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kw)
    out.backward(go)
    return [t.grad for t in leaves]


CASES = [  # G, L, window, dilated, causal, pad
    (4, 203, 8, True, True, False), (4, 203, 8, True, False, True),
    (1, 64, 1, True, False, False), (3, 150, 3, True, True, True),
    (2, 97, 16, True, False, False), (4, 77, 33, False, True, True),
    (2, 40, 1000, True, True, False), (8, 300, 12, True, True, True),
    (1, 9, 2, False, False, False), (4, 1100, 8, True, True, False),
]


def dump(path: str) -> int:
    torch.manual_seed(0)
    out = {}
    for dtype in (torch.bfloat16, torch.float16):
        for D in (16, 32, 64):
            for n, (G, L, window, dilated, causal, pad) in enumerate(CASES):
                B, Hk = 2, 2
                q = torch.randn(B, L, Hk * G, D, device="cuda").to(dtype)
                k = torch.randn(B, L, Hk, D, device="cuda").to(dtype)
                v = torch.randn(B, L, Hk, D, device="cuda").to(dtype)
                go = torch.randn(B, L, Hk * G, D, device="cuda").to(dtype)
                lengths = torch.tensor([L, max(1, L - 11)], device="cuda") if pad else None
                g = grads(blossom_ops.sliding_window_attention, q, k, v, go, window=window,
                          dilated=dilated, causal=causal, lengths=lengths)
                out[f"{dtype} D={D} case={n}"] = [t.cpu() for t in g[1:]]
    torch.save(out, path)
    print(f"saved {len(out)} cases to {path}")
    return 0


def same(pa: str, pb: str) -> int:
    a, b = torch.load(pa), torch.load(pb)
    diff = [key for key in a if not all(torch.equal(x, y) for x, y in zip(a[key], b[key]))]
    print(f"{len(a) - len(diff)}/{len(a)} cases bit-identical" + (f"; differ: {diff}" if diff else ""))
    return 1 if diff or a.keys() != b.keys() else 0


def check() -> int:
    torch.manual_seed(0)
    worst, bad = 0.0, 0
    cases = CASES
    for dtype in (torch.bfloat16, torch.float16):
        for D in (16, 32, 64, 128):
            for G, L, window, dilated, causal, pad in cases:
                B, Hk = 2, 2
                Hq = Hk * G
                q = torch.randn(B, L, Hq, D, device="cuda").to(dtype)
                k = torch.randn(B, L, Hk, D, device="cuda").to(dtype)
                v = torch.randn(B, L, Hk, D, device="cuda").to(dtype)
                go = torch.randn(B, L, Hq, D, device="cuda").to(dtype)
                lengths = torch.tensor([L, max(1, L - 11)], device="cuda") if pad else None
                kw = dict(window=window, dilated=dilated, causal=causal, lengths=lengths)
                g1 = grads(blossom_ops.sliding_window_attention, q, k, v, go, **kw)
                g2 = grads(blossom_ops.sliding_window_attention, q, k, v, go, **kw)
                det = all(torch.equal(a, b) for a, b in zip(g1, g2))
                c64 = lambda t: t.double().cpu()
                kw64 = dict(kw, lengths=None if lengths is None else lengths.cpu())
                g64 = grads(ref.sliding_window_attention, c64(q), c64(k), c64(v), c64(go), **kw64)
                glp = grads(ref.sliding_window_attention, q, k, v, go, **kw)
                msg, ok = [], det
                for name, a, r, lp in zip("qkv", g1, g64, glp):
                    e = (a.double().cpu() - r).norm().item() / max(r.norm().item(), 1e-30)
                    elp = (lp.double().cpu() - r).norm().item() / max(r.norm().item(), 1e-30)
                    fin = torch.isfinite(a).all().item()
                    ratio = e / max(elp, 1e-30)
                    msg.append(f"d{name} {e:.2e} (lp {elp:.2e}, x{ratio:.2f}){'' if fin else ' NONFINITE'}")
                    ok = ok and fin
                    if name != "q":
                        worst = max(worst, ratio)
                        ok = ok and e <= 3 * elp + (1e-2 if dtype == torch.bfloat16 else 2e-3)
                bad += 0 if ok else 1
                print(f"{'ok  ' if ok else 'FAIL'} {str(dtype)[6:]} D={D} G={G} L={L} w={window} "
                      f"dil={dilated} causal={causal} pad={pad} det={det} | " + " | ".join(msg),
                      flush=True)
    print(f"worst dK/dV error ratio {worst:.2f}; {bad} failing")
    return 1 if bad else 0


def bench(L: int, D: int) -> int:
    B, Hq, Hk = 64, 8, 2
    torch.manual_seed(1)
    mk = lambda h: torch.randn(B, L, h, D, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True)
    q, k, v = mk(Hq), mk(Hk), mk(Hk)
    out = blossom_ops.sliding_window_attention(q, k, v, window=8, dilated=True, causal=True)
    go = torch.randn_like(out)
    step = lambda: torch.autograd.grad(out, (q, k, v), go, retain_graph=True)  # noqa: E731
    for ms, n, key in kernel_times(step, 5, warmup=2):
        if "dkdv" in key or "dq" in key:
            print(f"L={L} D={D} {key[:80]:80s} {ms / n:.3f} ms avg x{n}", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "bench":
        sys.exit(bench(int(sys.argv[2]), int(sys.argv[3])))
    if len(sys.argv) > 2 and sys.argv[1] == "dump":
        sys.exit(dump(sys.argv[2]))
    if len(sys.argv) > 3 and sys.argv[1] == "same":
        sys.exit(same(sys.argv[2], sys.argv[3]))
    sys.exit(check())
