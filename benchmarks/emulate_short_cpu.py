"""float64 CPU emulation of the fused short-sequence kernels (csrc/cuda/blossom_short.cu):
the same row tiling (64 (query, head) rows, QT = 64 // G queries per tile, dead rows), the
same 64-key chunks and per-row 64-bit masks (row_bits), the forward's two passes, the dQ
kernel's per-row workspace and the dK/dV kernel's query walk, compared with autograd of
blossom_ops.reference on random inputs (block indices with -1 and out-of-range entries,
lengths padding including an empty sequence, G = 1, 3, 4, 16). It checks the
decomposition and the algebra, not the CUDA code itself (fragment layouts, shared memory:
scripts/emulate_short_fwd_mma.py replays the fragment index math).
Slow (pure Python loops): about a minute.
Usage: python3 benchmarks/emulate_short_cpu.py
"""
import itertools
import math

import torch
import importlib.util
import os

# reference.py alone (pure torch), so no compiled extension is needed
_spec = importlib.util.spec_from_file_location(
    'blossom_reference', os.path.join(os.path.dirname(os.path.abspath(__file__)), '..',
                                      'blossom_ops', 'reference.py'))
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

torch.set_default_dtype(torch.float64)
KEYS = 64; ROWS = 64
NEG = -math.inf

def range_bits(lo, hi, j0):
    lo = max(lo, j0); hi = min(hi, j0 + KEYS)
    if lo >= hi: return 0
    return ((1 << (hi - lo)) - 1) << (lo - j0)

def row_bits(m, b, i, g, j0, vb):
    lim = vb
    if m['causal']:
        if i < j0: return 0, 0
        if i - j0 < 63: lim &= (2 << (i - j0)) - 1
    bs = m['bs']; own = i // bs
    s = range_bits(own * bs, own * bs + bs, j0)
    for c in m['idx'][b, i, g].tolist():
        if 0 <= c < m['C']: s |= range_bits(c * bs, (c + 1) * bs, j0)
    w = range_bits(i - m['window'] + 1, i + 1 if m['causal'] else i + m['window'], j0)
    if m['dilated']:
        p = 1
        while p < m['L']:
            jl, jr = i - p, i + p
            if j0 <= jl < j0 + KEYS: w |= 1 << (jl - j0)
            if not m['causal'] and j0 <= jr < j0 + KEYS: w |= 1 << (jr - j0)
            p <<= 1
    return s & lim, w & lim

def bitvec(x):
    return torch.tensor([(x >> t) & 1 for t in range(KEYS)], dtype=torch.bool)

def vbits(m, b, j0):
    v = 0
    for t in range(KEYS):
        j = j0 + t
        if j < m['L'] and m['valid'][b, j]: v |= 1 << t
    return v

