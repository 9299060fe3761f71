"""GPU check and timing of the fused compression + selection of the short path
(csrc/cuda/short_select.cu: one kernel instead of block_compress + select_blocks inside
blossom_attention for L <= 256, half / bfloat16, D in {16, 32, 64}, ceil(L / stride) <= 32).

check: blossom_attention's block_idx (return_parts=True, forward only) against the two-op
route it replaces, blossom_ops.select_blocks(q, blossom_ops.block_compress(k, ...)), over
bf16 / fp16 x D {16, 32, 64} x G {1, 2, 4} x L {1, 7, 16, 50, 200, 256} x causal or not,
with padding (none / lengths / random valid mask) cycling, k_pos on every third case, plus
other configurations (stride 8 / 4, block_size 32 / 48, block_len 16 / 48, top_n 1 / 3 / 8,
G 3 / 8 / 16, strided q / k views) and one configuration outside the kernel's range (T > 32:
the fallback must give the two-op result exactly). Per case:
  * rows equal to the two-op route are counted; a differing row passes only as a tie: the
    float64 importance (reference.select_blocks_scores on the two-op k_cmp values) summed
    over the fused choice and over the two-op choice differ by at most 1e-4 * G, and the
    fused selection passes tests/helpers.assert_selection_valid (structure, candidates,
    forced entries; tolerance selection_tolerance(dtype, G));
  * two runs are bit-identical; with padding, NaN written into the padded rows of q and k
    leaves the selection unchanged.
Also checks (torch.profiler) that the fused kernel really runs, unless
BLOSSOM_OPS_CUDA_SHORT_SELECT=0. Exit status 1 on any failure.

time: per-kernel device time (torch.profiler) of the selection kernels in a blossom_attention
forward, B=64, Hq=8, Hk=2, L=200, D in {16, 64}, bf16, defaults, causal; with --ab the same
in a subprocess with BLOSSOM_OPS_CUDA_SHORT_SELECT=0 (the old two launches) for the A/B.

    python3 benchmarks/check_short_select_gpu.py [check] [time] [--ab]
"""
from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

import blossom_ops  # noqa: E402
from blossom_ops import reference as ref  # noqa: E402
from helpers import assert_selection_valid, nan_embedded, selection_tolerance  # noqa: E402
from profile_gpu import kernel_times  # noqa: E402 (same directory)

DEFAULT = dict(block_len=32, stride=16, block_size=16, top_n=4)
FUSED_ON = os.environ.get("BLOSSOM_OPS_CUDA_SHORT_SELECT", "") != "0"
# "cpu": a dry run of this script itself (no fused kernel there; float16 runs as bfloat16)
DEV = os.environ.get("CHECK_SHORT_SELECT_DEVICE", "cuda")


def inputs(B, L, Hq, Hk, D, dtype, padding, with_pos, block_len, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, Hq, D, generator=g)
    k = torch.randn(B, L, Hk, D, generator=g)
    v = torch.randn(B, L, Hk, D, generator=g)
    gl = torch.randn(B, L, Hq, 2, generator=g)
    pos = 0.5 * torch.randn(Hk, block_len, D, generator=g) if with_pos else None
    valid = None
    if padding == "lengths":
        lens = torch.randint(0, L + 1, (B,), generator=g)
        lens[0] = L
        valid = torch.arange(L)[None] < lens[:, None]
    elif padding == "random":
        valid = torch.rand(B, L, generator=g) > 0.3
    if DEV == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16
    dev = lambda x: None if x is None else x.to(DEV, dtype)  # noqa: E731
    return (dev(q), dev(k), dev(v), dev(gl), dev(pos),
            None if valid is None else valid.to(DEV))


def fused_idx(q, k, v, gl, pos, valid, cfg, causal):
    kw = dict(cfg, causal=causal, k_pos=pos)
    if valid is not None:
        kw["valid"] = valid
    with torch.no_grad():
        return blossom_ops.blossom_attention(q, k, v, gl, return_parts=True, **kw)[1]["block_idx"]


