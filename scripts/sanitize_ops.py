"""Exercise every blossom_ops operator forward and backward on CUDA at small sizes.

Two uses:
  * under compute-sanitizer (memcheck / racecheck): `python3 scripts/sanitize_ops.py`
    just runs every kernel path once (float32 + bfloat16, fast head dims and the generic
    path, padding, causal and not) and synchronises;
  * `--check`: also compares against blossom_ops.reference in float64 on the CPU, checks
    that two backward runs are bit-identical, that CUDA-graph capture works, and exits
    non-zero on any failure. Error rule: ||ours - ref|| / ||ref|| must be at most
    2x (forward) / 3x (backward) the error of the reference itself run in the same low
    precision on the GPU, plus a floor.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

import blossom_ops
from blossom_ops import reference as ref

FAILS: list[str] = []


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def floor_for(dtype) -> float:
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


def report(name: str, err: float, bound: float) -> None:
    ok = err <= bound
    print(f"  {'ok  ' if ok else 'FAIL'} {name:60s} err {err:.2e}  bound {bound:.2e}")
    if not ok:
        FAILS.append(name)


def compare(name, ours, ref64, ref_lowp, mult, dtype):
    for k, (o, r, rl) in enumerate(zip(ours, ref64, ref_lowp)):
        if r is None:
            continue
        bound = mult * rel_err(rl, r) + floor_for(dtype)
        report(f"{name}[{k}]", rel_err(o, r), bound)


def grads(fn, inputs, grad_outs):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gs = torch.autograd.grad(outs, inputs, grad_outs, allow_unused=True)
    return [o.detach() for o in outs], list(gs)


def run_attention_case(name, fn_ours, fn_ref, inputs, out_shapes, dtype, check):
    """inputs: float64 CPU leaf tensors. fn_*: (*inputs) -> (out, lse)."""
    dev = [x.detach().to("cuda", dtype).requires_grad_(x.requires_grad) for x in inputs]
    gouts = [torch.randn(s, dtype=torch.float64) for s in out_shapes]
    g_dev = [g.to("cuda", dtype) if k == 0 else g.to("cuda", torch.float32)
             for k, g in enumerate(gouts)]
    outs, gs = grads(fn_ours, dev, g_dev)
    if not check:
        return
    # finite-lse rows only get lse gradient in the reference comparison
    outs64, gs64 = grads(fn_ref, inputs, gouts)
    low = [x.detach().to("cuda", dtype).requires_grad_(x.requires_grad) for x in inputs]
    outs_l, gs_l = grads(fn_ref, low, g_dev)
    compare(f"{name} fwd", outs, outs64, outs_l, 2, dtype)
    compare(f"{name} bwd", [g for g in gs if g is not None],
            [g for g in gs64 if g is not None], [g for g in gs_l if g is not None], 3, dtype)
    # determinism: a second backward gives the same bits
    _, gs2 = grads(fn_ours, dev, g_dev)
    same = all(torch.equal(a, b) for a, b in zip(gs, gs2) if a is not None)
    print(f"  {'ok  ' if same else 'FAIL'} {name} backward bit-identical over two runs")
    if not same:
        FAILS.append(f"{name} determinism")


def lse_safe(lse):
    # -inf rows: compare as 0 (both sides give -inf there; the check is on finite rows)
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="compare with the reference")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    assert torch.cuda.is_available(), "needs a CUDA device"

    B, Hq, Hk = 2, 4, 2
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if args.check else [])
    for dtype, D, L, causal, pad in itertools.product(dtypes, [16, 24, 64], [1, 37, 70],
                                                       [True, False], [False, True]):
        if not args.check and (D == 24 and dtype != torch.float32):
            continue
        tag = f"{str(dtype)[6:]} D={D} L={L} causal={causal} pad={pad}"
        print(tag)
        lengths = torch.tensor([L, max(L - 9, 0)]) if pad else None
        valid = ref.validity(B, L, lengths)
        valid_dev = valid.cuda() if pad else None
        q = torch.randn(B, L, Hq, D, dtype=torch.float64, requires_grad=True)
        k = torch.randn(B, L, Hk, D, dtype=torch.float64, requires_grad=True)
        v = torch.randn(B, L, Hk, D, dtype=torch.float64, requires_grad=True)
        vref = valid if pad else None

        def swa(qq, kk, vv, mod):
            kw = dict(dilated=True, causal=causal, return_lse=True)
            if mod is blossom_ops:
                o, l = mod.sliding_window_attention(qq, kk, vv, 5, valid=valid_dev, **kw)
            else:
                o, l = mod.sliding_window_attention(qq, kk, vv, 5, valid=_on(vref, qq), **kw)
            return o, lse_safe(l)
        run_attention_case(f"swa {tag}", lambda *a: swa(*a, blossom_ops),
                           lambda *a: swa(*a, ref), [q, k, v], [q.shape, q.shape[:3]],
                           dtype, args.check)

        bs = 8
        C = -(-L // bs)
        idx = torch.randint(-1, C, (B, L, Hk, 3), dtype=torch.int32)
        idx[..., 2] = idx[..., 0]  # duplicates must be ignored

        def bsa(qq, kk, vv, mod):
            ii = idx.to(qq.device)
            vv_ = valid_dev if mod is blossom_ops else _on(vref, qq)
            o, l = mod.block_sparse_attention(qq, kk, vv, ii, block_size=bs, causal=causal,
                                              valid=vv_, return_lse=True)
            return o, lse_safe(l)
        run_attention_case(f"bsa {tag}", lambda *a: bsa(*a, blossom_ops),
                           lambda *a: bsa(*a, ref), [q, k, v], [q.shape, q.shape[:3]],
                           dtype, args.check)

        stride, blen = 4, 8
        T = -(-L // stride)
        kc = torch.randn(B, T, Hk, D, dtype=torch.float64, requires_grad=True)
        vc = torch.randn(B, T, Hk, D, dtype=torch.float64, requires_grad=True)

        def cmp_attn(qq, kk, vv, mod):
            vv_ = valid_dev if mod is blossom_ops else _on(vref, qq)
            o, l = mod.compressed_attention(qq, kk, vv, block_len=blen, stride=stride,
                                            causal=causal, valid=vv_, return_lse=True)
            return o, lse_safe(l)
        run_attention_case(f"cmp {tag}", lambda *a: cmp_attn(*a, blossom_ops),
                           lambda *a: cmp_attn(*a, ref), [q, kc, vc], [q.shape, q.shape[:3]],
                           dtype, args.check)

        pos = torch.randn(Hk, blen, D, dtype=torch.float64, requires_grad=True)

        def compress(xx, pp, mod):
            vv_ = valid_dev if mod is blossom_ops else _on(vref, xx)
            return mod.block_compress(xx, blen, stride, pos=pp, valid=vv_)
        run_attention_case(f"compress {tag}", lambda *a: compress(*a, blossom_ops),
                           lambda *a: compress(*a, ref), [k, pos], [(B, T, Hk, D)],
                           dtype, args.check)

        R = 3
        br = torch.randn(R, B, L, Hq, D, dtype=torch.float64, requires_grad=True)
        gl = torch.randn(B, L, Hq, R, dtype=torch.float64, requires_grad=True)
        run_attention_case(f"gate {tag}", lambda a, b_: blossom_ops.gate_fusion(a, b_),
                           lambda a, b_: ref.gate_fusion(a, b_), [br, gl], [q.shape],
                           dtype, args.check)

        # select_blocks: tie-aware comparison through the reference importance
        kc_d = kc.detach().to("cuda", dtype)
        q_d = q.detach().to("cuda", dtype)
        sel = blossom_ops.select_blocks(q_d, kc_d, 2, block_size=bs, stride=stride,
                                        block_len=blen, causal=causal, valid=valid_dev)
        torch.cuda.synchronize()
        if args.check:
            check_select(sel.cpu(), q_d.double().cpu(), kc_d.double().cpu(), bs, stride, blen,
                         causal, vref, f"select {tag}")

        # the whole op, R = 2 and 3, compared to the reference composed with our indices
        for R in (2, 3):
            g_logits = torch.randn(B, L, Hq, R, dtype=torch.float64, requires_grad=True)
            kw = dict(block_len=blen, stride=stride, block_size=bs, top_n=2, window=3,
                      causal=causal)
            dev_in = [x.detach().to("cuda", dtype).requires_grad_() for x in (q, k, v, g_logits)]
            out, parts = blossom_ops.blossom_attention(*dev_in, valid=valid_dev,
                                                       return_parts=True, **kw)
            go = torch.randn_like(out)
            gs = torch.autograd.grad(out, dev_in, go)
            torch.cuda.synchronize()
            if args.check:
                idx_ours = parts["block_idx"].cpu()
                check_select(idx_ours, q_d.double().cpu(),
                             ref.block_compress(k.detach().to(dtype).double(), blen, stride,
                                                valid=vref).to(dtype).double(),
                             bs, stride, blen, causal, vref,
                             f"blossom idx R={R} {tag}", loose=True)

                def whole(qq, kk, vv, gg):
                    vv_ = _on(vref, qq)
                    o_sel = ref.block_sparse_attention(qq, kk, vv, idx_ours.to(qq.device),
                                                       block_size=bs, causal=causal, valid=vv_)
                    o_win = ref.sliding_window_attention(qq, kk, vv, 3, causal=causal,
                                                         valid=vv_)
                    brs = [o_sel, o_win]
                    if R == 3:
                        kcm = ref.block_compress(kk, blen, stride, valid=vv_)
                        vcm = ref.block_compress(vv, blen, stride, valid=vv_)
                        brs.append(ref.compressed_attention(qq, kcm, vcm, block_len=blen,
                                                            stride=stride, causal=causal,
                                                            valid=vv_))
                    return ref.gate_fusion(brs, gg)
                ins64 = [x.detach().requires_grad_() for x in (q, k, v, g_logits)]
                o64 = whole(*ins64)
                g64 = torch.autograd.grad(o64, ins64, go.double().cpu())
                low = [x.detach().to("cuda", dtype).requires_grad_() for x in (q, k, v, g_logits)]
                ol = whole(*low)
                gsl = torch.autograd.grad(ol, low, go)
                compare(f"blossom R={R} {tag} fwd", [out], [o64], [ol], 2, dtype)
                compare(f"blossom R={R} {tag} bwd", gs, g64, gsl, 3, dtype)

    if args.check:
        check_graph_capture()
    torch.cuda.synchronize()
    if FAILS:
        print(f"{len(FAILS)} FAILED:", *FAILS[:40], sep="\n  ")
        return 1
    print("all ok" if args.check else "ran every op (no comparison: pass --check)")
    return 0


def _on(valid, like):
    return None if valid is None else valid.to(like.device)


def check_select(sel, q64, kc64, bs, stride, blen, causal, valid, name, loose=False):
    imp, cand = ref.select_blocks_scores(q64, kc64, block_size=bs, stride=stride,
                                         block_len=blen, causal=causal, valid=valid)
    want = ref.select_blocks(q64, kc64, sel.shape[-1], block_size=bs, stride=stride,
                             block_len=blen, causal=causal, valid=valid)
    bad = 0
    tol = 1e-3 if loose else 1e-5
    B, L, Hk, n = sel.shape
    for b, i, g in itertools.product(range(B), range(L), range(Hk)):
        a, w = sel[b, i, g].tolist(), want[b, i, g].tolist()
        if a == w:
            continue
        ca, cw = [c for c in a if c >= 0], [c for c in w if c >= 0]
        ok = (len(ca) == len(cw) and a == sorted(a, key=lambda c: (c < 0, c)) and
              all(cand[b, i, c] for c in ca) and
              abs(sum(imp[b, i, g, c].item() for c in ca) -
                  sum(imp[b, i, g, c].item() for c in cw)) <= tol)
        bad += 0 if ok else 1
    print(f"  {'ok  ' if bad == 0 else 'FAIL'} {name}: {bad} rows differ beyond ties")
    if bad:
        FAILS.append(name)


def check_graph_capture():
    """blossom_attention forward + backward captured in a CUDA graph and replayed."""
    B, L, Hq, Hk, D = 2, 64, 4, 2, 32
    q = torch.randn(B, L, Hq, D, device="cuda", requires_grad=True)
    k = torch.randn(B, L, Hk, D, device="cuda", requires_grad=True)
    v = torch.randn(B, L, Hk, D, device="cuda", requires_grad=True)
    g = torch.randn(B, L, Hq, 2, device="cuda", requires_grad=True)

    def step():
        out = blossom_ops.blossom_attention(q, k, v, g)
        out.sum().backward()
        return out

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for t in (q, k, v, g):
                t.grad = None
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    for t in (q, k, v, g):
        t.grad = None
    with torch.cuda.graph(graph):
        out = step()
    eager = blossom_ops.blossom_attention(q, k, v, g)
    graph.replay()
    torch.cuda.synchronize()
    ok = torch.equal(out, eager)
    print(f"  {'ok  ' if ok else 'FAIL'} CUDA graph capture/replay of blossom_attention fwd+bwd")
    if not ok:
        FAILS.append("graph capture")


if __name__ == "__main__":
    sys.exit(main())