def emulate(q, k, v, gate, idx, valid, bs, window, dilated, causal, scale, dO, nsplit=None):
    B, L, Hq, D = q.shape; Hk = k.shape[2]; G = Hq // Hk; QT = ROWS // G
    if nsplit is None:  # the widest split (dkdv_split picks 1..4; small grids get 4)
        nsplit = 4
    m = dict(L=L, bs=bs, C=(L + bs - 1) // bs, idx=idx, window=window, dilated=dilated, causal=causal, valid=valid)
    sl2 = scale / math.log(2)
    o_sel = torch.zeros_like(q); o_win = torch.zeros_like(q); out = torch.zeros_like(q)
    lse_s = torch.full((B, L, Hq), NEG); lse_w = torch.full((B, L, Hq), NEG)
    def rowid(q0, r):
        qq = r // G; i = q0 + qq; h = g * G + r % G
        live = qq < QT and i < L
        return i, h, live, live and bool(valid[b, i])
    def qrows(x, q0):
        t = torch.zeros(ROWS, D)
        for r in range(ROWS):
            i, h, live, ok = rowid(q0, r)
            if ok: t[r] = x[b, i, h]
        return t
    def krows(x, j0):
        t = torch.zeros(KEYS, D)
        for r in range(KEYS):
            j = j0 + r
            if j < L and valid[b, j]: t[r] = x[b, j, g]
        return t
    n_tiles = (L + QT - 1) // QT
    for b, g, tile in itertools.product(range(B), range(Hk), range(n_tiles)):
        q0 = tile * QT; q_end = min(q0 + QT, L); key_end = q_end if causal else L
        nch = (key_end + KEYS - 1) // KEYS
        Q = qrows(q, q0)
        ms = torch.full((ROWS,), NEG); ls = torch.zeros(ROWS); mw = ms.clone(); lw = ls.clone()
        def bits_for(j0):
            vb = vbits(m, b, j0); S_ = torch.zeros(ROWS, KEYS, dtype=torch.bool); W_ = S_.clone()
            for r in range(ROWS):
                i, h, live, ok = rowid(q0, r)
                if ok:
                    s_, w_ = row_bits(m, b, i, g, j0, vb); S_[r] = bitvec(s_); W_[r] = bitvec(w_)
            return S_, W_
        # one pass, online softmax per branch (rescale the accumulators when the max grows)
        As = torch.zeros(ROWS, D); Aw = torch.zeros(ROWS, D)
        for c in range(nch):
            j0 = c * KEYS; K = krows(k, j0); V = krows(v, j0); S = Q @ K.T * sl2; bs_, bw_ = bits_for(j0)
            for (mm, ll, bb, acc) in ((ms, ls, bs_, As), (mw, lw, bw_, Aw)):
                cm = torch.where(bb, S, torch.full_like(S, NEG)).max(1).values
                nm = torch.maximum(mm, cm)
                alpha = torch.where(nm == NEG, torch.ones_like(nm), torch.exp2(mm - nm))
                P = torch.where(bb, torch.exp2(S - nm[:, None]), torch.zeros_like(S))
                ll.mul_(alpha).add_(P.sum(1)); mm.copy_(nm)
                acc.mul_(alpha[:, None]).add_(P @ V)
        l2s = torch.where(ms == NEG, torch.full_like(ms, NEG), ms + torch.log2(ls))
        l2w = torch.where(mw == NEG, torch.full_like(mw, NEG), mw + torch.log2(lw))
        As = As * torch.where(ls > 0, 1 / ls, torch.zeros_like(ls))[:, None]
        Aw = Aw * torch.where(lw > 0, 1 / lw, torch.zeros_like(lw))[:, None]
        for r in range(ROWS):
            i, h, live, ok = rowid(q0, r)
            if not live: continue
            a = torch.sigmoid(gate[b, i, h, 0]); bb = torch.sigmoid(gate[b, i, h, 1])
            o_sel[b, i, h] = As[r]; o_win[b, i, h] = Aw[r]; out[b, i, h] = a * As[r] + bb * Aw[r]
            lse_s[b, i, h] = l2s[r] * math.log(2); lse_w[b, i, h] = l2w[r] * math.log(2)
    # backward: dq kernel
    ws = torch.zeros(B, L, Hq, 8); gq = torch.zeros_like(q); gg = torch.zeros_like(gate)
    for b, g, tile in itertools.product(range(B), range(Hk), range(n_tiles)):
        q0 = tile * QT; q_end = min(q0 + QT, L); key_end = q_end if causal else L
        nch = (key_end + KEYS - 1) // KEYS
        Q = qrows(q, q0); DO = qrows(dO, q0)
        row = torch.zeros(6, ROWS); row[4:] = NEG
        for r in range(ROWS):
            i, h, live, ok = rowid(q0, r)
            if not live: continue
            rs = (dO[b, i, h] * o_sel[b, i, h]).sum(); rw = (dO[b, i, h] * o_win[b, i, h]).sum()
            a = torch.sigmoid(gate[b, i, h, 0]); bb = torch.sigmoid(gate[b, i, h, 1])
            gg[b, i, h, 0] = rs * a * (1 - a); gg[b, i, h, 1] = rw * bb * (1 - bb)
            if ok:
                row[:, r] = torch.stack([a, bb, a * rs, bb * rw, lse_s[b, i, h] / math.log(2), lse_w[b, i, h] / math.log(2)])
            ws[b, i, h, :6] = row[:, r]
        acc = torch.zeros(ROWS, D)
        for c in range(nch):
            j0 = c * KEYS; K = krows(k, j0); V = krows(v, j0)
            S = Q @ K.T * sl2; dP = DO @ V.T
            vb = vbits(m, b, j0)
            dS = torch.zeros(ROWS, KEYS)
            for r in range(ROWS):
                i, h, live, ok = rowid(q0, r)
                if not ok: continue
                s_, w_ = row_bits(m, b, i, g, j0, vb); s_, w_ = bitvec(s_), bitvec(w_)
                a, bb, dsel, dwin, l2s, l2w = row[:, r]
                dS[r] = torch.where(s_, torch.exp2(S[r] - l2s) * (a * dP[r] - dsel), 0) + torch.where(w_, torch.exp2(S[r] - l2w) * (bb * dP[r] - dwin), 0)
            acc += dS @ K
        for r in range(ROWS):
            i, h, live, ok = rowid(q0, r)
            if live: gq[b, i, h] = scale * acc[r]
    gk = torch.zeros_like(k); gv = torch.zeros_like(v)
    nkt = (L + KEYS - 1) // KEYS
    for b, g, kt in itertools.product(range(B), range(Hk), range(nkt)):
        k0 = kt * KEYS; K = krows(k, k0); V = krows(v, k0); vb = vbits(m, b, k0)
        # nsplit CTAs per key tile: CTA s walks the steps t % nsplit == s; the partials are
        # summed over s = 0, 1, .. in that order
        parts = []
        for sp in range(nsplit):
            ak = torch.zeros(KEYS, D); av = torch.zeros(KEYS, D)
            q0 = (k0 if causal else 0) + sp * QT
            while q0 < L:
                Q = qrows(q, q0); DO = qrows(dO, q0)
                S = Q @ K.T * sl2; dP = DO @ V.T
                dS = torch.zeros(ROWS, KEYS); Pc = torch.zeros(ROWS, KEYS)
                for r in range(ROWS):
                    i, h, live, ok = rowid(q0, r)
                    if not ok: continue
                    a, bb, dsel, dwin, l2s, l2w = ws[b, i, h, :6]
                    s_, w_ = row_bits(m, b, i, g, k0, vb); s_, w_ = bitvec(s_), bitvec(w_)
                    ps = torch.where(s_, torch.exp2(S[r] - l2s), 0); pw = torch.where(w_, torch.exp2(S[r] - l2w), 0)
                    dS[r] = torch.where(s_, ps * (a * dP[r] - dsel), 0) + torch.where(w_, pw * (bb * dP[r] - dwin), 0)
                    Pc[r] = a * ps + bb * pw
                ak += dS.T @ Q; av += Pc.T @ DO
                q0 += nsplit * QT
            parts.append((ak, av))
        ak = torch.zeros(KEYS, D); av = torch.zeros(KEYS, D)
        for pk, pv in parts:
            ak += pk; av += pv
        for r in range(KEYS):
            j = k0 + r
            if j < L: gk[b, j, g] = scale * ak[r]; gv[b, j, g] = av[r]
    return (out, o_sel, lse_s, o_win, lse_w), (gq, gk, gv, gg)

def check(B, L, Hk, G, D, causal, bs, top_n, window, dilated, lens=None, seed=0, nsplit=None):
    gen = torch.Generator().manual_seed(seed)
    Hq = Hk * G
    q = torch.randn(B, L, Hq, D, generator=gen); k = torch.randn(B, L, Hk, D, generator=gen); v = torch.randn(B, L, Hk, D, generator=gen)
    gate = torch.randn(B, L, Hq, 2, generator=gen); dO = torch.randn(B, L, Hq, D, generator=gen)
    C = (L + bs - 1) // bs
    idx = torch.randint(-1, C + 2, (B, L, Hk, top_n), generator=gen, dtype=torch.int32)  # includes -1 and out-of-range
    lengths = torch.tensor(lens) if lens is not None else None
    valid = ref.validity(B, L, lengths, None, q.device)
    scale = 1 / math.sqrt(D)
    outs, grads = emulate(q, k, v, gate, idx, valid, bs, window, dilated, causal, scale, dO, nsplit)
    # reference (clip out-of-range entries to -1: the kernels ignore them)
    idx_ref = torch.where((idx >= 0) & (idx < C), idx, torch.full_like(idx, -1))
    leaves = [x.clone().requires_grad_() for x in (q, k, v, gate)]
    qq, kk, vv, gl = leaves
    o_s, l_s = ref.block_sparse_attention(qq, kk, vv, idx_ref, block_size=bs, causal=causal, valid=valid, return_lse=True)
    o_w, l_w = ref.sliding_window_attention(qq, kk, vv, window, dilated=dilated, causal=causal, valid=valid, return_lse=True)
    out = ref.gate_fusion([o_s, o_w], gl)
    rg = torch.autograd.grad(out, leaves, dO)
    worst = 0
    for name, a, e in zip(["out", "o_sel", "lse_sel", "o_win", "lse_win"], outs, (out, o_s, l_s, o_w, l_w)):
        e = e.detach(); fin = torch.isfinite(e)
        assert torch.equal(fin, torch.isfinite(a)) and torch.equal(a[~fin], e[~fin]), name
        err = (a[fin] - e[fin]).abs().max().item() if fin.any() else 0; worst = max(worst, err)
        assert err < 1e-9, (name, err)
    for name, a, e in zip(["gq", "gk", "gv", "gg"], grads, rg):
        err = (a - e).abs().max().item(); worst = max(worst, err)
        assert err < 1e-9, (name, err)
    return worst

if __name__ == "__main__":
    cases = [
      (1, 1, 1, 1, 16, True, 16, 4, 8, True, None),
      (1, 7, 2, 4, 16, False, 2, 3, 3, False, None),
      (2, 70, 2, 4, 16, True, 16, 4, 8, True, [70, 33]),
      (1, 130, 1, 3, 16, False, 4, 5, 1, True, None),
      (2, 150, 2, 16, 16, True, 8, 2, 10, True, [150, 0]),
      (1, 200, 1, 4, 16, False, 16, 4, 8, True, [120]),
      (1, 129, 2, 1, 16, True, 32, 2, 2, False, None),
    ]
    for c in cases:
      w = check(*c)
      print("ok", c, "max err", w, flush=True)
    for ns in (1, 2, 3):  # split off (sm_80, BLOSSOM_OPS_CUDA_SHORT_SPLIT=1), 2 (B=64 L=200), odd
      c = (2, 70, 2, 4, 16, True, 16, 4, 8, True, [70, 33])
      w = check(*c, nsplit=ns)
      print("ok", c, "nsplit", ns, "max err", w, flush=True)
