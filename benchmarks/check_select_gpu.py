"""GPU check and timing of select_blocks' tensor-core path (csrc/cuda/select_blocks_tc.cuh).

check: for bf16 / fp16, D in {16, 32, 64, 128}, G in {1, 2, 4, 8}, L in {1, 17, 200, 1000},
block_size in {16, 32, 64} (stride 16), causal or not, with and without a validity mask
(top_n cycling over {1, 4, 8}), then 32 long bf16 cases at D in {32, 64} (L in {3100, 5000}:
4-5 chunks of 64 compressed tokens, more than the kernel's ring of 3 chunk buffers holds, so
its second pass loads chunks again), the CUDA op must
  * pass the tie-aware selection check of tests/test_select_blocks.py (float64 importance of
    the same 16-bit values, tolerance selection_tolerance(dtype, G, same_keys=True): the
    float32 margin, since the reference scores exactly the values the kernel got);
  * be compared with the CPU op run on float32 copies of the same 16-bit values: rows that
    differ are counted and reported (near-ties may legitimately differ; the tie-aware check
    above is the pass/fail criterion);
  * be bit-identical over two runs, and unchanged when every padded position of q and k_cmp
    holds NaN (mask cases).
One line per failure, a summary, exit status 1 on any failure.
bench: median of 20 CUDA-event timings (after warmup) at B=64 Hq=8 Hk=2, D in {16, 64},
L in {4096, 16384}, bf16, block_size = stride = 16, top_n 4, causal.

    python3 benchmarks/check_select_gpu.py [check] [bench]
    BLOSSOM_OPS_CUDA_SIMPLE=1 python3 benchmarks/check_select_gpu.py bench   # the SIMT kernel
"""
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import blossom_ops  # noqa: E402
from blossom_ops import reference as ref  # noqa: E402
from helpers import assert_selection_valid, selection_tolerance  # noqa: E402

STRIDE, BLOCK_LEN = 16, 32
DEV = os.environ.get("CHECK_SELECT_DEVICE", "cuda")  # "cpu": dry run of this script itself


def nan_padded(x, valid):
    y = x.clone()
    y[~valid] = float("nan")
    return y


def one_case(dtype, D, G, L, bs, top_n, causal, masked, seed):
    g = torch.Generator().manual_seed(seed)
    B, Hk = 2, 2
    T = -(-L // STRIDE)
    q = torch.randn(B, L, Hk * G, D, generator=g).to(dtype)
    k = (torch.randn(B, T, Hk, D, generator=g) * 2).to(dtype)
    valid = None
    if masked:
        valid = torch.rand(B, L, generator=g) > 0.3
    kw = dict(block_size=bs, stride=STRIDE, block_len=BLOCK_LEN, causal=causal)
    vk = lambda dev: {} if valid is None else {"valid": valid.to(dev)}  # noqa: E731
    qc, kc = q.to(DEV), k.to(DEV)
    got = blossom_ops.select_blocks(qc, kc, top_n, **kw, **vk(DEV))
    again = blossom_ops.select_blocks(qc, kc, top_n, **kw, **vk(DEV))
    errs = []
    if not torch.equal(got, again):
        errs.append("two runs differ")
    imp, cand = ref.select_blocks_scores(q.double(), k.double(), **kw,
                                         **({} if valid is None else {"valid": valid}))
    ctx = f"{dtype} D={D} G={G} L={L} bs={bs} top_n={top_n} causal={causal} mask={masked}"
    try:
        assert_selection_valid("select_blocks[cuda]", got, imp, cand, top_n,
                               selection_tolerance(dtype, G, same_keys=True), ctx)
    except AssertionError as e:
        errs.append(str(e).splitlines()[0] + " | " + " ".join(str(e).splitlines()[1:3]))
    cpu = blossom_ops.select_blocks(q.float(), k.float(), top_n, **kw, **vk("cpu"))
    differ = int((cpu != got.cpu()).any(-1).sum())
    if masked:
        cvalid = ref.compressed_validity(valid, BLOCK_LEN, STRIDE)
        got_nan = blossom_ops.select_blocks(nan_padded(q, valid).to(DEV),
                                            nan_padded(k, cvalid).to(DEV), top_n, **kw, **vk(DEV))
        if not torch.equal(got_nan, got):
            errs.append("NaN in padded positions changed the selection")
    return errs, differ, ctx


def check():
    n = fails = rows_differ = 0
    # top_n cycles over {1, 4, 8} instead of multiplying the grid (768 cases, a few minutes).
    grid = itertools.product((torch.bfloat16, torch.float16), (16, 32, 64, 128), (1, 2, 4, 8),
                             (1, 17, 200, 1000), (16, 32, 64), (True, False), (False, True))
    long_grid = ((torch.bfloat16, D, G, L, bs, causal, (D + L) % 3 == 0) for D, G, L, bs, causal
                 in itertools.product((32, 64), (1, 4), (3100, 5000), (16, 64),
                                      (True, False)))
    for seed, (dtype, D, G, L, bs, causal, masked) in enumerate(itertools.chain(grid, long_grid)):
        top_n = (1, 4, 8)[seed % 3]
        errs, differ, ctx = one_case(dtype, D, G, L, bs, top_n, causal, masked, seed)
        n += 1
        rows_differ += differ
        if errs:
            fails += 1
            for e in errs:
                print(f"FAIL {ctx}: {e}", flush=True)
    print(f"select_blocks GPU check: {n - fails}/{n} cases pass; {rows_differ} (b, i, g) rows "
          f"differ from the fp32 CPU op in total (near-ties, allowed when the tie-aware check "
          f"passes)")
    return fails == 0


def bench():
    B, Hq, Hk = 64, 8, 2
    simple = os.environ.get("BLOSSOM_OPS_CUDA_SIMPLE") == "1"
    for D, L in itertools.product((16, 64), (4096, 16384)):
        T = -(-L // STRIDE)
        q = torch.randn(B, L, Hq, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, T, Hk, D, device="cuda", dtype=torch.bfloat16)
        f = lambda: blossom_ops.select_blocks(q, k, 4, block_size=16, stride=STRIDE,  # noqa: E731
                                              block_len=BLOCK_LEN, causal=True)
        for _ in range(3):
            f()
        times = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            f()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        times.sort()
        print(f"select_blocks bf16 B={B} Hq={Hq} Hk={Hk} D={D} L={L} causal top_n=4: "
              f"{times[len(times) // 2]:.3f} ms (median of 20){' [SIMPLE]' if simple else ''}",
              flush=True)
        del q, k


def main():
    if DEV == "cuda" and not torch.cuda.is_available():
        print("check_select_gpu.py needs CUDA")
        return 2
    what = sys.argv[1:] or ["check", "bench"]
    ok = True
    if "check" in what:
        ok = check()
    if "bench" in what:
        bench()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
