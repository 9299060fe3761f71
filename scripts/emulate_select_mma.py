"""Host emulation of the index math of csrc/cuda/select_blocks_tc.cuh (no GPU needed).

Replays, lane by lane, what the kernel does for every CTA of one (b, g): the Q staging
order (row_map), the ldmatrix.x4 address -> register mapping for the A (Q) and B (K)
fragments, mma.m16n8k16 through the fragment layouts of the PTX ISA (A, B and C rebuilt
from each lane's registers), the column masks, both passes with their quad / head
butterflies, the per-tpb block sums, the one-lane-per-block offers, the top-8 lists, the
arg-max merge and the ascending output. Arithmetic is float64 with exact exp2, so the
result must equal a direct dense computation of the same semantics (reference rules of
blossom_ops.reference.select_blocks) on tie-free data.

    python3 scripts/emulate_select_mma.py     # a sweep of G, D, tpb, causal, padding
"""
import itertools
import math
import random

import torch

K_COLS, K_NT, K_MAXTOP = 64, 8, 8


def row_map(G, r):
    if G == 1:
        return r, 0
    QW, G2 = 16 // G, G // 2
    return (r & 7) % QW, (r >> 3) * G2 + (r & 7) // QW


def ldmatrix_x4(src, lane, addr_of):
    """Registers of `lane`: matrix j is addressed by lanes 8j..8j+7 (row t % 8 given by
    lane t = addr_of(t) -> (row, col) of the row start); lane receives, of matrix j, the
    pair (row lane // 4, cols 2 (lane % 4) + {0, 1})."""
    regs = []
    for j in range(4):
        r, c = addr_of(8 * j + lane // 4)
        c += 2 * (lane % 4)
        regs.append((src[r][c], src[r][c + 1]))
    return regs


def mma16816(acc, a, b):
    """acc[lane][4] += A B with A, B rebuilt from the lanes' registers (PTX layouts)."""
    A = [[None] * 16 for _ in range(16)]
    B = [[None] * 8 for _ in range(16)]
    for lane in range(32):
        gid, tig = lane // 4, lane % 4
        for i in range(8):
            row = gid + (8 if i in (2, 3, 6, 7) else 0)
            col = 2 * tig + (i & 1) + (8 if i >= 4 else 0)
            A[row][col] = a[lane][i // 2][i % 2]
        for i in range(4):
            k = 2 * tig + (i & 1) + (8 if i >= 2 else 0)
            B[k][gid] = b[lane][i // 2][i % 2]
    for lane in range(32):
        gid, tig = lane // 4, lane % 4
        for i in range(4):
            row = gid + (8 if i >= 2 else 0)
            col = 2 * tig + (i & 1)
            acc[lane][i] += sum(A[row][k] * B[k][col] for k in range(16))


def range_bits(lo, hi):
    lo, hi = max(lo, 0), min(hi, K_COLS)
    if hi <= lo:
        return 0
    below_hi = (1 << 64) - 1 if hi >= 64 else (1 << hi) - 1
    return below_hi & ~((1 << lo) - 1) & ((1 << 64) - 1)


def better(ka, ca, kb, cb):
    return ca >= 0 and (cb < 0 or ka > kb or (ka == kb and ca < cb))


def insert(lst, key, c):
    if lst[-1][1] >= 0 and not better(key, c, *lst[-1]):
        return
    kv = (key, c)
    for k in range(K_MAXTOP):
        if better(kv[0], kv[1], *lst[k]):
            lst[k], kv = kv, lst[k]


def shfl_xor(vals, o):
    return [vals[l ^ o] for l in range(32)]


def emulate(q, k, valid, vcmp, G, DP, bs, stride, top_n, causal, scale):
    """q [L, G, D], k [T, D] (float64), valid [L], vcmp [T] bool -> out [L, top_n]."""
    L, _, D = q.shape
    Tn = k.shape[0]
    tpb = bs // stride
    C = -(-L // bs)
    QW, QT = 16 // G, 64 // G
    NS, G2 = (2, 1) if G == 1 else (1, G // 2)
    sc = scale * math.log2(math.e)
    out = [[None] * top_n for _ in range(L)]
    for tile in range(-(-L // QT)):
        i0 = tile * QT
        own_last = (min(L, i0 + QT) - 1) // bs
        c_hi = own_last if causal else C
        t_end = min(Tn, own_last * tpb) if causal else Tn
        nch = -(-t_end // K_COLS)
        blockvalid = [any(valid[j] for j in range(c * bs, min(L, (c + 1) * bs))) for c in range(c_hi)]
        Qs = [[0.0] * DP for _ in range(64)]
        for R in range(64):
            qw, hh = row_map(G, R & 15)
            i = i0 + (R >> 4) * QW + qw
            if i < L and valid[i]:
                for d in range(D):
                    Qs[R][d] = float(q[i, hh, d])

        def tok_ok(t):
            return t < t_end and vcmp[t] and blockvalid[t // tpb]

        for warp in range(4):
            own_last_w = (min(L, i0 + (warp + 1) * QW) - 1) // bs
            t_end_w = min(t_end, own_last_w * tpb) if causal else t_end
            qa = [[ldmatrix_x4(Qs, lane, lambda t, kk=kk: (warp * 16 + ((t >> 3) & 1) * 8 + (t & 7),
                                                           kk * 16 + (t >> 4) * 8))
                   for lane in range(32)] for kk in range(DP // 16)]
            # per lane state
            ex0, ex1, climit, cex, qidx = {}, {}, {}, {}, {}
            c_tok = -(-t_end // tpb)
            for lane in range(32):
                for sl in range(NS):
                    qw, _ = row_map(G, (lane >> 2) + 8 * sl)
                    i = i0 + warp * QW + qw
                    qidx[lane, sl] = i
                    qok = i < L and valid[i]
                    own = (i if i < L else L - 1) // bs
                    ex0[lane, sl] = own * tpb
                    ex1[lane, sl] = 2**31 - 1 if causal else (own + 1) * tpb
                    climit[lane, sl] = (min(own, c_tok) if causal else c_tok) if qok else 0
                    cex[lane, sl] = -1 if causal else own
            m = [[-math.inf] * 2 for _ in range(32)]
            l = [[0.0] * 2 for _ in range(32)]
            lse2 = [[math.inf] * 2 for _ in range(32)]
            lists = {(lane, sl): [(-math.inf, -1)] * K_MAXTOP for lane in range(32) for sl in range(NS)}
            offered = {}
            for pas in range(2):
                for ch in range(nch):
                    n0 = ch * K_COLS
                    Ks = [[0.0] * DP for _ in range(K_COLS)]
                    bits = 0
                    for j in range(K_COLS):
                        if tok_ok(n0 + j):
                            bits |= 1 << j
                            for d in range(D):
                                Ks[j][d] = float(k[n0 + j, d])
                    if n0 >= t_end_w:
                        continue
                    acc = [[[0.0] * 4 for _ in range(32)] for _ in range(K_NT)]
                    for kk in range(DP // 16):
                        for np_ in range(K_NT // 2):
                            bf = [ldmatrix_x4(Ks, lane, lambda t: (np_ * 16 + (t >> 4) * 8 + (t & 7),
                                                                    kk * 16 + ((t >> 3) & 1) * 8))
                                  for lane in range(32)]
                            mma16816(acc[2 * np_], qa[kk], [[bf[ln][0], bf[ln][1]] for ln in range(32)])
                            mma16816(acc[2 * np_ + 1], qa[kk], [[bf[ln][2], bf[ln][3]] for ln in range(32)])
                    x = [[[0.0] * 4 for _ in range(K_NT)] for _ in range(32)]
                    for lane in range(32):
                        q4 = lane & 3
                        okw = {}
                        for sl in range(NS):
                            okm = (bits & ~range_bits(ex0[lane, sl] - n0,
                                                      K_COLS if causal else ex1[lane, sl] - n0)) >> (2 * q4)
                            okw[sl, 0], okw[sl, 1] = okm & 0xFFFFFFFF, okm >> 32
                        for nt in range(K_NT):
                            for e in range(4):
                                sl = (e >> 1) if NS == 2 else 0
                                ok = (okw[sl, nt >> 2] >> ((nt & 3) * 8 + (e & 1))) & 1
                                x[lane][nt][e] = acc[nt][lane][e] * sc if ok else -math.inf
                    if pas == 0:
                        for lane in range(32):
                            for r in range(2):
                                vals = [x[lane][nt][2 * r + e] for nt in range(K_NT) for e in range(2)]
                                mn = max(m[lane][r], max(vals))
                                if mn != -math.inf:
                                    l[lane][r] = l[lane][r] * 2 ** (m[lane][r] - mn) + sum(2 ** (v - mn) for v in vals)
                                    m[lane][r] = mn
                        continue
                    ms = [[[[0.0] * 2 for _ in range(K_NT)] for _ in range(NS)] for _ in range(32)]
                    for nt in range(K_NT):
                        for e in range(2):
                            p0 = [2 ** (x[ln][nt][e] - lse2[ln][0]) for ln in range(32)]
                            p1 = [2 ** (x[ln][nt][2 + e] - lse2[ln][1]) for ln in range(32)]
                            if NS == 2:
                                for ln in range(32):
                                    ms[ln][0][nt][e], ms[ln][1][nt][e] = p0[ln], p1[ln]
                            else:
                                v = [p0[ln] + p1[ln] for ln in range(32)]
                                o = 4 * QW
                                while o < 32:
                                    v2 = shfl_xor(v, o)
                                    v = [v[ln] + v2[ln] for ln in range(32)]
                                    o <<= 1
                                for ln in range(32):
                                    ms[ln][0][nt][e] = v[ln]

                    def offer(lane, sl, imp, c):
                        cand = c < climit[lane, sl] and c != cex[lane, sl] and blockvalid[c]
                        if cand:
                            key = (qidx[lane, sl], c)
                            assert key not in offered, f"block offered twice {key}"
                            offered[key] = imp
                            insert(lists[lane, sl], -math.inf if math.isnan(imp) else imp, c)

                    cb0 = n0 // tpb
                    for sl in range(NS):
                        hl = [0 if G == 1 else (ln >> 2) // QW for ln in range(32)]
                        if tpb == 1:
                            for ln in range(32):
                                for nt in range(K_NT):
                                    if nt % G2 == hl[ln]:
                                        for e in range(2):
                                            offer(ln, sl, ms[ln][sl][nt][e], cb0 + nt * 8 + 2 * (ln & 3) + e)
                        elif tpb == 2:
                            for ln in range(32):
                                for nt in range(K_NT):
                                    if nt % G2 == hl[ln]:
                                        offer(ln, sl, ms[ln][sl][nt][0] + ms[ln][sl][nt][1], cb0 + nt * 4 + (ln & 3))
                        elif tpb == 4:
                            for nt in range(K_NT):
                                v = [ms[ln][sl][nt][0] + ms[ln][sl][nt][1] for ln in range(32)]
                                v2 = shfl_xor(v, 1)
                                v = [v[ln] + v2[ln] for ln in range(32)]
                                for ln in range(32):
                                    if (ln & 1) == 0 and nt % G2 == hl[ln]:
                                        offer(ln, sl, v[ln], cb0 + nt * 2 + ((ln & 3) >> 1))
                        else:
                            NTB = tpb // 8
                            for kb in range(K_NT // NTB):
                                v = [sum(ms[ln][sl][kb * NTB + j][0] + ms[ln][sl][kb * NTB + j][1]
                                         for j in range(NTB)) for ln in range(32)]
                                for o in (1, 2):
                                    v2 = shfl_xor(v, o)
                                    v = [v[ln] + v2[ln] for ln in range(32)]
                                for ln in range(32):
                                    if (ln & 3) == 0 and kb % G2 == hl[ln]:
                                        offer(ln, sl, v[ln], cb0 + kb)
                if pas == 0:
                    for r in range(2):
                        for o in (1, 2):
                            m2 = [m[ln ^ o][r] for ln in range(32)]
                            l2 = [l[ln ^ o][r] for ln in range(32)]
                            for ln in range(32):
                                mn = max(m[ln][r], m2[ln])
                                if mn != -math.inf:
                                    l[ln][r] = l[ln][r] * 2 ** (m[ln][r] - mn) + l2[ln] * 2 ** (m2[ln] - mn)
                                    m[ln][r] = mn
                        for ln in range(32):
                            lse2[ln][r] = m[ln][r] + math.log2(l[ln][r]) if l[ln][r] > 0 else math.inf
            # merge
            for sl in range(NS):
                chosen = [[-1] * K_MAXTOP for _ in range(32)]
                for r in range(top_n):
                    bv = [lists[ln, sl][0][0] for ln in range(32)]
                    bc = [lists[ln, sl][0][1] for ln in range(32)]
                    for o in (1, 2, 4, 8, 16):
                        if o >= 4 and (G == 1 or o < 4 * QW):
                            continue
                        v2, c2 = shfl_xor(bv, o), shfl_xor(bc, o)
                        for ln in range(32):
                            if better(v2[ln], c2[ln], bv[ln], bc[ln]):
                                bv[ln], bc[ln] = v2[ln], c2[ln]
                    for ln in range(32):
                        lst = lists[ln, sl]
                        if bc[ln] >= 0 and lst[0][1] == bc[ln]:
                            lists[ln, sl] = lst[1:] + [(-math.inf, -1)]
                        chosen[ln][r] = bc[ln]
                for ln in range(32):
                    hl = 0 if G == 1 else (ln >> 2) // QW
                    i = qidx[ln, sl]
                    if (ln & 3) == 0 and hl == 0 and i < L:
                        ch = chosen[ln]
                        for kk in range(top_n):
                            e = ch[kk]
                            if e < 0:
                                out[i][kk] = -1
                                continue
                            rank = sum(1 for y in range(K_MAXTOP) if 0 <= ch[y] < e)
                            assert out[i][rank] is None
                            out[i][rank] = e
            for (i, c), imp in offered.items():
                emu_imp[(i, c)] = imp
    return out


emu_imp = {}


def direct(q, k, valid, vcmp, G, bs, stride, top_n, causal, scale):
    L = q.shape[0]
    Tn = k.shape[0]
    tpb = bs // stride
    C = -(-L // bs)
    bval = [any(valid[j] for j in range(c * bs, min(L, (c + 1) * bs))) for c in range(C)]
    out, imps = [], {}
    for i in range(L):
        own = i // bs
        cands = [c for c in range(C) if valid[i] and bval[c] and (c < own if causal else c != own)]
        scored = [t for t in range(Tn) if vcmp[t] and (t // tpb) in cands]
        imp = {c: 0.0 for c in cands}
        for h in range(G):
            if not scored:
                break
            s = [float(q[i, h] @ k[t]) * scale for t in scored]
            mx = max(s)
            z = sum(math.exp(v - mx) for v in s)
            for t, v in zip(scored, s):
                imp[t // tpb] += math.exp(v - mx) / z
        for c in cands:
            imps[(i, c)] = imp[c]
        ranked = sorted(cands, key=lambda c: (-imp[c], c))[:top_n]
        out.append(sorted(ranked) + [-1] * (top_n - len(ranked)))
    return out, imps


def run(G, D, bs, stride, top_n, causal, L, pad, seed):
    g = torch.Generator().manual_seed(seed)
    Tn = -(-L // stride)
    q = torch.randn(L, G, D, generator=g, dtype=torch.float64)
    k = torch.randn(Tn, D, generator=g, dtype=torch.float64) * 2
    rnd = random.Random(seed)
    valid = [True] * L if not pad else [rnd.random() > 0.25 for _ in range(L)]
    vcmp = [True] * Tn if not pad else [rnd.random() > 0.2 for _ in range(Tn)]
    DP = 16 if D <= 16 else 32 if D <= 32 else 64 if D <= 64 else 128
    scale = 1 / math.sqrt(D)
    emu_imp.clear()
    got = emulate(q, k, valid, vcmp, G, DP, bs, stride, top_n, causal, scale)
    want, imps = direct(q, k, valid, vcmp, G, bs, stride, top_n, causal, scale)
    assert set(emu_imp) == set(imps), (sorted(set(imps) - set(emu_imp))[:5], sorted(set(emu_imp) - set(imps))[:5])
    for key, v in imps.items():
        assert abs(emu_imp[key] - v) < 1e-9, (key, emu_imp[key], v)
    for i in range(L):
        assert got[i] == want[i], (i, got[i], want[i])


def main():
    cases = []
    for G, tpb, causal in itertools.product((1, 2, 4, 8, 16), (1, 2, 4, 8, 16, 64), (True, False)):
        cases.append(dict(G=G, D=24 if G % 2 else 16, bs=2 * tpb, stride=2,
                          top_n=3 if G != 4 else 8, causal=causal, L=150,
                          pad=(G + tpb + causal) % 2 == 0, seed=G * 100 + tpb + 7 * causal))
    cases.append(dict(G=4, D=40, bs=16, stride=16, top_n=4, causal=True, L=1100, pad=True, seed=7))
    cases.append(dict(G=4, D=8, bs=32, stride=16, top_n=4, causal=False, L=333, pad=False, seed=8))
    cases.append(dict(G=2, D=72, bs=16, stride=8, top_n=1, causal=True, L=1, pad=False, seed=9))
    cases.append(dict(G=1, D=16, bs=16, stride=16, top_n=2, causal=False, L=17, pad=True, seed=10))
    for c in cases:
        run(**c)
        print("ok", c, flush=True)
    print(f"all {len(cases)} emulated cases match the direct computation")


if __name__ == "__main__":
    main()