def two_op_idx(q, k, pos, valid, cfg, causal):
    vk = {} if valid is None else {"valid": valid}
    kc = blossom_ops.block_compress(k, cfg["block_len"], cfg["stride"], pos=pos, **vk)
    idx = blossom_ops.select_blocks(q, kc, cfg["top_n"], block_size=cfg["block_size"],
                                    stride=cfg["stride"], block_len=cfg["block_len"],
                                    causal=causal, **vk)
    return idx, kc


def one_case(dtype, D, G, L, causal, padding, with_pos, cfg, seed, embed=False, B=2, Hk=2):
    q, k, v, gl, pos, valid = inputs(B, L, Hk * G, Hk, D, dtype, padding, with_pos,
                                     cfg["block_len"], seed)
    if embed:
        q, k, v = nan_embedded(q), nan_embedded(k), nan_embedded(v)
    ctx = (f"{dtype} D={D} G={G} L={L} causal={causal} pad={padding} pos={with_pos} "
           f"cfg={cfg} embed={embed}")
    errs = []
    got = fused_idx(q, k, v, gl, pos, valid, cfg, causal)
    again = fused_idx(q, k, v, gl, pos, valid, cfg, causal)
    if not torch.equal(got, again):
        errs.append("two runs differ")
    want, kc = two_op_idx(q, k, pos, valid, cfg, causal)
    if got.shape != want.shape or got.dtype != want.dtype:
        return [f"output {got.dtype} {tuple(got.shape)}, two-op {want.dtype} "
                f"{tuple(want.shape)}"], 0, 0, ctx
    rows = got.shape[0] * got.shape[1] * got.shape[2]
    diff = (got != want).any(-1)
    n_diff = int(diff.sum())
    if n_diff:
        vk = {} if valid is None else {"valid": valid.cpu()}
        imp, cand = ref.select_blocks_scores(q.double().cpu(), kc.double().cpu(),
                                             block_size=cfg["block_size"], stride=cfg["stride"],
                                             block_len=cfg["block_len"], causal=causal, **vk)
        C = imp.shape[-1]
        a, w = got.cpu().long(), want.cpu().long()

        def chosen_sum(idx):
            oh = torch.zeros(*idx.shape[:3], C + 1, dtype=torch.float64)
            oh.scatter_(3, torch.where(idx < 0, C, idx), 1.0)
            return (oh[..., :C] * imp.nan_to_num(0.0)).sum(-1)

        gap = (chosen_sum(a) - chosen_sum(w)).abs()
        beyond = diff.cpu() & (gap > 1e-4 * G)
        if beyond.any():
            b, i, g = [int(x) for x in beyond.nonzero()[0]]
            errs.append(f"{int(beyond.sum())} rows differ beyond ties, first (b={b}, i={i}, "
                        f"g={g}): fused {a[b, i, g].tolist()} two-op {w[b, i, g].tolist()} "
                        f"importance gap {gap[b, i, g].item():.3e}")
        try:
            assert_selection_valid("short_select", got, imp, cand, cfg["top_n"],
                                   selection_tolerance(dtype, G), ctx)
        except AssertionError as e:
            errs.append(" | ".join(str(e).splitlines()[:3]))
    if valid is not None:  # NaN in padded rows must not change anything
        bad = ~valid[:, :, None, None]
        qn, kn = q.masked_fill(bad, float("nan")), k.masked_fill(bad, float("nan"))
        if not torch.equal(fused_idx(qn, kn, v, gl, pos, valid, cfg, causal), got):
            errs.append("NaN in padded positions changed the selection")
    return errs, rows, n_diff, ctx


def fused_kernel_runs() -> bool:
    q, k, v, gl, pos, valid = inputs(2, 200, 8, 2, 64, torch.bfloat16, "none", False, 32, 0)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fused_idx(q, k, v, gl, pos, valid, DEFAULT, True)
        torch.cuda.synchronize()
    return any("short_select" in e.key for e in prof.key_averages())


