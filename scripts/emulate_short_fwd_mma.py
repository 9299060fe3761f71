"""Replays the lane / fragment index math of short_fwd_mma_kernel, short_dq_mma_kernel and
dkdv_step_mma (csrc/cuda/blossom_short.cu)
on the CPU with numpy, for one warp (16 rows) over a few 64-key chunks, and compares its
outputs with a dense masked softmax per branch. Catches wrong ldmatrix addresses, fragment
layouts and mask-bit positions without a GPU (it does not model timing, rounding to 16 bits
or the CTA's other warps).

Fragment semantics (PTX ISA, m16n8k16, 16-bit): see csrc/cuda/mma_frag.cuh.
Usage: python3 scripts/emulate_short_fwd_mma.py
"""
import numpy as np

from mma_emu import ldmatrix_pairs, mma

KH = 32  # keys per online-softmax step (kHalf)


def ldmatrix_x4(sm, offs, trans=False):
    """sm: 2-D array (rows, cols); offs[lane] = (row, col) of the 8 elements lane gives.
    Returns r[lane][j] = (lo, hi) pair of matrix j."""
    return ldmatrix_pairs([np.stack([sm[offs[8 * j + q][0], offs[8 * j + q][1]:offs[8 * j + q][1] + 8]
                                     for q in range(8)]) for j in range(4)], trans)


