# GPU check of the tiled block-sparse dK/dV (block_sparse_dkdv.cu): `check` compares grads with the float64
# reference (error ratio vs the same-dtype PyTorch reference) and bit-reproducibility; `bench L D`
# prints per-kernel CUDA times (run once plain, once with BLOSSOM_OPS_CUDA_SIMPLE=1 for the old kernel).
import os, sys, time, torch
import blossom_ops
from blossom_ops import reference as ref

def grads(fn, q, k, v, idx, bs, causal, lengths, go):
    ls = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*ls, idx, block_size=bs, causal=causal, lengths=lengths)
    out.backward(go)
    return [t.grad for t in ls]

def check():
    torch.manual_seed(0)
    worst = 0
    for dtype in (torch.bfloat16, torch.float16):
        for D in (16, 32, 64, 128):
            for (G, bs, L, causal, pad, n) in [(4, 16, 203, True, False, 3), (1, 16, 64, False, True, 2),
                                               (3, 32, 150, True, True, 4), (8, 16, 97, True, False, 6),
                                               (2, 48, 130, False, False, 2), (4, 8, 77, True, False, 3)]:
                B, Hk = 2, 2
                Hq = Hk * G
                q = torch.randn(B, L, Hq, D, device="cuda").to(dtype)
                k = torch.randn(B, L, Hk, D, device="cuda").to(dtype)
                v = torch.randn(B, L, Hk, D, device="cuda").to(dtype)
                go = torch.randn(B, L, Hq, D, device="cuda").to(dtype)
                C = -(-L // bs)
                idx = torch.randint(-1, C, (B, L, Hk, n), device="cuda", dtype=torch.int32)
                idx[0, :, 0, 0] = 0  # a popular block
                lengths = torch.tensor([L, L - 11], device="cuda") if pad else None
                g1 = grads(blossom_ops.block_sparse_attention, q, k, v, idx, bs, causal, lengths, go)
                g1b = grads(blossom_ops.block_sparse_attention, q, k, v, idx, bs, causal, lengths, go)
                det = all(torch.equal(a, b) for a, b in zip(g1, g1b))
                c64 = lambda t: t.double().cpu()
                g64 = grads(ref.block_sparse_attention, c64(q), c64(k), c64(v), idx.cpu(), bs, causal,
                            None if lengths is None else lengths.cpu(), c64(go))
                glp = grads(ref.block_sparse_attention, q, k, v, idx, bs, causal, lengths, go)
                msg = []
                for name, a, r, lp in zip("qkv", g1, g64, glp):
                    e = (a.double().cpu() - r).abs().max().item()
                    elp = (lp.double().cpu() - r).abs().max().item()
                    fin = torch.isfinite(a).all().item()
                    msg.append(f"d{name} err {e:.3e} lp {elp:.3e} ratio {e / max(elp, 1e-30):.2f}{'' if fin else ' NONFINITE'}")
                    if name != "q": worst = max(worst, e / max(elp, 1e-30))
                print(dtype, D, G, bs, L, causal, pad, n, "det", det, " | ".join(msg), flush=True)
    print("WORST dk/dv ratio", worst)

def bench(L, D):
    B, Hq, Hk, bs, n = 64, 8, 2, 16, 4
    dtype = torch.bfloat16
    torch.manual_seed(1)
    q = torch.randn(B, L, Hq, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, L, Hk, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, L, Hk, D, device="cuda", dtype=dtype, requires_grad=True)
    C = L // bs
    own = (torch.arange(L, device="cuda") // bs).view(1, L, 1, 1)
    # causal-valid random picks among earlier blocks
    idx = (torch.rand(B, L, Hk, n, device="cuda") * (own + 1).float()).floor().to(torch.int32)
    out = blossom_ops.block_sparse_attention(q, k, v, idx, block_size=bs)
    go = torch.randn_like(out)
    from torch.profiler import profile, ProfilerActivity
    for _ in range(2):
        torch.autograd.grad(out, (q, k, v), go, retain_graph=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            torch.autograd.grad(out, (q, k, v), go, retain_graph=True)
        torch.cuda.synchronize()
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and "kernel" in e.key.lower():
            print(f"L={L} D={D} {e.key[:90]:90s} {e.device_time / 1000:.3f} ms avg x{e.count}", flush=True)

if __name__ == "__main__":
    if sys.argv[1] == "check": check()
    else: bench(int(sys.argv[2]), int(sys.argv[3]))