def check() -> bool:
    fails = n = rows = differ = 0
    cases = []
    grid = itertools.product((torch.bfloat16, torch.float16), (16, 32, 64), (1, 2, 4),
                             (1, 7, 16, 50, 200, 256), (True, False))
    for seed, (dtype, D, G, L, causal) in enumerate(grid):
        padding = ("none", "lengths", "random")[seed % 3]
        cases.append(((dtype, D, G, L, causal, padding, seed % 3 == 1, DEFAULT, seed), {}))
    other = [  # (dtype, D, G, L, causal, padding, pos, cfg), kwargs
        ((torch.bfloat16, 64, 4, 256, True, "lengths", True,
          dict(block_len=16, stride=8, block_size=8, top_n=3)), {}),
        ((torch.float16, 32, 2, 200, False, "random", False,
          dict(block_len=48, stride=8, block_size=16, top_n=8)), {}),
        ((torch.bfloat16, 16, 3, 77, True, "random", True,
          dict(block_len=8, stride=4, block_size=8, top_n=3)), {}),
        ((torch.float16, 64, 8, 130, False, "none", False,
          dict(block_len=32, stride=16, block_size=48, top_n=1)), {}),
        ((torch.bfloat16, 32, 16, 200, True, "lengths", False, DEFAULT), {}),
        ((torch.bfloat16, 64, 4, 200, True, "none", False, DEFAULT), {"embed": True}),
        ((torch.float16, 16, 4, 256, False, "random", True,
          dict(block_len=32, stride=16, block_size=32, top_n=2)), {"embed": True}),
        ((torch.bfloat16, 64, 4, 200, True, "none", False, DEFAULT), {"B": 64}),
        # outside the fused kernel's range (T = 50 > 32): the two ops, identical
        ((torch.bfloat16, 64, 4, 200, True, "lengths", False,
          dict(block_len=8, stride=4, block_size=4, top_n=4)), {}),
    ]
    for j, (args, kw) in enumerate(other):
        cases.append((args + (1000 + j,), kw))
    for args, kw in cases:
        n += 1
        errs, r, d, ctx = one_case(*args, **kw)
        rows += r
        differ += d
        if errs:
            fails += 1
            for e in errs:
                print(f"FAIL {ctx}: {e}", flush=True)
    runs = DEV == "cuda" and fused_kernel_runs()
    if FUSED_ON and DEV == "cuda" and not runs:
        fails += 1
        print("FAIL the fused kernel (short_select) did not run", flush=True)
    print(f"short_select check: {n - fails}/{n} cases pass; {differ} of {rows} (b, i, g) rows "
          f"differ from the two-op route (ties, allowed); fused kernel ran: {runs} "
          f"(BLOSSOM_OPS_CUDA_SHORT_SELECT={os.environ.get('BLOSSOM_OPS_CUDA_SHORT_SELECT', '')!r})",
          flush=True)
    return fails == 0


def time_kernels() -> None:
    B, Hq, Hk, L, steps = 64, 8, 2, 200, 20
    tag = "fused" if FUSED_ON else "two ops (BLOSSOM_OPS_CUDA_SHORT_SELECT=0)"
    print(f"selection kernels in blossom_attention forward, {torch.cuda.get_device_name()}, "
          f"bf16 B={B} Hq={Hq} Hk={Hk} L={L} causal, defaults; {tag}; us per call")
    for D in (16, 64):
        q, k, v, gl, _, _ = inputs(B, L, Hq, Hk, D, torch.bfloat16, "none", False, 32, 1)
        f = lambda: fused_idx(q, k, v, gl, None, None, DEFAULT, True)  # noqa: E731
        sel = 0.0
        for ms, n, key in kernel_times(f, steps, warmup=5):
            if any(s in key for s in ("short_select", "compress_fwd", "select_")):
                print(f"  D={D:<3} {ms * 1e3:8.2f} us  x{n}  {key[:90]}")
                sel += ms * 1e3
        print(f"  D={D:<3} {sel:8.2f} us  selection total per forward", flush=True)


def main() -> int:
    if DEV == "cuda" and not torch.cuda.is_available():
        print("check_short_select_gpu.py needs CUDA")
        return 2
    what = [a for a in sys.argv[1:] if not a.startswith("--")] or ["check", "time"]
    ok = True
    if "check" in what:
        ok = check()
    if "time" in what:
        time_kernels()
        if "--ab" in sys.argv:
            env = dict(os.environ, BLOSSOM_OPS_CUDA_SHORT_SELECT="0")
            subprocess.run([sys.executable, os.path.abspath(__file__), "time"], env=env,
                           check=False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
