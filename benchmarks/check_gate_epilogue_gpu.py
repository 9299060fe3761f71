"""A/B of blossom_attention's gate in the window forward's epilogue
(BLOSSOM_OPS_CUDA_GATE_EPILOGUE; csrc/cuda/attn_gate_epilogue.cuh).

The switch is read once per process, so each route is dumped by its own process:
    python3 benchmarks/check_gate_epilogue_gpu.py dump /tmp/ge_on.pt
    BLOSSOM_OPS_CUDA_GATE_EPILOGUE=0 python3 benchmarks/check_gate_epilogue_gpu.py dump /tmp/ge_off.pt
    python3 benchmarks/check_gate_epilogue_gpu.py cmp /tmp/ge_on.pt /tmp/ge_off.pt
cmp requires every tensor (out, the branch outputs and lse, block_idx, the gradients of q, k,
v, gate_logits, k_pos, v_pos) to be bit-identical: the epilogue claims the same bits as the
gate kernel. `graph` checks that a captured CUDA graph of the forward replays with fresh
inputs to the eager result (no host sync on the gated path); `bench` times the forward
(median of CUDA events; compare numbers of one run on one card only).
Cases: the query-pair kernel (G = 4, 2, 1; D 16 / 32 / 64 / 128; odd L; padding; R = 2, 3)
and its fallbacks (G = 8, D = 40, fp32, non-contiguous logits), which must agree as well.
"""
from __future__ import annotations

import sys

import torch

import blossom_ops

DEV = "cuda"  # a CPU dry run of dump / cmp may set it (fp16 cases then need replacing)
CASES = [  # B, L, Hq, Hk, D, R, dtype, pad, strided logits
    (2, 300, 8, 2, 64, 2, torch.bfloat16, False, False),
    (2, 301, 8, 2, 64, 3, torch.bfloat16, True, False),
    (2, 517, 4, 1, 16, 2, torch.float16, True, False),
    (1, 333, 4, 2, 32, 3, torch.float16, False, False),
    (1, 263, 2, 2, 128, 2, torch.bfloat16, True, False),
    (1, 280, 8, 1, 64, 2, torch.bfloat16, False, False),   # G = 8: gate kernel
    (1, 270, 4, 2, 40, 3, torch.bfloat16, False, False),   # D = 40: gate kernel
    (1, 290, 4, 2, 64, 2, torch.float32, True, False),     # fp32: gate kernel
    (2, 300, 8, 2, 64, 2, torch.bfloat16, False, True),    # strided logits: gate kernel
    (4, 4096, 8, 2, 64, 2, torch.bfloat16, False, False),  # benchmark shape, smaller B
]


def inputs(case, seed):
    B, L, Hq, Hk, D, R, dt, pad, strided = case
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV, dt)  # noqa: E731
    t = dict(q=mk(B, L, Hq, D), k=mk(B, L, Hk, D), v=mk(B, L, Hk, D),
             k_pos=mk(Hk, 32, D) * 0.5, v_pos=mk(Hk, 32, D) * 0.5, go=mk(B, L, Hq, D))
    gl = mk(B, L, Hq, R) * 2
    if strided:
        gl = torch.cat([gl, gl], -1)[..., :R]
    t["gate_logits"] = gl
    t["lengths"] = (torch.tensor([L - 41] + [L] * (B - 1), device=DEV) if pad else None)
    return t


def run(case, seed):
    t = inputs(case, seed)
    leaves = {n: t[n].requires_grad_() for n in ("q", "k", "v", "gate_logits", "k_pos", "v_pos")}
    out, parts = blossom_ops.blossom_attention(
        leaves["q"], leaves["k"], leaves["v"], leaves["gate_logits"], k_pos=leaves["k_pos"],
        v_pos=leaves["v_pos"], lengths=t["lengths"], return_parts=True)
    out.backward(t["go"])
    res = {"out": out.detach()}
    res.update({f"part_{n}": p.detach() for n, p in parts.items() if torch.is_tensor(p)})
    res.update({f"grad_{n}": x.grad for n, x in leaves.items()})
    return {n: v.cpu() for n, v in res.items() if v is not None}


def dump(path):
    data = {}
    for ci, case in enumerate(CASES):
        print(f"start case {ci} {case[:6]} {case[6]} pad={case[7]} strided={case[8]}", flush=True)
        data[ci] = run(case, 100 + ci)
        if DEV == "cuda":
            torch.cuda.synchronize()
        print(f"ok case {ci}", flush=True)
    torch.save(data, path)
    print(f"dumped {len(data)} cases to {path}")


def cmp(a_path, b_path):
    a, b = torch.load(a_path), torch.load(b_path)
    bad = 0
    for ci in sorted(a):
        for n in sorted(a[ci]):
            x, y = a[ci][n], b[ci][n]
            same = x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
            if not same:
                bad += 1
                d = (x.double() - y.double()).abs().max().item() if x.shape == y.shape else None
                print(f"DIFF case {ci} {CASES[ci][:7]} {n}: max abs diff {d}")
    print(f"cmp: {bad} tensors differ (of {sum(len(v) for v in a.values())})")
    return 1 if bad else 0


def graph():
    case = (2, 301, 8, 2, 64, 3, torch.bfloat16, False, False)  # no lengths: no host checks
    t = inputs(case, 7)
    fwd = lambda: blossom_ops.blossom_attention(  # noqa: E731
        t["q"], t["k"], t["v"], t["gate_logits"], k_pos=t["k_pos"], v_pos=t["v_pos"],
        lengths=t["lengths"])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fwd()
    torch.cuda.current_stream().wait_stream(s)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        out = fwd()
    fresh = inputs(case, 8)
    for n in ("q", "k", "v", "gate_logits", "k_pos", "v_pos"):
        t[n].copy_(fresh[n])
    gr.replay()
    torch.cuda.synchronize()
    want = fwd()
    ok = torch.equal(out, want)
    print(f"graph replay with fresh inputs == eager: {ok}")
    return 0 if ok else 1


def bench():
    from check_short_gpu import cuda_time  # same directory; median of CUDA-event times
    for B, L, D in ((64, 4096, 64), (64, 4096, 16), (64, 16384, 64)):
        case = (B, L, 8, 2, D, 2, torch.bfloat16, False, False)
        t = inputs(case, 3)
        f = lambda: blossom_ops.blossom_attention(t["q"], t["k"], t["v"], t["gate_logits"])  # noqa: E731
        print(f"forward B={B} L={L} D={D} bf16: {cuda_time(f):.3f} ms (median of 20)")
        del t
        torch.cuda.empty_cache()


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "dump"
    if mode == "dump":
        dump(sys.argv[2])
    elif mode == "cmp":
        sys.exit(cmp(sys.argv[2], sys.argv[3]))
    elif mode == "graph":
        sys.exit(graph())
    elif mode == "bench":
        bench()
    else:
        sys.exit(f"unknown mode {mode}")