def emulate(D, n_chunks, rng):
    KD, ND, NH = D // 16, D // 8, KH // 8
    Q = rng.standard_normal((16, D))
    K = rng.standard_normal((64 * n_chunks, D))
    V = rng.standard_normal((64 * n_chunks, D))
    sel = rng.random((16, 64 * n_chunks)) < 0.3
    win = rng.random((16, 64 * n_chunks)) < 0.2
    sel[3] = False  # a row with no selected key: o = 0
    bits = [[[int(sum(1 << k for k in range(64) if mk[r, 64 * c + k])) for r in range(16)]
             for mk in (sel, win)] for c in range(n_chunks)]
    sl2 = 0.3
    a_off = [((l & 7) + ((l >> 3) & 1) * 8, (l >> 4) * 8) for l in range(32)]
    kb_off = [((l & 7) + (l >> 4) * 8, ((l >> 3) & 1) * 8) for l in range(32)]
    vb_off = [((l & 7) + ((l >> 3) & 1) * 8, (l >> 4) * 8) for l in range(32)]
    os_ = [[[0.0] * 4 for _ in range(ND)] for _ in range(32)]
    ow_ = [[[0.0] * 4 for _ in range(ND)] for _ in range(32)]
    ms = [[-np.inf] * 2 for _ in range(32)]
    mw = [[-np.inf] * 2 for _ in range(32)]
    ls = [[0.0] * 2 for _ in range(32)]
    lw = [[0.0] * 2 for _ in range(32)]
    for c in range(n_chunks):
        sK, sV = K[64 * c:64 * c + 64], V[64 * c:64 * c + 64]
        for hk in range(2):
            s = [[[0.0] * 4 for _ in range(NH)] for _ in range(32)]
            for kk in range(KD):
                qa = ldmatrix_x4(Q, [(r, kk * 16 + cc) for r, cc in a_off])
                for np_ in range(NH // 2):
                    bf = ldmatrix_x4(sK, [(hk * KH + np_ * 16 + r, kk * 16 + cc) for r, cc in kb_off])
                    d0 = [s[t][2 * np_] for t in range(32)]
                    d1 = [s[t][2 * np_ + 1] for t in range(32)]
                    mma(d0, qa, [bf[t][0] for t in range(32)], [bf[t][1] for t in range(32)])
                    mma(d1, qa, [bf[t][2] for t in range(32)], [bf[t][3] for t in range(32)])
            lane_state = []
            for t in range(32):
                g, tg = t // 4, t % 4
                sh = hk * KH + 2 * tg
                bsel = [(bits[c][0][g] >> sh) & 0xffffffff, (bits[c][0][g + 8] >> sh) & 0xffffffff]
                bwin = [(bits[c][1][g] >> sh) & 0xffffffff, (bits[c][1][g + 8] >> sh) & 0xffffffff]
                cs, cw = [-np.inf] * 2, [-np.inf] * 2
                for nt in range(NH):
                    for e in range(4):
                        j, bit = e >> 1, 8 * nt + (e & 1)
                        x = s[t][nt][e] * sl2
                        s[t][nt][e] = x
                        if (bsel[j] >> bit) & 1: cs[j] = max(cs[j], x)
                        if (bwin[j] >> bit) & 1: cw[j] = max(cw[j], x)
                lane_state.append((bsel, bwin, cs, cw))
            for t in range(32):  # butterflies over the 4 lanes of a row
                base = t & ~3
                for j in range(2):
                    cs = max(lane_state[base + q][2][j] for q in range(4))
                    cw = max(lane_state[base + q][3][j] for q in range(4))
                    ns, nw = max(ms[t][j], cs), max(mw[t][j], cw)
                    a_s = 1.0 if ns == -np.inf else 2.0 ** (ms[t][j] - ns)
                    a_w = 1.0 if nw == -np.inf else 2.0 ** (mw[t][j] - nw)
                    ms[t][j], mw[t][j] = ns, nw
                    ls[t][j] *= a_s
                    lw[t][j] *= a_w
                    for n in range(ND):
                        os_[t][n][2 * j] *= a_s
                        os_[t][n][2 * j + 1] *= a_s
                        ow_[t][n][2 * j] *= a_w
                        ow_[t][n][2 * j + 1] *= a_w
            for k in range(NH // 2):
                as4, aw4 = [[None] * 4 for _ in range(32)], [[None] * 4 for _ in range(32)]
                for t in range(32):
                    bsel, bwin = lane_state[t][0], lane_state[t][1]
                    for h in range(2):
                        for j in range(2):
                            bit = 8 * (2 * k + h)
                            x = s[t][2 * k + h][2 * j:2 * j + 2]
                            p = [2.0 ** (x[u] - ms[t][j]) if (bsel[j] >> (bit + u)) & 1 else 0.0 for u in range(2)]
                            w = [2.0 ** (x[u] - mw[t][j]) if (bwin[j] >> (bit + u)) & 1 else 0.0 for u in range(2)]
                            ls[t][j] += sum(p)
                            lw[t][j] += sum(w)
                            as4[t][2 * h + j] = tuple(p)
                            aw4[t][2 * h + j] = tuple(w)
                for dp in range(ND // 2):
                    vb = ldmatrix_x4(sV, [(hk * KH + k * 16 + r, dp * 16 + cc) for r, cc in vb_off], trans=True)
                    b = [[vb[t][q] for t in range(32)] for q in range(4)]
                    for acc, a in ((os_, as4), (ow_, aw4)):
                        mma([acc[t][2 * dp] for t in range(32)], a, b[0], b[1])
                        mma([acc[t][2 * dp + 1] for t in range(32)], a, b[2], b[3])
    out_s, out_w = np.zeros((16, D)), np.zeros((16, D))
    lse_s, lse_w = np.zeros(16), np.zeros(16)
    for t in range(32):
        g, tg = t // 4, t % 4
        base = t & ~3
        for j in range(2):
            L_s = sum(ls[base + q][j] for q in range(4))
            L_w = sum(lw[base + q][j] for q in range(4))
            r = g + 8 * j
            for n in range(ND):
                for u in range(2):
                    out_s[r, 8 * n + 2 * tg + u] = os_[t][n][2 * j + u] / L_s if L_s > 0 else 0
                    out_w[r, 8 * n + 2 * tg + u] = ow_[t][n][2 * j + u] / L_w if L_w > 0 else 0
            lse_s[r] = -np.inf if ms[t][j] == -np.inf else (ms[t][j] + np.log2(L_s)) * np.log(2)
            lse_w[r] = -np.inf if mw[t][j] == -np.inf else (mw[t][j] + np.log2(L_w)) * np.log(2)
    # Dense reference: scores in natural units are S * sl2 * ln 2.
    S = Q @ K.T * sl2 * np.log(2)
    err = 0.0
    for mk, o, lse in ((sel, out_s, lse_s), (win, out_w, lse_w)):
        Sm = np.where(mk, S, -np.inf)
        mx = Sm.max(1, keepdims=True)
        mx = np.where(np.isfinite(mx), mx, 0)
        P = np.where(mk, np.exp(Sm - mx), 0)
        l = P.sum(1, keepdims=True)
        ref = np.where(l > 0, (P / np.where(l > 0, l, 1)) @ V, 0)
        ref_lse = np.where(l[:, 0] > 0, mx[:, 0] + np.log(np.where(l[:, 0] > 0, l[:, 0], 1)), -np.inf)
        err = max(err, np.abs(o - ref).max())
        fin = np.isfinite(ref_lse)
        assert np.array_equal(fin, np.isfinite(lse)), "lse finiteness differs"
        err = max(err, np.abs(lse[fin] - ref_lse[fin]).max())
    return err


def emulate_dq(D, n_chunks, rng):
    KD, ND, NH = D // 16, D // 8, KH // 8
    n = 64 * n_chunks
    Q, dO = rng.standard_normal((16, D)), rng.standard_normal((16, D))
    K, V = rng.standard_normal((n, D)), rng.standard_normal((n, D))
    sel = rng.random((16, n)) < 0.3
    win = rng.random((16, n)) < 0.2
    ga, gb = rng.random(16), rng.random(16)
    dsel, dwin = rng.standard_normal(16), rng.standard_normal(16)
    l2s, l2w = rng.standard_normal(16), rng.standard_normal(16)
    sl2, scale = 0.3, 0.125
    bits = [[[int(sum(1 << k for k in range(64) if mk[r, 64 * c + k])) for r in range(16)]
             for mk in (sel, win)] for c in range(n_chunks)]
    a_off = [((l & 7) + ((l >> 3) & 1) * 8, (l >> 4) * 8) for l in range(32)]
    kb_off = [((l & 7) + (l >> 4) * 8, ((l >> 3) & 1) * 8) for l in range(32)]
    kt_off = [((l & 7) + ((l >> 3) & 1) * 8, (l >> 4) * 8) for l in range(32)]
    dq = [[[0.0] * 4 for _ in range(ND)] for _ in range(32)]
    for c in range(n_chunks):
        sK, sV = K[64 * c:64 * c + 64], V[64 * c:64 * c + 64]
        for hk in range(2):
            sc = [[[0.0] * 4 for _ in range(NH)] for _ in range(32)]
            dp = [[[0.0] * 4 for _ in range(NH)] for _ in range(32)]
            for kk in range(KD):
                qa = ldmatrix_x4(Q, [(r, kk * 16 + cc) for r, cc in a_off])
                oa = ldmatrix_x4(dO, [(r, kk * 16 + cc) for r, cc in a_off])
                for np_ in range(NH // 2):
                    rows = [(hk * KH + np_ * 16 + r, kk * 16 + cc) for r, cc in kb_off]
                    kf, vf = ldmatrix_x4(sK, rows), ldmatrix_x4(sV, rows)
                    for acc, a, f in ((sc, qa, kf), (dp, oa, vf)):
                        mma([acc[t][2 * np_] for t in range(32)], a,
                            [f[t][0] for t in range(32)], [f[t][1] for t in range(32)])
                        mma([acc[t][2 * np_ + 1] for t in range(32)], a,
                            [f[t][2] for t in range(32)], [f[t][3] for t in range(32)])
            for k in range(NH // 2):
                da = [[None] * 4 for _ in range(32)]
                for t in range(32):
                    g, tg = t // 4, t % 4
                    sh = hk * KH + 2 * tg
                    for h in range(2):
                        for j in range(2):
                            r = g + 8 * j
                            bsel = (bits[c][0][r] >> sh) & 0xffffffff
                            bwin = (bits[c][1][r] >> sh) & 0xffffffff
                            d2 = []
                            for u in range(2):
                                e, bit = 2 * j + u, 8 * (2 * k + h) + u
                                x, dpv = sc[t][2 * k + h][e] * sl2, dp[t][2 * k + h][e]
                                ds = 0.0
                                if (bsel >> bit) & 1: ds += 2.0 ** (x - l2s[r]) * (ga[r] * dpv - dsel[r])
                                if (bwin >> bit) & 1: ds += 2.0 ** (x - l2w[r]) * (gb[r] * dpv - dwin[r])
                                d2.append(ds)
                            da[t][2 * h + j] = tuple(d2)
                for dpair in range(ND // 2):
                    kb = ldmatrix_x4(sK, [(hk * KH + k * 16 + r, dpair * 16 + cc) for r, cc in kt_off], trans=True)
                    mma([dq[t][2 * dpair] for t in range(32)], da, [kb[t][0] for t in range(32)], [kb[t][1] for t in range(32)])
                    mma([dq[t][2 * dpair + 1] for t in range(32)], da, [kb[t][2] for t in range(32)], [kb[t][3] for t in range(32)])
    out = np.zeros((16, D))
    for t in range(32):
        g, tg = t // 4, t % 4
        for j in range(2):
            for nn in range(ND):
                for u in range(2):
                    out[g + 8 * j, 8 * nn + 2 * tg + u] = scale * dq[t][nn][2 * j + u]
    S = Q @ K.T * sl2
    dP = dO @ V.T
    Ps = np.where(sel, 2.0 ** (S - l2s[:, None]), 0)
    Pw = np.where(win, 2.0 ** (S - l2w[:, None]), 0)
    dS = Ps * (ga[:, None] * dP - dsel[:, None]) + Pw * (gb[:, None] * dP - dwin[:, None])
    ref = scale * dS @ K
    return np.abs(out - ref).max() / max(1.0, np.abs(ref).max())


def emulate_dkdv(D, rng):
    """One query step (64 rows) for warp 0's 16 keys of a 64-key tile."""
    KD, ND, NH = D // 16, D // 8, KH // 8
    K, V = rng.standard_normal((16, D)), rng.standard_normal((16, D))
    Q, dO = rng.standard_normal((64, D)), rng.standard_normal((64, D))
    sel = rng.random((64, 16)) < 0.3  # [row, key]
    win = rng.random((64, 16)) < 0.2
    ga, gb = rng.random(64), rng.random(64)
    dsel, dwin = rng.standard_normal(64), rng.standard_normal(64)
    l2s, l2w = rng.standard_normal(64), rng.standard_normal(64)
    sl2 = 0.3
    bs = [int(sum(1 << k for k in range(16) if sel[r, k])) for r in range(64)]
    bw = [int(sum(1 << k for k in range(16) if win[r, k])) for r in range(64)]
    a_off = [((l & 7) + ((l >> 3) & 1) * 8, (l >> 4) * 8) for l in range(32)]
    b_off = [((l & 7) + (l >> 4) * 8, ((l >> 3) & 1) * 8) for l in range(32)]
    t_off = [((l & 7) + ((l >> 3) & 1) * 8, (l >> 4) * 8) for l in range(32)]
    mk = [[[0.0] * 4 for _ in range(ND)] for _ in range(32)]
    mv = [[[0.0] * 4 for _ in range(ND)] for _ in range(32)]
    for hr in range(2):
        st = [[[0.0] * 4 for _ in range(NH)] for _ in range(32)]
        dpt = [[[0.0] * 4 for _ in range(NH)] for _ in range(32)]
        for kk in range(KD):
            ka = ldmatrix_x4(K, [(r, kk * 16 + c) for r, c in a_off])
            va = ldmatrix_x4(V, [(r, kk * 16 + c) for r, c in a_off])
            for np_ in range(NH // 2):
                rows = [(hr * KH + np_ * 16 + r, kk * 16 + c) for r, c in b_off]
                qf, of = ldmatrix_x4(Q, rows), ldmatrix_x4(dO, rows)
                for acc, a, f in ((st, ka, qf), (dpt, va, of)):
                    mma([acc[t][2 * np_] for t in range(32)], a, [f[t][0] for t in range(32)], [f[t][1] for t in range(32)])
                    mma([acc[t][2 * np_ + 1] for t in range(32)], a, [f[t][2] for t in range(32)], [f[t][3] for t in range(32)])
        for k in range(NH // 2):
            da, ca = [[None] * 4 for _ in range(32)], [[None] * 4 for _ in range(32)]
            for t in range(32):
                g, tg = t // 4, t % 4
                for h in range(2):
                    ds, pc = [0.0] * 4, [0.0] * 4
                    for u in range(2):
                        r = hr * KH + 8 * (2 * k + h) + 2 * tg + u
                        for j in range(2):
                            e, key = 2 * j + u, g + 8 * j
                            x, dp = st[t][2 * k + h][e] * sl2, dpt[t][2 * k + h][e]
                            if (bs[r] >> key) & 1:
                                ps = 2.0 ** (x - l2s[r]); ds[e] += ps * (ga[r] * dp - dsel[r]); pc[e] += ga[r] * ps
                            if (bw[r] >> key) & 1:
                                pw = 2.0 ** (x - l2w[r]); ds[e] += pw * (gb[r] * dp - dwin[r]); pc[e] += gb[r] * pw
                    da[t][2 * h], da[t][2 * h + 1] = (ds[0], ds[1]), (ds[2], ds[3])
                    ca[t][2 * h], ca[t][2 * h + 1] = (pc[0], pc[1]), (pc[2], pc[3])
            for dp2 in range(ND // 2):
                rows = [(hr * KH + k * 16 + r, dp2 * 16 + c) for r, c in t_off]
                qb, ob = ldmatrix_x4(Q, rows, trans=True), ldmatrix_x4(dO, rows, trans=True)
                for acc, a, f in ((mk, da, qb), (mv, ca, ob)):
                    mma([acc[t][2 * dp2] for t in range(32)], a, [f[t][0] for t in range(32)], [f[t][1] for t in range(32)])
                    mma([acc[t][2 * dp2 + 1] for t in range(32)], a, [f[t][2] for t in range(32)], [f[t][3] for t in range(32)])
    dK, dV = np.zeros((16, D)), np.zeros((16, D))
    for t in range(32):
        g, tg = t // 4, t % 4
        for n in range(ND):
            for e in range(4):
                key, d = g + 8 * (e >> 1), 8 * n + 2 * tg + (e & 1)
                dK[key, d], dV[key, d] = mk[t][n][e], mv[t][n][e]
    S = Q @ K.T * sl2  # [row, key]
    dP = dO @ V.T
    Ps = np.where(sel, 2.0 ** (S - l2s[:, None]), 0)
    Pw = np.where(win, 2.0 ** (S - l2w[:, None]), 0)
    dS = Ps * (ga[:, None] * dP - dsel[:, None]) + Pw * (gb[:, None] * dP - dwin[:, None])
    C = ga[:, None] * Ps + gb[:, None] * Pw
    refK, refV = dS.T @ Q, C.T @ dO
    return max(np.abs(dK - refK).max() / max(1, np.abs(refK).max()),
               np.abs(dV - refV).max() / max(1, np.abs(refV).max()))


def main() -> int:
    rng = np.random.default_rng(0)
    worst = 0.0
    for D in (16, 32, 64):
        for n_chunks in (1, 2):
            e = emulate(D, n_chunks, rng)
            print(f"D={D} chunks={n_chunks}: max |emulated - dense| = {e:.2e}")
            worst = max(worst, e)
            e = emulate_dq(D, n_chunks, rng)
            print(f"D={D} chunks={n_chunks}: dQ, max relative |emulated - dense| = {e:.2e}")
            worst = max(worst, e)
    for D in (16, 32, 64):
        e = emulate_dkdv(D, rng)
        print(f"D={D}: dK/dV step, max relative |emulated - dense| = {e:.2e}")
        worst = max(worst, e)
    ok = worst < 1e-9
    print("ok" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
