"""GPU check and timing of the block-sparse dK/dV (csrc/cuda/block_sparse_dkdv*.cu/.cuh).

  check        grad_q / grad_k / grad_v of block_sparse_attention against the float64 reference
               (CPU), as relative Frobenius errors (norm floor 1) and their ratio to the error of the same-dtype
               PyTorch reference; a case fails when dK or dV exceeds 3x that plus a floor
               (1e-2 bf16, 2e-3 fp16), when a gradient is not finite, or when two backward runs
               are not bit-identical. Cases: bf16 / fp16, D in {16, 32, 64, 128}, G in
               {1, 2, 3, 4, 8}, block sizes 16 / 32 / 48 (and 8: generic kernel), L with tails
               (1, 9, 97, 203, ...), causal or not, lengths or a validity mask with holes,
               duplicates and -1 in block_idx, a block every query selects, strided q / dO.
               Each case also names the dK/dV kernel that ran (torch.profiler) and checks it is
               the expected one: bs_dkdv_mma_kernel for 16-bit inputs and block_size % 16 == 0,
               the wmma kernel with BLOSSOM_OPS_CUDA_BS_DKDV=old, the generic one otherwise.
  ab           runs `check`'s inputs in two child processes, default and BLOSSOM_OPS_CUDA_BS_DKDV=
               old (the switch is read once per process), and prints, per case, max |new - old|
               relative to max |old| for dK and dV next to both errors against float64.
  bench L D    per-kernel CUDA times of block_sparse_attention's backward at B=64, Hq=8, Hk=2,
               bf16, block 16, top-n 4, random causal picks (`--popular`: every query also picks
               block 0). Run it plain and with BLOSSOM_OPS_CUDA_BS_DKDV=old on the same card.

    python3 benchmarks/check_bs_dkdv.py check
    BLOSSOM_OPS_CUDA_BS_DKDV=old python3 benchmarks/check_bs_dkdv.py check
    python3 benchmarks/check_bs_dkdv.py ab
    python3 benchmarks/check_bs_dkdv.py bench 4096 64
    BLOSSOM_OPS_CUDA_BS_DKDV=old python3 benchmarks/check_bs_dkdv.py bench 4096 64
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch

import blossom_ops
from blossom_ops import reference as ref
from profile_gpu import kernel_times  # same directory

# G, block_size, L, causal, pad ("lengths" | "valid" | None), top_n, variant
# variant: "popular" (every query also selects block 0), "strided" (q / dO with head stride 2D)
CASES = [
    (4, 16, 203, True, None, 3, None),
    (1, 16, 64, False, "lengths", 2, None),
    (3, 32, 150, True, "lengths", 4, None),
    (8, 16, 97, True, None, 6, None),
    (2, 48, 130, False, None, 2, None),
    (4, 8, 77, True, None, 3, None),          # block 8: generic kernel
    (4, 16, 9, True, None, 2, None),          # L < 16
    (2, 16, 1, True, None, 1, None),          # L = 1
    (4, 16, 300, True, "valid", 4, None),     # validity mask with holes
    (4, 16, 256, True, None, 4, "popular"),   # block 0 in every list
    (2, 32, 161, False, "valid", 3, "popular"),
    (4, 16, 190, True, "lengths", 4, "strided"),
    (4, 16, 230, True, "lengths", 10, None),  # top_n > 8: the index reads rows in place
]
DTYPES = ("bfloat16", "float16")
DIMS = (16, 32, 64, 128)


def make_case(case, D, dtype, seed):
    G, bs, L, causal, pad, n, variant = case
    B, Hk = 2, 2
    Hq = Hk * G
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    mk = lambda *s: torch.randn(*s, generator=g).to(dt)  # noqa: E731
    q, k, v, go = mk(B, L, Hq, D), mk(B, L, Hk, D), mk(B, L, Hk, D), mk(B, L, Hq, D)
    C = -(-L // bs)
    idx = torch.randint(-1, C, (B, L, Hk, n), generator=g, dtype=torch.int32)
    if n >= 2:
        idx[:, ::3, :, 1] = idx[:, ::3, :, 0]  # duplicates
    if variant == "popular":
        idx[:, :, :, 0] = 0
    kw = dict(block_size=bs, causal=causal)
    if pad == "lengths":
        kw["lengths"] = torch.tensor([L, max(1, L - 11)])
    elif pad == "valid":
        valid = torch.rand(B, L, generator=g) < 0.8
        valid[:, 0] = True
        kw["valid"] = valid
    return dict(q=q, k=k, v=v, go=go, idx=idx, kw=kw, strided=variant == "strided")


def to_cuda(t):
    """Inputs on the GPU; with strided, q and dO become views with head stride 2 D."""
    kw = {n: x.cuda() for n, x in t["kw"].items() if torch.is_tensor(x)}
    kw.update({n: x for n, x in t["kw"].items() if not torch.is_tensor(x)})
    q, go = t["q"].cuda(), t["go"].cuda()
    if t["strided"]:
        D = q.shape[-1]
        wq = torch.zeros(*q.shape[:-1], 2 * D, dtype=q.dtype, device="cuda")
        wg = torch.zeros_like(wq)
        wq[..., :D] = q
        wg[..., D:] = go
        q, go = wq[..., :D], wg[..., D:]
    return q, t["k"].cuda(), t["v"].cuda(), go, t["idx"].cuda(), kw


def grads(fn, q, k, v, go, idx, kw):
    leaves = [x.detach().clone().requires_grad_() if x.is_contiguous() else
              x.detach().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves, idx, **kw)
    out.backward(go)
    return [x.grad for x in leaves]


def dkdv_kernels(q, k, v, go, idx, kw):
    rows = kernel_times(lambda: grads(blossom_ops.block_sparse_attention, q, k, v, go, idx, kw),
                        1, warmup=0)
    return sorted({key for _, _, key in rows if "dkdv" in key.lower()})


def short_name(key):
    """'void blossom::gpu::detail::bs_wmma::bs_dkdv_kernel<...>(...)' ->
    'bs_wmma::bs_dkdv_kernel'."""
    parts = key.split("<")[0].split("(")[0].split()[-1].split("::")
    return "::".join(p for p in parts[-2:] if p != "detail")


def expected_kernel(case, D, dtype):
    bs = case[1]
    if os.environ.get("BLOSSOM_OPS_CUDA_SIMPLE") == "1" or bs % 16 != 0:
        return None  # the generic kernel (attn_kernels.cuh)
    if os.environ.get("BLOSSOM_OPS_CUDA_BS_DKDV") == "old":
        return "bs_wmma"
    return "bs_dkdv_mma_kernel"


def run_cases(save=None):
    worst, bad, res = 0.0, 0, {}
    # Relative Frobenius error; the floor 1 keeps gradients that are 0 in exact arithmetic
    # (L = 1: a softmax over one key) from dividing rounding noise by ~0.
    rel = lambda a, r: (a.double().cpu() - r).norm().item() / max(r.norm().item(), 1.0)  # noqa
    for dtype in DTYPES:
        for D in DIMS:
            for nc, case in enumerate(CASES):
                t = make_case(case, D, dtype, seed=1000 * D + nc)
                q, k, v, go, idx, kw = to_cuda(t)
                g1 = grads(blossom_ops.block_sparse_attention, q, k, v, go, idx, kw)
                g2 = grads(blossom_ops.block_sparse_attention, q, k, v, go, idx, kw)
                det = all(torch.equal(a, b) for a, b in zip(g1, g2))
                kern = dkdv_kernels(q, k, v, go, idx, kw)
                want = expected_kernel(case, D, dtype)
                kern_ok = (want is None and not any("bs_" in x for x in kern)) or \
                    (want is not None and any(want in x for x in kern))
                c64 = lambda x: x.detach().double().cpu()  # noqa: E731
                kw64 = {n: (x.cpu() if torch.is_tensor(x) else x) for n, x in kw.items()}
                g64 = grads(ref.block_sparse_attention, c64(q), c64(k), c64(v), c64(go),
                            idx.cpu(), kw64)
                glp = grads(ref.block_sparse_attention, q, k, v, go, idx, kw)
                ok, msg = det and kern_ok, []
                floor = 1e-2 if dtype == "bfloat16" else 2e-3
                for name, a, r, lp in zip("qkv", g1, g64, glp):
                    e, elp = rel(a, r), rel(lp, r)
                    fin = bool(torch.isfinite(a).all())
                    ratio = e / max(elp, 1e-6)  # 16-bit reference errors are ~1e-3
                    msg.append(f"d{name} {e:.2e} (lp {elp:.2e}, x{ratio:.2f})"
                               f"{'' if fin else ' NONFINITE'}")
                    ok = ok and fin
                    if name != "q":
                        worst = max(worst, ratio)
                        ok = ok and e <= 3 * elp + floor
                bad += 0 if ok else 1
                if save is not None:
                    res[(dtype, D, nc)] = [x.cpu() for x in g1[1:]] + [g64[1], g64[2]]
                print(f"{'ok  ' if ok else 'FAIL'} {dtype} D={D} G={case[0]} bs={case[1]} "
                      f"L={case[2]} causal={case[3]} pad={case[4]} n={case[5]} {case[6] or ''} "
                      f"det={det} kernel={'/'.join(short_name(x) for x in kern)}"
                      f"{'' if kern_ok else ' (UNEXPECTED)'} | " + " | ".join(msg), flush=True)
    print(f"worst dK/dV error ratio {worst:.2f}; {bad} failing", flush=True)
    if save is not None:
        torch.save(res, save)
    return 1 if bad else 0


def ab() -> int:
    with tempfile.TemporaryDirectory() as d:
        paths = {}
        for route in ("new", "old"):
            env = dict(os.environ)
            env.pop("BLOSSOM_OPS_CUDA_BS_DKDV", None)
            if route == "old":
                env["BLOSSOM_OPS_CUDA_BS_DKDV"] = "old"
            paths[route] = os.path.join(d, route + ".pt")
            print(f"--- {route} route", flush=True)
            rc = subprocess.call([sys.executable, __file__, "_child", paths[route]], env=env)
            if rc:
                print(f"{route} route: check failed (rc {rc})")
        new, old = torch.load(paths["new"]), torch.load(paths["old"])
    print("--- new vs old (max |new - old| / max |old|)")
    for key in new:
        dk_n, dv_n, dk64, dv64 = new[key]
        dk_o, dv_o = old[key][:2]
        f = lambda a, b: ((a.double() - b.double()).abs().max() /  # noqa: E731
                          b.double().abs().max().clamp_min(1e-30)).item()
        print(f"{key}: dK {f(dk_n, dk_o):.2e} dV {f(dv_n, dv_o):.2e} | vs float64: new dK "
              f"{f(dk_n, dk64):.2e} dV {f(dv_n, dv64):.2e}, old dK {f(dk_o, dk64):.2e} "
              f"dV {f(dv_o, dv64):.2e}")
    return 0


def bench(L: int, D: int, popular: bool) -> int:
    B, Hq, Hk, bs, n = 64, 8, 2, 16, 4
    torch.manual_seed(1)
    mk = lambda h: torch.randn(B, L, h, D, device="cuda", dtype=torch.bfloat16,  # noqa: E731
                               requires_grad=True)
    q, k, v = mk(Hq), mk(Hk), mk(Hk)
    own = (torch.arange(L, device="cuda") // bs).view(1, L, 1, 1)
    # causal-valid random picks among earlier blocks (and the own block, ignored)
    idx = (torch.rand(B, L, Hk, n, device="cuda") * (own + 1).float()).floor().to(torch.int32)
    if popular:
        idx[..., 0] = 0
    out = blossom_ops.block_sparse_attention(q, k, v, idx, block_size=bs)
    go = torch.randn_like(out)
    step = lambda: torch.autograd.grad(out, (q, k, v), go, retain_graph=True)  # noqa: E731
    route = os.environ.get("BLOSSOM_OPS_CUDA_BS_DKDV", "default")
    for ms, cnt, key in kernel_times(step, 5, warmup=2):
        print(f"L={L} D={D} route={route}{' popular' if popular else ''} {key[:80]:80s} "
              f"{ms / cnt:.3f} ms avg x{cnt}", flush=True)
    return 0


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "check"
    if cmd == "bench":
        sys.exit(bench(int(sys.argv[2]), int(sys.argv[3]), "--popular" in sys.argv))
    if cmd == "ab":
        sys.exit(ab())
    if cmd == "_child":
        sys.exit(run_cases(save=sys.argv[2]))
    sys.exit(run_cases())
